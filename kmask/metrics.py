"""Token-weighted masked metrics: a sum and a count, exact across batches.

Each metric keeps two float32 variables, the sum of its per-step values over
the real steps and the number of real steps (weighted by `sample_weight`),
both from `kmask.reduce.sum_and_count`. Its result is their quotient,
so two batches with 16 and 1 real tokens give the mean over 17 tokens, not the
mean of two batch means. The steps come from the pipeline every kmask loss
runs: the mask Keras propagated onto `y_pred`, AND the
padding `mask_value` marks in `y_true` (AND the padding a wrapped kmask loss
finds), AND the steps whose `sample_weight` is 0; the shapes are checked as a
loss checks them, and padded steps are replaced before the per-step function
runs, so NaN there is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from kmask import _pipeline, _resolve, class_weights
from kmask._shapes import squeeze_trailing
from kmask.masks import combine_masks, target_padding
from kmask.ops import crossentropy
from kmask.ops.linear import HEAD_STATS
from kmask.reduce import divide_or_zero, masked_sum_and_count, sum_and_count
from kmask.typing import Tensor, TensorLike


class _TokenMean(keras.metrics.Metric):
    """A metric whose state is a sum over the real tokens and their count,
    both float32 even under mixed precision (a float16 count stops growing
    at 2048 tokens); its result is their quotient, 0 before any real step."""

    def __init__(self, name: str | None = None, dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="total"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="count"
        )

    def _add(self, total: Any, count: Any) -> None:
        self.total.assign_add(ops.cast(total, "float32"))
        self.count.assign_add(ops.cast(count, "float32"))

    def _mean(self) -> Tensor:
        """The token mean so far: total over count, 0 before any real step."""
        total = ops.convert_to_tensor(self.total)
        return divide_or_zero(total, ops.convert_to_tensor(self.count))

    def result(self) -> Tensor:
        return ops.cast(self._mean(), self.dtype)

    def _exp_mean(self) -> Tensor:
        """`exp` of the token mean (a perplexity, when the mean is a negative
        log-likelihood); 0 before any real step, as Keras's metrics and
        keras-hub's `Perplexity` give."""
        seen = ops.greater(ops.convert_to_tensor(self.count), 0)
        return ops.cast(ops.where(seen, ops.exp(self._mean()), 0.0), self.dtype)


