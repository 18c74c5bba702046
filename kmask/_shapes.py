"""The per-step shapes: the one place that checks them, with one wording,
and the helpers that squeeze, align and broadcast to them.

Every shape error of kmask is a `ValueError` worded as Keras words them: the
argument, what was expected, and every shape involved:

    Invalid shape for argument `mask`. Expected [batch] or the per-step shape
    (2, 5). Received: mask.shape=(2, 4), y_pred.shape=(2, 5, 3)

Unknown dimensions (`None`, under `tf.function` or a symbolic model) match
anything: what cannot be known while tracing is not checked.

The per-step shape is the predictions' shape without their class axis; a mask
or a weight is `[batch]` or any leading part of it, and gains trailing axes,
never leading ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from kmask.typing import Tensor


def invalid_shape(argument: str, expected: str, **shapes: Any) -> ValueError:
    """The error for `argument`; `shapes` are named as they print, the
    argument's own first."""
    received = ", ".join(
        f"{name}.shape={tuple(shape)}" for name, shape in shapes.items()
    )
    return ValueError(
        f"Invalid shape for argument `{argument}`. Expected {expected}. "
        f"Received: {received}"
    )


def same_dim(a: int | None, b: int | None) -> bool:
    """Whether two static dimensions can be equal (unknown ones match)."""
    return a is None or b is None or a == b


def same_shape(a: tuple, b: tuple) -> bool:
    """Whether two static shapes can be equal."""
    return len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b, strict=True))


def same_steps(y_true: Any, y_pred: Any) -> bool:
    """Whether a dense loss can take the fused path: `y_true` of `y_pred`'s
    shape (no broadcasting), rank 2 or more. Asked of the inputs as given:
    moving the class axis of both keeps them equal."""
    try:
        shape = tuple(np.shape(y_pred))
        return len(shape) >= 2 and tuple(np.shape(y_true)) == shape
    except ValueError:  # ragged nested lists: the pipeline says what is wrong
        return False


def step_shape(y_pred: Any, class_axis: int = -1) -> tuple:
    """The shape of the per-step values: `y_pred`'s without its class axis."""
    shape = list(y_pred.shape)
    if len(shape) > 1:
        del shape[class_axis]
    return tuple(shape)


def fits_steps(shape: tuple, steps: tuple) -> bool:
    """Whether a mask or weight of `shape` fits per-step values of shape
    `steps`: `[batch]` or any leading part of `steps`."""
    return len(shape) <= len(steps) and all(
        same_dim(got, want)
        for got, want in zip(shape, steps[: len(shape)], strict=True)
    )


def check_fits_steps(argument: str, shape: tuple, steps: tuple, **context: Any) -> None:
    """Raises unless `argument` (a mask or weights) fits the per-step shape;
    `context` names the shapes it was compared with."""
    if not fits_steps(tuple(shape), tuple(steps)):
        raise invalid_shape(
            argument,
            f"[batch] or the per-step shape {tuple(steps)}",
            **{argument: shape},
            **context,
        )


def fits_steps_error(
    argument: str, shape: tuple, steps: tuple, pred_shape: tuple
) -> ValueError | None:
    """The error of `check_fits_steps` against `y_pred`'s steps, or `None`."""
    if fits_steps(shape, steps):
        return None
    return invalid_shape(
        argument,
        f"[batch] or the per-step shape {steps}",
        **{argument: shape},
        y_pred=pred_shape,
    )


def check_targets(y_true: Any, y_pred: Any) -> None:
    """Raises unless `y_true` and `y_pred` describe the same steps: equal
    shapes (a last axis of 1 broadcasts), or `y_true` without `y_pred`'s last
    (class) axis (sparse labels)."""
    error = targets_error(tuple(y_true.shape), tuple(y_pred.shape))
    if error is not None:
        raise error


