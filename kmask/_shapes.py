"""The one place that checks shapes, with one wording.

Every shape error of kmask is a `ValueError` worded as Keras words them: the
argument, what was expected, and every shape involved:

    Invalid shape for argument `mask`. Expected [batch] or the per-step shape
    (2, 5). Received: mask.shape=(2, 4), y_pred.shape=(2, 5, 3)

Unknown dimensions (`None`, under `tf.function` or a symbolic model) match
anything: what cannot be known while tracing is not checked.
"""

from __future__ import annotations

from typing import Any


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


def check_frames(y_true: Any, y_pred: Any, mask: Any = None) -> None:
    """A CTC call's shapes: labels `[batch, max_label_length]`, logits
    `[batch, frames, classes]`, and the frame `mask` `[batch]` or `[batch,
    frames]`."""
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


def check_same_shape(targets: Any, predictions: Any) -> None:
    """Raises unless `targets` has the same shape as `predictions`."""
    if not same_shape(tuple(targets.shape), tuple(predictions.shape)):
        raise invalid_shape(
            "targets",
            "the same shape as `predictions`",
            targets=targets.shape,
            predictions=predictions.shape,
        )


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
    hidden_shape, kernel_shape = tuple(hidden.shape), tuple(kernel.shape)
    labels_shape = tuple(labels.shape)
    width_axis = 1 if transpose_kernel else 0
    if len(kernel_shape) != 2 or not same_dim(
        hidden_shape[-1], kernel_shape[width_axis]
    ):
        expected = "[hidden_size, vocabulary]"
        if transpose_kernel:
            expected = "[vocabulary, hidden_size] (transpose_kernel=True)"
        raise invalid_shape(
            "kernel",
            f"{expected} with hidden_size the last axis of `hidden`",
            kernel=kernel_shape,
            hidden=hidden_shape,
        )
    if not same_shape(labels_shape, hidden_shape[:-1]):
        raise invalid_shape(
            "labels",
            "the shape of `hidden` without its last axis",
            labels=labels_shape,
            hidden=hidden_shape,
        )
    vocabulary = kernel_shape[1 - width_axis : 2 - width_axis]
    if bias is not None and not same_shape(tuple(bias.shape), vocabulary):
        raise invalid_shape(
            "bias",
            f"[vocabulary] = {vocabulary}",
            bias=bias.shape,
            kernel=kernel_shape,
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
