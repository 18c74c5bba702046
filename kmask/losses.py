"""`MaskedLoss`, its named subclasses, and `masked_loss()`.

A masked loss computes the wrapped loss per step, then reduces it over the
real steps only. The mask it uses is the AND of the mask Keras propagated onto
`y_pred`, the padding found in `y_true` through `mask_value`, and (for
`masked_loss()`) an explicit `mask`; `sample_weight` multiplies it. See
`kmask.reduce` for what each reduction computes.

Calling a kmask loss runs the masking pipeline every loss and metric share,
then `call()` (the per-step extension point, honoured on every path: see
`MaskedLoss.call`), then the reduction; `masked_loss()` builds a loss and
calls it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from kmask import _pipeline, _resolve, _shapes, class_weights
from kmask.masks import target_padding
from kmask.ops import (
    binary_crossentropy,
    categorical_crossentropy_with_logits,
    mean_squared_error,
    sparse_crossentropy,
)
from kmask.reduce import reduce_steps, standardize_reduction
from kmask.typing import Tensor, TensorLike


def _sparse_per_step(y_true, y_pred, ignore_class: int | None = None, **kwargs):
    """`kmask.ops.sparse_crossentropy`; `ignore_class` is in the signature
    only, the loss turns it into a mask before the labels arrive here."""
    del ignore_class
    return sparse_crossentropy(y_true, y_pred, **kwargs)


@keras.saving.register_keras_serializable(package="kmask")
class MaskedLoss(keras.losses.Loss):
    """Wraps any Keras loss so that padded steps are left out of it.

    Args:
        loss: A Keras loss name (`"categorical_crossentropy"`, `"mae"`, ...), a
            `keras.losses.Loss` instance or class, or a callable
            `(y_true, y_pred) -> per-step loss` that reduces the last axis.
        mask_value: Optional pad value of `y_true` (see `kmask.value_mask`):
            a scalar label such as `0` or `-100`, a one-hot pad vector such as
            `[0, 0, 1]`, or `float("nan")` for missing regression targets.
        reduction: `"token_mean"` (default), `"sequence_mean"`, `"sum"`,
            `"sum_over_batch_size"` or `"none"`; see `kmask.reduce`.
        name: Optional name of the loss.
        dtype: The loss's dtype. The loss is computed and reduced in float32
            (or wider) and returned in this dtype.
        **loss_kwargs: Passed to the wrapped loss (`from_logits=True`,
            `label_smoothing=0.1`, ...).

    Returns:
        Called as `loss(y_true, y_pred, sample_weight=None)`, a scalar, or the
        per-step losses with `reduction="none"`.

    Example:

    >>> import kmask
    >>> y_true = [[[1.0], [2.0], [float("nan")]]]
    >>> y_pred = [[[1.5], [2.0], [9.0]]]
    >>> loss = kmask.MaskedLoss("mae", mask_value=float("nan"))
    >>> float(loss(y_true, y_pred))  # (0.5 + 0.0) / 2 real steps
    0.25
    """

    # The dtype the targets are cast to; `None`: the predictions'.
    _target_dtype: str | None = None
    # The standardized class weights of a cross-entropy (`kmask.class_weights`).
    class_weight: Any = None

    def __init__(
        self,
        loss: str | keras.losses.Loss | type | Callable,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str | None = None,
        dtype: Any = None,
        **loss_kwargs: Any,
    ) -> None:
        reduction = standardize_reduction(reduction)
        # Checked and made plain Python once, here.
        self._pads = None if mask_value is None else _resolve.pad_values(mask_value)
        wrapped = _resolve.wrapped(loss, loss_kwargs)
        super().__init__(name=name or wrapped.name, reduction=None, dtype=dtype)
        self.reduction = reduction
        self.loss, self.loss_kwargs = wrapped.fn, wrapped.kwargs
        self.mask_value = mask_value
        self.dtype_arg = dtype
        self._class_axis = wrapped.class_axis
        self._per_step = wrapped.per_step
        self._sparse_labels = wrapped.sparse_labels
        self._target_kind = wrapped.target_kind
        self._ignore_class = wrapped.ignore_class
        # The padding the targets mark: `target_mask`, unless overridden.
        self._padding = functools.partial(
            target_padding, pads=(self._pads,), ignore_class=self._ignore_class
        )

    def __call__(
        self,
        y_true: TensorLike,
        y_pred: TensorLike,
        sample_weight: TensorLike | None = None,
        *,
        mask: TensorLike | None = None,
        mask_value: Any = None,
        segment_ids: TensorLike | None = None,
        reduction: str | None = None,
    ) -> Tensor:
        """The pipeline (`prepare` finds the real steps and checks every shape
        once), then `call()` or the fused op it stands for on the neutralised
        steps, then `kmask.masked_reduce`. The keyword-only arguments are
        `kmask.masked_loss`'s: an explicit `mask`, a further pad value, packed
        `segment_ids`, and a reduction for this call instead of the loss's own.
        """
        reduction = (
            self.reduction if reduction is None else standardize_reduction(reduction)
        )
        masked_op = self._masked_op(y_true, y_pred)
        target_mask = self._padding_with(mask_value)
        with keras.name_scope(self.name):
            steps = _pipeline.per_step_values(
                y_true,
                y_pred,
                self.call,
                masked_op,
                dtype=self.dtype,
                target_mask=target_mask,
                target_dtype=self._target_dtype,
                class_axis=self._class_axis,
                mask=mask,
                sample_weight=sample_weight,
                segment_ids=segment_ids,
                sparse_labels=self._sparse_labels,
                target_kind=self._target_kind,
                class_weight=self.class_weight,
            )
            ids = None if segment_ids is None else ops.convert_to_tensor(segment_ids)
            result = reduce_steps(
                steps.values, steps.masked, reduction, steps.sample_weight, ids
            )
            return ops.cast(result, self.dtype)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        """The per-step loss: the wrapped loss with its class axis reduced.

        The extension point, as in Keras: override it to change the loss of
        each step. Calling the loss runs it on inputs whose padded steps were
        replaced by harmless values, with the class axis (`axis=`) moved last,
        then reduces over the real steps. The named losses' fused ops (which
        select padding away inside their gradient instead) run only while
        `call()` is kmask's own; both give the same numbers.
        """
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        fused = self._fused_op(y_true, y_pred)
        if fused is not None:
            return fused(y_true, y_pred, None)
        return self._per_step(y_true, y_pred)

    def target_mask(self, y_true: Tensor) -> Tensor | None:
        """The padding this loss finds in `y_true` (`mask_value`, and the
        wrapped loss's `ignore_class`), or `None`: `True` on real steps.

        The pipeline calls it with the targets, sparse labels with a trailing
        axis of 1 (so that a pad value is compared label by label); it
        returns a mask of the per-step shape. Override it to add a source of
        padding (docs/development.md).
        """
        return self._padding(y_true)

    def _padding_with(self, mask_value: Any) -> Callable[[Tensor], Tensor | None]:
        """`target_mask`, and the padding a further `mask_value` marks."""
        if mask_value is not None:
            return functools.partial(
                target_padding,
                pads=(self._pads, _resolve.pad_values(mask_value)),
                ignore_class=self._ignore_class,
            )
        if type(self).target_mask is not MaskedLoss.target_mask:
            return self.target_mask
        return self._padding

    def _fused_op(self, y_true, y_pred) -> _pipeline.MaskedCall | None:
        """The op computing `call()` that takes the mask itself, or `None`;
        `y_true` and `y_pred` as given, or with the class axis last."""
        del y_true, y_pred
        return None

    def _masked_op(self, y_true, y_pred) -> _pipeline.MaskedCall | None:
        """The fused op, unless a subclass overrides `call()`."""
        if type(self).call is not MaskedLoss.call:
            return None
        return self._fused_op(y_true, y_pred)

    def get_config(self) -> dict[str, Any]:
        fields = {"mask_value": self.mask_value, "reduction": self.reduction}
        fields.update(name=self.name, dtype=self.dtype_arg)
        return _resolve.wrapper_config("loss", self.loss, fields, self.loss_kwargs)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MaskedLoss:
        return cls(**_resolve.deserialize_wrapped(config, "loss"))


class _NamedMaskedLoss(MaskedLoss):
    """A `MaskedLoss` whose wrapped loss (`_wraps`) is fixed by the subclass,
    named `_loss_name` unless told otherwise."""

    _wraps: Any = None
    _loss_name = ""

    def __init__(
        self,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str | None = None,
        dtype: Any = None,
        **loss_kwargs: Any,
    ):
        name = name or self._loss_name
        super().__init__(self._wraps, mask_value, reduction, name, dtype, **loss_kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        del config["loss"]
        return config


class _ProbabilityLoss(_NamedMaskedLoss):
    """The arguments of Keras's categorical and binary cross-entropy."""

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str | None = None,
        dtype: Any = None,
    ):
        options = {"from_logits": from_logits, "label_smoothing": label_smoothing}
        super().__init__(mask_value, reduction, name, dtype, **options, axis=axis)


