"""`python -m kmask.parity`: the same numbers on TensorFlow, JAX and PyTorch.

Run it where the backends are installed (`nox -s parity` installs all three,
runs it, then its tests):

    python -m kmask.parity                         # every installed backend
    python -m kmask.parity --json parity.json      # and write the full results
    python -m kmask.parity --backends jax torch --cases scce_logits/ layer/
    python -m kmask.parity --list                  # the case names, nothing run

The parent process builds one fixed suite of cases from `SEED` with NumPy and
writes their inputs to a temporary `.npz`. Each backend then runs the whole
suite in a child process of its own (`sys.executable -m kmask.parity`, the
parent's environment with only `KERAS_BACKEND` changed) and calls the public
API as a user does: a kmask loss as Keras calls it,
`loss(y_true, y_pred, sample_weight)`, with a propagated mask put on `y_pred`
by `keras.layers.Masking`; `kmask.masked_loss` for explicit masks; metrics
through `update_state`/`result` over two batches; layers in front of a loss.
It records each loss value and its gradient with respect to `y_pred` (the
backend's autodiff), on whatever device the backend sees. The parent compares
every output with a float64 NumPy reference and every backend with every
other, prints a table (one row per case; per backend the worst error against
NumPy, then the worst backend-to-backend gap) and exits with status 1, naming
the case, the backend and both values, when any output is off tolerance.

How far off is an output `x` from a reference `r` (`relative_error`)?
`max_i |x_i - r_i| / max(max_i |r_i|, ERROR_FLOOR)`: the largest deviation
against the largest reference magnitude, so a scalar gets its relative error,
with an absolute floor of `ERROR_FLOOR` = 1e-6 for values near 0. NaN must
meet NaN. The reference is first rounded to the dtype the backend returned the
output in: a bfloat16 gradient keeps 8 significant bits, and its own rounding
(up to 2**-8 = 3.9e-3 relative) is no error of the computation; against the
unrounded reference bfloat16 gradients show up to 3.5e-3, float16 ones 4.6e-4.
The gap between two backends is the same measure with the other backend in
place of `r` (scaled by the reference). Both must stay within
`TOLERANCES[dtype]`, `dtype` being the precision of the case's inputs.

The suite is a covering design, not the full product: every loss with every
reduction, every loss with every mask source that applies to its targets,
every mask source with every reduction (`_covering_families`); every loss in
float16 and bfloat16; every loss on all-padding, no-padding and one-token
batches; every loss compiled (`jax.jit`, `tf.function`; torch runs eagerly);
then the metrics, the layers, and the fused cross-entropy of `kmask.fused`
(its gradients with respect to the logits, or to the hidden states, kernel
and bias of the chunked linear one). The `devices/` cases check devices as
well as backends: a few SGD steps of a masked model on one device, on two
(TensorFlow `MirroredStrategy` on 2 logical CPUs, JAX `DataParallel` on 2 CPU
devices, PyTorch DDP in 2 `gloo` processes) and with gradient accumulation,
each against NumPy's full-batch weights and, per backend, the two-device
weights against the one-device ones (`kmask/parity_devices.py`; each
backend's child runs them in a process of its own with 2 devices set up).
A case's inputs come from a generator seeded with `SEED` and its name, so
they do not depend on which cases run.

To add cases, write a function that returns a list of `Case`s and decorate it
with `@_family`; `_loss_case`, `_metric_case`, `_layer_case` and `_fused_case`
build a case and its NumPy reference. A new way of calling the API is a runner
in `_RUNNERS`: `(spec, inputs) -> outputs`, run in the child.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from itertools import combinations
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

import kmask

SEED = 3
BACKENDS = ("tensorflow", "jax", "torch")
# The one place the tolerances live: the largest `relative_error` an output
# may show, against NumPy and between backends, by the precision of the
# case's inputs.
TOLERANCES = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-3}
ERROR_FLOOR = 1e-6
HALF_DTYPES = ("float16", "bfloat16")

BATCH, STEPS, CLASSES, FEATURES = 4, 7, 5, 3
# keras.backend.epsilon(): Keras clips probabilities to [EPSILON, 1 - EPSILON].
EPSILON = 1e-7
NAN = float("nan")
_PROGRESS = "kmask-parity-progress"


@dataclass
class Case:
    """One parity check: what a child process runs and what NumPy expects.

    Args:
        name: Unique, `/`-separated, e.g. `"mse/nan_targets/sum/bfloat16"`.
        runner: Which of `_RUNNERS` runs it: `"loss"`, `"metric"`, `"layer"`.
        spec: JSON-able description of the API call (class names, arguments).
        inputs: The arrays the child turns into tensors. Those named in
            `spec["half"]` hold values already rounded to `dtype`.
        expected: The float64 NumPy reference of each output of the runner.
        dtype: The precision of the inputs; it picks the tolerance.

    Example:

    >>> from kmask.parity import build_suite
    >>> cases = build_suite(["layer/length"])
    >>> [case.name for case in cases]
    ['layer/length_post/mse/token_mean',
     'layer/length_pre/scce_logits/sequence_mean',
     'layer/length_post/bce_logits_ls/sum/bfloat16']
    >>> sorted(cases[0].expected)
    ['grad', 'mask', 'output', 'value']
    """

    name: str
    runner: str
    spec: dict[str, Any]
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    dtype: str = "float32"


def relative_error(actual: Any, reference: Any, scale: Any = None) -> float:
    """How far `actual` is from `reference`, the measure every check uses.

    Args:
        actual: A scalar or an array.
        reference: The same shape. NaN in it must meet NaN in `actual`.
        scale: What the deviation is measured against; defaults to
            `reference` (the gap between two backends passes the reference).

    Returns:
        `max_i |actual_i - reference_i| / max(max_i |scale_i|, ERROR_FLOOR)`
        over the non-NaN entries; `inf` when shapes or NaNs disagree or
        `actual` is infinite where `reference` is not.

    Example:

    >>> from kmask.parity import relative_error
    >>> round(relative_error([1.0, 2.002], [1.0, 2.0]), 6)
    0.001
    >>> round(relative_error(1e-9, 0.0), 6)  # near 0, against the 1e-6 floor
    0.001
    >>> relative_error([float("nan"), 1.0], [float("nan"), 1.0])
    0.0
    """
    return _deviation(actual, reference, scale)[0]


# ----------------------------------------------------------------------------
# NumPy references, float64. A per-step reference takes the real steps as rows
# (`y_true[valid]`, `y_pred[valid]`) and returns the per-step loss and its
# gradient with respect to the row of `y_pred`.


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_categorical(y_true, y_pred, from_logits=False, label_smoothing=0.0):
    target = y_true * (1 - label_smoothing) + label_smoothing / y_pred.shape[-1]
    if from_logits:
        log_probs = _np_log_softmax(y_pred)
        grad = np.exp(log_probs) * target.sum(-1, keepdims=True) - target
        return -(target * log_probs).sum(-1), grad
    total = y_pred.sum(-1, keepdims=True)
    probs = y_pred / total
    clipped = np.clip(probs, EPSILON, 1 - EPSILON)
    d_probs = np.where(probs == clipped, -target / clipped, 0.0)
    grad = (d_probs - (d_probs * probs).sum(-1, keepdims=True)) / total
    return -(target * np.log(clipped)).sum(-1), grad


def _np_sparse_categorical(
    labels, y_pred, from_logits=False, label_smoothing=0.0, z_loss=0.0
):
    one_hot = np.eye(y_pred.shape[-1])[labels.astype(int)]
    loss, grad = _np_categorical(one_hot, y_pred, from_logits, label_smoothing)
    if z_loss:
        log_normalizer = (y_pred - _np_log_softmax(y_pred))[..., 0]
        loss = loss + z_loss * log_normalizer**2
        grad = grad + 2 * z_loss * log_normalizer[..., None] * np.exp(
            _np_log_softmax(y_pred)
        )
    return loss, grad


def _np_binary(y_true, y_pred, from_logits=False, label_smoothing=0.0):
    target = y_true * (1 - label_smoothing) + 0.5 * label_smoothing
    features = y_pred.shape[-1]
    if from_logits:
        loss = np.logaddexp(0.0, y_pred) - target * y_pred
        grad = 1 / (1 + np.exp(-y_pred)) - target
        return loss.mean(-1), grad / features
    clipped = np.clip(y_pred, EPSILON, 1 - EPSILON)
    loss = -(target * np.log(clipped) + (1 - target) * np.log(1 - clipped))
    grad = np.where(
        y_pred == clipped, -target / clipped + (1 - target) / (1 - clipped), 0.0
    )
    return loss.mean(-1), grad / features


def _np_squared(y_true, y_pred):
    error = y_pred - y_true
    return (error**2).mean(-1), 2 * error / error.shape[-1]


def _np_absolute(y_true, y_pred):
    error = y_pred - y_true
    return np.abs(error).mean(-1), np.sign(error) / error.shape[-1]


def _np_huber(y_true, y_pred, delta=1.0):
    error = y_pred - y_true
    small = np.abs(error) <= delta
    loss = np.where(small, 0.5 * error**2, delta * np.abs(error) - 0.5 * delta**2)
    grad = np.where(small, error, delta * np.sign(error))
    return loss.mean(-1), grad / error.shape[-1]


def _np_step_weight(weight, shape) -> np.ndarray:
    """A `[batch]` or `[batch, time, ...]` weight (ones when `None`) per step
    of `shape`."""
    if weight is None:
        return np.ones(shape)
    weight = np.asarray(weight, "float64")
    return np.broadcast_to(
        weight.reshape(weight.shape + (1,) * (len(shape) - weight.ndim)), shape
    )


def _np_reduce(per_step, valid, weight, reduction):
    """The reduction of `kmask.reduce` and `d result / d per_step`; for
    `"none"` the derivative is that of the sum of the per-step results."""
    weight = _np_step_weight(weight, per_step.shape)
    used = valid & (weight != 0)
    used_weight = np.where(used, weight, 0.0)
    if reduction == "none":
        return np.where(used, per_step * weight, 0.0), used_weight
    if reduction == "sum":
        coefficient = used_weight
    elif reduction == "sum_over_batch_size":
        coefficient = used_weight / per_step.size
    elif reduction == "token_mean":
        coefficient = _np_normalized(used_weight)
    else:
        steps = used.sum(1, keepdims=True)
        per_sequence = np.where(steps > 0, 1.0 / np.maximum(steps, 1), 0.0)
        coefficient = _np_normalized(used_weight * per_sequence)
    return np.where(used, coefficient * per_step, 0.0).sum(), coefficient


def _np_normalized(weight):
    total = weight.sum()
    return weight / total if total else np.zeros_like(weight)


def _np_sequence_mask(lengths, steps: int, padding: str) -> np.ndarray:
    positions = np.arange(steps)[None, :]
    lengths = np.asarray(lengths)[:, None]
    return positions < lengths if padding == "post" else positions >= steps - lengths


def _np_masked_loss(loss, y_true, y_pred, valid, weight, reduction):
    """The value and gradient of a masked loss, from the real steps only."""
    as_float = partial(np.asarray, dtype="float64")
    y_pred = as_float(y_pred)
    used = valid & (_np_step_weight(weight, valid.shape) != 0)
    per_step = np.zeros(valid.shape)
    step_grad = np.zeros(y_pred.shape)
    if used.any():
        target_rows = (
            y_true[used] if loss.target == "labels" else as_float(y_true[used])
        )
        per_step[used], step_grad[used] = loss.reference(target_rows, y_pred[used])
    value, coefficient = _np_reduce(per_step, valid, weight, reduction)
    grad = np.where(used[..., None], coefficient[..., None] * step_grad, 0.0)
    return value, grad


# ----------------------------------------------------------------------------
# The losses, as a user configures them.


@dataclass(frozen=True)
class _Loss:
    """A kmask loss as a user configures it, and its NumPy reference.

    `cls` is a class of `kmask`; `keras_loss` the Keras loss name that
    `MaskedLoss` and `kmask.masked_loss` take (`None`: no Keras twin).
    `reference(y_true_rows, y_pred_rows)` gives the per-step loss and its
    gradient.
    """

    name: str
    cls: str
    keras_loss: str | None
    kwargs: dict[str, Any]
    target: str  # "labels", "one_hot", "binary" or "regression"
    prediction: str  # "logits", "probs" or "values"
    reference: Callable

    def spec(self) -> dict[str, Any]:
        return {"cls": self.cls, "keras_loss": self.keras_loss, "kwargs": self.kwargs}


# Keras loss name: (targets, NumPy reference).
_KINDS = {
    "categorical_crossentropy": ("one_hot", _np_categorical),
    "sparse_categorical_crossentropy": ("labels", _np_sparse_categorical),
    "binary_crossentropy": ("binary", _np_binary),
    "mean_squared_error": ("regression", _np_squared),
    "mean_absolute_error": ("regression", _np_absolute),
    "huber": ("regression", _np_huber),
}
_CLASS_KINDS = {
    "MaskedCategoricalCrossentropy": "categorical_crossentropy",
    "MaskedSparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "MaskedBinaryCrossentropy": "binary_crossentropy",
    "MaskedMeanSquaredError": "mean_squared_error",
    "MaskedMeanAbsoluteError": "mean_absolute_error",
    "MaskedHuber": "huber",
}


def _loss(name: str, cls: str, keras_twin: bool = True, **kwargs: Any) -> _Loss:
    """`cls(**kwargs)`; `MaskedLoss` takes the Keras name as `loss=`."""
    kind = kwargs.pop("loss") if cls == "MaskedLoss" else _CLASS_KINDS[cls]
    target, reference = _KINDS[kind]
    if target == "regression":
        prediction = "values"
    else:
        prediction = "logits" if kwargs.get("from_logits") else "probs"
    return _Loss(
        name,
        cls,
        kind if keras_twin else None,
        kwargs,
        target,
        prediction,
        partial(reference, **kwargs),
    )


_SCCE = "MaskedSparseCategoricalCrossentropy"
LOSSES = (
    _loss("cce_probs", "MaskedCategoricalCrossentropy"),
    _loss(
        "cce_logits_ls",
        "MaskedCategoricalCrossentropy",
        from_logits=True,
        label_smoothing=0.1,
    ),
    _loss("scce_probs", _SCCE),
    _loss("scce_logits", _SCCE, from_logits=True),
    # Label smoothing and z-loss are kmask's own: Keras's sparse loss has neither.
    _loss("scce_probs_ls", _SCCE, keras_twin=False, label_smoothing=0.2),
    _loss(
        "scce_logits_ls_z",
        _SCCE,
        keras_twin=False,
        from_logits=True,
        label_smoothing=0.1,
        z_loss=0.05,
    ),
    _loss("bce_probs", "MaskedBinaryCrossentropy"),
    _loss(
        "bce_logits_ls",
        "MaskedBinaryCrossentropy",
        from_logits=True,
        label_smoothing=0.2,
    ),
    _loss("mse", "MaskedMeanSquaredError"),
    _loss("mae", "MaskedMeanAbsoluteError"),
    _loss("huber", "MaskedHuber", delta=0.5),
    _loss("named_cce", "MaskedLoss", loss="categorical_crossentropy", from_logits=True),
    _loss(
        "named_scce",
        "MaskedLoss",
        loss="sparse_categorical_crossentropy",
        from_logits=True,
    ),
    _loss("named_huber", "MaskedLoss", loss="huber", delta=1.5),
)
_LOSSES_BY_NAME = {loss.name: loss for loss in LOSSES}


# ----------------------------------------------------------------------------
# Inputs. A "mask source" pads a clean batch the way a user's data is padded
# and says how the padding reaches the loss.


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def _round(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array`'s values rounded to `dtype` (integers are kept)."""
    array = np.asarray(array)
    if array.dtype.kind != "f":
        return array
    if dtype == "bfloat16":
        return array.astype(ml_dtypes.bfloat16).astype("float32")
    return array.astype(dtype).astype("float32")


