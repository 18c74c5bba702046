"""masks -> neutralise padded steps -> per-step values: the one pipeline.

Every kmask loss, metric and the fused head run it:

1. `prepare`: `y_pred` in float32 (or float64) with its class axis moved
   last (so everything downstream reduces the last axis), sparse labels of
   shape `[..., 1]` squeezed, the shapes checked, and the real steps found:
   the AND of the mask Keras propagated onto `y_pred`, the padding found in
   `y_true` (a pad value, `ignore_class`), an explicit mask, packed
   sequences' padding (`segment_ids` 0) and the steps whose `sample_weight`
   is 0. Sparse labels out of range at a real step raise in eager execution
   and make the step NaN when traced (`kmask.masks.labels_out_of_range`,
   then `poison`). `prepare_labels` is
   the same step for the chunked head, which has labels and no predictions.
2. `per_step_values` (which runs `prepare` first): padded steps
   neutralised with `where` before the
   per-step function sees them (never multiplied by 0 after: `0 * NaN` is
   NaN, and so is its gradient), or the mask handed to a fused op that
   selects them away inside its own gradient.
3. The caller reduces with `kmask.reduce`: a loss with `masked_reduce`, a
   metric with `masked_sum_and_count`, the fused head with `masked_reduce`
   (whose registry says whether it is linear in the per-step losses).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from keras import ops

from kmask._keras_compat import get_keras_mask
from kmask._resolve import pad_values
from kmask._shapes import (
    accumulation_dtype,
    check_distillation,
    check_frames,
    check_stats,
    check_steps,
    squeeze_trailing,
    step_weights,
)
from kmask.masks import (
    combine_masks,
    labels_out_of_range,
    post_padded_lengths,
    target_padding,
    targets_padding,
)
from kmask.typing import Tensor

# `(y_true, y_pred, valid) -> per-step values` where `valid` is a boolean
# mask of the per-step shape, or `None`.
MaskedCall = Callable[[Any, Any, Any], Any]

# Padded steps are replaced by these before a loss sees them, so the loss is
# finite there whatever the padding held: 0.5 is a valid probability, logit
# and regression value, 0 a valid label.
PAD_PREDICTION = 0.5
PAD_TARGET = 0


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
    # The per-step values (`per_step_values`), padding neutralised.
    values: Any = None


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
    segment_ids: Any = None,
    sparse_labels: bool = False,
    target_kind: str | None = None,
    family: str = "loss",
) -> Steps:
    """Step 1: tensors of the right dtype and shape, and the real steps.

    Every shape is checked here, once (`kmask._shapes.check_steps`).

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
        segment_ids: Optional `[batch, time]` ids of packed sequences; id 0
            is padding.
        sparse_labels: Whether `y_true` holds integer labels when it has one
            axis less than `y_pred` (or a last axis of 1): they are checked
            against the number of classes.
        target_kind: `"labels"` or `"one_hot"` where the caller takes only
            that kind of targets (see `kmask._resolve.target_kind`): the
            other kind is a `ValueError` about `y_true`, raised before the
            padding is looked for (a vector `mask_value` cannot be blamed).
        family: `"loss"` or `"metric"`: what that error suggests instead.
    """
    # Local work first, then each module once: the mask Keras propagated
    # (read off the caller's `y_pred`), the shapes, the masks and labels.
    given_pred = y_pred
    y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
    y_true, y_pred = _class_axis_last(y_true, y_pred, class_axis)
    propagated = get_keras_mask(given_pred)
    y_pred = ops.cast(y_pred, accumulation_dtype(dtype))
    steps = tuple(y_pred.shape[:-1] if len(y_pred.shape) > 1 else y_pred.shape)
    if sparse_labels:
        y_true = squeeze_trailing(y_true, len(steps))
    if sample_weight is not None:
        sample_weight = squeeze_trailing(
            ops.convert_to_tensor(sample_weight), len(steps)
        )
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
    if segment_ids is not None:
        segment_ids = ops.convert_to_tensor(segment_ids)
    check_steps(
        y_true,
        y_pred,
        target_kind,
        family,
        mask=mask,
        sample_weight=sample_weight,
        segment_ids=segment_ids,
    )
    sparse = sparse_labels and len(y_true.shape) == len(steps)
    in_segment = None
    if segment_ids is not None:
        in_segment = ops.not_equal(segment_ids, ops.zeros_like(segment_ids))
    padding = targets_padding(
        target_mask, y_true, sparse, len(y_true.shape) == len(y_pred.shape)
    )
    masked = combine_masks(propagated, padding, mask, in_segment)
    weighted = None
    if sample_weight is not None:
        weighted = ops.not_equal(sample_weight, ops.zeros_like(sample_weight))
    step_shape = ops.shape(y_pred)[:-1] if len(y_pred.shape) > 1 else ops.shape(y_pred)
    valid = combine_masks(masked, weighted, shape=step_shape)
    y_true = ops.cast(y_true, target_dtype or y_pred.dtype)
    out_of_range = None
    if sparse:
        classes = y_pred.shape[-1]
        if classes is None:
            classes = ops.shape(y_pred)[-1]
        labels, out_of_range = labels_out_of_range(
            ops.cast(y_true, "int32"), classes, valid
        )
        y_true = ops.cast(labels, y_true.dtype)
    return Steps(y_true, y_pred, valid, sample_weight, masked, out_of_range)


def prepare_labels(
    labels: Any,
    *,
    classes: Any,
    target_mask: Callable[[Any], Any] | None = None,
    mask: Any = None,
    sample_weight: Any = None,
) -> Steps:
    """Step 1 for a head that sees labels and no predictions (the chunked
    linear cross-entropy): the real steps of `labels`, their label range
    checked against `classes`. The caller checked the shapes
    (`kmask._shapes.check_linear`).

    Returns:
        `Steps` with int32 `y_true` (0 where out of range), no `y_pred`.
    """
    labels = ops.cast(ops.convert_to_tensor(labels), "int32")
    if sample_weight is not None:
        sample_weight = squeeze_trailing(
            ops.convert_to_tensor(sample_weight), len(labels.shape)
        )
    padding = None if target_mask is None else target_mask(labels)
    masked = combine_masks(padding, mask)
    valid = masked
    if sample_weight is not None:
        weighted = ops.not_equal(sample_weight, ops.zeros_like(sample_weight))
        valid = combine_masks(masked, weighted)
    labels, out_of_range = labels_out_of_range(labels, classes, valid, "labels")
    return Steps(labels, None, valid, sample_weight, masked, out_of_range)


def distillation_values(
    teacher_logits: Any,
    student_logits: Any,
    call: Callable[[Any, Any], Any],
    *,
    labels: Any = None,
    mask_value: Any = None,
    mask: Any = None,
    sample_weight: Any = None,
) -> Steps:
    """Steps 1 and 2 for two predictions of the same steps (distillation):
    `per_step_values` with the teacher's logits as the targets, which hold
    no padding; the pad label `mask_value` is looked for in `labels`
    instead, ANDed into `mask`. The mask Keras propagated onto
    `student_logits` counts, as onto any `y_pred`. The shapes are checked
    first (`_shapes.check_distillation`).

    Returns:
        `Steps` with the teacher's logits as `y_true` and the per-step
        values of `call(teacher, student)` in `values`.
    """
    checked_student = ops.convert_to_tensor(student_logits)
    teacher_logits = ops.convert_to_tensor(teacher_logits)
    if labels is not None:
        labels = squeeze_trailing(
            ops.convert_to_tensor(labels), len(checked_student.shape) - 1
        )
    check_distillation(teacher_logits, checked_student, labels)
    if labels is not None and mask_value is not None:
        mask = combine_masks(mask, label_padding(mask_value)(labels))
    return per_step_values(
        teacher_logits,
        student_logits,
        call,
        dtype=checked_student.dtype,
        target_mask=_no_padding,
        mask=mask,
        sample_weight=sample_weight,
    )


def prepare_hidden(
    hidden: Any,
    *,
    classes: Any,
    labels: Any = None,
    mask_value: Any = None,
    mask: Any = None,
    sample_weight: Any = None,
) -> Steps:
    """Step 1 for a chunked op over hidden states whose labels only mark
    padding (the chunked distillation): the mask Keras propagated onto
    `hidden` ANDed into `mask`, then `prepare_labels` (labels of 0 when none
    are given). The caller checked the shapes
    (`_shapes.check_linear_distillation`)."""
    propagated = get_keras_mask(hidden)
    if labels is None:
        labels = ops.zeros(ops.shape(hidden)[:-1], "int32")
    else:
        labels = squeeze_trailing(ops.convert_to_tensor(labels), len(hidden.shape) - 1)
    return prepare_labels(
        labels,
        classes=classes,
        target_mask=None if mask_value is None else label_padding(mask_value),
        mask=combine_masks(propagated, mask),
        sample_weight=sample_weight,
    )


def label_padding(mask_value: Any) -> Callable[[Any], Any]:
    """`labels -> mask`: `False` where a label is `mask_value`, the labels
    compared one by one whatever their rank (`masks.targets_padding` of
    sparse labels)."""
    padding = functools.partial(target_padding, pads=(pad_values(mask_value),))
    return functools.partial(targets_padding, padding, sparse=True, dense=False)


def _no_padding(_targets: Any) -> None:
    """A teacher's logits mark no padding."""
    return None