@keras.saving.register_keras_serializable(package="kmask")
class MaskedCategoricalCrossentropy(_ProbabilityLoss):
    """Masked `keras.losses.CategoricalCrossentropy` for one-hot targets.

    Takes every argument of the Keras loss, plus `mask_value` and a kmask
    `reduction` (see `kmask.MaskedLoss` and `kmask.reduce`).

    Args:
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        label_smoothing: Smoothing of the one-hot targets, in `[0, 1]`.
        axis: The class axis.
        mask_value: Pad value of `y_true`, e.g. the one-hot pad `[0, 0, 1]`.
        reduction, name, dtype: As in `kmask.MaskedLoss`.
        class_weight: Optional `{class: weight}` dict or `[classes]` vector:
            each real step weighs `sum_k w_k y_k` (its label's weight for
            one-hot targets) on top of `sample_weight`; see
            "Class weights" in the reductions' concepts page.

    Returns:
        The masked cross-entropy between `[batch, time, classes]` targets and
        predictions, reduced over the real steps.

    Example:

    >>> import kmask
    >>> y_true = [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]  # the 2nd step is padding
    >>> y_pred = [[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]
    >>> loss = kmask.MaskedCategoricalCrossentropy(mask_value=[0, 0, 1])
    >>> round(float(loss(y_true, y_pred)), 4)  # -log(0.5)
    0.6931
    """

    _wraps = "categorical_crossentropy"
    _loss_name = "masked_categorical_crossentropy"

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str | None = None,
        dtype: Any = None,
        class_weight: Any = None,
    ) -> None:
        super().__init__(
            from_logits, label_smoothing, axis, mask_value, reduction, name, dtype
        )
        if class_weight is not None:
            self.class_weight = class_weights.standardize(class_weight)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_weight": self.class_weight}

    def _fused_op(self, y_true, y_pred):
        """From logits with the class axis last and targets of the logits'
        shape, `kmask.ops.categorical_crossentropy_with_logits`."""
        kwargs = self.loss_kwargs
        if not kwargs["from_logits"] or not _shapes.same_steps(y_true, y_pred):
            return None
        return functools.partial(
            categorical_crossentropy_with_logits,
            label_smoothing=kwargs["label_smoothing"],
        )