def _clean(rng, loss: _Loss, batch: int = BATCH, steps: int = STEPS):
    """Targets and predictions without padding: float32, labels int32."""
    width = {"binary": 1, "regression": FEATURES}.get(loss.target, CLASSES)
    shape = (batch, steps, width)
    labels = rng.integers(0, width, (batch, steps))
    if loss.target == "labels":
        y_true = labels.astype("int32")
    elif loss.target == "one_hot":
        y_true = np.eye(width, dtype="float32")[labels]
    elif loss.target == "binary":
        y_true = rng.integers(0, 2, shape).astype("float32")
    else:
        y_true = rng.normal(size=shape).astype("float32")
    logits = rng.normal(scale=1.5, size=shape)
    if loss.prediction != "probs":
        return y_true, logits.astype("float32")
    if width == 1:
        return y_true, (1 / (1 + np.exp(-logits))).astype("float32")
    return y_true, np.exp(_np_log_softmax(logits)).astype("float32")


def _lengths(rng) -> np.ndarray:
    """One empty sequence, one full, two in between, in random order."""
    middle = rng.integers(1, STEPS, size=2)
    return rng.permutation([0, STEPS, *middle]).astype("int32")


def _scattered(rng, fraction: float = 0.3) -> np.ndarray:
    return rng.random((BATCH, STEPS)) < fraction


def _garbage(y_true, y_pred, padded):
    """What padding holds when only a mask says so: labels no loss accepts
    (-1), infinite targets, NaN predictions."""
    steps = padded[..., None]
    y_pred = np.where(steps, NAN, y_pred).astype("float32")
    if y_true.dtype.kind == "i":
        return np.where(padded, -1, y_true).astype("int32"), y_pred
    return np.where(steps, np.inf, y_true).astype("float32"), y_pred


def _mark(y_true, padded, mask_value):
    """Writes the pad value into the padded steps of the targets."""
    if y_true.dtype.kind == "i":
        return np.where(padded, mask_value, y_true).astype("int32")
    pad = np.broadcast_to(np.asarray(mask_value, "float32"), y_true.shape)
    return np.where(padded[..., None], pad, y_true).astype("float32")


def _avoid(y_true, mask_value):
    """Changes the real targets that happen to equal the pad value."""
    pad = np.asarray(mask_value, "float64")
    if y_true.dtype.kind == "i":
        return np.where(y_true == pad, (y_true + 1) % CLASSES, y_true).astype("int32")
    is_pad = np.all(y_true == pad, axis=-1, keepdims=True)
    return np.where(is_pad, np.roll(y_true, 1, axis=-1), y_true).astype("float32")


@dataclass
class _Padded:
    """A batch padded by one mask source, with what the reference needs.

    `valid` holds the real steps the masks find and `weight` the sample
    weight, as NumPy sees them; `call` tells the child how the padding reaches
    the API (see `_run_loss`), `arrays` what it needs for that.
    """

    y_true: np.ndarray
    y_pred: np.ndarray
    valid: np.ndarray
    weight: np.ndarray | None = None
    call: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _all_real():
    return np.ones((BATCH, STEPS), bool)


def _target_pad(target: str):
    """The pad value a user marks `target`s with: -100 or NaN."""
    return -100 if target == "labels" else NAN