def prepare_stats(stats: Any, *, names: tuple, sample_weight: Any = None) -> Steps:
    """Step 1 for per-step statistics a layer already computed (the head's
    `return_stats=True` output, `[..., len(names)]`, one of them `"weight"`):
    the real steps are the AND of the mask Keras propagated onto `stats`, a
    non-zero `"weight"` and a non-zero `sample_weight`; the shapes checked
    once (`kmask._shapes.check_stats`).

    Returns:
        `Steps` with float32 `y_pred` (the statistics), no `y_true`, and as
        `sample_weight` the step weights: the layer's `"weight"` times
        `sample_weight`.
    """
    propagated = get_keras_mask(stats)
    stats = ops.cast(ops.convert_to_tensor(stats), "float32")
    if sample_weight is not None:
        sample_weight = squeeze_trailing(
            ops.convert_to_tensor(sample_weight), len(stats.shape) - 1
        )
    check_stats(stats, names, sample_weight)
    weight = stats[..., names.index("weight")]
    if sample_weight is not None:
        weight = weight * step_weights(tuple(ops.shape(weight)), None, sample_weight)
    weighted = ops.not_equal(weight, ops.zeros_like(weight))
    valid = combine_masks(propagated, weighted, shape=ops.shape(weight))
    return Steps(None, stats, valid, weight, propagated)