def targets_error(true_shape: tuple, pred_shape: tuple) -> ValueError | None:
    """The error of `check_targets`, or `None`."""
    lower, higher = sorted((true_shape, pred_shape), key=len)
    if len(higher) - len(lower) == 1:
        pairs = list(zip(lower, higher[:-1], strict=True))
    elif len(higher) == len(lower) and lower:
        pairs = list(zip(lower[:-1], higher[:-1], strict=True))
        if 1 not in (lower[-1], higher[-1]):
            pairs.append((lower[-1], higher[-1]))
    else:
        pairs = [(len(true_shape), len(pred_shape))] if lower != higher else []
    if all(same_dim(a, b) for a, b in pairs):
        return None
    return invalid_shape(
        "y_true",
        "y_pred's shape, or y_pred's shape without its last (class) axis",
        y_true=true_shape,
        y_pred=pred_shape,
    )


# What fits targets of the other kind, by the kind expected and who asks.
_FITS_OTHER_KIND = {
    ("labels", "loss"): "kmask.MaskedCategoricalCrossentropy",
    ("labels", "metric"): "kmask.MaskedCategoricalAccuracy",
    ("one_hot", "loss"): "kmask.MaskedSparseCategoricalCrossentropy",
    ("one_hot", "metric"): "kmask.MaskedSparseCategoricalAccuracy",
}


def check_target_kind(y_true: Any, y_pred: Any, kind: str | None, family: str) -> None:
    """Raises when `y_true` is of the other kind than a loss or metric
    (`family`) takes: one-hot targets where integer labels are expected
    (`kind="labels"`), or labels where one-hot targets are (`"one_hot"`).
    The class axis of `y_pred` is last; sparse labels were squeezed."""
    error = target_kind_error(tuple(y_true.shape), tuple(y_pred.shape), kind, family)
    if error is not None:
        raise error


def target_kind_error(
    true_shape: tuple, pred_shape: tuple, kind: str | None, family: str
) -> ValueError | None:
    """The error of `check_target_kind`, or `None`."""
    if kind == "labels" and len(true_shape) == len(pred_shape) and pred_shape:
        expected = (
            f"integer labels of shape {pred_shape[:-1]} (y_pred's shape without "
            "its class axis), or with a last axis of 1"
        )
        other = "One-hot (or soft) targets of y_pred's shape take"
    elif kind == "one_hot" and len(true_shape) == len(pred_shape) - 1:
        expected = f"one-hot (or soft) targets of y_pred's shape {pred_shape}"
        other = "Integer labels take"
    else:
        return None
    error = invalid_shape("y_true", expected, y_true=true_shape, y_pred=pred_shape)
    return ValueError(f"{error}. {other} {_FITS_OTHER_KIND[kind, family]}.")


def check_steps(
    y_true: Any,
    y_pred: Any,
    target_kind: str | None = None,
    family: str = "loss",
    **per_step: Any,
) -> None:
    """Every shape of one call of the pipeline, checked at once: `y_true`
    against `y_pred` (as `check_targets` and `check_target_kind`), then each
    of `per_step` (`mask`, `sample_weight`, `segment_ids`: a tensor or
    `None`) against the per-step shape. `y_pred`'s class axis is last."""
    true_shape, pred_shape = tuple(y_true.shape), tuple(y_pred.shape)
    error = targets_error(true_shape, pred_shape) or target_kind_error(
        true_shape, pred_shape, target_kind, family
    )
    steps = step_shape(y_pred)
    for argument, tensor in per_step.items():
        if error is None and tensor is not None:
            shape = tuple(tensor.shape)
            error = fits_steps_error(argument, shape, steps, pred_shape)
            if argument == "segment_ids" and len(shape) != 2:
                error = invalid_shape(
                    argument,
                    f"[batch, time] = {steps[:2]}",
                    segment_ids=shape,
                    y_pred=pred_shape,
                )
    if error is not None:
        raise error