def _by_lengths(padding: str, api: str = "call"):
    """Lengths, as `sample_weight=kmask.sequence_mask(...)` (Keras's way) or
    as `kmask.masked_loss(mask=...)`."""

    def pad(rng, loss, y_true, y_pred) -> _Padded:
        lengths = _lengths(rng)
        real = _np_sequence_mask(lengths, STEPS, padding)
        y_true, y_pred = _garbage(y_true, y_pred, ~real)
        call = {"api": api, "lengths_padding": padding}
        if api == "call":
            return _Padded(
                y_true, y_pred, _all_real(), real, call, {"lengths": lengths}
            )
        return _Padded(y_true, y_pred, real, None, call, {"lengths": lengths})

    return pad


def _by_pad_value(pads: dict[str, Any]):
    """A pad value in the targets, `mask_value=pads[target]`."""

    def pad(rng, loss, y_true, y_pred) -> _Padded:
        mask_value = pads[loss.target]
        padded = _scattered(rng)
        y_true = _mark(_avoid(y_true, mask_value), padded, mask_value)
        y_pred = np.where(padded[..., None], NAN, y_pred).astype("float32")
        return _Padded(y_true, y_pred, ~padded, None, {"mask_value": mask_value})

    return pad


def _propagated(rng, loss, y_true, y_pred) -> _Padded:
    """`keras.layers.Masking(0.0)` on `y_pred`: the mask Keras propagates."""
    padded = ~_np_sequence_mask(_lengths(rng), STEPS, "post")
    y_true, _ = _garbage(y_true, y_pred, padded)
    y_pred = np.where(padded[..., None], 0.0, y_pred).astype("float32")
    return _Padded(y_true, y_pred, ~padded, None, {"masking": 0.0})


def _sequence_weights(rng, loss, y_true, y_pred) -> _Padded:
    """`sample_weight` of shape `[batch]`; a weight of 0 drops a sequence."""
    weights = rng.uniform(0.5, 2.0, BATCH).astype("float32")
    weights[rng.integers(BATCH)] = 0.0
    dropped = np.repeat((weights == 0)[:, None], STEPS, axis=1)
    y_true, y_pred = _garbage(y_true, y_pred, dropped)
    return _Padded(y_true, y_pred, _all_real(), weights, {}, {"sample_weight": weights})


def _step_weights(rng, loss, y_true, y_pred) -> _Padded:
    """`sample_weight` of shape `[batch, time]`, 0 on padding."""
    real = _np_sequence_mask(_lengths(rng), STEPS, "post")
    weights = (rng.uniform(0.5, 2.0, (BATCH, STEPS)) * real).astype("float32")
    y_true, y_pred = _garbage(y_true, y_pred, ~real)
    return _Padded(y_true, y_pred, _all_real(), weights, {}, {"sample_weight": weights})


def _combined(api: str):
    """Every source at once. `"call"`: per-step weights times a left-padded
    length mask as `sample_weight`; `"function"`: `kmask.masked_loss` with a
    right-padded `mask=` and per-sequence weights. Both add a pad value in
    the targets and a propagated mask."""

    def pad(rng, loss, y_true, y_pred) -> _Padded:
        lengths = _lengths(rng)
        padding = "pre" if api == "call" else "post"
        real = _np_sequence_mask(lengths, STEPS, padding)
        mask_value = _target_pad(loss.target)
        pad_marked = _scattered(rng, 0.2) & real
        masked_out = _scattered(rng, 0.2) & real & ~pad_marked
        y_true = _mark(_avoid(y_true, mask_value), pad_marked, mask_value)
        y_pred = np.where(masked_out[..., None], 0.0, y_pred)
        y_true, y_pred = _garbage(y_true, y_pred, ~real)
        y_pred = np.where(pad_marked[..., None], NAN, y_pred).astype("float32")
        valid = ~pad_marked & ~masked_out
        call = {
            "api": api,
            "lengths_padding": padding,
            "mask_value": mask_value,
            "masking": 0.0,
        }
        if api == "call":
            weights = rng.uniform(0.5, 2.0, (BATCH, STEPS)).astype("float32")
            weight = weights * real
        else:
            weights = rng.uniform(0.5, 2.0, BATCH).astype("float32")
            weight, valid = weights, valid & real
        arrays = {"lengths": lengths, "sample_weight": weights}
        return _Padded(y_true, y_pred, valid, weight, call, arrays)

    return pad


def _all_padding(how: str):
    """Not one real step: zero lengths, every target a pad, or every
    prediction masked by `Masking`."""

    def pad(rng, loss, y_true, y_pred) -> _Padded:
        every_step = _all_real()
        no_step = ~every_step
        if how == "lengths":
            y_true, y_pred = _garbage(y_true, y_pred, every_step)
            lengths = np.zeros(BATCH, "int32")
            call = {"lengths_padding": "post"}
            return _Padded(
                y_true, y_pred, every_step, no_step, call, {"lengths": lengths}
            )
        if how == "pad_id":
            mask_value = _target_pad(loss.target)
            y_true = _mark(y_true, every_step, mask_value)
            y_pred = np.full_like(y_pred, NAN)
            return _Padded(y_true, y_pred, no_step, None, {"mask_value": mask_value})
        y_true, _ = _garbage(y_true, y_pred, every_step)
        return _Padded(y_true, np.zeros_like(y_pred), no_step, None, {"masking": 0.0})

    return pad


def _no_padding(masked: bool):
    """Every step real: no mask at all, or every mask present and empty."""

    def pad(rng, loss, y_true, y_pred) -> _Padded:
        if not masked:
            return _Padded(y_true, y_pred, _all_real())
        lengths = np.full(BATCH, STEPS, "int32")
        call = {"lengths_padding": "post", "mask_value": _target_pad(loss.target)}
        return _Padded(
            y_true, y_pred, _all_real(), _all_real(), call, {"lengths": lengths}
        )

    return pad


def _one_token(rng, loss, y_true, y_pred) -> _Padded:
    """A single real step in the batch, left-padded."""
    lengths = np.zeros(BATCH, "int32")
    lengths[rng.integers(BATCH)] = 1
    real = _np_sequence_mask(lengths, STEPS, "pre")
    y_true, y_pred = _garbage(y_true, y_pred, ~real)
    call = {"lengths_padding": "pre"}
    return _Padded(y_true, y_pred, _all_real(), real, call, {"lengths": lengths})


_EVERY_TARGET = frozenset({"labels", "one_hot", "binary", "regression"})
_FLOAT_TARGETS = frozenset({"one_hot", "binary", "regression"})
_ONE_HOT_PAD = [0.0] * (CLASSES - 1) + [1.0]


@dataclass(frozen=True)
class _Source:
    pad: Callable[..., _Padded]
    targets: frozenset = _EVERY_TARGET
    functional: bool = False  # calls kmask.masked_loss, which needs a Keras loss name

    def fits(self, loss: _Loss) -> bool:
        has_name = loss.keras_loss is not None
        return loss.target in self.targets and (has_name or not self.functional)


MASK_SOURCES = {
    "lengths_post": _Source(_by_lengths("post")),
    "lengths_pre": _Source(_by_lengths("pre")),
    "explicit_mask": _Source(_by_lengths("pre", api="function"), functional=True),
    "pad_zero": _Source(
        _by_pad_value({"labels": 0, "one_hot": 0, "regression": 0}),
        frozenset({"labels", "one_hot", "regression"}),
    ),
    "pad_negative": _Source(
        _by_pad_value({"labels": -100, "binary": -1, "regression": -1}),
        frozenset({"labels", "binary", "regression"}),
    ),
    "pad_vector": _Source(
        _by_pad_value(
            {"one_hot": _ONE_HOT_PAD, "binary": [-1.0], "regression": [0.5, -1.0, 2.0]}
        ),
        _FLOAT_TARGETS,
    ),
    "nan_targets": _Source(
        _by_pad_value(dict.fromkeys(_FLOAT_TARGETS, NAN)), _FLOAT_TARGETS
    ),
    "propagated": _Source(_propagated),
    "sequence_weights": _Source(_sequence_weights),
    "step_weights": _Source(_step_weights),
    "combined": _Source(_combined("call")),
    "combined_function": _Source(_combined("function"), functional=True),
}
EDGE_SOURCES = {
    "all_padding_lengths": _Source(_all_padding("lengths")),
    "all_padding_pad_id": _Source(_all_padding("pad_id")),
    "all_padding_propagated": _Source(_all_padding("propagated")),
    "no_padding": _Source(_no_padding(masked=False)),
    "no_padding_masked": _Source(_no_padding(masked=True)),
    "one_token": _Source(_one_token),
}
_ALL_SOURCES = {**MASK_SOURCES, **EDGE_SOURCES}


# ----------------------------------------------------------------------------
# Case builders.


def _loss_case(
    loss: _Loss,
    source: str,
    reduction: str,
    dtype: str = "float32",
    compiled: bool = False,
) -> Case:
    """`loss` on a batch padded by `source`, reduced by `reduction`: the
    value and its gradient with respect to `y_pred`."""
    parts = [loss.name, source, reduction]
    parts += [dtype] if dtype != "float32" else []
    parts += ["jit"] if compiled else []
    name = "/".join(parts)
    rng = _rng(name)
    y_true, y_pred = (_round(array, dtype) for array in _clean(rng, loss))
    padded = _ALL_SOURCES[source].pad(rng, loss, y_true, y_pred)
    value, grad = _np_masked_loss(
        loss, padded.y_true, padded.y_pred, padded.valid, padded.weight, reduction
    )
    spec = {
        **loss.spec(),
        "api": "call",
        "lengths_padding": None,
        "mask_value": None,
        "masking": None,
        **padded.call,
        "reduction": reduction,
        "compiled": compiled,
        "half": _half_inputs(dtype, padded.y_true),
    }
    inputs = {"y_true": padded.y_true, "y_pred": padded.y_pred, **padded.arrays}
    return Case(name, "loss", spec, inputs, {"value": value, "grad": grad}, dtype)