@keras.saving.register_keras_serializable(package="kmask")
class MaskedMeanMetricWrapper(_TokenMean):
    """The mean of any per-step function over the real steps of every batch.

    The masked, token-weighted form of `keras.metrics.MeanMetricWrapper`.
    Given a kmask loss, it reports that loss's token mean over all batches
    since the last reset, which is what the loss gives on the concatenated
    batches.

    Args:
        fn: `(y_true, y_pred, **fn_kwargs) -> per-step values` that reduces
            the class axis (e.g. `keras.metrics.sparse_categorical_accuracy`),
            the name of a Keras loss or metric function (`"mae"`,
            `"categorical_accuracy"`), or a `keras.losses.Loss` instance or
            class (a class is instantiated with `fn_kwargs`). A kmask loss
            also contributes the padding it finds in `y_true`.
        mask_value: Optional pad value of `y_true` (see
            `kmask.masks.value_mask`): `0`, `-100`, a one-hot pad vector such
            as `[0, 0, 1]`, or `float("nan")`.
        name: Name of the metric; defaults to `"masked_" + fn's name`.
        dtype: Dtype of the result. The state is float32 whatever it is.
        **fn_kwargs: Passed to `fn` (e.g. `from_logits=True`).

    Returns:
        `result()` is the mean of `fn` over the real steps seen since the last
        `reset_state()`, 0 when there were none.

    Example:

    >>> from kmask.metrics import MaskedMeanMetricWrapper
    >>> metric = MaskedMeanMetricWrapper("mae", mask_value=-1.0)
    >>> metric.update_state([[[1.0], [-1.0]]], [[[3.0], [9.0]]])
    >>> metric.update_state([[[0.0], [0.0]]], [[[1.0], [1.0]]])
    >>> float(metric.result())  # (2 + 1 + 1) / 3 real steps
    1.3333333730697632
    """

    # The standardized class weights of an accuracy (`kmask.class_weights`).
    class_weight: Any = None

    def __init__(
        self,
        fn: str | keras.losses.Loss | Callable,
        mask_value: Any = None,
        name: str | None = None,
        dtype: Any = None,
        **fn_kwargs: Any,
    ) -> None:
        wrapped = _resolve.wrapped(fn, fn_kwargs, "fn", _metric_by_name)
        super().__init__(name=name or wrapped.name, dtype=dtype)
        self.fn, self.fn_kwargs = wrapped.fn, wrapped.kwargs
        self._pads = None if mask_value is None else _resolve.pad_values(mask_value)
        self.mask_value = mask_value
        self._per_step = wrapped.per_step
        self._class_axis = wrapped.class_axis
        self._sparse_labels = wrapped.sparse_labels
        self._target_kind = wrapped.target_kind
        self._ignore_class = wrapped.ignore_class

    def target_mask(self, y_true: Tensor) -> Tensor | None:
        """The padding found in `y_true` (`mask_value`, an `ignore_class`,
        and a wrapped kmask loss's own), or `None`."""
        padding = target_padding(y_true, (self._pads,), self._ignore_class)
        if hasattr(self.fn, "target_mask"):
            padding = combine_masks(padding, self.fn.target_mask(y_true))
        return padding

    def update_state(
        self,
        y_true: TensorLike,
        y_pred: TensorLike,
        sample_weight: TensorLike | None = None,
    ) -> None:
        """Adds the real steps of one batch to the sum and the count.

        Args:
            y_true: Targets, `[batch, time]` labels or `[batch, time, ...]`.
            y_pred: Predictions, `[batch, time, ...]`; a mask Keras
                propagated onto them counts.
            sample_weight: Optional weights, `[batch]` or `[batch, time]`; a
                weight of 0 marks padding.
        """
        steps = self._through_pipeline(y_true, y_pred, sample_weight)
        # `steps.sample_weight`: the weights, class weights included.
        self._add(*sum_and_count(steps.values, steps.valid, steps.sample_weight))

    def _through_pipeline(
        self, y_true: Any, y_pred: Any, sample_weight: Any
    ) -> _pipeline.Steps:
        """One batch through the masking pipeline: its `Steps`, with the
        per-step values of `fn` (padding neutralised, the class axis last by
        then)."""
        return _pipeline.per_step_values(
            y_true,
            y_pred,
            self._per_step,
            dtype=self.dtype,
            target_mask=self.target_mask,
            class_axis=self._class_axis,
            sample_weight=sample_weight,
            sparse_labels=self._sparse_labels,
            target_kind=self._target_kind,
            family="metric",
            class_weight=self.class_weight,
        )

    def get_config(self) -> dict[str, Any]:
        fields = {"mask_value": self.mask_value, "name": self.name}
        return _resolve.wrapper_config(
            "fn", self.fn, {**fields, "dtype": self.dtype}, self.fn_kwargs
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MaskedMeanMetricWrapper:
        return cls(**_resolve.deserialize_wrapped(config, "fn"))


class _NamedMaskedMetric(MaskedMeanMetricWrapper):
    """A `MaskedMeanMetricWrapper` whose function (`_fn`) is fixed by the
    subclass, named `_metric_name` unless told otherwise."""

    _fn: Any = None
    _metric_name = ""

    def __init__(
        self,
        mask_value: Any = None,
        name: str | None = None,
        dtype: Any = None,
        **fn_kwargs: Any,
    ):
        name = name or self._metric_name
        super().__init__(self._fn, mask_value, name, dtype, **fn_kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        del config["fn"]
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MaskedMeanMetricWrapper:
        return cls(**config)


class _ClassWeightedMetric(_NamedMaskedMetric):
    """A named metric that takes `class_weight`: each real step weighs its
    label's class weight on top of `sample_weight`."""

    def __init__(
        self,
        mask_value: Any = None,
        name: str | None = None,
        dtype: Any = None,
        class_weight: Any = None,
    ):
        super().__init__(mask_value, name, dtype)
        self.class_weight = class_weights.standardize(class_weight)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_weight": self.class_weight}


@keras.saving.register_keras_serializable(package="kmask")
class MaskedSparseCategoricalAccuracy(_ClassWeightedMetric):
    """Accuracy of integer labels over the real steps of every batch.

    Args:
        mask_value: Optional pad label, e.g. `0` or `-100`.
        name: Name of the metric.
        dtype: Dtype of the result.
        class_weight: Optional `{class: weight}` dict or `[classes]` vector:
            each real step weighs its label's class weight, so the result is
            `sum(c[y] * right) / sum(c[y])`; with `kmask.class_weight_for`'s
            weights of the same data, the mean of the per-class recalls.

    Returns:
        `result()` is the fraction of real steps whose label is the arg max of
        `y_pred`, over all batches since the last reset. `y_true` is
        `[batch, time]`, `y_pred` `[batch, time, classes]`.

    Example:

    >>> from kmask.metrics import MaskedSparseCategoricalAccuracy
    >>> metric = MaskedSparseCategoricalAccuracy(mask_value=-100)
    >>> metric.update_state([[1, 0, -100]], [[[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]])
    >>> float(metric.result())  # 1 right out of 2 real steps
    0.5
    """

    _fn = staticmethod(keras.metrics.sparse_categorical_accuracy)
    _metric_name = "masked_sparse_categorical_accuracy"


@keras.saving.register_keras_serializable(package="kmask")
class MaskedCategoricalAccuracy(_ClassWeightedMetric):
    """Accuracy of one-hot targets over the real steps of every batch.

    Args:
        mask_value: Optional pad of `y_true`, e.g. the one-hot pad vector
            `[0, 0, 1]`.
        name: Name of the metric.
        dtype: Dtype of the result.
        class_weight: Optional `{class: weight}` dict or `[classes]` vector:
            each real step weighs `sum_k c[k] * y_true[k]` (its label's
            class weight).

    Returns:
        `result()` is the fraction of real steps where the arg max of `y_true`
        and `y_pred` agree, over all batches since the last reset. Both are
        `[batch, time, classes]`.

    Example:

    >>> from kmask.metrics import MaskedCategoricalAccuracy
    >>> metric = MaskedCategoricalAccuracy(mask_value=[0, 0, 1])
    >>> y_true = [[[1, 0, 0], [0, 0, 1]]]  # the 2nd step is padding
    >>> metric.update_state(y_true, [[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]])
    >>> float(metric.result())
    1.0
    """

    _fn = staticmethod(keras.metrics.categorical_accuracy)
    _metric_name = "masked_categorical_accuracy"


@keras.saving.register_keras_serializable(package="kmask")
class MaskedSequenceAccuracy(_NamedMaskedMetric):
    """The fraction of sequences whose every real step is predicted right.

    A row counts as right when the arg max of `y_pred` over the class axis
    equals the label at each of its real steps; rows with no real step drop
    out. The state is two numbers, the right rows and the counted rows (both
    weighted by a `[batch]` `sample_weight`), so the result is exact across
    batches and replicas. Padding comes from every source the other metrics
    use: the mask Keras propagated onto `y_pred`, `mask_value`, and steps
    whose `sample_weight` is 0.

    Args:
        mask_value: Optional pad label, e.g. `0` or `-100`.
        name: Name of the metric.
        dtype: Dtype of the result.

    Returns:
        `result()` is right rows / counted rows since the last reset, 0 before
        any counted row. `y_true` is `[batch, time]` labels, `y_pred`
        `[batch, time, classes]`.

    Example:

    >>> from kmask.metrics import MaskedSequenceAccuracy
    >>> metric = MaskedSequenceAccuracy(mask_value=-100)
    >>> y_true = [[1, 0, -100], [1, 1, 1], [-100, -100, -100]]
    >>> y_pred = [[[0.2, 0.8], [0.9, 0.1], [0.9, 0.1]],
    ...           [[0.2, 0.8], [0.9, 0.1], [0.2, 0.8]],
    ...           [[0.2, 0.8], [0.9, 0.1], [0.2, 0.8]]]
    >>> metric.update_state(y_true, y_pred)
    >>> float(metric.result())  # row 1 right, row 2 wrong, row 3 all padding
    0.5
    """

    _fn = staticmethod(keras.metrics.sparse_categorical_accuracy)
    _metric_name = "masked_sequence_accuracy"

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Adds the right rows and the counted rows of one batch.

        Args:
            y_true: Labels, `[batch, time]`.
            y_pred: Scores, `[batch, time, classes]`; a mask Keras propagated
                onto them counts.
            sample_weight: Optional weights: `[batch]` weights the rows,
                `[batch, time]` marks padding where it is 0.
        """
        steps = self._through_pipeline(y_true, y_pred, sample_weight)
        per_step = steps.values
        step_axes = tuple(range(1, len(per_step.shape)))
        right = ops.equal(per_step, ops.ones_like(per_step))
        real = ops.ones_like(right) if steps.valid is None else steps.valid
        row_right = ops.all(
            ops.logical_or(right, ops.logical_not(real)), axis=step_axes
        )
        row_counted = ops.any(real, axis=step_axes)
        row_weight = None
        if sample_weight is not None:
            row_weight = squeeze_trailing(ops.convert_to_tensor(sample_weight), 1)
            if len(row_weight.shape) != 1:
                row_weight = None
        self._add(
            *masked_sum_and_count(
                ops.cast(row_right, "float32"), row_counted, row_weight
            )
        )


@keras.saving.register_keras_serializable(package="kmask")
class Perplexity(_NamedMaskedMetric):
    """`exp(total cross-entropy / total real tokens)` over every batch.

    Labels are sparse (`[batch, time]` or `[batch, time, 1]`) or one-hot
    (`y_pred`'s shape); the shape tells which.

    Args:
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        mask_value: Optional pad of `y_true`: a label such as `0` or `-100`,
            or a one-hot pad vector.
        name: Name of the metric.
        dtype: Dtype of the result.

    Returns:
        `result()` is the perplexity over the real tokens since the last reset;
        0 when there were none, as Keras's metrics and keras-hub's
        `Perplexity` give.

    Example:

    >>> from kmask.metrics import Perplexity
    >>> metric = Perplexity(from_logits=True, mask_value=-100)
    >>> metric.update_state([[2, -100]], [[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    >>> round(float(metric.result()), 4)  # exp(log(3))
    3.0
    """

    _fn = staticmethod(crossentropy)
    _metric_name = "perplexity"

    def __init__(
        self,
        from_logits: bool = False,
        mask_value: Any = None,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(mask_value, name, dtype, from_logits=from_logits)

    def result(self) -> Tensor:
        return self._exp_mean()


class _HeadMetric(_TokenMean):
    """The token-weighted mean of one of the head's per-step statistics
    (`HEAD_STATS`, the subclass's `_stat`) over every batch since the last
    reset, named `_metric_name` unless told otherwise."""

    _stat: str
    _metric_name: str

    def __init__(self, name: str | None = None, dtype: Any = None) -> None:
        super().__init__(name=name or self._metric_name, dtype=dtype)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Adds a batch. `y_true` is ignored (the head saw the labels);
        `y_pred` is the head's `[..., 8]` statistics; `sample_weight`
        multiplies the head's step weights."""
        del y_true
        steps = _pipeline.prepare_stats(
            y_pred, names=HEAD_STATS, sample_weight=sample_weight
        )
        # A padded step adds nothing, even NaN.
        values = steps.y_pred[..., HEAD_STATS.index(self._stat)]
        self._add(*sum_and_count(values, steps.valid, steps.sample_weight))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="kmask")
class HeadAccuracy(_HeadMetric):
    """The token accuracy of a `kmask.FusedLinearCrossentropy` head, exact
    across batches, from its per-step statistics (the logits are never held).

    Build the head with `return_stats=True`, make its output the model's,
    and compile with `loss=None, metrics=[kmask.HeadAccuracy(),
    kmask.HeadPerplexity()]`: the head adds its loss itself, and each metric
    keeps a sum and a count of the real tokens.

    Args:
        name: Name of the metric; defaults to `"accuracy"`.
        dtype: Dtype of the result. The state is float32 whatever it is.

    Returns:
        `result()` is the share of real tokens whose argmax (of the capped
        logits, with a soft cap) is the label since the last reset, weighted
        by `sample_weight`; 0 when there were none.

    Example:

    >>> import kmask
    >>> metric = kmask.HeadAccuracy()
    >>> # HEAD_STATS per step: loss, nll, correct, weight, then four more.
    >>> metric.update_state(None, [[[0.5, 0.5, 1, 1, 0, 0, 0, 0], [0.0] * 8]])
    >>> metric.update_state(
    ...     None, [[[2.0, 2.0, 0, 1, 0, 0, 0, 0], [0.1, 0.1, 1, 1, 0, 0, 0, 0]]]
    ... )
    >>> round(float(metric.result()), 4)  # 2 right of 3 real tokens
    0.6667
    """

    _stat = "correct"
    _metric_name = "accuracy"


@keras.saving.register_keras_serializable(package="kmask")
class HeadPerplexity(_HeadMetric):
    """The perplexity of a `kmask.FusedLinearCrossentropy` head, exact across
    batches: `exp(total negative log-likelihood / total real tokens)`.

    The negative log-likelihood is the label's, without the head's label
    smoothing or z-loss; see `HeadAccuracy` for the setup.

    Args:
        name: Name of the metric; defaults to `"perplexity"`.
        dtype: Dtype of the result. The state is float32 whatever it is.

    Returns:
        `result()` is the perplexity over the real tokens since the last
        reset; 0 when there were none, as `kmask.metrics.Perplexity` gives.

    Example:

    >>> import kmask
    >>> metric = kmask.HeadPerplexity()
    >>> metric.update_state(None, [[[1.1, 1.0986, 0, 1, 0, 0, 0, 0], [0.0] * 8]])
    >>> round(float(metric.result()), 2)  # exp(log(3))
    3.0
    """

    _stat = "nll"
    _metric_name = "perplexity"

    def result(self) -> Tensor:
        return self._exp_mean()


@keras.saving.register_keras_serializable(package="kmask")
class HeadZLoss(_HeadMetric):
    """The mean z-loss term `z_loss * logsumexp(logits) ** 2` of a
    `kmask.FusedLinearCrossentropy` head over the real tokens, exact across
    batches, so that it can be logged apart from the loss (0 when the head
    has no `z_loss`); see `HeadAccuracy` for the setup.

    Args:
        name: Name of the metric; defaults to `"z_loss"`.
        dtype: Dtype of the result. The state is float32 whatever it is.

    Returns:
        `result()` is the token-weighted mean of the z-loss term since the
        last reset; 0 when there were no real tokens.

    Example:

    >>> import kmask
    >>> metric = kmask.HeadZLoss()
    >>> metric.update_state(None, [[[0, 0, 0, 1, 0.3, 0, 0, 0], [0.0] * 8]])
    >>> metric.update_state(None, [[[0, 0, 0, 1, 0.1, 0, 0, 0]]])
    >>> round(float(metric.result()), 4)
    0.2
    """

    _stat = "z_loss"
    _metric_name = "z_loss"


@keras.saving.register_keras_serializable(package="kmask")
class HeadEntropy(_HeadMetric):
    """The mean entropy of a `kmask.FusedLinearCrossentropy` head's softmax
    (at the head's `temperature`) over the real tokens, exact across
    batches; see `HeadAccuracy` for the setup.

    Args:
        name: Name of the metric; defaults to `"entropy"`.
        dtype: Dtype of the result. The state is float32 whatever it is.

    Returns:
        `result()` is the token-weighted mean entropy (in nats) since the
        last reset; 0 when there were no real tokens.

    Example:

    >>> import kmask
    >>> metric = kmask.HeadEntropy()
    >>> metric.update_state(None, [[[0, 0, 0, 1, 0, 0, 0, 1.5], [0.0] * 8]])
    >>> metric.update_state(None, [[[0, 0, 0, 1, 0, 0, 0, 0.5]]])
    >>> float(metric.result())
    1.0
    """

    _stat = "entropy"
    _metric_name = "entropy"


def _metric_by_name(name: str) -> Callable | None:
    """A function from `keras.metrics` (`"sparse_categorical_accuracy"`)."""
    function = getattr(keras.metrics, name, None)
    if function is None or isinstance(function, type) or not callable(function):
        return None
    return function
