"""`MaskedLoss`, its named subclasses, and `masked_loss()`.

A masked loss computes the wrapped loss per step, then reduces it over the
real steps only. The mask it uses is the AND of the mask Keras propagated onto
`y_pred`, the padding found in `y_true` through `mask_value`, and (for
`masked_loss()`) an explicit `mask`; `sample_weight` multiplies it. See
`kmask.reduce` for what each reduction computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from kmask.fused import (
    categorical_crossentropy_with_logits,
    mean_squared_error,
    sparse_crossentropy_with_logits,
)
from kmask.masks import (
    combine_masks,
    fill_padding,
    keras_mask,
    per_step_mask,
    step_shape,
    value_mask,
    weight_mask,
)
from kmask.reduce import _accumulation_dtype, masked_reduce, standardize_reduction


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
        Called as `loss(y_true, y_pred, sample_weight=None)`: a scalar, or the
        per-step losses with `reduction="none"`.

    Example:

    >>> import kmask
    >>> y_true = [[[1.0], [2.0], [float("nan")]]]
    >>> y_pred = [[[1.5], [2.0], [9.0]]]
    >>> loss = kmask.MaskedLoss("mae", mask_value=float("nan"))
    >>> float(loss(y_true, y_pred))  # (0.5 + 0.0) / 2 real steps
    0.25
    """

    def __init__(
        self,
        loss: str | keras.losses.Loss | type | Callable,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str | None = None,
        dtype: Any = None,
        **loss_kwargs: Any,
    ):
        reduction = standardize_reduction(reduction)
        loss, loss_kwargs = _instantiate_class(loss, loss_kwargs)
        super().__init__(name=name or _default_name(loss), reduction=None, dtype=dtype)
        self.reduction = reduction
        self.loss, self.loss_kwargs = loss, loss_kwargs
        self.mask_value = mask_value
        self.dtype_arg = dtype
        self._per_step = _per_step_function(self.loss, self.loss_kwargs)
        self._class_axis = _class_axis(self.loss, self.loss_kwargs)

    def __call__(self, y_true, y_pred, sample_weight=None):
        return self._masked_call(y_true, y_pred, sample_weight)

    def call(self, y_true, y_pred):
        """The per-step loss: the wrapped loss with its class axis reduced."""
        return self._per_step(y_true, y_pred)

    def target_mask(self, y_true):
        """The padding this loss finds in `y_true`, or `None`."""
        if self.mask_value is None:
            return None
        return value_mask(y_true, self.mask_value)

    def _masked_call(self, y_true, y_pred, sample_weight=None, mask=None):
        propagated = keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_pred = ops.convert_to_tensor(y_pred)
            y_pred = ops.cast(y_pred, _accumulation_dtype(self.dtype))
            y_true = ops.convert_to_tensor(y_true)
            _check_shapes(y_true, y_pred)
            weighted = None
            if sample_weight is not None:
                weighted = weight_mask(
                    sample_weight, step_shape(y_pred, self._class_axis)
                )
            valid = combine_masks(propagated, self.target_mask(y_true), mask, weighted)
            y_true = self._cast_targets(y_true, y_pred.dtype)
            per_step = self._masked_steps(y_true, y_pred, valid)
            result = masked_reduce(per_step, valid, self.reduction, sample_weight)
            return ops.cast(result, self.dtype)

    def _masked_steps(self, y_true, y_pred, valid):
        """The per-step loss, with padded steps (where `valid` is `False`)
        neutralised before the loss sees them."""
        if valid is not None:
            y_true, y_pred = fill_padding(y_true, y_pred, valid, self._class_axis)
        return self.call(y_true, y_pred)

    def _cast_targets(self, y_true, dtype):
        return ops.cast(y_true, dtype)

    def get_config(self) -> dict[str, Any]:
        loss = self.loss
        if not isinstance(loss, str):
            loss = keras.saving.serialize_keras_object(loss)
        return {
            "loss": loss,
            "mask_value": self.mask_value,
            "reduction": self.reduction,
            "name": self.name,
            "dtype": self.dtype_arg,
            **self.loss_kwargs,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MaskedLoss:
        config = dict(config)
        if isinstance(config.get("loss"), dict):
            config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)


