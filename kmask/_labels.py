"""Labels out of range, and whether a value is concrete (eager) or traced.

A sparse label outside `[0, classes)` at a real step is an error. Where the
labels have a value (eager execution), kmask raises a `ValueError` naming the
label, its position and the number of classes. Inside a traced or compiled
function (`jax.jit`, `tf.function`, XLA, `torch.compile`) nothing can be
raised, so the label is replaced by 0 before any gather (no backend error, no
read out of bounds) and the step's value becomes NaN: the loss or metric is
NaN, never a finite wrong number. Labels at padded steps may hold anything.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from kmask.ops._dispatch import compiling


def concrete(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array when it is concrete, `None` when symbolic.

    Inside a compiled function (tf.function, jax.jit, torch.compile) tensors
    have no value yet; JAX and TensorFlow refuse the conversion, each with its
    own exception type, and PyTorch's compiler is asked before trying.
    """
    if isinstance(value, keras.KerasTensor) or compiling():
        return None
    try:
        return np.asarray(ops.convert_to_numpy(value))
    except (TypeError, ValueError, NotImplementedError, RuntimeError, AttributeError):
        return None


def out_of_range_steps(labels: Any, classes: Any, valid: Any, argument: str = "y_true"):
    """The real steps whose label is outside `[0, classes)`: a boolean
    tensor of `labels`' shape (`valid` is `None` or broadcasts to it).
    An error names the labels `argument`.

    Raises:
        ValueError: in eager execution, when there is such a step.
    """
    classes = ops.cast(classes, labels.dtype)
    bad = ops.logical_or(
        ops.less(labels, ops.zeros_like(labels)), ops.greater_equal(labels, classes)
    )
    if valid is not None:
        bad = ops.logical_and(bad, _align(valid, len(labels.shape)))
    found = concrete(ops.any(bad))
    if found is not None and bool(found):
        _raise_out_of_range(
            concrete(bad), concrete(labels), concrete(classes), argument
        )
    return bad


def safe_labels(labels: Any, bad: Any):
    """`labels` with 0 at the `bad` steps, so that no gather reads out of
    range."""
    return ops.where(bad, ops.zeros_like(labels), labels)


def poison(per_step: Any, bad: Any):
    """`per_step` with NaN at the `bad` steps (a `where`, fused into the
    computation under XLA)."""
    nan = ops.full_like(per_step, float("nan"))
    return ops.where(bad, nan, per_step)


def _align(mask: Any, rank: int):
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < rank:
        mask = ops.expand_dims(mask, -1)
    return mask


def _raise_out_of_range(bad, labels, classes, argument: str) -> None:
    positions = np.argwhere(np.broadcast_to(bad, labels.shape))
    first = tuple(int(i) for i in positions[0])
    value = labels[first].item()
    position = f"{argument}[{', '.join(str(i) for i in first)}]" if first else argument
    hint = ""
    if value < 0:
        hint = (
            f". If {value} marks padding, pass mask_value={value} to the loss or metric"
        )
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected labels in "
        f"[0, {int(classes)}) ({int(classes)} classes) at every real step (a "
        f"padded step may hold any label). Received: {position}={value}, "
        f"{len(positions)} label(s) out of range at real steps{hint}"
    )
