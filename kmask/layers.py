"""Layers that create or restore a Keras mask.

Each returns its first input unchanged in value and dtype and sets the mask
its `compute_mask` describes, so every layer after it, and a loss reading the
propagated mask, sees which steps are real. `kmask.report.mask_report` shows
where a model needs one.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kmask import _shapes
from kmask._resolve import pad_values, plain
from kmask.masks import PADDINGS, keras_mask, sequence_mask, value_mask
from kmask.typing import Tensor


@keras.saving.register_keras_serializable(package="kmask")
class AttachMask(keras.layers.Layer):
    """Gives a tensor the Keras mask of another one.

    Once a layer such as `LSTM(return_sequences=False)` has dropped the mask,
    no later layer has it; `AttachMask()([outputs, masked])` puts the mask of
    `masked` (for instance the output of `Masking`) back onto `outputs`, so a
    plain Keras loss ignores the padded steps again. The value of `masked` is
    not used.

    Args:
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Returns:
        Called on `[tensor, masked_tensor]`, `tensor` unchanged, carrying
        the mask of `masked_tensor`. Both share the batch and time axes:
        `tensor` is `[batch, time, ...]`, the mask `[batch, time]`.

    Example:

    >>> import keras
    >>> from keras import ops
    >>> from kmask.layers import AttachMask
    >>> from kmask.masks import keras_mask
    >>> masked = keras.layers.Masking()(ops.convert_to_tensor([[[0.0], [1.0]]]))
    >>> outputs = AttachMask()([ops.ones((1, 2, 3)), masked])
    >>> ops.convert_to_numpy(keras_mask(outputs))
    array([[False,  True]])
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs: Any) -> Tensor:
        tensor, _ = _unpack_pair(inputs, self.name, "masked_tensor")
        return _new_tensor(tensor)

    def compute_mask(
        self, inputs: Any, previous_mask: Tensor | None = None
    ) -> Tensor | None:
        tensor, masked_tensor = _unpack_pair(inputs, self.name, "masked_tensor")
        mask = keras_mask(masked_tensor)
        if mask is None:
            raise ValueError(
                f"Layer '{self.name}' (AttachMask) expects its second input to "
                "carry a Keras mask (e.g. the output of `Masking` or of an "
                "`Embedding(mask_zero=True)`). Received: a tensor of shape "
                f"{tuple(masked_tensor.shape)} without a mask"
            )
        _check_time_axis(tensor, tuple(mask.shape), self.name)
        return mask

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[0])

    def compute_output_spec(self, inputs: Any) -> Any:
        tensor, _ = _unpack_pair(inputs, self.name, "masked_tensor")
        return keras.KerasTensor(tensor.shape, dtype=tensor.dtype)


@keras.saving.register_keras_serializable(package="kmask")
class LengthMask(keras.layers.Layer):
    """Masks the steps of a tensor past each sequence's length.

    For models whose inputs come with their lengths: no `Masking` layer and
    no pad value needed. Put it after any `Embedding` (which drops an incoming
    mask unless `mask_zero=True`).

    Args:
        padding: `"post"` when the padding follows the real steps (right
            padding), `"pre"` when it comes first (left padding).
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Returns:
        Called on `[x, lengths]` with `x` of shape `[batch, time, ...]` and
        integer `lengths` of shape `[batch]` or `[batch, 1]`: `x` unchanged,
        carrying `kmask.masks.sequence_mask(lengths, time, padding)` as its
        mask.

    Example:

    >>> from keras import ops
    >>> from kmask.layers import LengthMask
    >>> from kmask.masks import keras_mask
    >>> x = ops.zeros((2, 4, 1))
    >>> outputs = LengthMask(padding="pre")([x, ops.convert_to_tensor([1, 3])])
    >>> ops.convert_to_numpy(keras_mask(outputs)).astype(int)
    array([[0, 0, 0, 1],
           [0, 1, 1, 1]])
    """

    def __init__(self, padding: str = "post", **kwargs: Any) -> None:
        if padding not in PADDINGS:
            raise ValueError(
                f"Invalid value for argument `padding`. Expected one of "
                f"{PADDINGS}. Received: padding={padding!r}"
            )
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.padding = padding
        self.supports_masking = True

    def call(self, inputs: Any) -> Tensor:
        x, _ = _unpack_pair(inputs, self.name, "lengths")
        return _new_tensor(x)

    def compute_mask(
        self, inputs: Any, previous_mask: Tensor | None = None
    ) -> Tensor | None:
        x, lengths = _unpack_pair(inputs, self.name, "lengths")
        if len(lengths.shape) == 2 and lengths.shape[1] == 1:
            lengths = ops.squeeze(lengths, axis=1)
        if len(lengths.shape) != 1:
            raise _shapes.invalid_shape(
                "lengths", "[batch] or [batch, 1]", lengths=lengths.shape, x=x.shape
            )
        if isinstance(x, keras.KerasTensor) and x.shape[1] is None:
            # A symbolic time axis of unknown length has no `arange`; the
            # mask's spec is all a graph under construction needs.
            return keras.KerasTensor(tuple(x.shape[:2]), dtype="bool")
        time = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
        return sequence_mask(lengths, time, padding=self.padding)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[0])

    def compute_output_spec(self, inputs: Any) -> Any:
        x, _ = _unpack_pair(inputs, self.name, "lengths")
        return keras.KerasTensor(x.shape, dtype=x.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "padding": self.padding}