def check_frames(
    y_true: Any, y_pred: Any, mask: Any = None, sample_weight: Any = None
) -> None:
    """A CTC call's shapes: labels `[batch, max_label_length]`, logits
    `[batch, frames, classes]`, the frame `mask` `[batch]` or `[batch,
    frames]`, and `sample_weight` `[batch]` (one per sequence)."""
    true_shape, pred_shape = tuple(y_true.shape), tuple(y_pred.shape)
    if len(pred_shape) != 3:
        raise invalid_shape(
            "y_pred", "[batch, frames, classes]", y_pred=pred_shape, y_true=true_shape
        )
    if len(true_shape) != 2 or not same_dim(true_shape[0], pred_shape[0]):
        raise invalid_shape(
            "y_true",
            "[batch, max_label_length] with y_pred's batch",
            y_true=true_shape,
            y_pred=pred_shape,
        )
    if mask is not None:
        error = fits_steps_error("mask", tuple(mask.shape), pred_shape[:2], pred_shape)
        if error is not None:
            raise error
    if sample_weight is not None:
        error = fits_steps_error(
            "sample_weight", tuple(sample_weight.shape), pred_shape[:1], pred_shape
        )
        if error is not None:
            raise error


def check_sequence_ranks(logits: Any, targets: Any, weights: Any) -> None:
    """`kmask.sequence_loss`'s shapes: TF Addons' rank rules, in kmask's
    wording."""
    if len(logits.shape) != 3:
        raise invalid_shape(
            "logits", "[batch_size, sequence_length, num_classes]", logits=logits.shape
        )
    if len(targets.shape) not in (2, 3):
        raise invalid_shape(
            "targets",
            "[batch_size, sequence_length] labels or [batch_size, "
            "sequence_length, num_classes] one-hot targets",
            targets=targets.shape,
            logits=logits.shape,
        )
    if len(weights.shape) != 2:
        raise invalid_shape(
            "weights",
            "[batch_size, sequence_length]",
            weights=weights.shape,
            logits=logits.shape,
        )


def check_stats(stats: Any, names: tuple, sample_weight: Any = None) -> None:
    """Per-step statistics a layer computed (the head's `return_stats=True`
    output): a last axis of `len(names)`, and `sample_weight` `[batch]` or a
    leading part of the per-step shape."""
    shape = tuple(stats.shape)
    if not shape or not same_dim(shape[-1], len(names)):
        raise ValueError(
            "Invalid value for argument `y_pred`. Expected the per-step "
            f"statistics {names} of a kmask.FusedLinearCrossentropy built with "
            f"`return_stats=True`, a last axis of {len(names)}. Received: "
            f"y_pred.shape={shape}"
        )
    if sample_weight is not None:
        check_fits_steps(
            "sample_weight", tuple(sample_weight.shape), shape[:-1], y_pred=shape
        )


def check_same_shape(targets: Any, predictions: Any) -> None:
    """Raises unless `targets` has the same shape as `predictions`."""
    if not same_shape(tuple(targets.shape), tuple(predictions.shape)):
        raise invalid_shape(
            "targets",
            "the same shape as `predictions`",
            targets=targets.shape,
            predictions=predictions.shape,
        )


def _check_linear_head(
    hidden: Any, kernel: Any, bias: Any, transpose_kernel: bool, prefix: str = ""
) -> Any:
    """A linear head's shapes: `kernel` `[hidden_size, vocabulary]` (or
    `[vocabulary, hidden_size]` with `transpose_kernel`) with `hidden`'s last
    axis as its hidden size, and `bias` `[vocabulary]`. The arguments are
    named with `prefix` (`"student_"`, ...).

    Returns:
        The vocabulary (an int, or `None` when unknown).
    """
    hidden_shape, kernel_shape = tuple(hidden.shape), tuple(kernel.shape)
    width_axis = 1 if transpose_kernel else 0
    if len(kernel_shape) != 2 or not same_dim(
        hidden_shape[-1], kernel_shape[width_axis]
    ):
        expected = "[hidden_size, vocabulary]"
        if transpose_kernel:
            expected = "[vocabulary, hidden_size] (transpose_kernel=True)"
        raise invalid_shape(
            f"{prefix}kernel",
            f"{expected} with hidden_size the last axis of `{prefix}hidden`",
            **{f"{prefix}kernel": kernel_shape, f"{prefix}hidden": hidden_shape},
        )
    vocabulary = kernel_shape[1 - width_axis]
    if bias is not None and not same_shape(tuple(bias.shape), (vocabulary,)):
        raise invalid_shape(
            f"{prefix}bias",
            f"[vocabulary] = ({vocabulary},)",
            **{f"{prefix}bias": tuple(bias.shape), f"{prefix}kernel": kernel_shape},
        )
    return vocabulary


