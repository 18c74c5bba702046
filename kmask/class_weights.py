"""Class weights on sequence labels: each real step weighted by its label's
class weight, on top of `sample_weight`.

A class weight is a step weight: the masking pipeline every loss, metric and
the head run multiplies it into the step weights it already carries, so
every reduction of `kmask.reduce` applies it unchanged. `"token_mean"` then
divides by the summed class weights of the real steps, PyTorch's rule for
`cross_entropy(weight=, ignore_index=)`; docs/concepts/reductions.md states
the rule once.

`class_weight_for` builds inverse-frequency weights from a data set's labels
in NumPy (it runs once, before training, on the whole data set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from keras import ops

from kmask import _shapes
from kmask._shapes import align_rank
from kmask.typing import Tensor

ClassWeight = Mapping[int, float] | Sequence[float] | np.ndarray

__all__ = ["class_weight_for"]


def standardize(class_weight: Any) -> dict[int, float] | list[float] | None:
    """`class_weight` checked and as plain Python: a `{class: weight}` dict
    with int keys (string keys, as JSON writes them, are read back as ints)
    or a list of one weight per class; `None` stays `None`.

    Raises:
        ValueError: naming `class_weight`, for a class id that is not a
            non-negative integer, or a weight that is negative or not finite.
    """
    if class_weight is None:
        return None
    if isinstance(class_weight, Mapping):
        standardized: dict[int, float] = {}
        for key, weight in class_weight.items():
            standardized[_class_id(key)] = _weight(weight, key)
        return dict(sorted(standardized.items()))
    if isinstance(class_weight, (list, tuple)):
        # Plain Python (no NumPy), so that `torch.compile` can trace it.
        weights = list(class_weight)
        flat = all(not isinstance(weight, (list, tuple)) for weight in weights)
    else:
        array = np.asarray(class_weight)
        weights = array.tolist() if array.ndim == 1 else []
        flat = array.dtype.kind in "iuf"
    if not (weights and flat):
        raise ValueError(
            "Invalid value for argument `class_weight`. Expected a dict "
            "{class: weight} or a non-empty [classes] vector of numbers. "
            f"Received: class_weight={class_weight!r}"
        )
    return [_weight(weight, index) for index, weight in enumerate(weights)]


def _class_id(key: Any) -> int:
    """A dict key as a class id: an int, or a string of one (JSON's keys)."""
    try:
        class_id = int(key)
    except (TypeError, ValueError):
        class_id = -1
    if isinstance(key, bool) or class_id < 0 or str(class_id) != str(key).strip():
        raise ValueError(
            "Invalid value for argument `class_weight`. Expected class ids "
            f"that are non-negative integers. Received: class id {key!r}"
        )
    return class_id


def _weight(weight: Any, class_id: Any) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(
            "Invalid value for argument `class_weight`. Expected finite, "
            f"non-negative weights. Received: weight {weight!r} for class "
            f"{class_id!r}"
        )
    return value


def vector(class_weight: dict[int, float] | list[float], classes: Any) -> list[float]:
    """The `[classes]` weights of a standardized `class_weight` (a class a
    dict leaves out weighs 1, as in Keras's `fit(class_weight=)`); `classes`
    is checked where it is known (`kmask._shapes`). Plain Python, no NumPy:
    `torch.compile` traces it as constants."""
    known = classes if isinstance(classes, int) else None
    _shapes.check_class_weight(class_weight, known)
    if isinstance(class_weight, list):
        return list(class_weight)
    size = known if known is not None else max(class_weight, default=-1) + 1
    return [class_weight.get(class_id, 1.0) for class_id in range(size)]


def step_weights(
    class_weight: dict[int, float] | list[float],
    y_true: Any,
    classes: Any,
    sparse: bool,
    masked: Any = None,
) -> Tensor:
    """The class weight of each step, float32 of the per-step shape, 0 where
    not `masked`; no gradient.

    Sparse labels weigh their class's weight (a label outside the vector
    weighs 1, so that the pipeline still finds it out of range); dense
    targets (one-hot or soft, the class axis last) weigh `sum_k w_k y_k`,
    which is the label's weight for one-hot targets. Padded steps are
    selected to 0 with `where`, whatever they held.
    """
    weights_list = vector(class_weight, classes)
    size = len(weights_list)
    weights = ops.convert_to_tensor(weights_list, "float32")
    if sparse:
        labels = ops.cast(y_true, "int32")
        in_range = ops.logical_and(ops.greater_equal(labels, 0), ops.less(labels, size))
        safe = ops.where(in_range, labels, ops.zeros_like(labels))
        per_step = ops.where(in_range, ops.take(weights, safe), 1.0)
    else:
        targets = ops.cast(y_true, "float32")
        if masked is not None:
            real = align_rank(ops.cast(masked, "bool"), len(targets.shape))
            targets = ops.where(real, targets, ops.zeros_like(targets))
        per_step = ops.einsum("...c,c->...", targets, weights)
    if masked is not None:
        real = align_rank(ops.cast(masked, "bool"), len(per_step.shape))
        per_step = ops.where(real, per_step, ops.zeros_like(per_step))
    return ops.stop_gradient(per_step)


def fold(sample_weight: Any, class_steps: Any) -> Tensor:
    """`sample_weight` (`None`, `[batch]` or a leading part of the per-step
    shape) times the per-step class weights: the step weights the pipeline
    carries on."""
    if sample_weight is None:
        return class_steps
    sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    return align_rank(sample_weight, len(class_steps.shape)) * class_steps


def class_weight_for(
    labels: Any,
    mask_value: Any = None,
    power: float = 1.0,
    num_classes: int | None = None,
) -> dict[int, float]:
    """Inverse-frequency class weights from a data set's labels, padding
    left out: `(total / (classes * count_c)) ** power`, with `total` the real
    tokens and `classes` the number of classes that occur.

    A NumPy utility: it runs once, on the whole data set, before training.
    With `power=1` a class of average frequency weighs 1 and the weighted
    token count equals the real token count; `power=0.5` is the square
    root that many taggers prefer; `power=0` weighs every class 1.

    Args:
        labels: Integer labels of any shape, e.g. `[samples, time]`.
        mask_value: Optional pad label (e.g. `-100`), left out of the counts.
        power: The exponent of the inverse frequency, `>= 0`.
        num_classes: Optional number of classes; a class with no real step
            then weighs 0 (it cannot be weighed by its frequency). Without it
            the classes are those that occur.

    Returns:
        A `{class: weight}` dict, for the `class_weight` argument of kmask's
        cross-entropy losses, metrics and head.

    Example:

    >>> import kmask
    >>> labels = [[0, 0, 0, 1, -100], [0, 0, 0, 1, -100]]
    >>> kmask.class_weight_for(labels, mask_value=-100)
    {0: 0.6666666666666666, 1: 2.0}
    """
    values = np.asarray(labels)
    if values.dtype.kind not in "iu" and not (
        values.dtype.kind == "f" and np.all(np.isnan(values) | (values % 1 == 0))
    ):
        raise ValueError(
            "Invalid value for argument `labels`. Expected integer labels. "
            f"Received: labels.dtype={values.dtype}"
        )
    if not (isinstance(power, (int, float)) and power >= 0):
        raise ValueError(
            "Invalid value for argument `power`. Expected a number >= 0. "
            f"Received: power={power!r}"
        )
    real = np.ones(values.shape, bool)
    if mask_value is not None:
        real = values != mask_value
        if isinstance(mask_value, float) and math.isnan(mask_value):
            real = ~np.isnan(values)
    real_labels = values[real].astype("int64")
    if real_labels.size and real_labels.min() < 0:
        raise ValueError(
            "Invalid value for argument `labels`. Expected labels >= 0 at the "
            f"real steps (pass the pad label as `mask_value`). Received: label "
            f"{int(real_labels.min())}, mask_value={mask_value!r}"
        )
    if (
        num_classes is not None
        and real_labels.size
        and real_labels.max() >= num_classes
    ):
        raise ValueError(
            "Invalid value for argument `labels`. Expected labels below "
            f"num_classes={num_classes}. Received: label {int(real_labels.max())}"
        )
    counts = np.bincount(real_labels, minlength=num_classes or 0)
    classes = range(len(counts)) if num_classes is not None else np.flatnonzero(counts)
    present = [int(c) for c in classes]
    occurring = int(np.count_nonzero(counts))
    total = float(counts.sum())
    weights = {}
    for class_id in present:
        count = float(counts[class_id])
        if count == 0:
            weights[class_id] = 0.0
            continue
        weights[class_id] = float((total / (occurring * count)) ** power)
    return weights