def _half_inputs(dtype: str, y_true: np.ndarray) -> list[str]:
    """The inputs a half-precision case gives in `dtype`: the predictions,
    and float targets too."""
    if dtype == "float32":
        return []
    return ["y_pred"] + (["y_true"] if y_true.dtype.kind == "f" else [])


def _metric_case(
    name: str,
    spec: dict[str, Any],
    loss: _Loss,
    per_step: Callable,
    source: str,
    dtype: str = "float32",
    perplexity: bool = False,
) -> Case:
    """A metric updated with two batches of different shapes, each padded by
    `source`: its result after each. `per_step(y_true_rows, y_pred_rows)` is
    the reference of the metric's per-step values; `perplexity` takes the
    exponential of the mean."""
    name = "/".join(["metric", name] + ([dtype] if dtype != "float32" else []))
    rng = _rng(name)
    inputs, expected = {}, {}
    total = count = 0.0
    for batch, (size, steps) in enumerate([(BATCH, STEPS), (3, 5)]):
        y_true, y_pred = (_round(a, dtype) for a in _clean(rng, loss, size, steps))
        padded = _metric_padding(rng, source, loss, y_true, y_pred)
        inputs[f"y_true_{batch}"] = padded.y_true
        inputs[f"y_pred_{batch}"] = padded.y_pred
        if padded.weight is not None:
            inputs[f"sample_weight_{batch}"] = padded.weight
        weights = _np_step_weight(padded.weight, padded.valid.shape)
        used = padded.valid & (weights != 0)
        if used.any():
            rows = per_step(padded.y_true[used], np.asarray(padded.y_pred[used], float))
            total += float((rows * weights[used]).sum())
            count += float(weights[used].sum())
        mean = total / count if count else 0.0
        expected[f"result_{batch + 1}"] = np.float64(
            math.exp(mean) if perplexity else mean
        )
    half = [
        key
        for key, array in inputs.items()
        if dtype != "float32" and key.startswith("y_") and array.dtype.kind == "f"
    ]
    spec = {"masking": None, **spec, "half": half}
    return Case(name, "metric", spec, inputs, expected, dtype)


_METRIC_PADS = {"labels": -100, "one_hot": _ONE_HOT_PAD, "regression": NAN}


def _metric_padding(rng, source: str, loss: _Loss, y_true, y_pred) -> _Padded:
    """Padding for a metric batch of any shape. `"pad"`: the target's pad
    value (-100, the one-hot pad vector, NaN) in the targets; `"weights"`:
    that and per-step weights with zeros; `"propagated"`: zero predictions
    for `Masking`; `"all_padding"`: every target a pad."""
    shape = y_true.shape[:2]
    padded = (
        np.ones(shape, bool) if source == "all_padding" else rng.random(shape) < 0.3
    )
    if source == "propagated":
        y_pred = np.where(padded[..., None], 0.0, y_pred).astype("float32")
        return _Padded(y_true, y_pred, ~padded)
    mask_value = _METRIC_PADS[loss.target]
    y_true = _mark(_avoid(y_true, mask_value), padded, mask_value)
    weight = None
    if source == "weights":
        weight = (rng.uniform(0.5, 2.0, shape) * (rng.random(shape) > 0.2)).astype(
            "float32"
        )
        padded = padded | (weight == 0)
    y_pred = np.where(padded[..., None], NAN, y_pred).astype("float32")
    return _Padded(y_true, y_pred, ~padded, weight)


def _layer_case(
    label: str,
    layer: str,
    layer_kwargs: dict[str, Any],
    loss: _Loss,
    reduction: str,
    dtype: str = "float32",
) -> Case:
    """A kmask layer between the predictions and a loss that has no mask of
    its own: the loss value and gradient, the layer's output and its mask.

    `LengthMask` gets `[y_pred, lengths]`, `AttachMask` `[y_pred,
    Masking(0.0)(carrier)]`, with NaN predictions on padding; `ValueMask`
    gets `y_pred` padded with its `mask_value`."""
    name = "/".join(["layer", label, loss.name, reduction])
    name += f"/{dtype}" if dtype != "float32" else ""
    rng = _rng(name)
    y_true, y_pred = (_round(array, dtype) for array in _clean(rng, loss))
    lengths = _lengths(rng)
    real = _np_sequence_mask(lengths, STEPS, layer_kwargs.get("padding", "post"))
    y_true, y_pred = _garbage(y_true, y_pred, ~real)
    output = y_pred.astype("float64")
    inputs = {"y_true": y_true, "y_pred": y_pred}
    if layer == "LengthMask":
        inputs["lengths"] = lengths
    elif layer == "AttachMask":
        carrier = rng.normal(size=(BATCH, STEPS, 2)) * real[..., None]
        inputs["carrier"] = carrier.astype("float32")
    else:
        pad = np.asarray(layer_kwargs["mask_value"], "float32")
        y_pred = np.where(real[..., None], y_pred, pad).astype("float32")
        inputs["y_pred"] = y_pred
        output = np.where(real[..., None], y_pred, 0.0)
    value, grad = _np_masked_loss(loss, y_true, y_pred, real, None, reduction)
    spec = {
        **loss.spec(),
        "layer": layer,
        "layer_kwargs": layer_kwargs,
        "reduction": reduction,
        "half": _half_inputs(dtype, y_true),
    }
    expected = {"value": value, "grad": grad, "output": output, "mask": real * 1.0}
    return Case(name, "layer", spec, inputs, expected, dtype)


# The fused cross-entropy (`kmask.fused`): hidden states `[BATCH, STEPS,
# FUSED_WIDTH]` projected to `FUSED_VOCABULARY` classes, `FUSED_CHUNK` tokens
# at a time, so that the last of the chunks is partial.
FUSED_WIDTH, FUSED_VOCABULARY, FUSED_CHUNK = 6, 9, 5


def _np_linear(hidden, kernel, bias, labels, valid, weight, reduction, **options):
    """The linear cross-entropy's value, its per-step losses (0 on padding)
    and the gradients with respect to `hidden`, `kernel` and `bias`."""
    used = valid & (_np_step_weight(weight, valid.shape) != 0)
    hidden = np.where(used[..., None], np.asarray(hidden, "float64"), 0.0)
    kernel = np.asarray(kernel, "float64")
    logits = hidden @ kernel
    if bias is not None:
        logits = logits + np.asarray(bias, "float64")
    per_step, step_grad = np.zeros(valid.shape), np.zeros(logits.shape)
    if used.any():
        per_step[used], step_grad[used] = _np_sparse_categorical(
            labels[used], logits[used], from_logits=True, **options
        )
    value, coefficient = _np_reduce(per_step, valid, weight, reduction)
    d_logits = np.where(used[..., None], coefficient[..., None] * step_grad, 0.0)
    return {
        "value": value,
        "per_step": per_step,
        "grad_hidden": d_logits @ kernel.T,
        "grad_kernel": np.einsum("bth,btv->hv", hidden, d_logits),
        "grad_bias": d_logits.sum((0, 1)),
    }


