"""`python -m tools.fuzz`: the same random case on every backend.

Hypothesis draws cases: a loss or metric, the predictions' shape (rank 1 to
4, empty axes included), their dtype (float16, bfloat16, float32), where the
padding comes from (a pad value, weights, an explicit mask, the propagated
mask, `ignore_class`), the pad value, the reduction, and now and then a bad
input (a label out of range, a string pad value, float lengths, weights of the
wrong shape, NaN at padded steps). Every backend runs every case in one child
process of its own; a case passes when all backends give the same value
within the parity tolerance (`tools.parity.compare.TOLERANCES`) or raise the
same type of exception.

    python -m tools.fuzz                       # 300 cases
    python -m tools.fuzz --examples 2000 --seed 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tools.backends import backend_environment, installed_backends, run_in_own_session
from tools.parity.compare import TOLERANCES, relative_error

LOSSES = (
    "scce_logits",
    "scce_probs",
    "cce_logits",
    "bce",
    "mse",
    "mae",
    "huber",
    "accuracy",
    "perplexity",
)
SPARSE = ("scce_logits", "scce_probs", "accuracy", "perplexity")
METRICS = ("accuracy", "perplexity")
DTYPES = ("float32", "float16", "bfloat16")
SOURCES = ("none", "mask_value", "sample_weight", "mask", "propagated", "ignore_class")
REDUCTIONS = ("token_mean", "sequence_mean", "sum", "sum_over_batch_size", "none")
BAD = (
    "label_high",
    "label_negative",
    "string_mask_value",
    "float_lengths",
    "weight_shape",
    "nan_at_padding",
)
PROPAGATED_PAD = -9.0


def case_strategy():
    """The hypothesis strategy of one case (a JSON-able dict)."""
    from hypothesis import strategies as st

    @st.composite
    def case(draw):
        loss = draw(st.sampled_from(LOSSES))
        source = draw(st.sampled_from(SOURCES))
        if source == "ignore_class" and loss not in SPARSE:
            source = "mask_value"
        # Masking propagates a mask over `[batch, time, features]`.
        rank = 3 if source == "propagated" else draw(st.sampled_from((1, 2, 3, 4)))
        # An empty axis now and then; ignore_class 0 needs another class.
        steps = [draw(st.sampled_from((1, 2, 3, 1, 2, 3, 0))) for _ in range(rank - 1)]
        features = draw(st.integers(2 if source == "ignore_class" else 1, 4))
        bad = draw(st.sampled_from((None, None, None, *BAD)))
        return {
            "loss": loss,
            "shape": [*steps, features],
            "dtype": draw(st.sampled_from(DTYPES)),
            "source": source,
            "pad_choice": draw(st.integers(0, 1)),
            "per_sequence_weight": draw(st.booleans()),
            "reduction": draw(st.sampled_from(REDUCTIONS)),
            "bad": bad,
            "seed": draw(st.integers(0, 2**16)),
        }

    return case()


def generate(count: int, seed: int) -> list[dict]:
    """`count` cases drawn by hypothesis (fewer when it runs out of new ones)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    found: list[dict] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case_strategy())
    def collect(case):
        found.append(case)

    collect()
    return found


