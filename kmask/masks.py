"""Where masks come from: lengths, pad values, the propagated Keras mask.

A mask here is a boolean tensor that is `True` on real steps and `False` on
padding. Masks stay boolean until `kmask.reduce` casts them.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from kmask._keras_compat import get_keras_mask

PADDINGS = ("pre", "post")
# Padded steps are replaced by these before a loss sees them, so the loss is
# finite there whatever the padding held: 0.5 is a valid probability, logit
# and regression value, 0 a valid label.
_PAD_PREDICTION = 0.5
_PAD_TARGET = 0


def sequence_mask(lengths: Any, maxlen: int | None = None, padding: str = "post"):
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
    concrete = _concrete(lengths)
    if concrete is not None:
        if concrete.ndim != 1:
            raise ValueError(
                "Argument `lengths` must have shape [batch]. "
                f"Received: lengths.shape={concrete.shape}"
            )
        if maxlen is None:
            maxlen = int(concrete.max()) if concrete.size else 0
        out_of_range = (concrete < 0) | (concrete > maxlen)
        if np.any(out_of_range):
            raise ValueError(
                f"Invalid value for argument `lengths`: every length must be in "
                f"[0, maxlen={maxlen}]. Received: lengths={concrete.tolist()}"
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


def value_mask(y: Any, mask_value: Any):
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
        A boolean tensor, `True` on real steps: `y`'s shape without the
        feature axis when one is compared, else `y`'s shape.

    Example:

    >>> import kmask
    >>> from keras import ops
    >>> y = [[[0, 0, 1], [1, 0, 0]], [[0, 1, 0], [0, 0, 1]]]
    >>> ops.convert_to_numpy(kmask.value_mask(y, [0, 0, 1]))
    array([[False,  True],
           [ True, False]])
    """
    y = ops.convert_to_tensor(y)
    pad = np.asarray(mask_value, dtype="float64")
    if pad.ndim > 1:
        raise ValueError(
            "Argument `mask_value` must be a scalar or a vector. "
            f"Received: mask_value with shape {pad.shape}"
        )
    has_feature_axis = pad.ndim == 1 or len(y.shape) >= 3
    if pad.ndim == 1 and y.shape[-1] is not None and y.shape[-1] != pad.shape[0]:
        raise ValueError(
            "Argument `mask_value` must be as long as the feature axis of the "
            f"targets. Received: mask_value={pad.tolist()} (length "
            f"{pad.shape[0]}) for targets of shape {tuple(y.shape)}"
        )
    is_pad = _equals_pad(y, pad)
    if has_feature_axis:
        is_pad = ops.all(is_pad, axis=-1)
    return ops.logical_not(is_pad)


def combine_masks(*masks: Any):
    """ANDs the masks that are not `None`; `None` when all are.

    Masks of rank `[batch]` combine with per-step masks by broadcasting over
    the trailing axes.
    """
    present = [ops.cast(mask, "bool") for mask in masks if mask is not None]
    if not present:
        return None
    combined = present[0]
    for mask in present[1:]:
        rank = max(len(combined.shape), len(mask.shape))
        combined = ops.logical_and(_align_rank(combined, rank), _align_rank(mask, rank))
    return combined


def step_shape(y_pred: Any, class_axis: int = -1) -> tuple:
    """The shape of the per-step loss: `y_pred`'s without its class axis."""
    shape = list(y_pred.shape)
    if len(shape) > 1:
        del shape[class_axis]
    return tuple(shape)


def weight_mask(sample_weight: Any, steps: tuple):
    """The steps a `sample_weight` keeps (a weight of 0 is padding).

    Args:
        sample_weight: Weights, `[batch]` or the per-step shape `steps`;
            trailing axes of size 1 beyond it (Keras's `[batch, time, 1]`)
            are squeezed.
        steps: The per-step shape, see `step_shape`.

    Returns:
        A boolean tensor, `False` where the weight is 0.
    """
    sample_weight = ops.convert_to_tensor(sample_weight)
    while len(sample_weight.shape) > len(steps) and sample_weight.shape[-1] == 1:
        sample_weight = ops.squeeze(sample_weight, axis=-1)
    if not fits_steps(tuple(sample_weight.shape), steps):
        raise ValueError(
            f"Argument `sample_weight` must have shape [batch] = {steps[:1]} or "
            f"the per-step shape {steps}. "
            f"Received: sample_weight.shape={tuple(sample_weight.shape)}"
        )
    return ops.not_equal(sample_weight, ops.zeros_like(sample_weight))