def _fused_case(
    api: str,
    source: str,
    reduction: str = "token_mean",
    dtype: str = "float32",
    compiled: bool = False,
    use_bias: bool = True,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Case:
    """A case of the `"fused"` runner. `api`: `"crossentropy"`
    (`kmask.sparse_crossentropy_with_logits` with an explicit mask: the
    per-step losses and the gradient of their sum against a random
    cotangent), `"function"` (`kmask.fused_linear_crossentropy`: the value
    and the gradients of `hidden`, `kernel` and `bias`) or `"layer"`
    (`kmask.FusedLinearCrossentropy`: the loss it adds, its per-step output
    and the gradient of `hidden`). `source` pads the batch: `pad_negative`
    (labels -100, `mask_value`), `explicit_mask` (lengths as `mask=`),
    `step_weights` / `sequence_weights` (`sample_weight`), `propagated`
    (`Masking(0.0)` on the hidden states), `all_padding`."""
    options = {"label_smoothing": label_smoothing, "z_loss": z_loss}
    parts = ["fused", api, source, reduction]
    parts += ["smoothing"] * bool(label_smoothing) + ["z_loss"] * bool(z_loss)
    parts += ["no_bias"] * (not use_bias)
    parts += [dtype] if dtype != "float32" else []
    parts += ["jit"] if compiled else []
    name = "/".join(parts)
    rng = _rng(name)
    hidden = _round(rng.normal(size=(BATCH, STEPS, FUSED_WIDTH)), dtype)
    kernel = _round(rng.normal(size=(FUSED_WIDTH, FUSED_VOCABULARY)) / 2, dtype)
    bias = _round(rng.normal(size=FUSED_VOCABULARY) / 2, dtype)
    labels = rng.integers(0, FUSED_VOCABULARY, (BATCH, STEPS)).astype("int32")
    real = _np_sequence_mask(_lengths(rng), STEPS, "post")
    call: dict[str, Any] = {"mask_value": None}
    arrays: dict[str, np.ndarray] = {}
    valid, weight = real, None
    if source == "pad_negative":
        labels = np.where(real, labels, -100).astype("int32")
        call["mask_value"] = -100
    elif source == "explicit_mask":
        arrays["mask"] = real
    elif source == "step_weights":
        weight = (rng.uniform(0.5, 2.0, (BATCH, STEPS)) * real).astype("float32")
        valid = _all_real()
    elif source == "sequence_weights":
        weight = rng.uniform(0.5, 2.0, BATCH).astype("float32")
        weight[rng.integers(BATCH)] = 0.0
        arrays["mask"] = real
    elif source == "all_padding":
        valid = ~_all_real()
        labels = np.full_like(labels, -100)
        call["mask_value"] = -100
    if weight is not None:
        arrays["sample_weight"] = weight
    used = valid & (_np_step_weight(weight, valid.shape) != 0)
    if call["mask_value"] is None:
        labels = np.where(used, labels, -1).astype("int32")
    pad = 0.0 if source == "propagated" else NAN
    hidden = np.where(used[..., None], hidden, pad).astype("float32")
    inputs = {"labels": labels, **arrays}
    if api == "crossentropy":
        logits = _round(np.where(used[..., None], hidden @ kernel, NAN), dtype)
        cotangent = rng.normal(size=(BATCH, STEPS))
        per_step, step_grad = np.zeros(used.shape), np.zeros(logits.shape)
        if used.any():
            per_step[used], step_grad[used] = _np_sparse_categorical(
                labels[used], logits[used], from_logits=True, **options
            )
        inputs.update(logits=logits.astype("float32"), mask=used)
        inputs["cotangent"] = cotangent.astype("float32")
        expected = {
            "output": per_step,
            "grad_logits": np.where(
                used[..., None], cotangent[..., None] * step_grad, 0.0
            ),
        }
        half = ["logits"]
    else:
        inputs.update(hidden=hidden, kernel=kernel.astype("float32"))
        if use_bias:
            inputs["bias"] = bias.astype("float32")
        reference = _np_linear(
            hidden,
            kernel,
            bias if use_bias else None,
            labels,
            valid,
            weight,
            reduction,
            **options,
        )
        names = ["value", "grad_hidden"]
        if api == "layer":
            names.append("per_step")
        else:
            names += ["grad_kernel"] + ["grad_bias"] * use_bias
        expected = {key: reference[key] for key in names}
        half = ["hidden", "kernel", "bias"] if use_bias else ["hidden", "kernel"]
    spec = {
        "api": api,
        **call,
        "masking": 0.0 if source == "propagated" else None,
        "reduction": reduction,
        "chunk_size": FUSED_CHUNK,
        "options": options,
        "compiled": compiled,
        "half": half if dtype != "float32" else [],
    }
    return Case(name, "fused", spec, inputs, expected, dtype)


# ----------------------------------------------------------------------------
# The suite: families of cases.

_FAMILIES: list[Callable[[], list[Case]]] = []


def _family(build: Callable[[], list[Case]]) -> Callable[[], list[Case]]:
    """Registers a function that returns cases; `build_suite` runs them all."""
    _FAMILIES.append(build)
    return build


def _sources_for(loss: _Loss) -> list[str]:
    return [name for name, source in MASK_SOURCES.items() if source.fits(loss)]


def _losses_for(source: str) -> list[_Loss]:
    return [loss for loss in LOSSES if _ALL_SOURCES[source].fits(loss)]


@_family
def _covering_families() -> list[Case]:
    """Loss x reduction, loss x mask source and mask source x reduction,
    each pair once, the third factor rotating."""
    cases = []
    for index, loss in enumerate(LOSSES):
        sources = _sources_for(loss)
        for shift, reduction in enumerate(kmask.REDUCTIONS):
            cases.append(_loss_case(loss, _pick(sources, index + shift), reduction))
        for shift, source in enumerate(sources):
            cases.append(
                _loss_case(loss, source, _pick(kmask.REDUCTIONS, index + shift))
            )
    for index, source in enumerate(MASK_SOURCES):
        losses = _losses_for(source)
        for shift, reduction in enumerate(kmask.REDUCTIONS):
            cases.append(_loss_case(_pick(losses, index + shift), source, reduction))
    return cases


@_family
def _half_precision() -> list[Case]:
    """Every loss with float16 and bfloat16 inputs."""
    return [
        _loss_case(
            loss,
            _pick(_sources_for(loss), 3 * index + shift),
            _pick(kmask.REDUCTIONS, index + 2 * shift),
            dtype,
        )
        for index, loss in enumerate(LOSSES)
        for shift, dtype in enumerate(HALF_DTYPES)
    ]


@_family
def _edge_cases() -> list[Case]:
    """Every loss on all-padding, no-padding and one-token batches."""
    return [
        _loss_case(loss, source, _pick(kmask.REDUCTIONS, index + shift))
        for index, loss in enumerate(LOSSES)
        for shift, source in enumerate(EDGE_SOURCES)
    ]


@_family
def _compiled() -> list[Case]:
    """Every loss under `jax.jit` / `tf.function`, as `fit` calls it."""
    return [
        _loss_case(loss, "combined", _pick(kmask.REDUCTIONS, index), compiled=True)
        for index, loss in enumerate(LOSSES)
    ]


@_family
def _metrics() -> list[Case]:
    """Every metric of `kmask.metrics`, over two batches."""
    losses = _LOSSES_BY_NAME
    wrapper = "MaskedMeanMetricWrapper"
    scce = losses["scce_logits_ls_z"]
    kmask_loss = {**scce.spec(), "kwargs": {**scce.kwargs, "mask_value": -100}}

    def perplexity_of_labels(name: str, padding: str, **options: Any) -> Case:
        return _metric_case(
            name,
            {
                "metric": "Perplexity",
                "kwargs": {"from_logits": True, "mask_value": -100},
            },
            losses["scce_logits"],
            lambda t, p: losses["scce_logits"].reference(t, p)[0],
            padding,
            perplexity=True,
            **options,
        )

    return [
        _metric_case(
            "mae/nan_targets",
            {"metric": wrapper, "kwargs": {"fn": "mae", "mask_value": NAN}},
            losses["mae"],
            lambda t, p: _np_absolute(t, p)[0],
            "pad",
        ),
        _metric_case(
            "mse/propagated",
            {"metric": wrapper, "kwargs": {"fn": "mse"}, "masking": 0.0},
            losses["mse"],
            lambda t, p: _np_squared(t, p)[0],
            "propagated",
        ),
        _metric_case(
            "kmask_loss/weights",
            {"metric": wrapper, "kwargs": {}, "fn_loss": kmask_loss},
            scce,
            lambda t, p: scce.reference(t, p)[0],
            "weights",
        ),
        _metric_case(
            "sparse_accuracy/weights",
            {
                "metric": "MaskedSparseCategoricalAccuracy",
                "kwargs": {"mask_value": -100},
            },
            losses["scce_logits"],
            lambda t, p: (p.argmax(-1) == t).astype(float),
            "weights",
        ),
        _metric_case(
            "categorical_accuracy/pad_vector",
            {
                "metric": "MaskedCategoricalAccuracy",
                "kwargs": {"mask_value": _ONE_HOT_PAD},
            },
            losses["cce_probs"],
            lambda t, p: (p.argmax(-1) == t.argmax(-1)).astype(float),
            "pad",
        ),
        perplexity_of_labels("perplexity/labels", "pad"),
        _metric_case(
            "perplexity/one_hot",
            {"metric": "Perplexity", "kwargs": {"mask_value": _ONE_HOT_PAD}},
            losses["cce_probs"],
            lambda t, p: losses["cce_probs"].reference(t, p)[0],
            "weights",
            perplexity=True,
        ),
        perplexity_of_labels("perplexity/all_padding", "all_padding"),
        _metric_case(
            "mae/nan_targets",
            {"metric": wrapper, "kwargs": {"fn": "mae", "mask_value": NAN}},
            losses["mae"],
            lambda t, p: _np_absolute(t, p)[0],
            "weights",
            dtype="float16",
        ),
        perplexity_of_labels("perplexity/labels", "weights", dtype="bfloat16"),
    ]


@_family
def _layers() -> list[Case]:
    """Every layer of `kmask.layers` in front of a loss."""
    losses = _LOSSES_BY_NAME
    post, pre = {"padding": "post"}, {"padding": "pre"}
    nan, vector = {"mask_value": NAN}, {"mask_value": [0.5, -1.0, 2.0]}
    return [
        _layer_case("length_post", "LengthMask", post, losses["mse"], "token_mean"),
        _layer_case(
            "length_pre", "LengthMask", pre, losses["scce_logits"], "sequence_mean"
        ),
        _layer_case("value_nan", "ValueMask", nan, losses["huber"], "sum"),
        _layer_case("value_vector", "ValueMask", vector, losses["mae"], "none"),
        _layer_case("attach", "AttachMask", {}, losses["cce_logits_ls"], "token_mean"),
        _layer_case(
            "length_post",
            "LengthMask",
            post,
            losses["bce_logits_ls"],
            "sum",
            "bfloat16",
        ),
    ]


@_family
def _fused() -> list[Case]:
    """`kmask.sparse_crossentropy_with_logits`, `kmask.fused_linear_crossentropy`
    and `kmask.FusedLinearCrossentropy`: every reduction, the mask sources,
    smoothing and z-loss, no bias, bfloat16, compiled, all padding."""
    return [
        _fused_case("crossentropy", "explicit_mask"),
        _fused_case("crossentropy", "pad_negative", label_smoothing=0.1, z_loss=0.05),
        _fused_case("crossentropy", "explicit_mask", dtype="bfloat16", compiled=True),
        _fused_case("crossentropy", "all_padding"),
        _fused_case("function", "pad_negative", "token_mean"),
        _fused_case("function", "explicit_mask", "sum"),
        _fused_case(
            "function",
            "step_weights",
            "sequence_mean",
            label_smoothing=0.1,
            z_loss=0.05,
        ),
        _fused_case(
            "function", "sequence_weights", "sum_over_batch_size", use_bias=False
        ),
        _fused_case("function", "pad_negative", "none"),
        _fused_case("function", "all_padding", "token_mean"),
        _fused_case("function", "explicit_mask", "token_mean", dtype="bfloat16"),
        _fused_case(
            "function", "step_weights", "token_mean", compiled=True, label_smoothing=0.1
        ),
        _fused_case("layer", "propagated", "token_mean"),
        _fused_case("layer", "pad_negative", "sequence_mean", z_loss=0.05),
    ]


def _replicas(setup: str) -> int:
    return 2 if setup == "two_devices" else 1


@_family
def _devices() -> list[Case]:
    """One device against two (and against accumulated micro-batches): SGD
    steps of kmask's masked MSE in each of `parity_devices.COMMON_SETUPS`,
    the weights after 1 and 3 steps and the first logged loss against NumPy's
    full-batch run. The child runs them all in one process with 2 devices
    (`parity_devices.run_backend`); see `kmask/parity_devices.py`."""
    from kmask import parity_devices

    expected = {
        "weights": parity_devices.expected_weights(),
        "loss": np.float64(parity_devices.expected_loss()),
    }
    return [
        Case(
            name=f"devices/{setup}/{source}",
            runner="devices",
            spec={"setup": setup, "source": source, "half": []},
            inputs={},
            # `replicas`: what `fit` ran on, so a setup that quietly fell
            # back to one device fails.
            expected={**expected, "replicas": np.float64(_replicas(setup))},
        )
        for setup in parity_devices.COMMON_SETUPS
        for source in parity_devices.SOURCES
    ]


def _pick(options: Sequence, index: int):
    return options[index % len(options)]


def build_suite(patterns: Sequence[str] = ()) -> list[Case]:
    """The parity suite, the same on every call.

    Args:
        patterns: Keep the cases whose name contains any of these; all when
            empty.

    Returns:
        The cases, in a fixed order, names unique (a case two families build
        alike is kept once).
    """
    suite: dict[str, Case] = {}
    for build in _FAMILIES:
        for case in build():
            suite.setdefault(case.name, case)
    return [
        case
        for case in suite.values()
        if not patterns or any(pattern in case.name for pattern in patterns)
    ]


# ----------------------------------------------------------------------------
# The child: one backend, every case. The few backend-specific lines (autodiff
# and the device's name) live here and nowhere else in kmask.


def _child(workdir: Path) -> None:
    import keras

    backend = keras.backend.backend()
    cases = json.loads((workdir / "cases.json").read_text())
    arrays = np.load(workdir / "inputs.npz")
    outputs, dtypes, errors, seconds = {}, {}, {}, {}
    for index, case in enumerate(cases):
        started = time.perf_counter()
        inputs = {name: arrays[f"{index}__{name}"] for name in case["inputs"]}
        try:
            results = _RUNNERS[case["runner"]](case["spec"], _tensors(inputs, case))
        except Exception as error:  # a case that raises fails, the others run
            errors[case["name"]] = f"{type(error).__name__}: {error}"
        else:
            for output, (array, dtype) in results.items():
                outputs[f"{index}__{output}"] = array
                dtypes.setdefault(case["name"], {})[output] = dtype
        seconds[case["name"]] = time.perf_counter() - started
        print(_PROGRESS, index + 1, len(cases), flush=True)
    np.savez(workdir / f"{backend}.npz", **outputs)
    meta = {
        "backend": backend,
        "version": sys.modules[backend].__version__,
        "keras": keras.__version__,
        "device": _device(),
        "errors": errors,
        "dtypes": dtypes,
        "seconds": seconds,
    }
    (workdir / f"{backend}.json").write_text(json.dumps(meta))


def _tensors(inputs: dict[str, np.ndarray], case: dict) -> dict[str, Any]:
    from keras import ops

    tensors = {}
    for name, array in inputs.items():
        tensor = ops.convert_to_tensor(array)
        if name in case["spec"]["half"]:
            tensor = ops.cast(tensor, case["dtype"])
        tensors[name] = tensor
    return tensors


def _build_loss(spec: dict[str, Any], **options: Any):
    if spec["cls"] == "MaskedLoss":
        return kmask.MaskedLoss(spec["keras_loss"], **spec["kwargs"], **options)
    return getattr(kmask, spec["cls"])(**spec["kwargs"], **options)


def _masking(spec: dict[str, Any], dtype: Any) -> Callable:
    import keras

    if spec.get("masking") is None:
        return lambda tensor: tensor
    return keras.layers.Masking(
        spec["masking"], dtype=keras.backend.standardize_dtype(dtype)
    )


def _run_loss(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """A kmask loss called as Keras calls it, or `kmask.masked_loss`; the
    padding reaches it as `spec` says: `lengths_padding` builds
    `kmask.sequence_mask(lengths)`, given as `sample_weight` (times the
    weights, when there are some) or as `mask=`; `mask_value` goes to the
    loss; `masking` puts `keras.layers.Masking` on `y_pred`."""
    from keras import ops

    y_true, y_pred = inputs["y_true"], inputs["y_pred"]
    weights = inputs.get("sample_weight")
    mask = None
    if spec["lengths_padding"] is not None:
        steps = y_pred.shape[1]
        mask = kmask.sequence_mask(
            inputs["lengths"], steps, padding=spec["lengths_padding"]
        )
    masking = _masking(spec, y_pred.dtype)
    if spec["api"] == "function":

        def loss_value(predictions):
            return kmask.masked_loss(
                y_true,
                masking(predictions),
                spec["keras_loss"],
                mask=mask,
                mask_value=spec["mask_value"],
                sample_weight=weights,
                reduction=spec["reduction"],
                **spec["kwargs"],
            )

    else:
        loss = _build_loss(
            spec, mask_value=spec["mask_value"], reduction=spec["reduction"]
        )
        sample_weight = weights if mask is None else mask
        if mask is not None and weights is not None:
            if len(weights.shape) == 1:
                weights = ops.expand_dims(weights, -1)
            sample_weight = weights * ops.cast(mask, weights.dtype)

        def loss_value(predictions):
            return loss(y_true, masking(predictions), sample_weight)

    def objective(predictions):
        value = loss_value(predictions)
        return ops.sum(value), {"value": value}

    return _value_and_grad(objective, y_pred, spec["compiled"])


def _run_metric(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """`update_state` with two batches, `result()` after each."""
    from kmask import metrics

    kwargs = dict(spec["kwargs"])
    if "fn_loss" in spec:
        kwargs["fn"] = _build_loss(spec["fn_loss"])
    metric = getattr(metrics, spec["metric"])(**kwargs)
    results = {}
    for batch in (0, 1):
        y_pred = inputs[f"y_pred_{batch}"]
        metric.update_state(
            inputs[f"y_true_{batch}"],
            _masking(spec, y_pred.dtype)(y_pred),
            sample_weight=inputs.get(f"sample_weight_{batch}"),
        )
        results[f"result_{batch + 1}"] = _to_numpy(metric.result())
    return results


def _run_layer(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """The layer between `y_pred` and a loss: the loss's value and gradient,
    the layer's output and its mask."""
    import keras
    from keras import ops

    from kmask import layers

    layer = getattr(layers, spec["layer"])(**spec["layer_kwargs"])
    loss = _build_loss(spec, reduction=spec["reduction"])
    carrier = inputs.get("carrier")
    masked = None if carrier is None else keras.layers.Masking(0.0)(carrier)

    def objective(predictions):
        if spec["layer"] == "LengthMask":
            output = layer([predictions, inputs["lengths"]])
        elif spec["layer"] == "AttachMask":
            output = layer([predictions, masked])
        else:
            output = layer(predictions)
        mask = kmask.keras_mask(output)
        value = loss(inputs["y_true"], output)
        return ops.sum(value), {"value": value, "output": output, "mask": mask}

    return _value_and_grad(objective, inputs["y_pred"], compiled=False)


def _run_fused(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """The fused cross-entropy, the chunked linear one or its layer; see
    `_fused_case`."""
    from keras import ops

    options = spec["options"]
    if spec["api"] == "crossentropy":

        def crossentropy(xs):
            per_step = kmask.sparse_crossentropy_with_logits(
                inputs["labels"], xs["logits"], inputs["mask"], **options
            )
            return ops.sum(per_step * inputs["cotangent"]), {"output": per_step}

        return _value_and_grads(
            crossentropy, {"logits": inputs["logits"]}, spec["compiled"]
        )
    if spec["api"] == "layer":
        layer = kmask.FusedLinearCrossentropy(
            inputs["kernel"].shape[1],
            mask_value=spec["mask_value"],
            reduction=spec["reduction"],
            chunk_size=spec["chunk_size"],
            **options,
        )
        layer.build([tuple(inputs["hidden"].shape), tuple(inputs["labels"].shape)])
        layer.set_weights([ops.convert_to_numpy(inputs[k]) for k in ("kernel", "bias")])
        masking = _masking(spec, inputs["hidden"].dtype)

        def through_layer(xs):
            per_step = layer([masking(xs["hidden"]), inputs["labels"]])
            value = layer.losses[-1]
            return value, {"value": value, "per_step": per_step}

        return _value_and_grads(
            through_layer, {"hidden": inputs["hidden"]}, spec["compiled"]
        )

    def linear(xs):
        value = kmask.fused_linear_crossentropy(
            xs["hidden"],
            xs["kernel"],
            inputs["labels"],
            xs.get("bias"),
            mask_value=spec["mask_value"],
            mask=inputs.get("mask"),
            sample_weight=inputs.get("sample_weight"),
            reduction=spec["reduction"],
            chunk_size=spec["chunk_size"],
            **options,
        )
        return ops.sum(value), {"value": value}

    params = {key: inputs[key] for key in ("hidden", "kernel", "bias") if key in inputs}
    return _value_and_grads(linear, params, spec["compiled"])


@cache
def _device_rows() -> dict[tuple[str, str], dict[str, Any]] | Exception:
    """Every device setup of this backend, run once in a process of its own
    (or the error it failed with, reported by each device case)."""
    import keras

    from kmask import parity_devices

    try:
        rows = parity_devices.run_backend(
            keras.backend.backend(), parity_devices.COMMON_SETUPS, builtin=False
        )
    except RuntimeError as error:
        return error
    return {(row["setup"], row["mask source"]): row for row in rows}


def _run_devices(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """The weights and first logged loss of one device setup; see `_devices`."""
    del inputs
    rows = _device_rows()
    if isinstance(rows, Exception):
        raise rows
    row = rows[spec["setup"], spec["source"]]
    return {
        "weights": (np.asarray(row["weights"], "float64"), "float32"),
        "loss": (np.asarray(row["logged loss"], "float64"), "float32"),
        "replicas": (np.asarray(row["replicas"], "float64"), "float64"),
    }


_RUNNERS: dict[str, Callable[[dict, dict], dict]] = {
    "loss": _run_loss,
    "metric": _run_metric,
    "layer": _run_layer,
    "fused": _run_fused,
    "devices": _run_devices,
}


def _value_and_grad(objective: Callable, x: Any, compiled: bool) -> dict:
    """Runs `objective(x) -> (scalar, outputs)` and differentiates the
    scalar with respect to `x`: the outputs and `"grad"`."""
    results = _value_and_grads(lambda xs: objective(xs["x"]), {"x": x}, compiled)
    results["grad"] = results.pop("grad_x")
    return results


def _value_and_grads(objective: Callable, xs: dict[str, Any], compiled: bool) -> dict:
    """Runs `objective(xs) -> (scalar, outputs)` and differentiates the
    scalar with the backend's autodiff with respect to each tensor of `xs`
    (`"grad_<name>"`); `compiled` traces it first (torch stays eager:
    `torch.compile` wants a C++ toolchain)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        step = jax.value_and_grad(objective, has_aux=True)
        (_, outputs), grads = (jax.jit(step) if compiled else step)(xs)
    elif backend == "tensorflow":
        import tensorflow as tf

        def step(xs):
            with tf.GradientTape() as tape:
                tape.watch(list(xs.values()))
                scalar, outputs = objective(xs)
            grads = tape.gradient(scalar, xs)
            return outputs, {
                name: tf.zeros_like(xs[name]) if grad is None else grad
                for name, grad in grads.items()
            }

        outputs, grads = (tf.function(step) if compiled else step)(xs)
    else:
        import torch

        xs = {name: x.detach().clone().requires_grad_(True) for name, x in xs.items()}
        scalar, outputs = objective(xs)
        found = [None] * len(xs)
        if scalar.requires_grad:
            found = torch.autograd.grad(scalar, list(xs.values()), allow_unused=True)
        grads = {
            name: torch.zeros_like(x) if grad is None else grad
            for (name, x), grad in zip(xs.items(), found, strict=True)
        }
    results = {name: _to_numpy(tensor) for name, tensor in outputs.items()}
    results.update({f"grad_{name}": _to_numpy(grad) for name, grad in grads.items()})
    return results


def _to_numpy(tensor) -> tuple[np.ndarray, str]:
    """float64 values (exact from any float or bool) and the tensor's dtype."""
    import keras
    from keras import ops

    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if dtype != "float64":
        tensor = ops.cast(tensor, "float32")
    return np.asarray(ops.convert_to_numpy(tensor), "float64"), dtype


def _device() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.device_kind == device.platform:
            return device.platform
        return f"{device.platform} ({device.device_kind})"
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"


# ----------------------------------------------------------------------------
# The parent: run the children, compare, report.


@dataclass
class _BackendRun:
    backend: str
    outputs: dict[str, np.ndarray]
    meta: dict[str, Any]
    returncode: int
    log: str
    seconds: float


def _write_inputs(workdir: Path, cases: list[Case]) -> None:
    arrays = {
        f"{index}__{name}": array
        for index, case in enumerate(cases)
        for name, array in case.inputs.items()
    }
    np.savez(workdir / "inputs.npz", **arrays)
    manifest = [
        {
            "name": case.name,
            "runner": case.runner,
            "spec": case.spec,
            "dtype": case.dtype,
            "inputs": list(case.inputs),
        }
        for case in cases
    ]
    (workdir / "cases.json").write_text(json.dumps(manifest))


def _run_children(
    cases: list[Case], backends: Sequence[str], console: Console
) -> dict[str, _BackendRun]:
    """Runs every backend's child at once, with a progress bar each."""
    runs: dict[str, _BackendRun] = {}
    with tempfile.TemporaryDirectory(prefix="kmask-parity-") as directory:
        workdir = Path(directory)
        _write_inputs(workdir, cases)
        columns = (
            "{task.description:>10}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            threads = [
                threading.Thread(
                    target=_run_child,
                    args=(workdir, backend, len(cases), progress, runs),
                )
                for backend in backends
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    return {backend: runs[backend] for backend in backends}  # not finishing order


def _run_child(workdir, backend, total, progress, runs) -> None:
    task = progress.add_task(backend, total=total)
    environment = {**os.environ, "KERAS_BACKEND": backend}
    command = [sys.executable, "-m", "kmask.parity", "--child", str(workdir)]
    started = time.perf_counter()
    log_path = workdir / f"{backend}.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=log, text=True
        )
        for line in child.stdout:
            if line.startswith(_PROGRESS):
                progress.update(task, completed=int(line.split()[1]))
            else:
                log.write(line)
        returncode = child.wait()
    seconds = time.perf_counter() - started
    outputs, meta = {}, {}
    if returncode == 0:
        with np.load(workdir / f"{backend}.npz") as stored:
            outputs = dict(stored)
        meta = json.loads((workdir / f"{backend}.json").read_text())
    runs[backend] = _BackendRun(
        backend, outputs, meta, returncode, log_path.read_text(), seconds
    )
    status = "done" if returncode == 0 else f"exited with status {returncode}"
    progress.console.print(f"{backend}: {status} in {seconds:.1f} s")


def _deviation(actual, reference, scale=None) -> tuple[float, tuple]:
    """`relative_error`, and the index of the worst entry."""
    actual = np.asarray(actual, "float64")
    reference = np.asarray(reference, "float64")
    scale = reference if scale is None else np.asarray(scale, "float64")
    if actual.shape != reference.shape:
        return math.inf, ()
    nan_reference = np.isnan(reference)
    disagree = (np.isnan(actual) != nan_reference) | (
        ~nan_reference & ~np.isfinite(actual) & np.isfinite(reference)
    )
    if disagree.any():
        return math.inf, tuple(int(i) for i in np.argwhere(disagree)[0])
    deviation = np.where(nan_reference, 0.0, np.abs(actual - reference))
    deviation = np.where(actual == reference, 0.0, deviation)  # inf meets inf
    magnitude = np.abs(scale[~np.isnan(scale) & np.isfinite(scale)])
    floor = max(float(magnitude.max(initial=0.0)), ERROR_FLOOR)
    worst = (
        np.unravel_index(int(deviation.argmax()), deviation.shape)
        if deviation.size
        else ()
    )
    return float(deviation.max(initial=0.0) / floor), tuple(int(i) for i in worst)


def _rounded(reference: np.ndarray, dtype: str) -> np.ndarray:
    """The reference as the backend could at best return it in `dtype`."""
    if dtype in ("float32", "float16", "bfloat16"):
        return _round(np.asarray(reference, "float64"), dtype).astype("float64")
    return np.asarray(reference, "float64")


@dataclass
class _Finding:
    """The worst deviation of one output: from NumPy or between backends."""

    error: float
    output: str
    index: tuple
    got: float
    expected: float


def _compare(cases: list[Case], runs: dict[str, _BackendRun]) -> list[dict[str, Any]]:
    """Per case: each backend's worst deviation from NumPy, each pair's worst
    gap, and a message for each one off tolerance."""
    results = []
    for index, case in enumerate(cases):
        tolerance = TOLERANCES[case.dtype]
        errors: dict[str, _Finding | str] = {}
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for backend, run in runs.items():
            if run.returncode != 0:
                continue  # reported once, not once per case
            raised = run.meta["errors"].get(case.name)
            if raised:
                errors[backend] = raised
                continue
            dtypes = run.meta["dtypes"][case.name]
            outputs[backend] = {
                name: run.outputs[f"{index}__{name}"] for name in case.expected
            }
            errors[backend] = _worst(
                {
                    name: (outputs[backend][name], _rounded(reference, dtypes[name]))
                    for name, reference in case.expected.items()
                },
                case.expected,
            )
        gaps = {
            (first, second): _worst(
                {
                    name: (outputs[first][name], outputs[second][name])
                    for name in case.expected
                },
                case.expected,
            )
            for first, second in combinations(outputs, 2)
        }
        results.append(
            {
                "case": case,
                "tolerance": tolerance,
                "errors": errors,
                "gaps": gaps,
                "outputs": outputs,
                "failures": _case_failures(case.name, tolerance, errors, gaps),
            }
        )
    return results


def _worst(pairs: dict[str, tuple], references: dict[str, np.ndarray]) -> _Finding:
    """The output whose deviation is the largest, scaled by the reference."""
    worst = _Finding(0.0, "", (), 0.0, 0.0)
    for name, (actual, other) in pairs.items():
        error, where = _deviation(actual, other, references[name])
        if error > worst.error or not worst.output:
            worst = _Finding(error, name, where, _at(actual, where), _at(other, where))
    return worst


def _at(array, index: tuple) -> float:
    array = np.asarray(array, "float64")
    return float(array[index]) if array.ndim == len(index) else NAN


def _case_failures(name, tolerance, errors, gaps) -> list[str]:
    messages = []
    for backend, finding in errors.items():
        if isinstance(finding, str):
            messages.append(f"{name}: {backend} raised {finding}")
        elif not finding.error <= tolerance:
            messages.append(
                f"{name}: {backend} {_where(finding)} = {finding.got!r}, NumPy "
                f"float64 reference = {finding.expected!r} (relative error "
                f"{finding.error:.2e} > tolerance {tolerance:.0e})"
            )
    for (first, second), finding in gaps.items():
        if not finding.error <= tolerance:
            messages.append(
                f"{name}: {first} {_where(finding)} = {finding.got!r}, {second} "
                f"= {finding.expected!r} (gap {finding.error:.2e} > tolerance "
                f"{tolerance:.0e})"
            )
    return messages


def _where(finding: _Finding) -> str:
    index = "".join(f"[{i}]" for i in finding.index)
    return f"{finding.output}{index}"


def _format(error: float, tolerance: float) -> str:
    text = "0" if error == 0 else f"{error:.1e}"
    return text if error <= tolerance else f"[red]{text}[/red]"


def _table(results, backends, runs) -> Table:
    devices = ", ".join(
        f"{backend} on {runs[backend].meta.get('device', '?')}" for backend in backends
    )
    tolerances = ", ".join(f"{dtype} {tol:.0e}" for dtype, tol in TOLERANCES.items())
    table = Table(
        title=f"kmask parity: worst relative error vs NumPy float64 ({devices})",
        caption=f"gap: worst backend-to-backend; tolerance {tolerances}",
    )
    table.add_column("case")
    table.add_column("dtype")
    for backend in backends:
        table.add_column(backend, justify="right")
    table.add_column("gap", justify="right")
    table.add_column("")
    for result in results:
        tolerance = result["tolerance"]
        cells = []
        for backend in backends:
            finding = result["errors"].get(backend)
            if finding is None:
                cells.append("[red]no run[/red]")
            elif isinstance(finding, str):
                cells.append("[red]raised[/red]")
            else:
                cells.append(_format(finding.error, tolerance))
        gaps = [finding.error for finding in result["gaps"].values()]
        passed = not result["failures"] and len(result["errors"]) == len(backends)
        table.add_row(
            result["case"].name,
            result["case"].dtype,
            *cells,
            _format(max(gaps), tolerance) if gaps else "-",
            "ok" if passed else "[red]FAIL[/red]",
        )
    return table


def _summary(results, backends) -> list[str]:
    """The worst error per backend and precision, and the worst gap per pair."""
    lines = []
    for precision in ("float32", "half"):
        chosen = [
            result
            for result in results
            if (result["case"].dtype == "float32") == (precision == "float32")
        ]
        worst = []
        for backend in backends:
            found = [
                (result["errors"][backend].error, result["case"].name)
                for result in chosen
                if isinstance(result["errors"].get(backend), _Finding)
            ]
            if found:
                error, name = max(found)
                worst.append(f"{backend} {error:.1e} ({name})")
        if worst:
            lines.append(f"worst vs NumPy, {precision}: " + "; ".join(worst))
        gaps = []
        for pair in combinations(backends, 2):
            found = [
                (result["gaps"][pair].error, result["case"].name)
                for result in chosen
                if pair in result["gaps"]
            ]
            if found:
                error, name = max(found)
                gaps.append(f"{pair[0]}-{pair[1]} {error:.1e} ({name})")
        if gaps:
            lines.append(f"worst gap, {precision}: " + "; ".join(gaps))
    return lines


def _one_device_gaps(results) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per backend, each `devices/` setup's weights against the same
    backend's one-device weights (relative to NumPy's), and a message for
    each gap off tolerance."""
    from kmask import parity_devices

    by_name = {result["case"].name: result for result in results}
    gaps: dict[str, dict[str, float]] = {}
    messages = []
    for result in results:
        case = result["case"]
        if case.runner != "devices" or case.spec["setup"] == "one_device":
            continue
        one = by_name.get(f"devices/one_device/{case.spec['source']}")
        for backend, outputs in result["outputs"].items():
            if one is None or backend not in one["outputs"]:
                continue
            error = _deviation(
                outputs["weights"],
                one["outputs"][backend]["weights"],
                case.expected["weights"],
            )[0]
            setup = parity_devices.label(backend, case.spec["setup"])
            gaps.setdefault(backend, {})
            gaps[backend][setup] = max(gaps[backend].get(setup, 0.0), error)
            if not error <= result["tolerance"]:
                messages.append(
                    f"{case.name}: {backend} ({setup}) weights differ from its "
                    f"one-device run by {error:.2e} > tolerance "
                    f"{result['tolerance']:.0e}"
                )
    return gaps, messages


def _json_value(value: Any) -> Any:
    """Numbers for strict JSON: NaN and infinities become null."""
    array = np.asarray(value, "float64")
    return np.where(np.isfinite(array), array, None).tolist()


def _json_spec(value: Any) -> Any:
    """A spec for strict JSON: a NaN pad value becomes "nan"."""
    if isinstance(value, dict):
        return {key: _json_spec(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_spec(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _report(results, runs, failures, seconds) -> dict[str, Any]:
    def finding(found):
        if isinstance(found, str):
            return {"raised": found}
        return {
            "error": _json_value(found.error),
            "output": found.output,
            "index": list(found.index),
            "got": _json_value(found.got),
            "expected": _json_value(found.expected),
        }

    cases = []
    for result in results:
        case = result["case"]
        scalars = [
            name for name in case.expected if name not in ("grad", "output", "mask")
        ]
        values = {
            name: {
                "numpy": _json_value(case.expected[name]),
                **{
                    backend: _json_value(outputs[name])
                    for backend, outputs in result["outputs"].items()
                },
            }
            for name in scalars
        }
        cases.append(
            {
                "name": case.name,
                "runner": case.runner,
                "dtype": case.dtype,
                "tolerance": result["tolerance"],
                "spec": _json_spec(case.spec),
                "errors": {b: finding(f) for b, f in result["errors"].items()},
                "gaps": {
                    f"{a}-{b}": finding(f) for (a, b), f in result["gaps"].items()
                },
                "values": values,
            }
        )
    backends = {
        backend: {
            "returncode": run.returncode,
            "seconds": round(run.seconds, 2),
            **{key: run.meta.get(key) for key in ("version", "keras", "device")},
            **({} if run.returncode == 0 else {"log": run.log[-4000:]}),
        }
        for backend, run in runs.items()
    }
    return {
        "passed": not failures,
        "seed": SEED,
        "tolerances": TOLERANCES,
        "error_floor": ERROR_FLOOR,
        "error": "max_i |x_i - r_i| / max(max_i |r_i|, error_floor); the reference r "
        "rounded to the dtype of x; a gap uses another backend for r, scaled by "
        "the reference",
        "seconds": round(seconds, 2),
        "backends": backends,
        "failures": failures,
        "cases": cases,
    }


def _installed_backends() -> list[str]:
    return [backend for backend in BACKENDS if importlib.util.find_spec(backend)]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the parity suite; the command line of `python -m kmask.parity`.

    Args:
        argv: Command-line arguments; `sys.argv[1:]` when `None`.

    Returns:
        0 when every output of every backend is within tolerance, 1 when one
        is not (or a backend failed), 2 on a bad command line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m kmask.parity",
        description="Compare kmask's losses, metrics and layers across Keras "
        "backends and against float64 NumPy.",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        help="the backends to run (default: every one installed)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=(),
        metavar="TEXT",
        help="run only the cases whose name contains one of these",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the results here"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    console = Console(width=None if sys.stdout.isatty() else 140)
    cases = build_suite(args.cases)
    if args.list:
        for case in cases:
            console.print(case.name, case.dtype, highlight=False)
        console.print(f"{len(cases)} cases")
        return 0
    if not cases:
        parser.error(f"no case name contains any of {list(args.cases)}")
    backends = args.backends or _installed_backends()
    missing = [backend for backend in backends if not importlib.util.find_spec(backend)]
    if missing or not backends:
        parser.error(f"backends not installed: {missing or list(BACKENDS)}")
    started = time.perf_counter()
    console.print(f"{len(cases)} cases on {', '.join(backends)}, one process each")
    runs = _run_children(cases, backends, console)
    seconds = time.perf_counter() - started
    results = _compare(cases, runs)
    failures = [message for result in results for message in result["failures"]]
    device_gaps, device_failures = _one_device_gaps(results)
    failures += device_failures
    for backend, run in runs.items():
        if run.returncode != 0:
            failures.insert(
                0, f"{backend}: the child exited with status {run.returncode}"
            )
            console.print(
                f"[red]{backend} log:[/red]\n{run.log[-4000:]}", highlight=False
            )
    console.print(_table(results, backends, runs))
    for line in _summary(results, backends):
        console.print(line, highlight=False)
    for backend, gaps in device_gaps.items():
        console.print(
            f"{backend}, one device vs "
            + "; ".join(f"{setup}: {gap:.1e}" for setup, gap in gaps.items()),
            highlight=False,
        )
    if args.json:
        report = _report(results, runs, failures, seconds)
        report["one_device_gaps"] = device_gaps
        args.json.write_text(json.dumps(report, indent=1, allow_nan=False))
        console.print(f"results written to {args.json}")
    console.print(
        f"{len(cases)} cases x {len(backends)} backends in {seconds:.1f} s: "
        + ("all within tolerance" if not failures else f"{len(failures)} failures"),
        highlight=False,
    )
    for message in failures[:20]:
        console.print(f"[red]FAIL[/red] {message}", highlight=False, soft_wrap=True)
    if len(failures) > 20:
        console.print(f"... and {len(failures) - 20} more", highlight=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