@keras.saving.register_keras_serializable(package="kmask")
class MaskedSparseCategoricalCrossentropy(_NamedMaskedLoss):
    """Masked `keras.losses.SparseCategoricalCrossentropy` for integer labels.

    Takes every argument of the Keras loss, plus `mask_value`, a kmask
    `reduction`, `label_smoothing` and `z_loss`. `ignore_class` and
    `mask_value` both mark padding; padded labels may be any integer (e.g.
    `-100`): they never reach the cross-entropy.

    Args:
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        ignore_class: Optional label to leave out, as in Keras.
        axis: The class axis of `y_pred`.
        mask_value: Optional pad label, e.g. `0` or `-100`.
        label_smoothing: Smoothing towards the uniform distribution over
            classes, in `[0, 1]` (Keras's sparse loss has none).
        z_loss: Coefficient of `logsumexp(logits) ** 2` added per step, which
            keeps logits from drifting; needs `from_logits=True`.
        reduction, name, dtype: As in `kmask.MaskedLoss`.
        class_weight: Optional `{class: weight}` dict or `[classes]` vector:
            each real step weighs its label's class weight on top of
            `sample_weight`, and `"token_mean"` divides by their sum (PyTorch's
            `weight=`); see "Class weights" in the reductions' concepts page.

    Returns:
        The masked cross-entropy between `[batch, time]` labels and
        `[batch, time, classes]` predictions, reduced over the real steps.

    Example:

    >>> import kmask
    >>> y_true = [[2, 1, -100]]
    >>> y_pred = [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    >>> loss = kmask.MaskedSparseCategoricalCrossentropy(
    ...     from_logits=True, mask_value=-100
    ... )
    >>> round(float(loss(y_true, y_pred)), 4)  # log(3)
    1.0986
    """

    _wraps = staticmethod(_sparse_per_step)
    _target_dtype = "int32"

    def __init__(
        self,
        from_logits: bool = False,
        ignore_class: int | None = None,
        axis: int = -1,
        mask_value: Any = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        reduction: str | None = "token_mean",
        name: str = "masked_sparse_categorical_crossentropy",
        dtype: Any = None,
        class_weight: Any = None,
    ) -> None:
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(
                "Invalid value for argument `label_smoothing`. Expected a value "
                f"in [0, 1]. Received: label_smoothing={label_smoothing}"
            )
        if z_loss and not from_logits:
            raise ValueError(
                "Argument `z_loss` needs `from_logits=True`: it is defined on "
                f"logits. Received: z_loss={z_loss}, from_logits={from_logits}"
            )
        super().__init__(
            mask_value,
            reduction,
            name,
            dtype,
            from_logits=from_logits,
            ignore_class=ignore_class,
            axis=axis,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
        )
        self._sparse_labels = True
        self._target_kind = "labels"
        if class_weight is not None:
            self.class_weight = class_weights.standardize(class_weight)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_weight": self.class_weight}

    def _fused_op(self, y_true, y_pred):
        """The per-step loss, `kmask.ops.sparse_crossentropy`: from logits it
        takes the mask itself."""
        kwargs = dict(self.loss_kwargs, axis=-1)
        del kwargs["ignore_class"]
        if not kwargs["from_logits"]:
            return None
        return functools.partial(sparse_crossentropy, **kwargs)


