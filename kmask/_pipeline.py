"""masks -> neutralise padded steps -> per-step values: the one pipeline.

Every kmask loss, metric and the fused head run it:

1. `prepare`: `y_pred` in float32 (or float64) with its class axis moved
   last (so everything downstream reduces the last axis), sparse labels of
   shape `[..., 1]` squeezed, the shapes checked, and the real steps found:
   the AND of the mask Keras propagated onto `y_pred`, the padding found in
   `y_true` (a pad value, `ignore_class`), an explicit mask and the steps
   whose `sample_weight` is 0 (`valid_steps`). Sparse labels out of range at
   a real step raise in eager execution and make the step NaN when traced
   (`kmask._labels`).
2. `per_step_values`: padded steps neutralised with `where` before the
   per-step function sees them (never multiplied by 0 after: `0 * NaN` is
   NaN, and so is its gradient), or the mask handed to a fused op that
   selects them away inside its own gradient.
3. The caller reduces: a loss with `kmask.masked_reduce`, a metric with
   `masked_sum_and_count`, the fused head chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from keras import ops

from kmask import _labels
from kmask._shapes import (
    check_fits_steps,
    check_target_kind,
    check_targets,
    step_shape,
)
from kmask._steps import (
    accumulation_dtype,
    fill_padding,
    per_step_mask,
    squeeze_trailing,
    weight_mask,
)
from kmask.masks import combine_masks, keras_mask

# `(y_true, y_pred, valid) -> per-step values` where `valid` is a boolean
# mask of the per-step shape, or `None`.
MaskedCall = Callable[[Any, Any, Any], Any]


class Steps(NamedTuple):
    """The inputs of a per-step function, with the steps that are real."""

    y_true: Any
    y_pred: Any
    valid: Any  # boolean, `[batch]` or a leading part of the per-step shape; or None
    sample_weight: Any
    # The masks alone, without the zero weights: what `sum_over_batch_size`
    # counts, as Keras does. `None` when there is no mask.
    masked: Any = None
    # The real steps whose label is out of range (NaN there), or None.
    out_of_range: Any = None


def valid_steps(
    steps: tuple,
    *masks: Any,
    mask: Any = None,
    sample_weight: Any = None,
    **context: Any,
):
    """The AND of `masks`, the explicit `mask` and the steps whose
    `sample_weight` is not 0; `None` when there is none of them.

    Args:
        steps: The per-step shape.
        *masks: Masks found by kmask (propagated, pad value), or `None`.
        mask: An explicit mask, checked against `steps`.
        sample_weight: Weights, `[batch]` or the per-step shape, checked.
        **context: The shapes an error names besides the argument's own.
    """
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
        check_fits_steps("mask", tuple(mask.shape), steps, **context)
    weighted = None
    if sample_weight is not None:
        weighted = weight_mask(sample_weight, steps, **context)
    return combine_masks(*masks, mask, weighted)


def prepare(
    y_true: Any,
    y_pred: Any,
    *,
    dtype: Any,
    target_mask: Callable[[Any], Any],
    target_dtype: Any = None,
    class_axis: int = -1,
    mask: Any = None,
    sample_weight: Any = None,
    sparse_labels: bool = False,
    target_kind: str | None = None,
    family: str = "loss",
) -> Steps:
    """Step 1: tensors of the right dtype and shape, and the real steps.

    Args:
        y_true: Targets.
        y_pred: Predictions; a mask Keras propagated onto them counts.
        dtype: The caller's dtype: `y_pred` is computed in float32 (float64
            stays float64) whatever it is.
        target_mask: `y_true -> mask` of the padding in the targets, or `None`.
        target_dtype: The dtype of the targets handed on; `y_pred`'s when
            `None`.
        class_axis: The axis of `y_pred` the per-step function reduces; it
            is moved last (with `y_true`'s when it has `y_pred`'s rank), and
            the per-step function sees it last.
        mask: Optional explicit mask.
        sample_weight: Optional weights; a weight of 0 marks padding.
        sparse_labels: Whether `y_true` holds integer labels when it has one
            axis less than `y_pred` (or a last axis of 1): they are checked
            against the number of classes.
        target_kind: `"labels"` or `"one_hot"` where the caller takes only
            that kind of targets (see `kmask._resolve.target_kind`): the
            other kind is a `ValueError` about `y_true`, raised before the
            padding is looked for (a vector `mask_value` cannot be blamed).
        family: `"loss"` or `"metric"`: what the error suggests instead.
    """
    propagated = keras_mask(y_pred)
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), accumulation_dtype(dtype))
    y_true = ops.convert_to_tensor(y_true)
    y_true, y_pred = _class_axis_last(y_true, y_pred, class_axis)
    if sparse_labels:
        y_true = squeeze_trailing(y_true, len(y_pred.shape) - 1)
    check_targets(y_true, y_pred)
    check_target_kind(y_true, y_pred, target_kind, family)
    sparse = sparse_labels and len(y_true.shape) == len(y_pred.shape) - 1
    masked = valid_steps(
        step_shape(y_pred),
        propagated,
        _target_padding(
            target_mask, y_true, sparse, len(y_true.shape) == len(y_pred.shape)
        ),
        mask=mask,
        y_pred=y_pred.shape,
    )
    valid = masked
    if sample_weight is not None:
        valid = valid_steps(
            step_shape(y_pred),
            masked,
            sample_weight=sample_weight,
            y_pred=y_pred.shape,
        )
    y_true = ops.cast(y_true, target_dtype or y_pred.dtype)
    out_of_range = None
    if sparse:
        labels = ops.cast(y_true, "int32")
        out_of_range = _labels.out_of_range_steps(labels, _classes(y_pred), valid)
        y_true = ops.cast(_labels.safe_labels(labels, out_of_range), y_true.dtype)
    return Steps(y_true, y_pred, valid, sample_weight, masked, out_of_range)


def per_step_values(
    steps: Steps,
    call: Callable[[Any, Any], Any],
    class_axis: int = -1,
    masked_call: MaskedCall | None = None,
):
    """Step 2: the per-step values, padding neutralised.

    Args:
        steps: What `prepare` returned.
        call: `(y_true, y_pred) -> per-step values`, run on inputs whose
            padded steps were replaced by harmless values.
        class_axis: The axis of `y_pred` that `call` reduces.
        masked_call: A fused op that takes the mask itself (its gradient is 0
            at padded steps whatever they hold), used instead of `call`.
    """
    y_true, y_pred, valid = steps.y_true, steps.y_pred, steps.valid
    if 0 in tuple(y_pred.shape):
        # An empty batch: Keras's `max` refuses empty tensors on TensorFlow
        # and PyTorch. The values (there are none) stay connected to
        # `y_pred`, so its gradient is an empty zero, not missing.
        return ops.sum(y_pred, axis=class_axis) * 0.0
    if masked_call is not None:
        if valid is not None:
            valid = per_step_mask(valid, y_pred, class_axis)
        per_step = masked_call(y_true, y_pred, valid)
    else:
        if valid is not None:
            y_true, y_pred = fill_padding(y_true, y_pred, valid, class_axis)
        per_step = call(y_true, y_pred)
    if steps.out_of_range is None:
        return per_step
    return _labels.poison(per_step, steps.out_of_range)


def _class_axis_last(y_true, y_pred, class_axis: int):
    """`(y_true, y_pred)` with `y_pred`'s class axis moved last, and
    `y_true`'s too when it has `y_pred`'s rank (one-hot or dense targets)."""
    rank = len(y_pred.shape)
    if rank < 2 or class_axis in (-1, rank - 1):
        return y_true, y_pred
    if not -rank <= class_axis < rank:
        raise ValueError(
            f"Invalid value for argument `axis`. Expected an axis of y_pred "
            f"(rank {rank}). Received: axis={class_axis}, "
            f"y_pred.shape={tuple(y_pred.shape)}"
        )
    if len(y_true.shape) == rank:
        y_true = ops.moveaxis(y_true, class_axis, -1)
    return y_true, ops.moveaxis(y_pred, class_axis, -1)


def _target_padding(target_mask, y_true, sparse: bool, dense: bool):
    """The padding `target_mask` finds in `y_true`. `value_mask` guesses from
    the rank whether the last axis holds features (rank 3 or more) or labels;
    the pipeline knows. Sparse labels get a unit feature axis, so that a pad
    value is compared label by label whatever their rank; dense targets of
    rank 1 or 2 get leading unit axes, so that their last axis is read as
    features. The mask loses the added axes again."""
    if sparse:
        padding = target_mask(ops.expand_dims(y_true, -1))
        return None if padding is None else squeeze_trailing(padding, len(y_true.shape))
    if not dense:
        return target_mask(y_true)
    # Dense targets of rank 1 or 2 have a feature axis too: leading unit
    # axes make `value_mask` read it as one, and go again.
    added = max(3 - len(y_true.shape), 0)
    for _ in range(added):
        y_true = ops.expand_dims(y_true, 0)
    padding = target_mask(y_true)
    for _ in range(added if padding is not None else 0):
        padding = ops.squeeze(padding, axis=0)
    return padding


def _classes(y_pred):
    """The number of classes: static where known, else a tensor."""
    classes = y_pred.shape[-1]
    return ops.shape(y_pred)[-1] if classes is None else classes
