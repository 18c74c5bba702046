"""The inputs of the parity suite: clean batches, and the mask sources that pad
them the way a user's data is padded and say how the padding reaches the loss.

A case's inputs come from `case_rng(name)`, seeded with `SEED` and the case's
name, so that they do not depend on which cases run.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from tools.parity.losses import Loss
from tools.parity.references import np_log_softmax, np_sequence_mask

SEED = 3
HALF_DTYPES = ("float16", "bfloat16")
BATCH, STEPS, CLASSES, FEATURES = 4, 7, 5, 3
NAN = float("nan")


def case_rng(name: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def round_to(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array`'s values rounded to `dtype` (integers are kept)."""
    array = np.asarray(array)
    if array.dtype.kind != "f":
        return array
    if dtype == "bfloat16":
        return array.astype(ml_dtypes.bfloat16).astype("float32")
    return array.astype(dtype).astype("float32")


def clean(rng, loss: Loss, batch: int = BATCH, steps: int = STEPS):
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
    return y_true, np.exp(np_log_softmax(logits)).astype("float32")


def random_lengths(rng) -> np.ndarray:
    """One empty sequence, one full, two in between, in random order."""
    middle = rng.integers(1, STEPS, size=2)
    return rng.permutation([0, STEPS, *middle]).astype("int32")


def _scattered(rng, fraction: float = 0.3) -> np.ndarray:
    return rng.random((BATCH, STEPS)) < fraction


def garbage(y_true, y_pred, padded):
    """What padding holds when only a mask says so: labels no loss accepts
    (-1), infinite targets, NaN predictions."""
    steps = padded[..., None]
    y_pred = np.where(steps, NAN, y_pred).astype("float32")
    if y_true.dtype.kind == "i":
        return np.where(padded, -1, y_true).astype("int32"), y_pred
    return np.where(steps, np.inf, y_true).astype("float32"), y_pred


def mark(y_true, padded, mask_value):
    """Writes the pad value into the padded steps of the targets."""
    if y_true.dtype.kind == "i":
        return np.where(padded, mask_value, y_true).astype("int32")
    pad = np.broadcast_to(np.asarray(mask_value, "float32"), y_true.shape)
    return np.where(padded[..., None], pad, y_true).astype("float32")


def avoid(y_true, mask_value):
    """Changes the real targets that happen to equal the pad value."""
    pad = np.asarray(mask_value, "float64")
    if y_true.dtype.kind == "i":
        return np.where(y_true == pad, (y_true + 1) % CLASSES, y_true).astype("int32")
    is_pad = np.all(y_true == pad, axis=-1, keepdims=True)
    return np.where(is_pad, np.roll(y_true, 1, axis=-1), y_true).astype("float32")


@dataclass
class Padded:
    """A batch padded by one mask source, with what the reference needs.

    `valid` holds the real steps the masks find and `weight` the sample
    weight, as NumPy sees them; `call` tells the child how the padding reaches
    the API (see `runner._run_loss`), `arrays` what it needs for that.
    """

    y_true: np.ndarray
    y_pred: np.ndarray
    valid: np.ndarray
    weight: np.ndarray | None = None
    call: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def all_real():
    return np.ones((BATCH, STEPS), bool)


def _target_pad(target: str):
    """The pad value a user marks `target`s with: -100 or NaN."""
    return -100 if target == "labels" else NAN


def _by_lengths(padding: str, api: str = "call"):
    """Lengths, as `sample_weight=kmask.sequence_mask(...)` (Keras's way) or
    as `kmask.masked_loss(mask=...)`."""

    def pad(rng, loss, y_true, y_pred) -> Padded:
        lengths = random_lengths(rng)
        real = np_sequence_mask(lengths, STEPS, padding)
        y_true, y_pred = garbage(y_true, y_pred, ~real)
        call = {"api": api, "lengths_padding": padding}
        if api == "call":
            return Padded(y_true, y_pred, all_real(), real, call, {"lengths": lengths})
        return Padded(y_true, y_pred, real, None, call, {"lengths": lengths})

    return pad


def _by_pad_value(pads: dict[str, Any]):
    """A pad value in the targets, `mask_value=pads[target]`."""

    def pad(rng, loss, y_true, y_pred) -> Padded:
        mask_value = pads[loss.target]
        padded = _scattered(rng)
        y_true = mark(avoid(y_true, mask_value), padded, mask_value)
        y_pred = np.where(padded[..., None], NAN, y_pred).astype("float32")
        return Padded(y_true, y_pred, ~padded, None, {"mask_value": mask_value})

    return pad


def _propagated(rng, loss, y_true, y_pred) -> Padded:
    """`keras.layers.Masking(0.0)` on `y_pred`: the mask Keras propagates."""
    padded = ~np_sequence_mask(random_lengths(rng), STEPS, "post")
    y_true, _ = garbage(y_true, y_pred, padded)
    y_pred = np.where(padded[..., None], 0.0, y_pred).astype("float32")
    return Padded(y_true, y_pred, ~padded, None, {"masking": 0.0})