class Frames(NamedTuple):
    """A CTC batch through the pipeline: int32 labels (the blank at padded
    labels), float32 logits, and per sequence its real frames and labels."""

    labels: Any
    logits: Any
    real_frames: Any  # boolean [batch, frames]
    frame_lengths: Any  # int32 [batch]
    real_labels: Any  # boolean [batch, max_label_length]
    label_lengths: Any  # int32 [batch]
    has_frames: Any  # boolean [batch]
    sample_weight: Any = None  # [batch], or None


def prepare_frames(
    y_true: Any,
    y_pred: Any,
    *,
    mask: Any = None,
    mask_value: int = -1,
    blank_index: int = 0,
    sample_weight: Any = None,
) -> Frames:
    """Step 1 for CTC, whose steps are frames and whose labels are shorter:
    the real frames (the mask Keras propagated onto `y_pred` AND `mask`) and
    the real labels (not `mask_value`), both padded `'post'`; the shapes
    (`sample_weight`'s too, one weight per sequence) checked once
    (`kmask._shapes.check_frames`)."""
    propagated = get_keras_mask(y_pred)
    y_pred = ops.convert_to_tensor(y_pred)
    y_pred = ops.cast(y_pred, accumulation_dtype(y_pred.dtype))
    y_true = ops.convert_to_tensor(y_true)
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
    if sample_weight is not None:
        sample_weight = squeeze_trailing(ops.convert_to_tensor(sample_weight), 1)
    check_frames(y_true, y_pred, mask, sample_weight)
    real_frames = combine_masks(propagated, mask)
    if real_frames is None:
        real_frames = ops.ones_like(y_pred[..., 0], dtype="bool")
    real_frames = ops.broadcast_to(
        real_frames if len(real_frames.shape) == 2 else real_frames[:, None],
        ops.shape(y_pred)[:2],
    )
    frame_lengths = post_padded_lengths(real_frames, "mask")
    real_labels = ops.not_equal(y_true, ops.cast(mask_value, y_true.dtype))
    label_lengths = post_padded_lengths(real_labels, "y_true")
    labels = ops.where(real_labels, y_true, ops.cast(blank_index, y_true.dtype))
    return Frames(
        ops.cast(labels, "int32"),
        y_pred,
        real_frames,
        frame_lengths,
        real_labels,
        label_lengths,
        ops.greater(frame_lengths, 0),
        sample_weight,
    )


