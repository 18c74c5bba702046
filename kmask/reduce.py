"""`masked_reduce` and the reduction names: the one place that divides.

With per-step values `l`, weights `w` (1 when none are given) and a boolean
mask `m` (a step whose weight is 0 counts as padding too):

| reduction             | result                                         |
|-----------------------|------------------------------------------------|
| `token_mean`          | `sum(l*w*m) / sum(w*m)`                        |
| `sequence_mean`       | `sum(l*w*m/n) / sum(w*m/n)`, `n` = real steps  |
|                       | of each sequence; sequences with none drop out |
| `sum`                 | `sum(l*w*m)`                                   |
| `sum_over_batch_size` | `sum(l*w*m) / sum(m)`, or with no mask         |
|                       | `sum(l*w) / number of per-step values`         |
| `none`                | `l*w*m`, one value per step                    |

`sum_over_batch_size` is what Keras computes under that name: a mask (the
propagated mask, `ignore_class`, and for kmask also `mask_value` and an
explicit mask) divides by the number of real steps whatever the weights, and
weights without a mask divide by every step, zero weights included.

With `segment_ids` (several sequences packed in a row), steps with id 0 are
padding and `n` counts the real steps of each packed sequence, so
`sequence_mean` is the mean over packed sequences. With `token_counts` (one
value per sequence standing for several tokens, as a CTC loss does), the
denominator of `token_mean` is `sum(token_counts*w*m)`.

Keras's names are accepted as aliases: `None` is `"none"`, `"mean"` is
`"sum_over_batch_size"` and `"mean_with_sample_weight"` is `"token_mean"`.

Padded values are selected away with `where`, never multiplied by zero, so
NaN or inf at a padded step reaches neither the result nor its gradient. A
reduction over no real step is exactly 0. Sums and counts are accumulated in
float32 (or wider) whatever the dtype of the values.

Under data parallelism every denominator is global (see `kmask.distribute`),
so a mean over N replicas equals the mean over the whole batch. For gradient
accumulation, `accumulation_weights` and `accumulation_batches` turn each
micro-batch's weights into `steps * w / (sum of w over its window)`, to be used
with `reduction="sum"`: the optimizer's average of the micro-batch gradients
is then the gradient of the window's token mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from kmask import _shapes
from kmask.distribute import global_denominator
from kmask.masks import segment_step_counts
from kmask.typing import Tensor


@dataclasses.dataclass
class _Sums:
    """What a reduction is made of, per value: `l*w*m` (`weighted`), `w*m`
    (`step_weight`), the boolean `mask` of the values' rank (`None` without
    one), and the `axis` to sum over (`None`: every axis)."""

    weighted: Any
    step_weight: Any
    mask: Any
    axis: Any
    segment_ids: Any
    token_counts: Any
    _per_sequence: Any = dataclasses.field(default=None, init=False)

    def per_sequence(self) -> Any:
        """At every value, `1 / n`, `n` the real values of its sequence (0
        where it has none); computed once, for the numerator and the
        denominator (not `functools.cached_property`, whose lock
        `torch.compile` cannot trace)."""
        if self._per_sequence is None:
            steps = _sequence_steps(self.step_weight, self.segment_ids)
            self._per_sequence = divide_or_zero(ops.ones_like(steps), steps)
        return self._per_sequence


class Reduction(NamedTuple):
    """A reduction of the registry: its `numerator` and `denominator` (each
    `_Sums -> tensor`; `denominator` `None` when it does not divide), and
    for a linear one its `step_factor` (`_Sums -> factor`, `1.0` for a plain
    sum): the numerator is `sum(l*w*m*step_factor)`, so the gradient with
    respect to the per-step values is known before they are
    (`value_gradient`). Build a linear one with `linear`."""

    numerator: Callable[[_Sums], Any]
    denominator: Callable[[_Sums], Any] | None
    step_factor: Callable[[_Sums], Any] | None = None


def linear(
    step_factor: Callable[[_Sums], Any] | None,
    denominator: Callable[[_Sums], Any] | None,
) -> Reduction:
    """The `Reduction` `sum(l*w*m*step_factor) / denominator`; a
    `step_factor` of `None` is 1 (a plain sum)."""
    if step_factor is None:

        def numerator(sums: _Sums) -> Any:
            return ops.sum(sums.weighted, axis=sums.axis)

        return Reduction(numerator, denominator, _once)

    def weighted_numerator(sums: _Sums) -> Any:
        return ops.sum(sums.weighted * step_factor(sums), axis=sums.axis)

    return Reduction(weighted_numerator, denominator, step_factor)


def _once(sums: _Sums) -> float:
    return 1.0


def _times(values: Any, factor: Any) -> Any:
    """`values * factor`, with no multiplication by a plain `1.0`."""
    return values if isinstance(factor, float) and factor == 1.0 else values * factor


def _token_weight(sums: _Sums):
    weight = sums.step_weight
    if sums.token_counts is not None:
        weight = weight * sums.token_counts
    return ops.sum(weight, axis=sums.axis)


def _real_steps(sums: _Sums):
    if sums.mask is None:
        return ops.sum(ops.ones_like(sums.weighted), axis=sums.axis)
    real = ops.cast(sums.mask, sums.weighted.dtype)
    return ops.sum(ops.broadcast_to(real, ops.shape(sums.weighted)), axis=sums.axis)


def _per_sequence(sums: _Sums):
    return sums.per_sequence()


def _sequence_weight(sums: _Sums):
    return ops.sum(sums.step_weight * sums.per_sequence(), axis=sums.axis)


REGISTRY: dict[str, Reduction] = {
    "token_mean": linear(None, _token_weight),
    "sequence_mean": linear(_per_sequence, _sequence_weight),
    "sum": linear(None, None),
    "sum_over_batch_size": linear(None, _real_steps),
    # One value per step: nothing is summed, so nothing is known ahead.
    "none": Reduction(lambda sums: sums.weighted, None),
}
"""Every reduction kmask knows, by name: `masked_reduce` computes
`numerator / global_denominator(denominator)` (see the table above). A new
reduction is one entry here, and its row in the table."""

REDUCTIONS = tuple(REGISTRY)
KERAS_REDUCTION_ALIASES = {
    None: "none",
    "mean": "sum_over_batch_size",
    "mean_with_sample_weight": "token_mean",
}


def standardize_reduction(reduction: str | None) -> str:
    """Returns the kmask name of `reduction`, accepting Keras's names too."""
    if reduction in REGISTRY:
        return reduction
    if reduction in KERAS_REDUCTION_ALIASES:
        return KERAS_REDUCTION_ALIASES[reduction]
    raise ValueError(
        f"Invalid value for argument `reduction`. Expected one of {tuple(REGISTRY)} "
        f"(or Keras's {tuple(KERAS_REDUCTION_ALIASES)}). "
        f"Received: reduction={reduction!r}"
    )