def arrays(case: dict) -> dict[str, Any]:
    """The NumPy inputs of a case: `y_true`, `y_pred` (float32), `valid` (the
    real steps), and `sample_weight` or `mask` where the source uses them."""
    rng = np.random.default_rng(case["seed"])
    shape = tuple(case["shape"])
    steps, classes = shape[:-1], shape[-1]
    loss, source = case["loss"], case["source"]
    valid = rng.random(steps) < 0.7 if source != "none" else np.ones(steps, bool)
    y_pred = (rng.normal(size=shape) * 2).astype("float32")
    labels = rng.integers(1 if source == "ignore_class" else 0, classes, size=steps)
    if loss in SPARSE:
        y_true = labels.astype("int32")
        if loss == "scce_probs":
            y_pred = (np.exp(y_pred) / np.exp(y_pred).sum(-1, keepdims=True)).astype(
                "float32"
            )
    elif loss == "cce_logits":
        y_true = np.eye(classes, dtype="float32")[labels]
    elif loss == "bce":
        y_true = rng.integers(0, 2, size=shape).astype("float32")
    else:
        y_true = rng.normal(size=shape).astype("float32")
    out = {"valid": valid}
    if source == "mask_value":
        y_true = np.where(_expand(valid, y_true), y_true, _pad(case, classes))
        y_true = y_true.astype("int32" if loss in SPARSE else "float32")
    elif source == "ignore_class":
        y_true = np.where(valid, y_true, 0).astype("int32")
    elif source == "sample_weight":
        if case["per_sequence_weight"] and steps:
            # A sequence with a padded step gets weight 0: all of it is padding.
            whole = valid.all(axis=tuple(range(1, valid.ndim)))
            weight = rng.uniform(0.5, 2.0, steps[:1]) * whole
            per_sequence = weight.reshape(steps[:1] + (1,) * (len(steps) - 1))
            out["valid"] = np.broadcast_to(per_sequence != 0, steps)
        else:
            weight = rng.uniform(0.5, 2.0, steps) * valid
        out["sample_weight"] = weight.astype("float32")
    elif source == "mask":
        out["mask"] = valid
    elif source == "propagated":
        y_pred = np.where(valid[..., None], y_pred, PROPAGATED_PAD).astype("float32")
    if case["bad"] in ("label_high", "label_negative") and loss in SPARSE:
        real = np.argwhere(out["valid"])
        if len(real):
            bad = classes + 2 if case["bad"] == "label_high" else -7
            y_true = y_true.copy()
            y_true[tuple(real[0])] = bad
    if case["bad"] == "nan_at_padding" and source != "propagated":
        y_pred = np.where(_expand(out["valid"], y_pred), y_pred, np.nan)
        y_pred = y_pred.astype("float32")
    out.update(y_true=y_true, y_pred=y_pred)
    return out


def _expand(valid, like):
    return valid.reshape(valid.shape + (1,) * (like.ndim - valid.ndim))


def _pad(case: dict, classes: int):
    """The pad value of `mask_value` cases, by kind of target."""
    if case["loss"] in SPARSE:
        return (-100, 0)[case["pad_choice"]]
    if case["loss"] == "cce_logits":
        return np.eye(classes, dtype="float32")[classes - 1]
    return (np.nan, -1.0)[case["pad_choice"]]


# --- the child: one backend, every case ----------------------------------------


def _make(case: dict, classes: int):
    import kmask

    loss, source = case["loss"], case["source"]
    options: dict[str, Any] = {}
    if source == "mask_value":
        options["mask_value"] = _pad(case, classes)
    if case["bad"] == "string_mask_value":
        options["mask_value"] = "pad"
    if source == "ignore_class" and loss != "accuracy" and loss != "perplexity":
        options["ignore_class"] = 0
    if source == "ignore_class" and loss in METRICS:
        options["mask_value"] = 0
    if loss in METRICS:
        if loss == "accuracy":
            return kmask.MaskedSparseCategoricalAccuracy(**options)
        return kmask.Perplexity(from_logits=True, **options)
    options["reduction"] = case["reduction"]
    if loss == "scce_logits":
        return kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, **options)
    if loss == "scce_probs":
        return kmask.MaskedSparseCategoricalCrossentropy(**options)
    if loss == "cce_logits":
        return kmask.MaskedCategoricalCrossentropy(from_logits=True, **options)
    if loss == "bce":
        return kmask.MaskedBinaryCrossentropy(from_logits=True, **options)
    if loss == "mse":
        return kmask.MaskedMeanSquaredError(**options)
    if loss == "mae":
        return kmask.MaskedLoss("mae", **options)
    return kmask.MaskedHuber(**options)