@keras.saving.register_keras_serializable(package="kmask")
class ValueMask(keras.layers.Layer):
    """Masks the steps of the inputs that hold a pad value.

    What `keras.layers.Masking` cannot do: it never matches NaN (so NaN-padded
    inputs stay unmasked, and `NaN * 0` stays NaN), it takes a scalar only,
    and on rank-2 token ids it reduces the time axis into a `[batch]` mask.
    This layer uses `kmask.masks.value_mask`: a scalar (`0`, `-100`, NaN) or
    a vector pad (the one-hot `[0, 0, 1]`) compared on the feature axis, or
    elementwise on rank-2 ids. Padded steps are replaced by 0 with `where`,
    so neither NaN nor an out-of-range id reaches the next layer.

    Args:
        mask_value: The pad value: a scalar or a vector as long as the
            feature axis.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Returns:
        The inputs with padded steps set to 0, carrying a `[batch, time]`
        mask that is `True` on real steps.

    Example:

    >>> from keras import ops
    >>> from kmask.layers import ValueMask
    >>> from kmask.masks import keras_mask
    >>> x = ops.convert_to_tensor([[[1.0], [float("nan")]]])
    >>> outputs = ValueMask(mask_value=float("nan"))(x)
    >>> ops.convert_to_numpy(outputs).tolist()
    [[[1.0], [0.0]]]
    >>> ops.convert_to_numpy(keras_mask(outputs))
    array([[ True, False]])
    """

    def __init__(self, mask_value: Any = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        pad_values(mask_value)
        self.mask_value = mask_value
        self.supports_masking = True

    def call(self, inputs: Any) -> Tensor:
        valid = value_mask(inputs, self.mask_value)
        if len(inputs.shape) > len(valid.shape):
            valid = ops.expand_dims(valid, -1)
        return ops.where(valid, inputs, ops.zeros_like(inputs))

    def compute_mask(
        self, inputs: Any, previous_mask: Tensor | None = None
    ) -> Tensor | None:
        return value_mask(inputs, self.mask_value)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mask_value": plain(self.mask_value)}


def _unpack_pair(inputs, layer_name: str, second: str):
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
        raise ValueError(
            f"Layer '{layer_name}' expects a list of two inputs, "
            f"[tensor, {second}]. Received: inputs={inputs!r}"
        )
    return inputs[0], inputs[1]


def _check_time_axis(tensor, mask_shape: tuple, layer_name: str) -> None:
    """The mask must be `[batch, time]` for a `[batch, time, ...]` tensor."""
    shape = tuple(tensor.shape)
    if len(mask_shape) != 2 or not _shapes.fits_steps(mask_shape, shape):
        raise _shapes.invalid_shape(
            "masked_tensor",
            f"a [batch, time] mask sharing the batch and time axes of the "
            f"tensor (layer '{layer_name}')",
            mask=mask_shape,
            tensor=shape,
        )


def _new_tensor(x):
    """`x` as a new tensor object, sharing its data where the backend can.

    The output needs an identity of its own: Keras keeps the mask on the
    tensor (on JAX in a table keyed by `id`), so returning `x` itself would
    give the caller's tensor our mask. A reshape to the same shape is a view
    on torch and TensorFlow; JAX returns the same array, so it gets a copy
    (which `jit` removes).
    """
    reshaped = ops.reshape(x, ops.shape(x))
    return ops.copy(x) if reshaped is x else reshaped
