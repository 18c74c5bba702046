"""The figures of the documentation site, written to `docs/figures/`.

    python tools/figures.py --bench-ce bench_masked_ce.json \\
        --bench-fused bench_fused_linear.json      # what `nox -s figures` runs

Each figure comes from a measurement, never from typed numbers:

- `seed_training.png`: the seed model (`examples/seed_seq2seq.py`) trained
  from the same NumPy weights with Keras's built-in loss and with
  `kmask.MaskedCategoricalCrossentropy(mask_value=[0, 0, 1])`, on a small
  data set of the seed's task (left-padded strings of a and b, copied): the
  cross-entropy and the accuracy over the real steps of held-out sequences,
  computed in NumPy after each epoch.
- `speed.png`: forward + backward time per backend, kmask beside Keras and
  the native loss, read from the JSON `benchmarks/masked_ce.py --json` writes.
- `memory.png`: the memory of the same runs: the compiled temporary memory
  on JAX from that JSON, and the step memory of the large-vocabulary head
  against `Dense` + the masked loss per backend from the JSON
  `benchmarks/fused_linear.py --json` writes (when given).
- `memory_vs_tokens.png`: the large-vocabulary head against `Dense` + the
  masked loss as batch x time grows, as the compiled temporary memory XLA
  reports on JAX (`memory_analysis()`: compiled, never run, so it is cheap).

Runs under JAX whatever `KERAS_BACKEND` says, so that the training figure is
the same from run to run (fixed seeds, one backend).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
OUT = REPOSITORY / "docs" / "figures"
SEED_EPOCHS = 40
TOKENS = (1024, 2048, 4096, 8192, 16384)
HIDDEN, VOCABULARY, CHUNK = 512, 32768, 256
COLORS = {"kmask": "tab:red", "keras": "tab:blue", "native": "tab:gray"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _seed_data(count: int, rng):
    """Left-padded strings of a and b (1 to 5 characters), one-hot over
    (a, b, #); the targets copy the input, with the pad step `[0, 0, 1]`."""
    import numpy as np

    lengths = rng.integers(1, 6, count)
    letters = rng.integers(0, 2, (count, 5))
    real = np.arange(5)[None, :] >= (5 - lengths)[:, None]
    x = np.where(real[..., None], np.eye(3)[letters], 0.0).astype("float32")
    y = np.where(real[..., None], np.eye(3)[letters], np.eye(3)[2]).astype("float32")
    return x, y, real


def seed_training(path: Path) -> None:
    import keras
    import numpy as np

    sys.path.insert(0, str(REPOSITORY / "examples"))
    from seed_seq2seq import PAD_VECTOR, build_seed_model

    import kmask

    rng = np.random.default_rng(0)
    x, y, _ = _seed_data(512, rng)
    x_test, y_test, real_test = _seed_data(256, rng)

    def real_step_metrics(model):
        probs = np.clip(model.predict(x_test, verbose=0).astype("float64"), 1e-7, 1)
        cross_entropy = -(y_test * np.log(probs)).sum(-1)[real_test].mean()
        correct = probs.argmax(-1) == y_test.argmax(-1)
        return cross_entropy, correct[real_test].mean()

    curves = {}
    losses = {
        "Keras built-in loss": "categorical_crossentropy",
        "kmask mask_value=[0, 0, 1]": kmask.MaskedCategoricalCrossentropy(
            mask_value=PAD_VECTOR
        ),
    }
    for name, loss in losses.items():
        keras.utils.set_random_seed(0)
        model = build_seed_model()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss)
        points = [real_step_metrics(model)]
        for _ in range(SEED_EPOCHS):
            model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
            points.append(real_step_metrics(model))
        curves[name] = np.array(points)
        print(f"{name}: real-step CE {points[-1][0]:.4f}, accuracy {points[-1][1]:.4f}")

    pyplot = _pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(9, 3.6))
    for (name, points), color in zip(
        curves.items(), ("tab:blue", "tab:red"), strict=True
    ):
        left.plot(points[:, 0], label=name, color=color)
        right.plot(points[:, 1], label=name, color=color)
    left.set(xlabel="epoch", ylabel="cross-entropy, real steps", title="Loss")
    right.set(xlabel="epoch", ylabel="accuracy, real steps", title="Accuracy")
    right.legend(loc="lower right")
    figure.suptitle(
        f"The seed model, Keras {keras.__version__}, JAX (held-out real steps)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def speed(report: dict, path: Path) -> None:
    backends = [b for b in ("tensorflow", "jax", "torch") if b in report]
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(
        1, len(backends), figsize=(4 * len(backends), 3.8), squeeze=False
    )
    for axis, backend in zip(axes[0], backends, strict=True):
        results = report[backend]["results"]
        cases = list(results)
        width = 0.27
        for offset, variant in enumerate(("kmask", "keras", "native")):
            times = [results[c]["timings"][variant]["median_ms"] for c in cases]
            positions = [i + (offset - 1) * width for i in range(len(cases))]
            axis.bar(positions, times, width, label=variant, color=COLORS[variant])
        axis.set_yscale("log")
        axis.set_xticks(range(len(cases)))
        axis.set_xticklabels([c.replace("/", "\n") for c in cases], fontsize=7)
        axis.set_title(f"{backend} {report[backend]['version']}")
        axis.set_ylabel("forward + backward, ms (log)")
    axes[0][0].legend()
    figure.suptitle(f"Masked loss speed, {report.get('machine', '')}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def memory(ce_report: dict, fused_report: dict | None, path: Path) -> None:
    pyplot = _pyplot()
    panels = 2 if fused_report else 1
    figure, axes = pyplot.subplots(
        1, panels, figsize=(5.5 * panels, 3.8), squeeze=False
    )
    axis = axes[0][0]
    results = ce_report["jax"]["results"]
    cases = list(results)
    width = 0.27
    for offset, variant in enumerate(("kmask", "keras", "native")):
        mib = [results[c]["jax_temp_bytes"][variant] / 2**20 for c in cases]
        positions = [i + (offset - 1) * width for i in range(len(cases))]
        axis.bar(positions, mib, width, label=variant, color=COLORS[variant])
    axis.set_yscale("symlog", linthresh=1)
    axis.set_xticks(range(len(cases)))
    axis.set_xticklabels([c.replace("/", "\n") for c in cases], fontsize=7)
    axis.set_ylabel("JAX compiled temporary memory, MiB")
    axis.set_title("Masked losses on JAX")
    axis.legend()
    if fused_report:
        axis = axes[0][1]
        backends = [b for b in ("tensorflow", "jax", "torch") if b in fused_report]
        for offset, (variant, color) in enumerate(
            (("materialised", "tab:blue"), ("chunked", "tab:red"))
        ):
            mib = [fused_report[b][variant]["step_mib"] for b in backends]
            positions = [i + (offset - 0.5) * 0.4 for i in range(len(backends))]
            label = (
                "Dense + masked CE" if variant == "materialised" else "kmask chunked"
            )
            axis.bar(positions, mib, 0.4, label=label, color=color)
        axis.set_xticks(range(len(backends)))
        axis.set_xticklabels(backends)
        axis.set_ylabel("memory the step adds, MiB")
        shape = fused_report.get("shape", {})
        axis.set_title(
            "Large-vocabulary head, "
            + ", ".join(f"{key} {value}" for key, value in shape.items()),
            fontsize=8,
        )
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def memory_vs_tokens(path: Path) -> None:
    import jax

    sys.path.insert(0, str(REPOSITORY / "benchmarks"))
    from fused_linear import _loss_fn

    from tools.backends import value_and_grad

    rows = []
    for tokens in TOKENS:
        specs = (
            jax.ShapeDtypeStruct((1, tokens, HIDDEN), "float32"),
            jax.ShapeDtypeStruct((HIDDEN, VOCABULARY), "float32"),
            jax.ShapeDtypeStruct((VOCABULARY,), "float32"),
            jax.ShapeDtypeStruct((1, tokens), "int32"),
        )
        row = {"tokens": tokens}
        for variant in ("materialised", "chunked"):
            step = value_and_grad(_loss_fn(variant, CHUNK), argnums=(0, 1, 2), jit=True)
            analysis = step.lower(*specs).compile().memory_analysis()
            row[variant] = analysis.temp_size_in_bytes / 2**20
        print(
            f"batch x time {tokens}: materialised {row['materialised']:.0f} MiB, "
            f"chunked {row['chunked']:.0f} MiB"
        )
        rows.append(row)

    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(6, 3.8))
    tokens = [row["tokens"] for row in rows]
    axis.plot(
        tokens, [r["materialised"] for r in rows], "o-", label="Dense + masked CE"
    )
    axis.plot(
        tokens,
        [r["chunked"] for r in rows],
        "o-",
        color="tab:red",
        label="kmask chunked",
    )
    axis.set_xscale("log", base=2)
    axis.set_yscale("log", base=2)
    axis.set(
        xlabel="batch x time (tokens)",
        ylabel="JAX compiled temporary memory, MiB",
        title=f"hidden {HIDDEN}, vocabulary {VOCABULARY}, chunk {CHUNK}, JAX "
        f"{jax.__version__}",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-ce", type=Path, help="bench_masked_ce.json")
    parser.add_argument("--bench-fused", type=Path, help="bench_fused_linear.json")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("seed", "speed", "memory", "tokens"),
        default=("seed", "speed", "memory", "tokens"),
    )
    args = parser.parse_args(argv)
    # Set here, not at import: pytest imports this module for its doctests.
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, str(REPOSITORY))
    OUT.mkdir(parents=True, exist_ok=True)

    def load(path: Path | None) -> dict | None:
        if path is None or not path.exists():
            if path is not None:
                print(f"{path} not found: its figure is left as it is")
            return None
        return json.loads(path.read_text())

    ce_report, fused_report = load(args.bench_ce), load(args.bench_fused)
    if "seed" in args.only:
        seed_training(OUT / "seed_training.png")
    if "speed" in args.only and ce_report:
        speed(ce_report, OUT / "speed.png")
    if "memory" in args.only and ce_report:
        memory(ce_report, fused_report, OUT / "memory.png")
    if "tokens" in args.only:
        memory_vs_tokens(OUT / "memory_vs_tokens.png")
    print(f"figures in {OUT.relative_to(REPOSITORY)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
