"""The parity harness: its NumPy references, its suite, and that it can fail.

The tests that run `python -m tools.parity` need TensorFlow, JAX and PyTorch
installed together (the `parity` nox session); where one is missing (the
one-backend test sessions) they skip. The rest is NumPy and runs anywhere.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import textwrap

import keras
import numpy as np
import pytest

import kmask
from kmask import layers, metrics
from tools.backends import BACKENDS, REPOSITORY, run_in_own_session
from tools.parity import compare, losses, references, sources, suite

MISSING_BACKENDS = [b for b in BACKENDS if importlib.util.find_spec(b) is None]
needs_all_backends = pytest.mark.skipif(
    bool(MISSING_BACKENDS),
    reason="runs the harness on tensorflow, jax and torch together (nox -s "
    f"parity); not installed here: {', '.join(MISSING_BACKENDS)}",
)
# Loss cases are named loss/source/reduction[/dtype][/jit].
LOSS_CASES = [case for case in suite.build_suite() if case.runner == "loss"]


def _parts(case):
    return case.name.split("/")


# ----------------------------------------------------------------------------
# The NumPy references.


@pytest.mark.parametrize("loss", losses.LOSSES, ids=lambda loss: loss.name)
def test_reference_gradient_matches_finite_differences(loss):
    rng = np.random.default_rng(0)
    y_true, y_pred = sources.clean(rng, loss)
    y_true = y_true.reshape(-1, *y_true.shape[2:])
    y_pred = y_pred.reshape(-1, y_pred.shape[-1]).astype("float64")
    cotangent = rng.normal(size=len(y_pred))

    def objective(x):
        return float((loss.reference(y_true, x)[0] * cotangent).sum())

    step = 1e-6
    numeric = np.zeros_like(y_pred)
    for index in np.ndindex(y_pred.shape):
        shift = np.zeros_like(y_pred)
        shift[index] = step
        numeric[index] = (objective(y_pred + shift) - objective(y_pred - shift)) / (
            2 * step
        )
    analytic = loss.reference(y_true, y_pred)[1] * cotangent[:, None]
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "loss",
    [loss for loss in losses.LOSSES if loss.keras_loss],
    ids=lambda loss: loss.name,
)
def test_reference_loss_matches_keras(loss):
    """The references against Keras's own loss functions (not kmask's)."""
    y_true, y_pred = sources.clean(np.random.default_rng(1), loss)
    expected = keras.losses.get(loss.keras_loss)(y_true, y_pred, **loss.kwargs)
    rows = y_true.reshape(-1, *y_true.shape[2:])
    actual = loss.reference(rows, y_pred.reshape(-1, y_pred.shape[-1]))[0]
    np.testing.assert_allclose(
        actual, keras.ops.convert_to_numpy(expected).reshape(-1), rtol=1e-5
    )


def test_sparse_reference_smoothing_and_z_loss():
    logits = np.array([[1.0, 2.0, 0.5]])
    labels = np.array([1])
    log_probs = logits - np.log(np.exp(logits).sum())
    smoothed = -(0.9 * log_probs[0, 1] + 0.1 * log_probs.mean())
    z_term = 0.05 * np.log(np.exp(logits).sum()) ** 2
    loss, _ = references.np_sparse_categorical(
        labels, logits, from_logits=True, label_smoothing=0.1, z_loss=0.05
    )
    np.testing.assert_allclose(loss, [smoothed + z_term], rtol=1e-12)


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [
        ("token_mean", 10 / 4),
        ("sequence_mean", 3.0),  # the means 2 and 4; the empty sequence drops out
        ("sum", 10.0),
        ("sum_over_batch_size", 10 / 4),  # Keras: over the 4 real steps
        ("none", [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
    ],
)
def test_reference_reductions(reduction, expected):
    per_step = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 9.0], [7.0, 8.0, 9.0]])
    valid = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
    value, _ = references.np_reduce(per_step, valid, None, reduction)
    np.testing.assert_allclose(value, expected)


def test_relative_error():
    assert compare.relative_error([1.0, 3.0], [1.0, 2.0]) == 0.5
    assert compare.relative_error(2e-12, 0.0) == pytest.approx(2e-6)
    assert compare.relative_error([np.nan, 1.0], [np.nan, 1.0]) == 0.0
    assert compare.relative_error([np.nan, 1.0], [0.0, 1.0]) == np.inf
    assert compare.relative_error([0.0, 1.0], [np.nan, 1.0]) == np.inf
    assert compare.relative_error([np.inf], [1.0]) == np.inf
    assert compare.relative_error([1.0, 2.0], [1.0, 2.0, 3.0]) == np.inf


# ----------------------------------------------------------------------------
# The suite.


def test_case_names_are_unique_and_inputs_fixed():
    names = [case.name for case in suite.build_suite()]
    assert len(names) == len(set(names))
    selected = suite.build_suite(["mse/", "metric/perplexity"])
    assert selected
    by_name = {case.name: case for case in suite.build_suite()}
    for case in selected:
        same = by_name[case.name]
        assert case.inputs.keys() == same.inputs.keys()
        for key, array in case.inputs.items():
            np.testing.assert_array_equal(array, same.inputs[key])


def test_every_loss_reduction_and_mask_source_pair_is_covered():
    float32 = [_parts(case) for case in LOSS_CASES if case.dtype == "float32"]
    pairs = {(loss, source, reduction) for loss, source, reduction, *_ in float32}
    names = [loss.name for loss in losses.LOSSES]
    for loss in losses.LOSSES:
        for reduction in kmask.REDUCTIONS:
            assert any(p[0] == loss.name and p[2] == reduction for p in pairs)
        for source in sources.MASK_SOURCES:
            if sources.MASK_SOURCES[source].fits(loss):
                assert any(p[:2] == (loss.name, source) for p in pairs)
        for source in sources.EDGE_SOURCES:
            assert any(p[:2] == (loss.name, source) for p in pairs)
    for source in sources.MASK_SOURCES:
        for reduction in kmask.REDUCTIONS:
            assert any(p[1:] == (source, reduction) for p in pairs), (source, reduction)
    for dtype in sources.HALF_DTYPES:
        assert {_parts(c)[0] for c in LOSS_CASES if c.dtype == dtype} == set(names)
    assert {_parts(c)[0] for c in LOSS_CASES if c.name.endswith("/jit")} == set(names)


# TFA's SequenceLoss has its own flags instead of kmask's reductions and mask
# sources; tests/test_seq2seq.py checks it against NumPy on every backend.
COMPAT_LOSSES = {"SequenceLoss"}


def test_every_public_loss_metric_and_layer_has_a_case():
    cases = suite.build_suite()
    public_losses = {
        name
        for name in kmask.__all__
        if inspect.isclass(getattr(kmask, name))
        and issubclass(getattr(kmask, name), keras.losses.Loss)
    } - COMPAT_LOSSES
    ctc_classes = {
        "MaskedCTC" for c in cases if c.runner == "ctc" and c.spec["api"] == "class"
    }
    assert {case.spec["cls"] for case in LOSS_CASES} | ctc_classes == public_losses
    assert any(case.spec["api"] == "function" for case in LOSS_CASES)  # masked_loss
    public_metrics = _public_classes(metrics, keras.metrics.Metric)
    assert {c.spec["metric"] for c in cases if c.runner == "metric"} == public_metrics
    public_layers = _public_classes(layers, keras.layers.Layer)
    assert {c.spec["layer"] for c in cases if c.runner == "layer"} == public_layers


def _public_classes(module, base) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and inspect.isclass(value)
        and issubclass(value, base)
        and value.__module__ == module.__name__
    }


# ----------------------------------------------------------------------------
# The harness itself, on all three backends.

REDUCED = ["scce_logits_ls_z/", "bce_probs/", "metric/perplexity", "layer/attach"]


def _run_harness(tmp_path, *arguments, sitecustomize=None):
    # The parent only builds inputs and compares; it runs under JAX so that a
    # sitecustomize sabotaging one backend (torch) never reaches the parent,
    # whatever KERAS_BACKEND the test session has.
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "jax"}
    if sitecustomize is not None:
        (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(sitecustomize))
        path = [str(tmp_path), environment.get("PYTHONPATH", "")]
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    report = tmp_path / "parity.json"
    completed = run_in_own_session(
        [sys.executable, "-m", "tools.parity", "--json", str(report), *arguments],
        environment,
        600,
        cwd=REPOSITORY,
    )
    results = json.loads(report.read_text()) if report.exists() else None
    return completed, results


@needs_all_backends
def test_clean_reduced_suite_passes(tmp_path):
    completed, results = _run_harness(tmp_path, "--cases", *REDUCED)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert results["passed"]
    assert set(results["backends"]) == set(BACKENDS)
    assert {case["runner"] for case in results["cases"]} == {"loss", "metric", "layer"}
    assert {case["dtype"] for case in results["cases"]} >= {"float32", "bfloat16"}
    for case in results["cases"]:
        assert set(case["errors"]) == set(BACKENDS)
        for finding in [*case["errors"].values(), *case["gaps"].values()]:
            assert finding["error"] <= case["tolerance"], case["name"]


INJECTED_ERROR = """
    import os

    if os.environ.get("KERAS_BACKEND") == "torch":
        import kmask

        _call = kmask.MaskedLoss.__call__

        def _off_by_a_thousandth(self, y_true, y_pred, sample_weight=None):
            return _call(self, y_true, y_pred, sample_weight) * 1.001

        kmask.MaskedLoss.__call__ = _off_by_a_thousandth