def masked_reduce(
    values: Any,
    mask: Any = None,
    reduction: str | None = "token_mean",
    sample_weight: Any = None,
    segment_ids: Any = None,
    token_counts: Any = None,
) -> Tensor:
    """Reduces per-step values over the real steps only.

    See the module docstring of `kmask.reduce` for what each reduction
    computes.

    Args:
        values: Per-step values, shape `[batch, ...]` (e.g. `[batch, time]`).
        mask: Optional boolean tensor, `True` on real steps, of shape `[batch]`
            or `values.shape` (any leading part of it works).
        reduction: One of `"token_mean"` (default), `"sequence_mean"`,
            `"sum"`, `"sum_over_batch_size"` or `"none"`.
        sample_weight: Optional weights of shape `[batch]` (per sequence) or
            `values.shape` (per step). A weight of 0 marks padding.
        segment_ids: Optional integer `[batch, time]` ids of the sequences
            packed in each row (`0` is padding, see `kmask.segment_weights`).
            Steps with id 0 are padding, and `"sequence_mean"` averages over
            the packed sequences instead of the rows.
        token_counts: Optional number of tokens behind each value, of shape
            `[batch]` or `values.shape`: the denominator of `"token_mean"`
            adds `token_counts*w*m` instead of `w*m` (a CTC loss is one
            value per sequence, a mean over its labels).

    Returns:
        A scalar in `values`' dtype, or per-step values for `"none"`.

    Example:

    >>> import kmask
    >>> values = [[1.0, 2.0, 3.0], [4.0, 0.0, float("nan")]]
    >>> mask = [[True, True, True], [True, False, False]]
    >>> float(kmask.masked_reduce(values, mask))  # (1 + 2 + 3 + 4) / 4
    2.5
    >>> float(kmask.masked_reduce(values, mask, reduction="sequence_mean"))
    3.0
    """
    reduction = standardize_reduction(reduction)
    values = ops.convert_to_tensor(values)
    result_dtype = values.dtype if "float" in str(values.dtype) else "float32"
    if segment_ids is not None:
        segment_ids = _segment_ids(segment_ids, values)
    fit = {"mask": mask, "sample_weight": sample_weight, "token_counts": token_counts}
    fit = {
        name: None if tensor is None else _fit_to_values(tensor, values, name)
        for name, tensor in fit.items()
    }
    values = ops.cast(values, _shapes.accumulation_dtype(values.dtype))
    result = reduce_steps(values, reduction=reduction, segment_ids=segment_ids, **fit)
    return ops.cast(result, result_dtype)