def run_case(case: dict, data: dict[str, np.ndarray]):
    """One case on this process's backend: a NumPy value."""
    import keras
    from keras import ops

    import kmask

    if case["bad"] == "float_lengths":
        kmask.sequence_mask(np.array([1.5, 2.0]), 3)
    y_pred = ops.cast(ops.convert_to_tensor(data["y_pred"]), case["dtype"])
    if case["source"] == "propagated":
        y_pred = keras.layers.Masking(mask_value=PROPAGATED_PAD)(y_pred)
    weight = data.get("sample_weight")
    if case["bad"] == "weight_shape":
        weight = np.ones((*data["y_pred"].shape[:-1], 5), "float32")
    loss = _make(case, data["y_pred"].shape[-1])
    if isinstance(loss, keras.metrics.Metric):
        loss.update_state(data["y_true"], y_pred, sample_weight=weight)
        value = loss.result()
    elif case["source"] == "mask":
        value = kmask.masked_loss(
            data["y_true"],
            y_pred,
            loss,
            mask=data["mask"],
            sample_weight=weight,
            reduction=case["reduction"],
        )
    else:
        value = loss(data["y_true"], y_pred, sample_weight=weight)
    return np.asarray(ops.convert_to_numpy(ops.cast(value, "float32")), "float64")


def child(workdir: Path, backend: str) -> None:
    cases = json.loads((workdir / "cases.json").read_text())
    outcomes = []
    for case in cases:
        data = {k: v for k, v in np.load(workdir / f"{case['index']}.npz").items()}
        try:
            value = run_case(case, data)
            outcomes.append({"value": np.asarray(value).tolist()})
        # A case's outcome is its exception's type, whatever it is.
        except Exception as error:
            message = str(error)[:200]
            outcomes.append({"error": type(error).__name__, "message": message})
    (workdir / f"{backend}.json").write_text(json.dumps(outcomes))


# --- the parent -----------------------------------------------------------------


def disagreements(cases: list[dict], outcomes: dict[str, list]) -> list[str]:
    """One line per case whose backends disagree."""
    found = []
    backends = list(outcomes)
    for index, case in enumerate(cases):
        results = {backend: outcomes[backend][index] for backend in backends}
        first = results[backends[0]]
        for backend in backends[1:]:
            other = results[backend]
            if "error" in first or "error" in other:
                same = first.get("error") == other.get("error")
                if "error" not in first or "error" not in other:
                    same = False
            else:
                a = np.asarray(first["value"], "float64")
                b = np.asarray(other["value"], "float64")
                same = relative_error(b, a) <= TOLERANCES[case["dtype"]]
            if not same:
                found.append(
                    f"{json.dumps(case)}\n    {backends[0]}: {first}\n"
                    f"    {backend}: {other}"
                )
                break
    return found


def run(
    count: int, seed: int, backends: list[str] | None = None
) -> tuple[int, list, dict]:
    """Draws `count` cases, runs them on every backend; `(cases run, the
    disagreements, how many ended in a value or in each exception type)`."""
    cases = generate(count, seed)
    backends = backends or installed_backends()
    outcomes = {}
    with tempfile.TemporaryDirectory(prefix="kmask-fuzz-") as directory:
        workdir = Path(directory)
        for index, case in enumerate(cases):
            case["index"] = index
            np.savez(workdir / f"{index}.npz", **arrays(case))
        (workdir / "cases.json").write_text(json.dumps(cases))
        for backend in backends:
            command = [sys.executable, "-m", "tools.fuzz", "--child", str(workdir)]
            env = backend_environment(backend, TF_CPP_MIN_LOG_LEVEL="3")
            done = run_in_own_session(command, env, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"{backend} child failed:\n{done.stderr[-3000:]}")
            outcomes[backend] = json.loads((workdir / f"{backend}.json").read_text())
    return len(cases), disagreements(cases, outcomes), _kinds(outcomes)


def _kinds(outcomes: dict[str, list]) -> dict[str, int]:
    """How the first backend's cases ended: a value, or an exception type."""
    kinds: dict[str, int] = {}
    for outcome in next(iter(outcomes.values()), []):
        kind = outcome.get("error", "value")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import keras

        child(Path(args.child), keras.backend.backend())
        return
    backends = installed_backends()
    ran, found, kinds = run(args.examples, args.seed, backends)
    print(
        f"fuzz: ran {ran} cases on {', '.join(backends)}: "
        f"{ran - len(found)} agree, {len(found)} disagree; outcomes {kinds}"
    )
    for line in found:
        print(line)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