class _NamedMaskedLoss(MaskedLoss):
    """A `MaskedLoss` whose wrapped loss is fixed by the subclass."""

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        del config["loss"]
        return config


@keras.saving.register_keras_serializable(package="kmask")
class MaskedCategoricalCrossentropy(_NamedMaskedLoss):
    """Masked `keras.losses.CategoricalCrossentropy` for one-hot targets.

    Takes every argument of the Keras loss, plus `mask_value` and a kmask
    `reduction` (see `kmask.MaskedLoss` and `kmask.reduce`).

    Args:
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        label_smoothing: Smoothing of the one-hot targets, in `[0, 1]`.
        axis: The class axis.
        mask_value: Pad value of `y_true`, e.g. the one-hot pad `[0, 0, 1]`.
        reduction: A kmask reduction name; defaults to `"token_mean"`.
        name: Name of the loss.
        dtype: The loss's dtype.

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

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str = "masked_categorical_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(
            "categorical_crossentropy",
            mask_value=mask_value,
            reduction=reduction,
            name=name,
            dtype=dtype,
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
        )

    def _masked_steps(self, y_true, y_pred, valid):
        """From logits with the class axis last and targets of the logits'
        shape, the fused cross-entropy of `kmask.fused`: padding is selected
        away inside its gradient instead of by a `where` over the whole
        targets and predictions."""
        kwargs = self.loss_kwargs
        if not kwargs["from_logits"] or not _is_class_axis_last(
            y_true, y_pred, kwargs["axis"]
        ):
            return super()._masked_steps(y_true, y_pred, valid)
        if valid is not None:
            valid = per_step_mask(valid, y_pred)
        return categorical_crossentropy_with_logits(
            y_true, y_pred, valid, kwargs["label_smoothing"]
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
        reduction: A kmask reduction name; defaults to `"token_mean"`.
        name: Name of the loss.
        dtype: The loss's dtype.

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
    ):
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
            _sparse_categorical_crossentropy,
            mask_value=mask_value,
            reduction=reduction,
            name=name,
            dtype=dtype,
            from_logits=from_logits,
            ignore_class=ignore_class,
            axis=axis,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
        )

    def target_mask(self, y_true):
        ignore_class = self.loss_kwargs["ignore_class"]
        ignored = None
        if ignore_class is not None:
            ignored = ops.not_equal(y_true, ops.cast(ignore_class, y_true.dtype))
        return combine_masks(super().target_mask(y_true), ignored)

    def _cast_targets(self, y_true, dtype):
        return ops.cast(y_true, "int32")

    def _masked_steps(self, y_true, y_pred, valid):
        """From logits with the class axis last, the fused cross-entropy of
        `kmask.fused`: padding is selected away inside its gradient instead
        of by a `where` over the whole predictions."""
        kwargs = self.loss_kwargs
        rank = len(y_pred.shape)
        if (
            not kwargs["from_logits"]
            or rank < 2
            or kwargs["axis"] not in (-1, rank - 1)
        ):
            return super()._masked_steps(y_true, y_pred, valid)
        if len(y_true.shape) == rank and y_true.shape[-1] == 1:
            y_true = ops.squeeze(y_true, axis=-1)
        if valid is not None:
            valid = per_step_mask(valid, y_pred)
        return sparse_crossentropy_with_logits(
            y_true, y_pred, valid, kwargs["label_smoothing"], kwargs["z_loss"]
        )


@keras.saving.register_keras_serializable(package="kmask")
class MaskedBinaryCrossentropy(_NamedMaskedLoss):
    """Masked `keras.losses.BinaryCrossentropy`.

    Takes every argument of the Keras loss, plus `mask_value` and a kmask
    `reduction`. The last axis is reduced, as in Keras: give per-step binary
    targets the shape `[batch, time, 1]`.

    Args:
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        label_smoothing: Smoothing of the targets towards 0.5, in `[0, 1]`.
        axis: The axis the mean is taken over.
        mask_value: Optional pad value of `y_true`, e.g. `-1`.
        reduction: A kmask reduction name; defaults to `"token_mean"`.
        name: Name of the loss.
        dtype: The loss's dtype.

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

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str = "masked_binary_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(
            "binary_crossentropy",
            mask_value=mask_value,
            reduction=reduction,
            name=name,
            dtype=dtype,
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
        )