def reduce_steps(
    values: Any,
    mask: Any = None,
    reduction: str = "token_mean",
    sample_weight: Any = None,
    segment_ids: Any = None,
    token_counts: Any = None,
    axis: int | None = None,
) -> Tensor:
    """`masked_reduce` for the pipeline, which checked every shape already:
    `values` are float32 or float64 (the pipeline computes in them);
    `reduction` is a kmask name; `mask`, `sample_weight` and `token_counts`
    are `[batch]` or a leading part of `values`' shape, and `segment_ids`
    `[batch, time]`.
    `axis` keeps the other axes (TF Addons' per-axis means)."""
    sums = _sums(values, mask, sample_weight, segment_ids, token_counts, axis)
    entry = REGISTRY[reduction]
    result = entry.numerator(sums)
    if entry.denominator is not None:
        # Along an axis each value is one replica's own (its sequences or
        # steps): only a whole-batch denominator is summed across them.
        result = divide_or_zero(
            result, entry.denominator(sums), across_replicas=axis is None
        )
    return result


def value_gradient(
    shape: tuple[int, ...],
    mask: Any = None,
    reduction: str = "token_mean",
    sample_weight: Any = None,
) -> Tensor:
    """`d reduce_steps(values, mask, reduction, sample_weight) / d values`
    for a linear `reduction` (not `"none"`), float32 of the values' `shape`:
    `w*m*step_factor / global denominator`. It does not depend on the values,
    so a fused op can compute the value's gradient in its forward pass."""
    zeros = ops.zeros(shape, "float32")
    sums = _sums(zeros, mask, sample_weight)
    entry = REGISTRY[reduction]
    if entry.step_factor is None:
        names = tuple(name for name, found in REGISTRY.items() if found.step_factor)
        raise ValueError(
            "Invalid value for argument `reduction`. Expected a linear reduction "
            f"(one of {names}). Received: reduction={reduction!r}"
        )
    gradient = _times(sums.step_weight, entry.step_factor(sums))
    if entry.denominator is None:
        return gradient
    return divide_or_zero(gradient, entry.denominator(sums), across_replicas=True)


def is_linear(reduction: str) -> bool:
    """Whether the registry's `reduction` is a linear function of the
    per-step values (`value_gradient` gives its gradient before they are
    known)."""
    return REGISTRY[standardize_reduction(reduction)].step_factor is not None


def masked_sum_and_count(
    values: Any, mask: Any = None, sample_weight: Any = None
) -> tuple[Tensor, Tensor]:
    """The two sums every token mean is made of: `sum(l*w*m)` and `sum(w*m)`.

    Metrics keep these as state so that a mean over several batches is exact;
    the arguments are those of `masked_reduce`. Both sums are float32 (or
    wider).
    """
    values = ops.convert_to_tensor(values)
    if mask is not None:
        mask = _fit_to_values(mask, values, "mask")
    if sample_weight is not None:
        sample_weight = _fit_to_values(sample_weight, values, "sample_weight")
    values = ops.cast(values, _shapes.accumulation_dtype(values.dtype))
    return sum_and_count(values, mask, sample_weight)