"""


@needs_all_backends
def test_a_thousandth_off_on_torch_fails_naming_case_and_backend(tmp_path):
    completed, results = _run_harness(
        tmp_path, "--cases", *REDUCED, sitecustomize=INJECTED_ERROR
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert not results["passed"]
    assert "FAIL" in completed.stdout
    off = [
        case
        for case in results["cases"]
        if case["runner"] == "loss"
        and case["spec"]["api"] == "call"
        and case["dtype"] == "float32"
        and np.any(np.asarray(case["values"]["value"]["numpy"], float) != 0)
    ]
    assert len(off) > 10
    for case in off:
        torch = case["errors"]["torch"]
        assert torch["error"] == pytest.approx(1e-3, rel=0.01), case["name"]
        assert case["errors"]["jax"]["error"] <= case["tolerance"]
        assert case["errors"]["tensorflow"]["error"] <= case["tolerance"]
        message = (
            f"{case['name']}: torch {torch['output']}"
            + "".join(f"[{i}]" for i in torch["index"])
            + f" = {torch['got']!r}, NumPy float64 reference = {torch['expected']!r}"
        )
        assert any(failure.startswith(message) for failure in results["failures"])
    assert all("torch" in failure for failure in results["failures"])
    assert f"FAIL {results['failures'][0]}" in completed.stdout


@needs_all_backends
def test_a_backend_that_cannot_run_fails_the_run(tmp_path):
    completed, results = _run_harness(
        tmp_path,
        "--cases",
        "mse/lengths_post/",
        # `site` reports and swallows an exception raised here; a module set
        # to None fails every import of it instead.
        sitecustomize="""
            import os
            import sys

            if os.environ.get("KERAS_BACKEND") == "torch":
                sys.modules["torch"] = None
        """,
    )
    assert completed.returncode == 1
    assert "torch: the child exited with status 1" in results["failures"]
    assert "ModuleNotFoundError" in results["backends"]["torch"]["log"]


PER_REPLICA_DENOMINATOR = """
    import os

    if os.environ.get("KERAS_BACKEND") == "torch":
        import kmask

        kmask.reduce.global_denominator = lambda local: local
"""


@needs_all_backends
def test_a_per_replica_token_mean_fails_the_device_cases(tmp_path):
    """With each DDP process dividing by its own token count (what Keras's
    built-in losses do), torch's two-device cases fail, against NumPy and
    against its own one-device run; the single-process setups still pass."""
    completed, results = _run_harness(
        tmp_path, "--cases", "devices/", sitecustomize=PER_REPLICA_DENOMINATOR
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr
    failed = {
        case["name"]
        for case in results["cases"]
        for backend, finding in case["errors"].items()
        if finding["error"] > case["tolerance"] and backend == "torch"
    }
    assert failed == {
        "devices/two_devices/propagated_mask",
        "devices/two_devices/mask_value_nan",
    }
    for case in results["cases"]:
        if case["name"] in failed:
            assert case["errors"]["torch"]["error"] > 1e-2
            assert case["errors"]["jax"]["error"] <= case["tolerance"]
    gaps = results["one_device_gaps"]["torch"]
    assert gaps["DDP, 2 gloo processes"] > 1e-2
    assert gaps["gradient_accumulation_steps=2"] <= 1e-5
    assert any(
        "torch (DDP, 2 gloo processes) weights differ from its one-device run" in f
        for f in results["failures"]
    )
