"""The training-mode matrix: one registry of kmask's public losses, metrics,
mask layers and head, each trained in every mode Keras offers on a backend.

A cell is an object of `REGISTRY` in one of `MODES`. It builds a tiny model
around the object (batch 4, time 5, at most 16 classes, hidden 8), fits it
for 2 steps, checks that the weights are finite, and checks `evaluate`
against an independent NumPy reference computed in float64 from the model's
own outputs (`predict`), never from kmask. `resume` also checks the weights
after a `.keras` save, reload and one more epoch against a run that never
stopped; `model_parallel` (JAX, 8 CPU devices) the weights against the same
run on one device. The models, data and NumPy references are in
tools/modes_tasks.py.

A new public class joins the matrix by joining `REGISTRY` (or `EXCLUDED`,
with a reason): tests/test_modes.py fails for a public loss, metric or layer
of `kmask.__all__` in neither.

    python -m tools.modes_table --backend jax     # the Markdown table
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tools.modes_tasks import (
    BATCH,
    SEED,
    Task,
    binary_loss,
    categorical_loss,
    categorical_metric,
    ctc_loss,
    distiller_task,
    head_task,
    mask_layer_task,
    np_accuracy,
    np_sequence_accuracy,
    perplexity_metric,
    regression_loss,
    sequence_loss,
    sparse_loss,
    sparse_metric,
    wrapper_metric,
)
from tools.parity.references import np_absolute, np_huber, np_squared

MODES = (
    "eager",
    "jit_compile",
    "steps_per_execution",
    "mixed_float16",
    "mixed_bfloat16",
    "resume",
    "model_parallel",
)
# Keras's own limits, not kmask's: these cells are reported, never run.
UNSUPPORTED = {
    ("torch", "steps_per_execution"): (
        "Keras's torch trainer raises `steps_per_execution` must be 1 with "
        "the PyTorch backend"
    ),
    ("tensorflow", "model_parallel"): (
        "keras.distribution is implemented for JAX; its TensorFlow backend is a "
        "DTensor prototype marked DO NOT USE"
    ),
    ("torch", "model_parallel"): "keras.distribution has no PyTorch backend",
}
COMPILE_OPTIONS = {
    "eager": {"run_eagerly": True},
    "jit_compile": {"jit_compile": True},
    "steps_per_execution": {"steps_per_execution": 2},
}
POLICIES = {"mixed_float16": "mixed_float16", "mixed_bfloat16": "mixed_bfloat16"}
# float32 cells: the model's outputs are float32 and the reference float64.
# Half cells: the reference starts from the model's own half outputs (cast
# to float64), but kmask and Keras reduce them in float32 while an
# intermediate such as a softmax or the head's logits stays in float16 or
# bfloat16 (8 bits of mantissa): a relative 1e-2 covers that rounding.
TOLERANCE = {"float32": 1e-4, "half": 1e-2}
WEIGHT_TOLERANCE = 1e-5  # resume and model_parallel: the same steps, same order
MESH = (2, 4)  # (data, model) over 8 CPU devices


def unsupported(backend: str, mode: str) -> str | None:
    """Why Keras does not run `mode` on `backend`, or `None`."""
    return UNSUPPORTED.get((backend, mode))


@dataclass(frozen=True)
class Entry:
    """One public object of kmask and how to build its model."""

    name: str
    build: Callable[[], Task]


REGISTRY = (
    Entry("MaskedLoss", regression_loss("MaskedLoss", np_squared, "mse")),
    Entry(
        "MaskedSparseCategoricalCrossentropy",
        sparse_loss("MaskedSparseCategoricalCrossentropy"),
    ),
    Entry("MaskedCategoricalCrossentropy", categorical_loss),
    Entry("MaskedBinaryCrossentropy", binary_loss),
    *(
        Entry(name, regression_loss(name, reference))
        for name, reference in (
            ("MaskedMeanSquaredError", np_squared),
            ("MaskedMeanAbsoluteError", np_absolute),
            ("MaskedHuber", np_huber),
        )
    ),
    Entry("MaskedCTC", ctc_loss),
    Entry("SequenceLoss", sequence_loss),
    Entry(
        "MaskedSparseCategoricalAccuracy",
        sparse_metric("MaskedSparseCategoricalAccuracy", np_accuracy, copy_argmax=True),
    ),
    Entry("MaskedCategoricalAccuracy", categorical_metric),
    Entry(
        "MaskedSequenceAccuracy",
        sparse_metric("MaskedSequenceAccuracy", np_sequence_accuracy, copy_argmax=True),
    ),
    Entry("MaskedMeanMetricWrapper", wrapper_metric),
    Entry("Perplexity", perplexity_metric),
    Entry("HeadAccuracy", lambda: head_task("HeadAccuracy")),
    Entry("HeadPerplexity", lambda: head_task("HeadPerplexity")),
    Entry("AttachMask", lambda: mask_layer_task("AttachMask")),
    Entry("LengthMask", lambda: mask_layer_task("LengthMask")),
    Entry("ValueMask", lambda: mask_layer_task("ValueMask")),
    Entry("FusedLinearCrossentropy", lambda: head_task(None)),
    Entry("MaskedDistiller", distiller_task),
)
# Public Keras objects of kmask.__all__ that the matrix leaves out, and why.
EXCLUDED: dict[str, str] = {}


# ---------------------------------------------------------------- cells


@contextlib.contextmanager
def dtype_policy(name: str | None):
    """The global dtype policy `name` inside, the previous one restored
    after, also when the cell fails."""
    import keras

    previous = keras.config.dtype_policy()
    if name is not None:
        keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _compiled(entry: Entry, mode: str):
    """A fresh task of `entry`, its model compiled for `mode`."""
    import keras

    keras.utils.set_random_seed(SEED)
    task = entry.build()
    task.model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        **task.compile,
        **COMPILE_OPTIONS.get(mode, {}),
    )
    return task


def _fit(task: Task, epochs: int = 1) -> None:
    x, y, weights = task.data
    task.model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    )


def _weights(model) -> list[np.ndarray]:
    return [np.asarray(w, "float64") for w in model.get_weights()]


def check_finite(model) -> None:
    for variable, value in zip(model.weights, _weights(model), strict=True):
        assert np.isfinite(value).all(), f"{variable.path} is not finite: {value}"


def check_evaluate(task: Task, half: bool) -> dict[str, float]:
    """`evaluate` against the NumPy reference: the logged values."""
    (x, y, weights), expected = task.expected(task.model)
    logged = task.model.evaluate(
        x, y, sample_weight=weights, batch_size=BATCH, verbose=0, return_dict=True
    )
    rtol = TOLERANCE["half" if half else "float32"]
    for name, value in expected.items():
        found = float(logged[name])
        assert abs(found - value) <= rtol * max(abs(value), 1e-6), (
            f"evaluate logged {name}={found!r}, NumPy expects {value!r} (rtol {rtol})"
        )
    return {name: float(logged[name]) for name in expected}


def check_same_weights(found, expected, what: str) -> float:
    gap = max(
        float(np.max(np.abs(a - b), initial=0.0))
        for a, b in zip(found, expected, strict=True)
    )
    assert gap <= WEIGHT_TOLERANCE, f"{what}: the weights differ by {gap}"
    return gap


def run_cell(entry: Entry, mode: str, folder: str) -> dict[str, Any]:
    """Runs one cell in this process; raises `AssertionError` where a check
    fails. Returns what it measured. `model_parallel` needs JAX with 8 CPU
    devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`)."""
    import keras

    reason = unsupported(keras.backend.backend(), mode)
    if reason:
        raise ValueError(f"{entry.name}-{mode} is not supported by Keras: {reason}")
    with dtype_policy(POLICIES.get(mode)):
        if mode == "resume":
            return _resume(entry, folder)
        if mode == "model_parallel":
            return _model_parallel(entry)
        task = _compiled(entry, mode)
        _fit(task)
        check_finite(task.model)
        return {"logged": check_evaluate(task, half=mode in POLICIES)}


def _resume(entry: Entry, folder: str) -> dict[str, Any]:
    """Fits 1 epoch, saves, then fits 1 more epoch twice: in the model that
    never stopped, and in the one loaded from the file (Adam's moments and
    step must come from it). Both must end with the same weights."""
    import keras

    task = _compiled(entry, "resume")
    _fit(task)
    path = os.path.join(folder, f"{entry.name}.keras")
    task.model.save(path)
    _fit(task)
    reloaded = keras.saving.load_model(path)
    resumed = Task(reloaded, task.compile, task.data, task.expected)
    _fit(resumed)
    check_finite(reloaded)
    gap = check_same_weights(
        _weights(reloaded), _weights(task.model), "resumed against uninterrupted"
    )
    return {"logged": check_evaluate(resumed, half=False), "weight gap": gap}


def model_parallel_scope():
    """`ModelParallel` on a (data 2, model 4) mesh: the vocabulary (or class)
    axis of every Dense kernel, of the embedding and of the head's kernel on
    the model axis, the batch on the data axis."""
    import keras

    devices = keras.distribution.list_devices("cpu")
    if len(devices) < MESH[0] * MESH[1]:
        raise RuntimeError(
            f"JAX sees {len(devices)} CPU devices: set XLA_FLAGS="
            "--xla_force_host_platform_device_count=8 before importing it"
        )
    mesh = keras.distribution.DeviceMesh(MESH, ("data", "model"), devices[:8])
    layout = keras.distribution.LayoutMap(mesh)
    layout["dense/kernel"] = (None, "model")
    layout["embedding/embeddings"] = ("model", None)
    layout["head/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="data")


def _model_parallel(entry: Entry) -> dict[str, Any]:
    """The same fit on one device and sharded; the weights must agree and
    the sharded `evaluate` must match NumPy."""
    one_device = _compiled(entry, "model_parallel")
    initial = one_device.model.get_weights()
    _fit(one_device)
    distribution = model_parallel_scope()
    with distribution.scope():
        sharded = _compiled(entry, "model_parallel")
        sharded.model.set_weights(initial)
        _fit(sharded)
        check_finite(sharded.model)
        logged = check_evaluate(sharded, half=False)
        specs = {
            variable.path: str(variable.value.sharding.spec)
            for variable in sharded.model.weights
        }
    gap = check_same_weights(
        _weights(sharded.model),
        _weights(one_device.model),
        "sharded against one device",
    )
    return {"logged": logged, "weight gap": gap, "sharding": specs}