def sum_and_count(
    values: Any, mask: Any = None, sample_weight: Any = None
) -> tuple[Tensor, Tensor]:
    """`masked_sum_and_count` for the pipeline, which checked every shape:
    float32 (or float64) `values`, `mask` and `sample_weight` `[batch]` or a
    leading part of their shape. The two sums are the registry's
    `"token_mean"` numerator and (this replica's) denominator, the same
    two functions."""
    sums = _sums(values, mask, sample_weight)
    return ops.sum(sums.weighted), _token_weight(sums)


def _sums(
    values: Any,
    mask: Any = None,
    sample_weight: Any = None,
    segment_ids: Any = None,
    token_counts: Any = None,
    axis: int | None = None,
) -> _Sums:
    """The `_Sums` of `values`; the arguments are `reduce_steps`' (`mask`,
    `sample_weight` and `token_counts` aligned here when their rank is
    lower: the pipeline's have the per-step shape already)."""
    rank = len(values.shape)
    if mask is not None and len(mask.shape) < rank:
        mask = _shapes.align_rank(mask, rank)
    if sample_weight is not None and len(sample_weight.shape) < rank:
        sample_weight = _shapes.align_rank(sample_weight, rank)
    if token_counts is not None and len(token_counts.shape) < rank:
        token_counts = _shapes.align_rank(token_counts, rank)
    if segment_ids is not None:
        in_segment = ops.not_equal(segment_ids, ops.zeros_like(segment_ids))
        in_segment = _shapes.align_rank(in_segment, rank)
        mask = in_segment if mask is None else ops.logical_and(mask, in_segment)
    weighted, step_weight = _weighted_steps(values, mask, sample_weight)
    if token_counts is not None:
        token_counts = ops.cast(token_counts, step_weight.dtype)
    return _Sums(weighted, step_weight, mask, axis, segment_ids, token_counts)


def divide_or_zero(
    numerator: Any, denominator: Any, across_replicas: bool = False
) -> Tensor:
    """`numerator / denominator`, exactly 0 (with a finite gradient) where the
    denominator is 0. `across_replicas`: the denominator is this replica's
    share of a count, divided by as `kmask.distribute.global_denominator`
    says."""
    if across_replicas:
        denominator = global_denominator(denominator)
    nonzero = ops.not_equal(denominator, 0)
    safe_denominator = ops.where(nonzero, denominator, ops.ones_like(denominator))
    return ops.where(nonzero, numerator / safe_denominator, ops.zeros_like(numerator))