def per_step_values(
    y_true: Any,
    y_pred: Any,
    call: Callable[[Any, Any], Any],
    masked_call: MaskedCall | None = None,
    **prepare_kwargs: Any,
) -> Steps:
    """Steps 1 and 2: `prepare`, then the per-step values, padding
    neutralised, in `Steps.values` (float32, or float64 for float64
    predictions).

    Args:
        y_true: Targets.
        y_pred: Predictions.
        call: `(y_true, y_pred) -> per-step values` (the class axis last),
            run on inputs whose padded steps were replaced by harmless values.
        masked_call: A fused op that takes the mask itself (its gradient is 0
            at padded steps whatever they hold), used instead of `call`.
        **prepare_kwargs: `prepare`'s keyword arguments.
    """
    steps = prepare(y_true, y_pred, **prepare_kwargs)
    y_true, y_pred, valid = steps.y_true, steps.y_pred, steps.valid
    if 0 in tuple(y_pred.shape):
        # An empty batch: Keras's `max` refuses empty tensors on TensorFlow
        # and PyTorch. The values (there are none) stay connected to
        # `y_pred`, so its gradient is an empty zero, not missing.
        values = ops.sum(y_pred, axis=-1) * 0.0
    elif masked_call is not None:
        values = masked_call(y_true, y_pred, valid)
    else:
        if valid is not None:
            y_true, y_pred = fill_padding(y_true, y_pred, valid)
        values = call(y_true, y_pred)
    values = ops.cast(values, y_pred.dtype)
    if steps.out_of_range is not None:
        # `poison`, written out: the per-step values need nothing else here.
        nan = ops.full_like(values, float("nan"))
        values = ops.where(steps.out_of_range, nan, values)
    return steps._replace(values=values)


def poison(per_step: Any, out_of_range: Any) -> Any:
    """`per_step` with NaN at the steps whose label is out of range (a
    `where`, fused into the computation under XLA): a traced call cannot
    raise, so its value says it instead."""
    nan = ops.full_like(per_step, float("nan"))
    return ops.where(out_of_range, nan, per_step)


def fill_padding(y_true: Any, y_pred: Any, valid: Any) -> tuple[Tensor, Tensor]:
    """`(y_true, y_pred)` (class axis last) with their padded steps replaced
    by harmless values (`valid` has the per-step shape).

    `where` selects them away, so whatever the padding held (NaN, inf, a label
    of -100) reaches neither a loss nor its gradient: the gradient at a padded
    step is exactly 0.
    """
    valid_pred = ops.expand_dims(valid, -1)
    valid_true = valid_pred if len(y_true.shape) == len(y_pred.shape) else valid
    return (
        ops.where(valid_true, y_true, ops.cast(PAD_TARGET, y_true.dtype)),
        ops.where(valid_pred, y_pred, ops.cast(PAD_PREDICTION, y_pred.dtype)),
    )


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