@keras.saving.register_keras_serializable(package="kmask")
class MaskedMeanSquaredError(_NamedMaskedLoss):
    """Masked `keras.losses.MeanSquaredError`.

    Args:
        mask_value: Optional pad value of `y_true`, e.g. `float("nan")`.
        reduction: A kmask reduction name; defaults to `"token_mean"`.
        name: Name of the loss.
        dtype: The loss's dtype.

    Returns:
        The squared error averaged over the feature axis, reduced over the
        real steps.

    Example:

    >>> import kmask
    >>> y_true = [[[1.0], [float("nan")]]]
    >>> y_pred = [[[3.0], [0.0]]]
    >>> float(kmask.MaskedMeanSquaredError(mask_value=float("nan"))(y_true, y_pred))
    4.0
    """

    def __init__(
        self,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str = "masked_mean_squared_error",
        dtype: Any = None,
    ):
        super().__init__(
            "mean_squared_error",
            mask_value=mask_value,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )

    def _masked_steps(self, y_true, y_pred, valid):
        """With targets of the predictions' shape, the fused squared error of
        `kmask.fused`: padding is selected away inside its gradient instead
        of by a `where` over the whole targets and predictions."""
        if not _is_class_axis_last(y_true, y_pred, -1):
            return super()._masked_steps(y_true, y_pred, valid)
        if valid is not None:
            valid = per_step_mask(valid, y_pred)
        return mean_squared_error(y_true, y_pred, valid)


@keras.saving.register_keras_serializable(package="kmask")
class MaskedMeanAbsoluteError(_NamedMaskedLoss):
    """Masked `keras.losses.MeanAbsoluteError`.

    Args:
        mask_value: Optional pad value of `y_true`, e.g. `float("nan")`.
        reduction: A kmask reduction name; defaults to `"token_mean"`.
        name: Name of the loss.
        dtype: The loss's dtype.

    Returns:
        The absolute error averaged over the feature axis, reduced over the
        real steps.

    Example:

    >>> import kmask
    >>> y_true = [[[1.0], [-1.0]]]
    >>> y_pred = [[[3.0], [0.0]]]
    >>> float(kmask.MaskedMeanAbsoluteError(mask_value=-1.0)(y_true, y_pred))
    2.0
    """

    def __init__(
        self,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str = "masked_mean_absolute_error",
        dtype: Any = None,
    ):
        super().__init__(
            "mean_absolute_error",
            mask_value=mask_value,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )


@keras.saving.register_keras_serializable(package="kmask")
class MaskedHuber(_NamedMaskedLoss):
    """Masked `keras.losses.Huber`.

    Args:
        delta: Where the loss turns from quadratic to linear.
        mask_value: Optional pad value of `y_true`, e.g. `float("nan")`.
        reduction: A kmask reduction name; defaults to `"token_mean"`.
        name: Name of the loss.
        dtype: The loss's dtype.

    Returns:
        The Huber loss averaged over the feature axis, reduced over the real
        steps.

    Example:

    >>> import kmask
    >>> y_true = [[[0.0], [float("nan")]]]
    >>> y_pred = [[[3.0], [1.0]]]
    >>> float(kmask.MaskedHuber(delta=1.0, mask_value=float("nan"))(y_true, y_pred))
    2.5
    """

    def __init__(
        self,
        delta: float = 1.0,
        mask_value: Any = None,
        reduction: str | None = "token_mean",
        name: str = "masked_huber_loss",
        dtype: Any = None,
    ):
        super().__init__(
            "huber",
            mask_value=mask_value,
            reduction=reduction,
            name=name,
            dtype=dtype,
            delta=delta,
        )