def fill_padding(y_true: Any, y_pred: Any, valid: Any, class_axis: int = -1):
    """Replaces the padded steps of `y_true` and `y_pred` by harmless values.

    `where` selects them away, so whatever the padding held (NaN, inf, a label
    of -100) reaches neither a loss nor its gradient: the gradient at a padded
    step is exactly 0.

    Args:
        y_true: Targets, with or without `y_pred`'s class axis.
        y_pred: Predictions, `[batch, ..., classes]`.
        valid: Boolean mask, `[batch]` or the per-step shape (`y_pred`'s
            shape without `class_axis`).
        class_axis: The axis of `y_pred` the loss reduces.

    Returns:
        `(y_true, y_pred)` with padded steps replaced.
    """
    _check_fits(valid, y_pred, class_axis)
    return (
        _fill(y_true, valid, _PAD_TARGET, class_axis),
        _fill(y_pred, valid, _PAD_PREDICTION, class_axis),
    )


def per_step_mask(valid: Any, y_pred: Any, class_axis: int = -1):
    """`valid` broadcast to the per-step shape of `y_pred`.

    Args:
        valid: Boolean mask, `[batch]` or the per-step shape (`y_pred`'s
            shape without `class_axis`), or any leading part of it.
        y_pred: Predictions, `[batch, ..., classes]`.
        class_axis: The axis of `y_pred` the loss reduces.

    Returns:
        A boolean tensor of the per-step shape.
    """
    _check_fits(valid, y_pred, class_axis)
    steps = list(ops.shape(y_pred))
    del steps[class_axis]
    return broadcast_to_steps(valid, tuple(steps))


def broadcast_to_steps(mask: Any, steps: tuple):
    """`mask` (`[batch]` or a leading part of `steps`) broadcast to `steps`,
    the per-step shape; its trailing axes are added, not its leading ones."""
    mask = ops.convert_to_tensor(mask)
    return ops.broadcast_to(_align_rank(mask, len(steps)), steps)


def keras_mask(y_pred: Any):
    """Returns the mask Keras propagated onto `y_pred`, or `None`.

    On JAX the mask is not an attribute of the array, so only Keras's own
    (internal) accessor finds it; `kmask._keras_compat` looks it up.
    """
    return get_keras_mask(y_pred)


def fits_steps(shape: tuple, step_shape: tuple) -> bool:
    """Whether a mask or weight of `shape` fits per-step values of
    `step_shape`: `[batch]` or any leading part of it (unknown dims match)."""
    return len(shape) <= len(step_shape) and all(
        got is None or want is None or got == want
        for got, want in zip(shape, step_shape[: len(shape)], strict=True)
    )


def _check_fits(valid, y_pred, class_axis: int) -> tuple:
    """Raises unless `valid` fits the steps of `y_pred`; returns the steps."""
    steps = step_shape(y_pred, class_axis)
    if not fits_steps(tuple(valid.shape), steps):
        raise ValueError(
            f"The mask has shape {tuple(valid.shape)}, which does not fit "
            f"predictions of shape {tuple(y_pred.shape)}: expected [batch] or "
            f"the per-step shape {steps}."
        )
    return steps


def _fill(tensor, valid, fill_value, class_axis: int):
    extra_axes = len(tensor.shape) - len(valid.shape)
    if extra_axes == 1 and len(valid.shape) > 1:
        valid = ops.expand_dims(valid, class_axis)
    else:
        valid = _align_rank(valid, len(tensor.shape))
    return ops.where(valid, tensor, ops.cast(fill_value, tensor.dtype))


def _align_rank(mask, rank: int):
    """Appends trailing axes to `mask` until it has `rank` dimensions."""
    while len(mask.shape) < rank:
        mask = ops.expand_dims(mask, -1)
    return mask


def _equals_pad(y, pad: np.ndarray):
    """Elementwise `y == pad`, with NaN equal to NaN."""
    nan_positions = np.isnan(pad)
    if not np.any(nan_positions):
        return ops.equal(y, ops.convert_to_tensor(pad, dtype=y.dtype))
    if pad.ndim == 0:
        return ops.isnan(y)
    finite_pad = np.where(nan_positions, 0.0, pad)
    matches_value = ops.equal(y, ops.convert_to_tensor(finite_pad, dtype=y.dtype))
    return ops.where(ops.convert_to_tensor(nan_positions), ops.isnan(y), matches_value)


def _concrete(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array when it is concrete, `None` when symbolic.

    Inside a compiled function (tf.function, jax.jit) tensors have no value
    yet; each backend refuses the conversion with its own exception type.
    """
    if isinstance(value, keras.KerasTensor):
        return None
    try:
        return np.asarray(ops.convert_to_numpy(value))
    except (TypeError, ValueError, NotImplementedError, RuntimeError, AttributeError):
        return None