def accumulation_weights(sample_weight: Any, batch_size: int, steps: int) -> np.ndarray:
    """Per-step weights that make gradient accumulation equal the full batch.

    Use them as `sample_weight` with a kmask loss built with
    `reduction="sum"`, an optimizer with `gradient_accumulation_steps=steps`,
    and `fit(..., batch_size=batch_size, shuffle=False)` (the windows are
    fixed by the data's order; for shuffled data use `accumulation_batches`).

    Args:
        sample_weight: `[num_samples, time]` weights or a boolean mask of the
            real steps of the whole data set (e.g. `y != pad_id`).
        batch_size: The micro-batch size given to `fit()`.
        steps: The optimizer's `gradient_accumulation_steps`.

    Returns:
        Float32 weights of the same shape, `steps * w / sum(w)` with the sum
        over each window of `steps` consecutive micro-batches.

    Example:

    >>> import kmask
    >>> kmask.accumulation_weights([[1, 1], [1, 0], [0, 0], [1, 0]], 1, 2)
    array([[0.6666667, 0.6666667],
           [0.6666667, 0.       ],
           [0.       , 0.       ],
           [2.       , 0.       ]], dtype=float32)
    """
    weights = np.asarray(sample_weight, dtype="float64")
    window = batch_size * steps
    if len(weights) % window:
        raise ValueError(
            "The number of samples must be a multiple of batch_size * steps, so "
            "that every accumulation window is complete. Received: "
            f"{len(weights)} samples, batch_size={batch_size}, steps={steps}"
        )
    batches = np.split(weights, len(weights) // batch_size)
    return np.concatenate(
        [w for window in _windows(batches, steps) for w in _normalize(window, steps)]
    )


def accumulation_batches(batches: Iterable[tuple], steps: int) -> Iterator[tuple]:
    """Rewrites the weights of a stream of batches for gradient accumulation.

    Groups the batches in windows of `steps` and yields them again with
    `sample_weight` replaced by `steps * w / sum(w over the window)`. Use with
    a kmask loss built with `reduction="sum"` and an optimizer with
    `gradient_accumulation_steps=steps`; pass the generator to `fit()`. An
    epoch should have a multiple of `steps` batches.

    Args:
        batches: Iterable of `(x, y, sample_weight)` with NumPy weights or
            masks of shape `[batch, time]` (or `[batch]`).
        steps: The optimizer's `gradient_accumulation_steps`.

    Returns:
        An iterator of `(x, y, window_weights)`.
    """
    for window in _windows(batches, steps):
        weights = _normalize([np.asarray(w, "float64") for _, _, w in window], steps)
        for (x, y, _), normalized in zip(window, weights, strict=True):
            yield x, y, normalized


def _windows(items: Iterable, steps: int) -> Iterator[list]:
    """Consecutive groups of `steps` items (the last one may be shorter)."""
    window = []
    for item in items:
        window.append(item)
        if len(window) == steps:
            yield window
            window = []
    if window:
        yield window


def _normalize(window: list[np.ndarray], steps: int) -> list[np.ndarray]:
    """`steps * w / sum(w)` with the sum over the whole window, in float32."""
    total = sum(float(w.sum()) for w in window)
    scale = steps / total if total else 0.0
    return [(w * scale).astype("float32") for w in window]


def _weighted_steps(values, mask, sample_weight):
    """Per-step `l*w*m` (padding selected away) and the per-step weight `w*m`,
    both in `values`' dtype (float32 or wider) and shape; `mask` and
    `sample_weight` have `values`' rank."""
    valid = None if mask is None else ops.cast(mask, "bool")
    weight = None
    if sample_weight is not None:
        weight = ops.cast(sample_weight, values.dtype)
        has_weight = ops.not_equal(weight, 0)
        valid = has_weight if valid is None else ops.logical_and(valid, has_weight)
    if valid is None:
        return values, ops.ones_like(values)
    step_weight = ops.cast(valid, values.dtype)
    if weight is not None:
        step_weight = step_weight * weight
    step_weight = ops.broadcast_to(step_weight, ops.shape(values))
    step_values = ops.where(valid, values, ops.zeros_like(values))
    return step_values * step_weight, step_weight


def _sequence_steps(step_weight, segment_ids):
    """At every value, `n`: the real values of its sequence (its row, or its
    packed segment when `segment_ids` are given)."""
    real = ops.cast(ops.not_equal(step_weight, 0), step_weight.dtype)
    rank = len(real.shape)
    if segment_ids is None:
        if rank == 1:
            return real
        return ops.sum(real, axis=tuple(range(1, rank)), keepdims=True)
    per_step = real if rank == 2 else ops.sum(real, axis=tuple(range(2, rank)))
    counts = segment_step_counts(segment_ids, per_step)
    return _shapes.align_rank(counts, rank)


def _segment_ids(segment_ids: Any, values):
    """`segment_ids` checked to be `[batch, time]`, the first two axes of
    `values`."""
    segment_ids = ops.convert_to_tensor(segment_ids)
    shape, target = tuple(segment_ids.shape), tuple(values.shape)
    if len(shape) != 2 or not _shapes.fits_steps(shape, target):
        raise _shapes.invalid_shape(
            "segment_ids",
            f"[batch, time] = {target[:2]}",
            segment_ids=shape,
            values=target,
        )
    return segment_ids


def _fit_to_values(tensor: Any, values, name: str):
    """Checks that `tensor` is `[batch]` or a leading part of `values.shape`
    (trailing axes of size 1 allowed) and appends axes to match its rank."""
    target = tuple(values.shape)
    tensor = _shapes.squeeze_trailing(ops.convert_to_tensor(tensor), len(target))
    _shapes.check_fits_steps(name, tuple(tensor.shape), target, values=target)
    return _shapes.align_rank(tensor, len(target))