def masked_loss(
    y_true: Any,
    y_pred: Any,
    loss: str | keras.losses.Loss | type | Callable,
    mask: Any = None,
    mask_value: Any = None,
    sample_weight: Any = None,
    reduction: str | None = "token_mean",
    **loss_kwargs: Any,
):
    """Computes a masked loss in one call, with an explicit mask.

    The functional form of `kmask.MaskedLoss`: the same masks, reductions and
    padding guarantees.

    Args:
        y_true: Targets.
        y_pred: Predictions.
        loss: Anything `kmask.MaskedLoss` accepts as `loss`.
        mask: Optional boolean mask, `True` on real steps, `[batch]` or the
            per-step shape (e.g. `kmask.sequence_mask(lengths, time)`).
        mask_value: Optional pad value of `y_true`.
        sample_weight: Optional weights, `[batch]` or the per-step shape.
        reduction: A kmask reduction name; defaults to `"token_mean"`.
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
    masked = MaskedLoss(loss, mask_value=mask_value, reduction=reduction, **loss_kwargs)
    return masked._masked_call(y_true, y_pred, sample_weight, mask=mask)


def _sparse_categorical_crossentropy(
    y_true,
    y_pred,
    from_logits: bool = False,
    axis: int = -1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_class: int | None = None,
):
    """Per-step sparse cross-entropy with label smoothing and z-loss.

    `ignore_class` is accepted for the signature only: the caller turns it
    into a mask before the labels arrive here.
    """
    del ignore_class
    y_true = ops.cast(y_true, "int32")
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    if not label_smoothing and not z_loss:
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=from_logits, axis=axis
        )
    if from_logits:
        log_normalizer = ops.logsumexp(y_pred, axis=axis, keepdims=True)
        log_probs = y_pred - log_normalizer
    else:
        probs = y_pred / ops.sum(y_pred, axis=axis, keepdims=True)
        epsilon = keras.backend.epsilon()
        log_probs = ops.log(ops.clip(probs, epsilon, 1.0 - epsilon))
    label_log_prob = ops.take_along_axis(
        log_probs, ops.expand_dims(y_true, axis), axis=axis
    )
    per_step = -ops.squeeze(label_log_prob, axis=axis)
    if label_smoothing:
        uniform = -ops.mean(log_probs, axis=axis)
        per_step = (1.0 - label_smoothing) * per_step + label_smoothing * uniform
    if z_loss:
        per_step = per_step + z_loss * ops.square(
            ops.squeeze(log_normalizer, axis=axis)
        )
    return per_step


def _default_name(fn: Any) -> str:
    """`masked_` and the wrapped function's name; a kmask loss's name already
    says it."""
    if isinstance(fn, str):
        base = fn
    elif isinstance(fn, keras.losses.Loss):
        base = fn.name
    else:
        base = getattr(fn, "__name__", type(fn).__name__)
    return base if base.startswith("masked_") else f"masked_{base}"


def _instantiate_class(loss: Any, loss_kwargs: dict) -> tuple[Any, dict]:
    """A Loss class is instantiated with the kwargs, which it then owns."""
    if isinstance(loss, type) and issubclass(loss, keras.losses.Loss):
        return loss(**loss_kwargs), {}
    return loss, dict(loss_kwargs)


def _per_step_function(
    fn: Any,
    fn_kwargs: dict,
    argument: str = "loss",
    by_name: Callable[[str], Any] | None = None,
) -> Callable:
    """Resolves `fn` to `(y_true, y_pred) -> per-step values`: a Keras loss
    name (or whatever `by_name` finds for a name), a `keras.losses.Loss`
    instance or class, or a callable taking `fn_kwargs`. Errors name the
    constructor's `argument`."""
    if isinstance(fn, str):
        resolved = _loss_by_name(fn)
        if resolved is None and by_name is not None:
            resolved = by_name(fn)
        if resolved is None:
            kinds = "Keras loss" if by_name is None else "Keras loss or metric function"
            raise ValueError(
                f"Invalid value for argument `{argument}`: not a {kinds} name. "
                f"Received: {argument}={fn!r}"
            )
        if isinstance(resolved, keras.losses.Loss) and fn_kwargs:
            resolved = type(resolved)(**fn_kwargs)
            fn_kwargs = {}
        fn = resolved
    fn, fn_kwargs = _instantiate_class(fn, fn_kwargs)
    if isinstance(fn, keras.losses.Loss):
        if fn_kwargs:
            raise ValueError(
                "Keyword arguments configure a loss given by name or class, not "
                f"an instance. Received: {argument}={fn!r}, "
                f"{argument}_kwargs={fn_kwargs}"
            )
        return fn.call
    if not callable(fn) or isinstance(fn, type):
        raise ValueError(
            f"Invalid value for argument `{argument}`: expected a Keras loss "
            "name, a keras.losses.Loss instance or class, or a callable "
            f"(y_true, y_pred) -> per-step values. Received: {argument}={fn!r}"
        )

    def per_step(y_true, y_pred):
        return fn(y_true, y_pred, **fn_kwargs)

    return per_step