def _sequence_weights(rng, loss, y_true, y_pred) -> Padded:
    """`sample_weight` of shape `[batch]`; a weight of 0 drops a sequence."""
    weights = rng.uniform(0.5, 2.0, BATCH).astype("float32")
    weights[rng.integers(BATCH)] = 0.0
    dropped = np.repeat((weights == 0)[:, None], STEPS, axis=1)
    y_true, y_pred = garbage(y_true, y_pred, dropped)
    return Padded(y_true, y_pred, all_real(), weights, {}, {"sample_weight": weights})


def _step_weights(rng, loss, y_true, y_pred) -> Padded:
    """`sample_weight` of shape `[batch, time]`, 0 on padding."""
    real = np_sequence_mask(random_lengths(rng), STEPS, "post")
    weights = (rng.uniform(0.5, 2.0, (BATCH, STEPS)) * real).astype("float32")
    y_true, y_pred = garbage(y_true, y_pred, ~real)
    return Padded(y_true, y_pred, all_real(), weights, {}, {"sample_weight": weights})


def _combined(api: str):
    """Every source at once. `"call"`: per-step weights times a left-padded
    length mask as `sample_weight`; `"function"`: `kmask.masked_loss` with a
    right-padded `mask=` and per-sequence weights. Both add a pad value in
    the targets and a propagated mask."""

    def pad(rng, loss, y_true, y_pred) -> Padded:
        lengths = random_lengths(rng)
        padding = "pre" if api == "call" else "post"
        real = np_sequence_mask(lengths, STEPS, padding)
        mask_value = _target_pad(loss.target)
        pad_marked = _scattered(rng, 0.2) & real
        masked_out = _scattered(rng, 0.2) & real & ~pad_marked
        y_true = mark(avoid(y_true, mask_value), pad_marked, mask_value)
        y_pred = np.where(masked_out[..., None], 0.0, y_pred)
        y_true, y_pred = garbage(y_true, y_pred, ~real)
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
        return Padded(y_true, y_pred, valid, weight, call, arrays)

    return pad


def _all_padding(how: str):
    """Not one real step: zero lengths, every target a pad, or every
    prediction masked by `Masking`."""

    def pad(rng, loss, y_true, y_pred) -> Padded:
        every_step = all_real()
        no_step = ~every_step
        if how == "lengths":
            y_true, y_pred = garbage(y_true, y_pred, every_step)
            lengths = np.zeros(BATCH, "int32")
            call = {"lengths_padding": "post"}
            return Padded(
                y_true, y_pred, every_step, no_step, call, {"lengths": lengths}
            )
        if how == "pad_id":
            mask_value = _target_pad(loss.target)
            y_true = mark(y_true, every_step, mask_value)
            y_pred = np.full_like(y_pred, NAN)
            return Padded(y_true, y_pred, no_step, None, {"mask_value": mask_value})
        y_true, _ = garbage(y_true, y_pred, every_step)
        return Padded(y_true, np.zeros_like(y_pred), no_step, None, {"masking": 0.0})

    return pad


def _no_padding(masked: bool):
    """Every step real: no mask at all, or every mask present and empty."""

    def pad(rng, loss, y_true, y_pred) -> Padded:
        if not masked:
            return Padded(y_true, y_pred, all_real())
        lengths = np.full(BATCH, STEPS, "int32")
        call = {"lengths_padding": "post", "mask_value": _target_pad(loss.target)}
        return Padded(
            y_true, y_pred, all_real(), all_real(), call, {"lengths": lengths}
        )

    return pad


def _one_token(rng, loss, y_true, y_pred) -> Padded:
    """A single real step in the batch, left-padded."""
    lengths = np.zeros(BATCH, "int32")
    lengths[rng.integers(BATCH)] = 1
    real = np_sequence_mask(lengths, STEPS, "pre")
    y_true, y_pred = garbage(y_true, y_pred, ~real)
    call = {"lengths_padding": "pre"}
    return Padded(y_true, y_pred, all_real(), real, call, {"lengths": lengths})


_EVERY_TARGET = frozenset({"labels", "one_hot", "binary", "regression"})
_FLOAT_TARGETS = frozenset({"one_hot", "binary", "regression"})
ONE_HOT_PAD = [0.0] * (CLASSES - 1) + [1.0]


@dataclass(frozen=True)
class _Source:
    pad: Callable[..., Padded]
    targets: frozenset = _EVERY_TARGET
    functional: bool = False  # calls kmask.masked_loss, which needs a Keras loss name

    def fits(self, loss: Loss) -> bool:
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
            {"one_hot": ONE_HOT_PAD, "binary": [-1.0], "regression": [0.5, -1.0, 2.0]}
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
ALL_SOURCES = {**MASK_SOURCES, **EDGE_SOURCES}