@keras.saving.register_keras_serializable(package="kmask")
class MaskedBinaryCrossentropy(_ProbabilityLoss):
    """Masked `keras.losses.BinaryCrossentropy`.

    Takes every argument of the Keras loss, plus `mask_value` and a kmask
    `reduction`. The last axis is reduced, as in Keras: give per-step binary
    targets the shape `[batch, time, 1]`.

    Args:
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        label_smoothing: Smoothing of the targets towards 0.5, in `[0, 1]`.
        axis: The axis the mean is taken over.
        mask_value: Optional pad value of `y_true`, e.g. `-1`.
        reduction, name, dtype: As in `kmask.MaskedLoss`.

    Returns:
        The masked binary cross-entropy, reduced over the real steps.

    Example:

    >>> import kmask
    >>> y_true = [[[1.0], [0.0], [-1.0]]]
    >>> y_pred = [[[0.0], [0.0], [5.0]]]
    >>> loss = kmask.MaskedBinaryCrossentropy(from_logits=True, mask_value=-1)
    >>> round(float(loss(y_true, y_pred)), 4)  # log(2)
    0.6931
    """

    # kmask's own, in `keras.ops`: Keras's breaks `torch.compile`'s graph.
    _wraps = staticmethod(binary_crossentropy)
    _loss_name = "masked_binary_crossentropy"


@keras.saving.register_keras_serializable(package="kmask")
class MaskedMeanSquaredError(_NamedMaskedLoss):
    """Masked `keras.losses.MeanSquaredError`: the squared error averaged
    over the feature axis, reduced over the real steps.

    Args:
        mask_value: Optional pad value of `y_true`, e.g. `float("nan")`.
        reduction, name, dtype: As in `kmask.MaskedLoss`.

    Returns:
        A scalar, or the per-step losses with `reduction="none"`.

    Example:

    >>> import kmask
    >>> y_true = [[[1.0], [float("nan")]]]
    >>> y_pred = [[[3.0], [0.0]]]
    >>> float(kmask.MaskedMeanSquaredError(mask_value=float("nan"))(y_true, y_pred))
    4.0
    """

    _wraps = "mean_squared_error"
    _loss_name = "masked_mean_squared_error"

    def _fused_op(self, y_true, y_pred):
        """With targets of the predictions' shape, `kmask.ops.mean_squared_error`."""
        if not _shapes.same_steps(y_true, y_pred):
            return None
        return mean_squared_error