def _class_axis(fn: Any, fn_kwargs: dict) -> int:
    """The class axis the wrapped loss reduces: from the keyword arguments,
    else the loss's own (`axis` of a Keras loss, a kmask loss's kwargs)."""
    if "axis" in fn_kwargs:
        return fn_kwargs["axis"]
    axis = getattr(fn, "loss_kwargs", {}).get("axis", getattr(fn, "axis", None))
    return -1 if axis is None else axis


def _loss_by_name(name: str) -> Any:
    """A Keras loss function or Loss instance by name (aliases such as
    `"mae"` included), or `None`."""
    try:
        return keras.losses.get(name)
    except ValueError:
        return None


def _is_class_axis_last(y_true, y_pred, axis: int) -> bool:
    """Whether a dense loss can take the fused path: `y_true` of `y_pred`'s
    shape (no broadcasting), rank 2 or more, reduced over the last axis."""
    rank = len(y_pred.shape)
    return (
        rank >= 2
        and axis in (-1, rank - 1)
        and tuple(y_true.shape) == tuple(y_pred.shape)
    )


def _check_shapes(y_true, y_pred) -> None:
    """Raises when `y_true` and `y_pred` cannot describe the same steps:
    equal shapes (a last axis of 1 broadcasts), or `y_true` without
    `y_pred`'s last axis (sparse labels)."""
    true_shape, pred_shape = tuple(y_true.shape), tuple(y_pred.shape)
    lower, higher = sorted((true_shape, pred_shape), key=len)
    if len(higher) - len(lower) == 1:
        pairs = list(zip(lower, higher[:-1], strict=True))
    elif len(higher) == len(lower) and lower:
        pairs = list(zip(lower[:-1], higher[:-1], strict=True))
        if 1 not in (lower[-1], higher[-1]):
            pairs.append((lower[-1], higher[-1]))
    else:
        pairs = [(len(true_shape), len(pred_shape))] if lower != higher else []
    if any(a is not None and b is not None and a != b for a, b in pairs):
        raise ValueError(
            "Arguments `y_true` and `y_pred` have incompatible shapes: "
            f"y_true.shape={true_shape}, y_pred.shape={pred_shape}. Expected "
            "equal shapes, or y_true without y_pred's last (class) axis."
        )