def check_linear(
    hidden: Any,
    kernel: Any,
    labels: Any,
    bias: Any,
    transpose_kernel: bool = False,
    mask: Any = None,
    sample_weight: Any = None,
) -> None:
    """The shapes of `fused_linear_crossentropy`'s arguments: the linear
    head's, then `mask` and `sample_weight` against the labels' steps."""
    hidden_shape, labels_shape = tuple(hidden.shape), tuple(labels.shape)
    _check_linear_head(hidden, kernel, bias, transpose_kernel)
    if not same_shape(labels_shape, hidden_shape[:-1]):
        raise invalid_shape(
            "labels",
            "the shape of `hidden` without its last axis",
            labels=labels_shape,
            hidden=hidden_shape,
        )
    for argument, tensor in (("mask", mask), ("sample_weight", sample_weight)):
        if tensor is None:
            continue
        shape = tuple(tensor.shape)
        while len(shape) > len(labels_shape) and shape[-1] == 1:
            shape = shape[:-1]
        if not fits_steps(shape, labels_shape):
            raise invalid_shape(
                argument,
                f"[batch] or the per-step shape {labels_shape}",
                **{argument: shape},
                labels=labels_shape,
            )


def check_class_weight(class_weight: Any, classes: int | None) -> None:
    """A standardized `class_weight` (a `{class: weight}` dict or a list)
    against the number of classes, where it is known: a list has one weight
    per class, a dict's class ids are below `classes`."""
    if classes is None:
        return
    if isinstance(class_weight, list) and len(class_weight) != classes:
        raise ValueError(
            "Invalid shape for argument `class_weight`. Expected one weight per "
            f"class, [classes] = ({classes},). Received: "
            f"class_weight.shape=({len(class_weight)},)"
        )
    if isinstance(class_weight, dict):
        outside = [class_id for class_id in class_weight if class_id >= classes]
        if outside:
            raise ValueError(
                "Invalid value for argument `class_weight`. Expected class ids "
                f"below the number of classes, {classes}. Received: class ids "
                f"{outside}"
            )


def check_distillation(teacher: Any, student: Any, labels: Any = None) -> None:
    """A distillation call's shapes: teacher and student logits alike,
    `[batch, ..., classes]`, and `labels` `[batch]` or a leading part of
    their per-step shape."""
    teacher_shape, student_shape = tuple(teacher.shape), tuple(student.shape)
    if len(student_shape) < 2:
        raise invalid_shape(
            "student_logits",
            "[batch, ..., classes]",
            student_logits=student_shape,
            teacher_logits=teacher_shape,
        )
    if not same_shape(teacher_shape, student_shape):
        raise invalid_shape(
            "teacher_logits",
            "the shape of `student_logits`",
            teacher_logits=teacher_shape,
            student_logits=student_shape,
        )
    if labels is not None:
        check_fits_steps(
            "labels",
            tuple(labels.shape),
            step_shape(student),
            student_logits=student_shape,
        )


def check_linear_distillation(
    student: tuple[Any, Any, Any],
    teacher: tuple[Any, Any, Any],
    transpose_kernel: bool,
    **per_step: Any,
) -> None:
    """The shapes of `fused_linear_distillation`'s arguments: each model's
    `(hidden, kernel, bias)` a linear head (as `check_linear`), the same
    vocabulary and steps for both, then `per_step` (`labels`, `mask`,
    `sample_weight`: a tensor or `None`) against the steps."""
    vocabularies = [
        _check_linear_head(hidden, kernel, bias, transpose_kernel, f"{who}_")
        for who, (hidden, kernel, bias) in (("student", student), ("teacher", teacher))
    ]
    student_shape, teacher_shape = tuple(student[0].shape), tuple(teacher[0].shape)
    if not same_dim(*vocabularies):
        raise invalid_shape(
            "teacher_kernel",
            "the student's vocabulary",
            teacher_kernel=tuple(teacher[1].shape),
            student_kernel=tuple(student[1].shape),
        )
    steps = student_shape[:-1]
    if not same_shape(teacher_shape[:-1], steps):
        raise invalid_shape(
            "teacher_hidden",
            f"the steps of `student_hidden` {steps} and a hidden size",
            teacher_hidden=teacher_shape,
            student_hidden=student_shape,
        )
    for argument, tensor in per_step.items():
        if tensor is not None:
            check_fits_steps(
                argument, tuple(tensor.shape), steps, student_hidden=student_shape
            )


