"""Where masks come from: lengths, pad values, segments, the propagated mask,
and the real steps whose label is out of range.

A mask here is a boolean tensor that is `True` on real steps and `False` on
padding. Masks stay boolean until `kmask.reduce` casts them.

A sparse label outside `[0, classes)` at a real step is an error. Where the
labels have a value (eager execution), kmask raises a `ValueError` naming the
label, its position and the number of classes. Inside a traced or compiled
function (`jax.jit`, `tf.function`, XLA, `torch.compile`) nothing can be
raised, so the label is replaced by 0 before any gather (no backend error, no
read out of bounds) and the step's value becomes NaN: the loss or metric is
NaN, never a finite wrong number. Labels at padded steps
may hold anything.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from keras import ops

from kmask import _shapes
from kmask._keras_compat import get_keras_mask
from kmask._resolve import pad_values
from kmask.ops._dispatch import concrete
from kmask.typing import Tensor

__all__ = [
    "PADDINGS",
    "combine_masks",
    "keras_mask",
    "post_padded_lengths",
    "segment_step_counts",
    "sequence_mask",
    "value_mask",
]

PADDINGS = ("pre", "post")


def sequence_mask(
    lengths: Any, maxlen: int | None = None, padding: str = "post"
) -> Tensor:
    """Builds a boolean mask from sequence lengths.

    Args:
        lengths: Integer tensor of shape `[batch]`: the number of real steps of
            each sequence.
        maxlen: Length of the time axis. Defaults to `max(lengths)`, which
            needs concrete lengths (pass it explicitly inside a compiled
            function).
        padding: `"post"` when the padding follows the real steps (right
            padding), `"pre"` when it comes first (left padding, as in
            `##abb`).

    Returns:
        A boolean tensor of shape `[batch, maxlen]`, `True` on real steps.

    Example:

    >>> import kmask
    >>> from keras import ops
    >>> ops.convert_to_numpy(kmask.sequence_mask([3, 4], 5, padding="pre")).astype(int)
    array([[0, 0, 1, 1, 1],
           [0, 1, 1, 1, 1]])
    """
    if padding not in PADDINGS:
        raise ValueError(
            f"Invalid value for argument `padding`. Expected one of {PADDINGS}. "
            f"Received: padding={padding!r}"
        )
    if isinstance(maxlen, (bool, float, str, np.floating)):
        raise ValueError(
            "Invalid value for argument `maxlen`. Expected a non-negative "
            f"integer or None. Received: maxlen={maxlen!r}"
        )
    given = concrete(lengths)
    if given is not None:
        if given.ndim != 1:
            raise _shapes.invalid_shape("lengths", "[batch]", lengths=given.shape)
        if given.dtype.kind not in "iu":
            raise ValueError(
                "Invalid value for argument `lengths`. Expected integers "
                f"(the number of real steps of each sequence). Received: "
                f"lengths={given.tolist()} of dtype {given.dtype}"
            )
        if maxlen is None:
            maxlen = int(given.max()) if given.size else 0
        out_of_range = (given < 0) | (given > maxlen)
        if np.any(out_of_range):
            raise ValueError(
                f"Invalid value for argument `lengths`: every length must be in "
                f"[0, maxlen={maxlen}]. Received: lengths={given.tolist()}"
            )
    elif "int" not in str(lengths.dtype):
        raise ValueError(
            "Invalid value for argument `lengths`. Expected integers (the "
            f"number of real steps of each sequence). Received: lengths of "
            f"dtype {lengths.dtype}"
        )
    elif maxlen is None:
        raise ValueError(
            "Argument `maxlen` is required when `lengths` is a symbolic tensor "
            "(inside a compiled function). Received: maxlen=None"
        )
    lengths = ops.cast(ops.convert_to_tensor(lengths), "int32")
    positions = ops.arange(maxlen, dtype="int32")[None, :]
    if padding == "post":
        return ops.less(positions, lengths[:, None])
    return ops.greater_equal(positions, maxlen - lengths[:, None])


def value_mask(y: Any, mask_value: Any) -> Tensor:
    """Marks the steps of `y` that are not padding.

    For targets with a feature axis (rank 3 or more, or a vector
    `mask_value`), a step is padding when every feature on the last axis
    equals `mask_value` (a scalar, or a vector as long as the feature axis).
    For rank-2 sparse labels the comparison is elementwise. A NaN
    `mask_value` matches NaN.

    Args:
        y: Targets, e.g. one-hot `[batch, time, classes]` or sparse labels
            `[batch, time]`.
        mask_value: The pad value: a scalar such as `0` or `-100`, a vector
            such as the one-hot pad `[0, 0, 1]`, or `float("nan")`.

    Returns:
        A boolean tensor, `True` on real steps, of `y`'s shape without the
        feature axis when one is compared, else of `y`'s shape.

    Example:

    >>> import kmask
    >>> from keras import ops
    >>> y = [[[0, 0, 1], [1, 0, 0]], [[0, 1, 0], [0, 0, 1]]]
    >>> ops.convert_to_numpy(kmask.value_mask(y, [0, 0, 1]))
    array([[False,  True],
           [ True, False]])
    """
    return _not_pad(ops.convert_to_tensor(y), pad_values(mask_value))


def _not_pad(y, pad: float | tuple[float, ...]):
    """`value_mask` of a tensor `y`, `pad` as `kmask._resolve.pad_values`
    returns it."""
    has_feature_axis = isinstance(pad, tuple) or len(y.shape) >= 3
    if isinstance(pad, tuple) and y.shape[-1] not in (None, len(pad)):
        raise ValueError(
            "Invalid value for argument `mask_value`. Expected a scalar or a "
            f"vector as long as the feature axis of the targets ({y.shape[-1]}). "
            f"Received: mask_value={list(pad)} (length {len(pad)}), "
            f"y.shape={tuple(y.shape)}"
        )
    is_pad = _equals_pad(y, pad)
    if has_feature_axis:
        is_pad = ops.all(is_pad, axis=-1)
    return ops.logical_not(is_pad)


def target_padding(
    y: Any, pads: tuple = (), ignore_class: int | None = None
) -> Tensor | None:
    """The real steps the targets `y` (a tensor) mark: not any of `pads` (pad
    values as `kmask._resolve.pad_values` returns them, see `value_mask`;
    `None`s are skipped) and not `ignore_class`; `None` when there is
    neither."""
    masks = [_not_pad(y, pad) for pad in pads if pad is not None]
    return combine_masks(*masks, ignore_class_mask(y, ignore_class))


def ignore_class_mask(y: Any, ignore_class: int | None) -> Tensor | None:
    """`True` where the sparse label in `y` is not `ignore_class` (Keras's
    argument), `None` when there is no class to ignore."""
    if ignore_class is None:
        return None
    y = ops.convert_to_tensor(y)
    return ops.not_equal(y, ops.cast(ignore_class, y.dtype))


def combine_masks(*masks: Any, shape: Any = None) -> Tensor | None:
    """ANDs the masks that are not `None`; `None` when all are.

    Masks of rank `[batch]` combine with per-step masks by broadcasting over
    the trailing axes; with `shape` (the per-step shape) the result is
    broadcast to it (a mask of its rank has it already: masks are `[batch]`
    or a leading part of the per-step shape).
    """
    present = [ops.cast(mask, "bool") for mask in masks if mask is not None]
    if not present:
        return None
    combined = present[0]
    for mask in present[1:]:
        rank = max(len(combined.shape), len(mask.shape))
        combined = ops.logical_and(
            _shapes.align_rank(combined, rank), _shapes.align_rank(mask, rank)
        )
    if shape is not None and len(combined.shape) < len(shape):
        combined = _shapes.broadcast_to_steps(combined, shape)
    return combined


def targets_padding(
    target_mask: Any, y_true: Any, sparse: bool, dense: bool
) -> Tensor | None:
    """The padding `target_mask` (`y_true -> mask or None`) finds in `y_true`.

    `value_mask` guesses from the rank whether the last axis holds features
    (rank 3 or more) or labels; the caller knows. Sparse labels get a unit
    feature axis, so that a pad value is compared label by label whatever
    their rank; `dense` targets (of the predictions' rank) of rank 1 or 2 get
    leading unit axes, so that their last axis is read as features. The mask
    loses the added axes again.
    """
    if sparse:
        padding = target_mask(ops.expand_dims(y_true, -1))
        while padding is not None and len(padding.shape) > len(y_true.shape):
            padding = ops.squeeze(padding, axis=-1)
        return padding
    if not dense:
        return target_mask(y_true)
    added = max(3 - len(y_true.shape), 0)
    for _ in range(added):
        y_true = ops.expand_dims(y_true, 0)
    padding = target_mask(y_true)
    for _ in range(added if padding is not None else 0):
        padding = ops.squeeze(padding, axis=0)
    return padding


def labels_out_of_range(
    labels: Any, classes: Any, valid: Any, argument: str = "y_true"
) -> tuple[Tensor, Tensor]:
    """The real steps whose label is outside `[0, classes)`, and the labels
    with 0 there (so that no gather reads out of range).

    Args:
        labels: Integer labels.
        classes: The number of classes, an int or a scalar tensor.
        valid: `None`, or the real steps (`[batch]` or a leading part of
            `labels`' shape).
        argument: The labels' argument, named by the error.

    Returns:
        `(safe_labels, out_of_range)`: `labels` with 0 at the steps out of
        range, and a boolean tensor of `labels`' shape marking them.

    Raises:
        ValueError: in eager execution, when there is such a step.
    """
    classes = ops.cast(classes, labels.dtype)
    bad = ops.logical_or(
        ops.less(labels, ops.zeros_like(labels)), ops.greater_equal(labels, classes)
    )
    if valid is not None:
        if len(valid.shape) < len(labels.shape):
            valid = _shapes.align_rank(valid, len(labels.shape))
        bad = ops.logical_and(bad, ops.cast(valid, "bool"))
    found = concrete(ops.any(bad))
    if found is not None and bool(found):
        _raise_out_of_range(
            concrete(bad), concrete(labels), concrete(classes), argument
        )
    return ops.where(bad, ops.zeros_like(labels), labels), bad


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


def keras_mask(y_pred: Any) -> Tensor | None:
    """Returns the mask Keras propagated onto `y_pred`, or `None`.

    On JAX the mask is not an attribute of the array, so only Keras's own
    (internal) accessor finds it, and this function uses it there.
    """
    return get_keras_mask(y_pred)


def post_padded_lengths(mask: Any, argument: str = "mask") -> Tensor:
    """The number of real steps of each row of a `[batch, time]` mask whose
    real steps come first (padding `"post"`), as int32 `[batch]`.

    Raises a `ValueError` naming `argument` when the mask is concrete (eager)
    and a real step follows a padded one; inside a compiled function the
    order cannot be checked and the real steps are counted.
    """
    values = concrete(mask)
    if values is not None:
        if values.ndim != 2:
            raise _shapes.invalid_shape(
                argument, "[batch, time]", **{argument: values.shape}
            )
        real = values.astype(bool)
        after_padding = real[:, 1:] & ~real[:, :-1]
        if np.any(after_padding):
            rows = np.flatnonzero(after_padding.any(axis=1))
            raise ValueError(
                f"Invalid value for argument `{argument}`: the real steps must "
                "come first and the padding after them (padding 'post'). "
                f"Received: a real step after a padded one in rows {rows.tolist()}"
            )
    return ops.sum(ops.cast(mask, "int32"), axis=-1)


def segment_step_counts(segment_ids: Any, counted: Any) -> Tensor:
    """At every step, the sum of `counted` over the steps of its segment.

    A segment is a run of equal ids in a row of `segment_ids` (`[batch,
    time]`); packed sequences are numbered `1, 2, ...` along the row and `0`
    is padding. With `counted` the real steps (0 or 1) this is the length of
    each step's sequence. Linear in the number of steps.

    Args:
        segment_ids: Integer tensor `[batch, time]`.
        counted: Numbers to add up, `[batch, time]`.

    Returns:
        A tensor of `counted`'s dtype and shape.
    """
    segment_ids = ops.convert_to_tensor(segment_ids)
    counted = ops.convert_to_tensor(counted)
    batch, time = _static_or_dynamic(segment_ids, 0), _static_or_dynamic(segment_ids, 1)
    starts = ops.concatenate(
        [
            ops.ones_like(segment_ids[:, :1], dtype="int32"),
            ops.cast(ops.not_equal(segment_ids[:, 1:], segment_ids[:, :-1]), "int32"),
        ],
        axis=1,
    )
    run = ops.cumsum(starts, axis=1) - 1
    rows = ops.expand_dims(ops.arange(batch, dtype="int32"), 1)
    run_ids = ops.reshape(rows * time + run, (-1,))
    sums = ops.segment_sum(
        ops.reshape(counted, (-1,)), run_ids, num_segments=batch * time
    )
    return ops.reshape(ops.take(sums, run_ids, axis=0), ops.shape(counted))


def _static_or_dynamic(tensor, axis: int):
    """The size of `axis`: an int where it is static, else a scalar tensor."""
    size = tensor.shape[axis]
    return ops.shape(tensor)[axis] if size is None else size


def _equals_pad(y, pad: float | tuple[float, ...]):
    """Elementwise `y == pad`, with NaN equal to NaN."""
    if not isinstance(pad, tuple):
        if math.isnan(pad):
            return ops.isnan(y)
        return ops.equal(y, ops.convert_to_tensor(pad, dtype=y.dtype))
    nan_positions = [math.isnan(value) for value in pad]
    finite_pad = [0.0 if math.isnan(value) else value for value in pad]
    matches_value = ops.equal(y, ops.convert_to_tensor(finite_pad, dtype=y.dtype))
    if not any(nan_positions):
        return matches_value
    return ops.where(ops.convert_to_tensor(nan_positions), ops.isnan(y), matches_value)