@keras.saving.register_keras_serializable(package="kmask")
class MaskedMeanAbsoluteError(_NamedMaskedLoss):
    """Masked `keras.losses.MeanAbsoluteError`: the absolute error averaged
    over the feature axis, reduced over the real steps.

    Args:
        mask_value: Optional pad value of `y_true`, e.g. `-1.0`.
        reduction, name, dtype: As in `kmask.MaskedLoss`.

    Returns:
        A scalar, or the per-step losses with `reduction="none"`.

    Example:

    >>> import kmask
    >>> loss = kmask.MaskedMeanAbsoluteError(mask_value=-1.0)
    >>> float(loss([[[1.0], [-1.0]]], [[[3.0], [0.0]]]))
    2.0
    """

    _wraps = "mean_absolute_error"
    _loss_name = "masked_mean_absolute_error"


@keras.saving.register_keras_serializable(package="kmask")
class MaskedHuber(_NamedMaskedLoss):
    """Masked `keras.losses.Huber`: the Huber loss averaged over the feature
    axis, reduced over the real steps.

    Args:
        delta: Where the loss turns from quadratic to linear.
        mask_value: Optional pad value of `y_true`, e.g. `-1.0`.
        reduction, name, dtype: As in `kmask.MaskedLoss`.

    Returns:
        A scalar (per-step losses with `reduction="none"`).

    Example:

    >>> import kmask
    >>> loss = kmask.MaskedHuber(mask_value=-1.0)
    >>> float(loss([[[0.0], [-1.0]]], [[[3.0], [9.0]]]))  # 1 * 3 - 0.5
    2.5
    """

    _wraps = "huber"
    _loss_name = "masked_huber_loss"

    def __init__(
        self,
        delta: float = 1.0,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(mask_value, reduction, name, dtype, delta=delta)


def masked_loss(
    y_true: Any,
    y_pred: Any,
    loss: str | keras.losses.Loss | type | Callable,
    mask: Any = None,
    mask_value: Any = None,
    sample_weight: Any = None,
    reduction: str | None = "token_mean",
    segment_ids: Any = None,
    **loss_kwargs: Any,
) -> Tensor:
    """Computes a masked loss in one call, with an explicit mask.

    Builds a `kmask.MaskedLoss` (unless given a kmask loss) and calls it: the
    same masks, neutralised steps, `call()` and `kmask.masked_reduce`.

    Args:
        y_true: Targets.
        y_pred: Predictions.
        loss: Anything `kmask.MaskedLoss` accepts as `loss`, or a kmask loss,
            whose own padding (`mask_value`, `ignore_class`) counts too.
        mask: Optional boolean mask, `True` on real steps, `[batch]` or the
            per-step shape (e.g. `kmask.sequence_mask(lengths, time)`).
        mask_value: Optional pad value of `y_true`.
        sample_weight: Optional weights, `[batch]` or the per-step shape.
        reduction: A kmask reduction name; defaults to `"token_mean"`.
        segment_ids: Optional integer `[batch, time]` ids of the sequences
            packed in each row, `0` at padding (see `kmask.segment_weights`);
            `"sequence_mean"` is then the mean over packed sequences.
        **loss_kwargs: Passed to the wrapped loss.

    Returns:
        A scalar, or per-step losses with `reduction="none"`.

    Example:

    >>> import kmask
    >>> y_true = [[[1.0], [1.0], [1.0]], [[2.0], [2.0], [2.0]]]
    >>> y_pred = [[[0.0], [0.0], [0.0]], [[0.0], [0.0], [0.0]]]
    >>> mask = kmask.sequence_mask([1, 3], 3)
    >>> float(kmask.masked_loss(y_true, y_pred, "mae", mask=mask))  # (1 + 3*2) / 4
    1.75
    """
    if not isinstance(loss, MaskedLoss):
        loss = MaskedLoss(loss, **loss_kwargs)
    elif loss_kwargs:
        raise ValueError(
            "Keyword arguments configure a loss given by name or class, not "
            f"a kmask loss. Received: loss={loss!r}, loss_kwargs={loss_kwargs}"
        )
    return loss(
        y_true,
        y_pred,
        sample_weight,
        mask=mask,
        mask_value=mask_value,
        segment_ids=segment_ids,
        reduction=standardize_reduction(reduction),
    )