def accumulation_dtype(dtype: Any) -> str:
    """float32 for half precision and integers, else the dtype itself."""
    # str() of a TensorFlow dtype is "<dtype: 'float64'>", of torch's "torch.float64".
    return "float64" if "float64" in str(dtype) else "float32"


def align_rank(mask: Any, rank: int):
    """Appends trailing axes to `mask` until it has `rank` dimensions."""
    while len(mask.shape) < rank:
        mask = ops.expand_dims(mask, -1)
    return mask


def squeeze_trailing(tensor: Any, rank: int) -> Tensor:
    """Drops trailing axes of size 1 beyond `rank` (Keras's `[batch, time, 1]`
    weights)."""
    while len(tensor.shape) > rank and tensor.shape[-1] == 1:
        tensor = ops.squeeze(tensor, axis=-1)
    return tensor


def broadcast_to_steps(mask: Any, steps: tuple) -> Tensor:
    """`mask` (`[batch]` or a leading part of `steps`) broadcast to `steps`."""
    mask = ops.convert_to_tensor(mask)
    return ops.broadcast_to(align_rank(mask, len(steps)), steps)


def step_weights(steps: tuple, valid: Any = None, sample_weight: Any = None) -> Tensor:
    """float32 weights of `steps`: 1 where `valid` (0 elsewhere), times
    `sample_weight` (`[batch]` or a leading part of `steps`, trailing axes of
    size 1 dropped)."""
    weight = ops.ones(steps, "float32")
    if valid is not None:
        weight = ops.cast(broadcast_to_steps(valid, steps), "float32")
    if sample_weight is not None:
        sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        sample_weight = squeeze_trailing(sample_weight, len(steps))
        weight = weight * broadcast_to_steps(sample_weight, steps)
    return weight


def where_valid(valid: Any, values: Any):
    """`values` (per-step, or with a trailing class axis) with the steps that
    are not `valid` selected to 0; `values` itself when `valid` is `None`."""
    if valid is None:
        return values
    if len(values.shape) > len(valid.shape):
        valid = ops.expand_dims(valid, -1)
    return ops.where(valid, values, ops.zeros_like(values))


def last_size(tensor: Any):
    """The size of the last axis: an int where it is static, else a tensor of
    `tensor`'s dtype (a `None` dimension under `tf.function`)."""
    size = tensor.shape[-1]
    if size is None:
        size = ops.cast(ops.shape(tensor)[-1], tensor.dtype)
    return size


def dense_inputs(targets: Any, predictions: Any, valid: Any):
    """`(targets, predictions, valid)` as tensors: both values in float32 (or
    float64), `valid` boolean (or `None`); raises unless the shapes match."""
    predictions = ops.convert_to_tensor(predictions)
    dtype = accumulation_dtype(predictions.dtype)
    predictions = ops.cast(predictions, dtype)
    targets = ops.cast(ops.convert_to_tensor(targets), dtype)
    # Equal static shapes need no check: the pipeline's, whose shapes
    # `check_steps` checked, always are.
    if tuple(targets.shape) != tuple(predictions.shape):
        check_same_shape(targets, predictions)
    if valid is not None:
        valid = ops.cast(ops.convert_to_tensor(valid), "bool")
    return targets, predictions, valid


def positive_number(argument: str, value: Any, none: bool = False) -> float | None:
    """`value` as a float, checked to be a positive number (or `None` when
    `none` allows it); a `ValueError` naming `argument` else."""
    if none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        expected = "`None` or a positive number" if none else "a positive number"
        raise ValueError(
            f"Invalid value for argument `{argument}`. Expected {expected}. "
            f"Received: {argument}={value!r}"
        )
    return float(value)
