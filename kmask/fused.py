"""Fused cross-entropy: one pass over the logits each way, and a
large-vocabulary head that never holds them.

The sparse cross-entropy from logits, per step, is `logsumexp(x) - x[y]` and
its gradient is `softmax(x) - one_hot(y)`. Autodiff of the textbook form
keeps `log_softmax(x)` (a second `[tokens, classes]` array) for the backward
pass, and a NaN-safe mask needs a `where` over the whole logits in both
directions. `sparse_crossentropy_with_logits` keeps two numbers per step (the
row's maximum and the log of its sum of exponentials) and computes the
gradient as one expression, `where(valid, (softmax(x) - one_hot(y)) *
upstream, 0)`, which XLA (JAX, TensorFlow) fuses into a single loop: padding
costs no extra pass, and whatever it holds (NaN, inf) reaches neither the loss
nor its gradient. PyTorch runs op by op, so there the same computation is
`kmask.torch_kernels` (its docstring has the profile that asked for it).

`categorical_crossentropy_with_logits` (one-hot or soft targets) and
`mean_squared_error` do the same for dense targets: the gradient is one
expression with the `where` of the padding inside it, so neither the targets
nor the predictions pass through a `where` of their own (or its backward
pass). `MaskedCategoricalCrossentropy(from_logits=True)` and
`MaskedMeanSquaredError` use them.

`fused_linear_crossentropy` goes one step further for large vocabularies: the
logits `hidden @ kernel + bias` are computed a chunk of tokens at a time, in
the forward pass (for the normalizer and the label's logit) and again in the
backward pass (for the gradients of `hidden`, `kernel` and `bias`), so memory
holds one `[chunk_size, vocabulary]` block instead of `[tokens, vocabulary]`.
The price is one more matmul (four instead of three per step).
`FusedLinearCrossentropy` puts it at the end of a language model.

Both reduce with `kmask.masked_reduce`: see `kmask.reduce` for the reductions.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kmask.masks import broadcast_to_steps, combine_masks, value_mask, weight_mask
from kmask.reduce import _accumulation_dtype, masked_reduce, standardize_reduction


def sparse_crossentropy_with_logits(
    labels: Any,
    logits: Any,
    valid: Any = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
):
    """The per-step sparse cross-entropy from logits, with a fused gradient.

    Computed in float32 whatever the dtype of `logits`.

    Args:
        labels: Integer labels `[...]`; any value at a step that is not
            `valid` (e.g. `-100`).
        logits: `[..., classes]`.
        valid: Optional boolean mask of `labels`' shape, `True` on real steps.
        label_smoothing: Smoothing towards the uniform distribution over the
            classes, in `[0, 1]`.
        z_loss: Coefficient of `logsumexp(logits) ** 2` added per step.

    Returns:
        float32 per-step losses of `labels`' shape, 0 where not `valid`; their
        gradient is exactly 0 at those steps whatever `logits` holds there.

    Example:

    >>> import kmask
    >>> from keras import ops
    >>> logits = [[[0.0, 0.0, 0.0], [float("nan"), 1.0, 2.0]]]
    >>> per_step = kmask.sparse_crossentropy_with_logits(
    ...     [[2, -100]], logits, valid=[[True, False]]
    ... )
    >>> ops.convert_to_numpy(per_step).round(4)  # log(3), then padding
    array([[1.0986, 0.    ]], dtype=float32)
    """
    logits = ops.cast(ops.convert_to_tensor(logits), "float32")
    labels = ops.cast(ops.convert_to_tensor(labels), "int32")
    if valid is not None:
        valid = ops.cast(ops.convert_to_tensor(valid), "bool")
        labels = ops.where(valid, labels, ops.zeros_like(labels))
    if keras.backend.backend() == "torch":
        # Imported here: the module imports torch.
        from kmask import torch_kernels

        return torch_kernels.sparse_crossentropy_with_logits(
            labels, logits, valid, label_smoothing, z_loss
        )

    @ops.custom_gradient
    def crossentropy(logits):
        normalizer, per_step = _crossentropy_forward(
            logits, labels, label_smoothing, z_loss
        )
        if valid is not None:
            per_step = ops.where(valid, per_step, ops.zeros_like(per_step))

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return _crossentropy_grad(
                logits, normalizer, labels, valid, upstream, label_smoothing, z_loss
            )

        return per_step, grad

    return crossentropy(logits)


def categorical_crossentropy_with_logits(
    targets: Any,
    logits: Any,
    valid: Any = None,
    label_smoothing: float = 0.0,
):
    """The per-step cross-entropy of probability targets from logits, fused.

    `-sum(t * log_softmax(logits))` over the last axis, with `t` the targets
    smoothed towards the uniform distribution; the gradient with respect to
    the logits is `sum(t) * softmax(logits) - t`, one expression (see
    `kmask.fused`). Computed in float32 (float64 stays float64).

    Args:
        targets: One-hot or soft targets, `logits`' shape; anything (NaN,
            inf) at a step that is not `valid`.
        logits: `[..., classes]`.
        valid: Optional boolean mask of the per-step shape (`logits`' shape
            without the last axis), `True` on real steps.
        label_smoothing: Smoothing towards the uniform distribution over the
            classes, in `[0, 1]`.

    Returns:
        Per-step losses, 0 where not `valid`; their gradients with respect to
        `logits` and `targets` are exactly 0 at those steps whatever the
        inputs hold there.

    Example:

    >>> from keras import ops
    >>> from kmask.fused import categorical_crossentropy_with_logits
    >>> targets = [[[0.0, 0.0, 1.0], [float("nan"), 0.0, 0.0]]]
    >>> logits = [[[0.0, 0.0, 0.0], [float("inf"), 1.0, 2.0]]]
    >>> per_step = categorical_crossentropy_with_logits(
    ...     targets, logits, valid=[[True, False]]
    ... )
    >>> ops.convert_to_numpy(per_step).round(4)  # log(3), then padding
    array([[1.0986, 0.    ]], dtype=float32)
    """
    targets, logits, valid = _dense_inputs(targets, logits, valid)
    if keras.backend.backend() == "torch":
        # Imported here: the module imports torch.
        from kmask import torch_kernels

        return torch_kernels.categorical_crossentropy_with_logits(
            targets, logits, valid, label_smoothing
        )

    keep_exponentials = keras.backend.backend() == "tensorflow"

    @ops.custom_gradient
    def crossentropy(logits, targets):
        top, exponentials, log_sum = _log_normalizer(logits)
        target_sum, target_logit = _target_sums(
            targets, logits, label_smoothing, keep_exponentials
        )
        if keep_exponentials:
            log_probs = _log_probs(logits, top, log_sum)
            smoothed = _smooth(targets, label_smoothing)
            per_step = -ops.sum(smoothed * log_probs, axis=-1)
        else:
            # sum(t * logits) - sum(t) * logsumexp(logits), the maximum taken
            # out first: exact for one-hot targets.
            per_step = (target_sum * top - target_logit) + target_sum * log_sum
        per_step = _where_valid(valid, per_step)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            coefficient = ops.expand_dims(_where_valid(valid, upstream), -1)
            log_probs = _log_probs(logits, top, log_sum)
            if keep_exponentials:
                scale = target_sum / ops.exp(log_sum)
                probs = exponentials * ops.expand_dims(scale, -1)
            else:
                probs = ops.exp(log_probs) * ops.expand_dims(target_sum, -1)
            d_logits = coefficient * (probs - _smooth(targets, label_smoothing))
            d_targets = coefficient * ((label_smoothing - 1.0) * log_probs)
            return _where_valid(valid, d_logits), _where_valid(valid, d_targets)

        return per_step, grad

    return crossentropy(logits, targets)


def mean_squared_error(targets: Any, predictions: Any, valid: Any = None):
    """The per-step mean squared error over the last axis, fused.

    `mean((predictions - targets) ** 2)`, whose gradient is one expression,
    `where(valid, 2 * (predictions - targets) * upstream / features, 0)`: no
    `where` over the inputs, and XLA fuses the backward pass into one loop.
    Computed in float32 (float64 stays float64).

    Args:
        targets: `predictions`' shape; anything (NaN, inf) at a step that is
            not `valid`.
        predictions: `[..., features]`.
        valid: Optional boolean mask of the per-step shape (`predictions`'
            shape without the last axis), `True` on real steps.

    Returns:
        Per-step losses, 0 where not `valid`; their gradients with respect to
        `predictions` and `targets` are exactly 0 at those steps whatever the
        inputs hold there.

    Example:

    >>> from keras import ops
    >>> from kmask.fused import mean_squared_error
    >>> targets = [[[1.0, 3.0], [float("nan"), 0.0]]]
    >>> predictions = [[[0.0, 0.0], [1.0, float("inf")]]]
    >>> per_step = mean_squared_error(targets, predictions, valid=[[True, False]])
    >>> ops.convert_to_numpy(per_step)  # (1 + 9) / 2, then padding
    array([[5., 0.]], dtype=float32)
    """
    targets, predictions, valid = _dense_inputs(targets, predictions, valid)
    if keras.backend.backend() == "torch":
        from kmask import torch_kernels

        return torch_kernels.mean_squared_error(targets, predictions, valid)
    features = _last_size(predictions)

    @ops.custom_gradient
    def squared_error(predictions, targets):
        per_step = ops.mean(ops.square(predictions - targets), axis=-1)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            coefficient = _where_valid(valid, upstream) * (2.0 / features)
            d_predictions = _where_valid(
                valid, ops.expand_dims(coefficient, -1) * (predictions - targets)
            )
            return d_predictions, -d_predictions

        return _where_valid(valid, per_step), grad

    return squared_error(predictions, targets)


def fused_linear_crossentropy(
    hidden: Any,
    kernel: Any,
    labels: Any,
    bias: Any = None,
    mask_value: Any = None,
    mask: Any = None,
    sample_weight: Any = None,
    reduction: str | None = "token_mean",
    chunk_size: int = 256,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
):
    """The masked sparse cross-entropy of `hidden @ kernel + bias`, in chunks.

    Equals `kmask.MaskedSparseCategoricalCrossentropy(from_logits=True)` on
    the logits `hidden @ kernel + bias`, without ever holding them: tokens are
    processed `chunk_size` at a time, forward and backward (see
    `kmask.fused`). The padding comes from `mask_value`, `mask` and
    `sample_weight` (a weight of 0), as in `kmask.masked_loss`; padded steps
    reach neither the result nor any gradient, even when `hidden` holds NaN
    there. Computed in float32 whatever the input dtypes.

    Args:
        hidden: `[batch, ..., hidden_size]` features, e.g. `[batch, time,
            hidden_size]`.
        kernel: `[hidden_size, vocabulary]` projection.
        labels: Integer labels `[batch, ...]`, `hidden`'s shape without its
            last axis.
        bias: Optional `[vocabulary]` bias.
        mask_value: Optional pad label, e.g. `0` or `-100`.
        mask: Optional boolean mask, `True` on real steps: `[batch]` or
            `labels`' shape.
        sample_weight: Optional weights, `[batch]` or `labels`' shape.
        reduction: A kmask reduction name; see `kmask.reduce`.
        chunk_size: Tokens per chunk: memory holds `chunk_size * vocabulary`
            logits (and their gradient) at a time.
        label_smoothing: Smoothing towards the uniform distribution over the
            vocabulary, in `[0, 1]`.
        z_loss: Coefficient of `logsumexp(logits) ** 2` added per step.

    Returns:
        A float32 scalar, or per-step losses of `labels`' shape with
        `reduction="none"`.

    Example:

    >>> import kmask
    >>> import numpy as np
    >>> hidden = np.zeros((1, 3, 4), "float32")
    >>> kernel = np.ones((4, 5), "float32")
    >>> labels = [[1, 4, -100]]
    >>> loss = kmask.fused_linear_crossentropy(
    ...     hidden, kernel, labels, mask_value=-100, chunk_size=2
    ... )
    >>> round(float(loss), 4)  # equal logits: log(5) on the 2 real steps
    1.6094
    """
    reduction = standardize_reduction(reduction)
    _check_options(chunk_size, label_smoothing)
    hidden = ops.convert_to_tensor(hidden)
    kernel = ops.convert_to_tensor(kernel)
    labels = ops.convert_to_tensor(labels)
    _check_linear_shapes(hidden, kernel, labels, bias)
    valid = _steps_valid(labels, mask_value, mask, sample_weight)
    _, value = _linear_crossentropy(
        hidden,
        kernel,
        labels,
        bias,
        valid,
        sample_weight,
        reduction,
        chunk_size,
        label_smoothing,
        z_loss,
    )
    return value


@keras.saving.register_keras_serializable(package="kmask")
class FusedLinearCrossentropy(keras.layers.Layer):
    """The output layer of a language model and its loss, in chunks.

    Owns the `Dense(vocabulary_size)` projection. Called on `[hidden,
    labels]`, it adds the masked sparse cross-entropy of the logits to the
    model's losses (`add_loss`) through `kmask.fused_linear_crossentropy`, so
    the `[batch, time, vocabulary]` logits are never held, and returns the
    per-step losses (0 at padding). Compile the model with `loss=None`. Called
    on `hidden` alone it returns the logits, for generation. A mask Keras
    propagates onto `hidden` marks padding too.

    Args:
        vocabulary_size: Number of classes.
        use_bias: Whether the projection has a bias.
        mask_value: Optional pad label, e.g. `0` or `-100`.
        reduction: A kmask reduction other than `"none"`; see `kmask.reduce`.
        chunk_size: Tokens per chunk; see `kmask.fused_linear_crossentropy`.
        label_smoothing: Smoothing towards the uniform distribution over the
            vocabulary, in `[0, 1]`.
        z_loss: Coefficient of `logsumexp(logits) ** 2` added per step.
        kernel_initializer: Initializer of the `[hidden_size, vocabulary_size]`
            kernel.
        bias_initializer: Initializer of the bias.
        **kwargs: Passed to `keras.layers.Layer` (`name`, `dtype`, ...).

    Returns:
        Called on `[hidden, labels]`: the float32 per-step losses, `labels`'
        shape; called on `hidden`: the logits.

    Example:

    >>> import keras
    >>> import kmask
    >>> import numpy as np
    >>> tokens = keras.Input((6,), dtype="int32")
    >>> labels = keras.Input((6,), dtype="int32")
    >>> hidden = keras.layers.Embedding(10, 4)(tokens)
    >>> head = kmask.FusedLinearCrossentropy(10, mask_value=-100, chunk_size=4)
    >>> model = keras.Model([tokens, labels], head([hidden, labels]))
    >>> model.compile(optimizer="sgd", loss=None)
    >>> x = np.ones((2, 6), "int32")
    >>> y = np.full((2, 6), -100, "int32")
    >>> float(model.evaluate([x, y], verbose=0))  # every label is padding
    0.0
    """

    def __init__(
        self,
        vocabulary_size: int,
        use_bias: bool = True,
        mask_value: Any = None,
        reduction: str = "token_mean",
        chunk_size: int = 256,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        reduction = standardize_reduction(reduction)
        if reduction == "none":
            raise ValueError(
                "Invalid value for argument `reduction`: the layer adds a scalar "
                "loss and returns the per-step losses itself. Expected a reduction "
                "other than 'none'. Received: reduction='none'"
            )
        _check_options(chunk_size, label_smoothing)
        self.vocabulary_size = vocabulary_size
        self.use_bias = use_bias
        self.mask_value = mask_value
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        hidden_shape = input_shape[0] if _is_pair(input_shape) else input_shape
        self.kernel = self.add_weight(
            name="kernel",
            shape=(hidden_shape[-1], self.vocabulary_size),
            initializer=self.kernel_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.vocabulary_size,),
                initializer=self.bias_initializer,
            )

    def call(self, inputs, mask=None):
        if not _is_pair(inputs):
            logits = ops.matmul(inputs, self.kernel)
            return logits if self.bias is None else logits + self.bias
        hidden, labels = inputs
        hidden_mask = mask[0] if mask is not None else None
        labels = ops.convert_to_tensor(labels)
        _check_linear_shapes(hidden, self.kernel, labels, self.bias)
        valid = _steps_valid(labels, self.mask_value, hidden_mask, None)
        per_step, value = _linear_crossentropy(
            hidden,
            self.kernel,
            labels,
            self.bias,
            valid,
            None,
            self.reduction,
            self.chunk_size,
            self.label_smoothing,
            self.z_loss,
        )
        self.add_loss(value)
        return per_step

    def compute_output_shape(self, input_shape):
        if _is_pair(input_shape):
            return tuple(input_shape[1])
        return (*input_shape[:-1], self.vocabulary_size)

    def compute_output_spec(self, inputs, mask=None):
        if _is_pair(inputs):
            return keras.KerasTensor(tuple(inputs[1].shape), dtype="float32")
        shape = (*inputs.shape[:-1], self.vocabulary_size)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        # The per-step losses are 0 on padding: nothing downstream needs a mask.
        return None if _is_pair(inputs) else mask

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "use_bias": self.use_bias,
            "mask_value": self.mask_value,
            "reduction": self.reduction,
            "chunk_size": self.chunk_size,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


# ----------------------------------------------------------------------------
# The cross-entropy of a block of logits and its gradient, shared by both.


def _crossentropy_forward(logits, labels, label_smoothing: float, z_loss: float):
    """The normalizer `(top, log_sum)`, with `logsumexp(logits) = top +
    log_sum`, and the per-step loss, all of `labels`' shape.

    Differences are taken from the row's maximum `top`, which is exact near
    it: `logits - logsumexp(logits)` directly loses `ulp(logits)` (1e-6
    relative for logits of 8, as autodiff of `log_softmax` does not).
    """
    top = ops.max(logits, axis=-1)
    # A row of -inf has no finite maximum; any shift works there.
    top = ops.where(ops.isfinite(top), top, ops.zeros_like(top))
    shifted = logits - ops.expand_dims(top, -1)
    log_sum = ops.log(ops.sum(ops.exp(shifted), axis=-1))
    label_shifted = ops.squeeze(
        ops.take_along_axis(shifted, ops.expand_dims(labels, -1), axis=-1), axis=-1
    )
    per_step = log_sum - (1.0 - label_smoothing) * label_shifted
    if label_smoothing:
        per_step = per_step - label_smoothing * ops.mean(shifted, axis=-1)
    if z_loss:
        per_step = per_step + z_loss * ops.square(top + log_sum)
    return (top, log_sum), per_step


def _crossentropy_grad(
    logits,
    normalizer,
    labels,
    valid,
    upstream,
    label_smoothing: float,
    z_loss: float,
):
    """`upstream * d per_step / d logits`, exactly 0 where not `valid`.

    One expression, so that XLA fuses it into one loop over the logits.
    """
    top, log_sum = normalizer
    coefficient = upstream
    if valid is not None:
        coefficient = ops.where(valid, upstream, ops.zeros_like(upstream))
    scale = coefficient
    if z_loss:
        scale = coefficient * (1.0 + 2.0 * z_loss * (top + log_sum))
    classes = logits.shape[-1]
    log_probs = logits - ops.expand_dims(top, -1) - ops.expand_dims(log_sum, -1)
    probs = ops.exp(log_probs) * ops.expand_dims(scale, -1)
    is_label = ops.equal(
        ops.arange(classes, dtype="int32"), ops.expand_dims(labels, -1)
    )
    label_term = ops.expand_dims((1.0 - label_smoothing) * coefficient, -1)
    grad = ops.where(is_label, probs - label_term, probs)
    if label_smoothing:
        grad = grad - ops.expand_dims(coefficient * (label_smoothing / classes), -1)
    if valid is not None:
        grad = ops.where(ops.expand_dims(valid, -1), grad, ops.zeros_like(grad))
    return grad


# ----------------------------------------------------------------------------
# Dense targets: what the fused one-hot cross-entropy and squared error share.


def _dense_inputs(targets, predictions, valid):
    """`(targets, predictions, valid)` as tensors: both values in float32 (or
    float64), `valid` boolean (or `None`); raises unless the shapes match."""
    predictions = ops.convert_to_tensor(predictions)
    dtype = _accumulation_dtype(predictions.dtype)
    predictions = ops.cast(predictions, dtype)
    targets = ops.cast(ops.convert_to_tensor(targets), dtype)
    if not _same_shape(targets.shape, predictions.shape):
        raise ValueError(
            "Arguments `targets` and `predictions` must have the same shape. "
            f"Received: targets.shape={tuple(targets.shape)}, "
            f"predictions.shape={tuple(predictions.shape)}"
        )
    if valid is not None:
        valid = ops.cast(ops.convert_to_tensor(valid), "bool")
    return targets, predictions, valid


def _smooth(targets, label_smoothing: float):
    """`targets` moved `label_smoothing` of the way to the uniform distribution."""
    if not label_smoothing:
        return targets
    return targets * (1.0 - label_smoothing) + label_smoothing / _last_size(targets)


def _target_sums(targets, logits, label_smoothing: float, elementwise: bool):
    """`sum(t)` and `sum(t * logits)` over the last axis, `t` the smoothed
    targets; the second as a dot product (no `[..., classes]` product is
    held), or not at all when `elementwise` (see `_log_normalizer`)."""
    target_sum = ops.sum(targets, axis=-1)
    target_logit = None
    if not elementwise:
        target_logit = ops.einsum("...c,...c->...", targets, logits)
    if label_smoothing:
        target_sum = (1.0 - label_smoothing) * target_sum + label_smoothing
        if target_logit is not None:
            target_logit = (1.0 - label_smoothing) * target_logit + (
                label_smoothing * ops.mean(logits, axis=-1)
            )
    return target_sum, target_logit


def _log_normalizer(logits):
    """`(top, exponentials, log_sum)` of the last axis: `exponentials =
    exp(logits - top)` and `logsumexp(logits) = top + log_sum`; see
    `_crossentropy_forward`.

    Which form costs least depends on the compiler, measured at `[16, 256,
    4096]` on a 2-core CPU (`benchmarks/masked_ce.py`, forward + backward,
    ms). On JAX, XLA fuses the exponential into the sum and holds no
    `[..., classes]` temporary beyond the gradient's buffer (0.1 MiB of
    temporaries, the native loss 192 MiB), so the backward pass recomputes
    the exponentials and `sum(t * logits)` is a dot product (67; 89 with an
    elementwise product, 110 keeping the exponentials; Keras's loss 98).
    TensorFlow's XLA writes the exponentials out for the sum on CPU anyway
    and its batched dot is slow, so there the backward pass reuses them and
    the product is elementwise (36; 40 recomputing them, 45 with the dot;
    Keras's loss 36).
    """
    top = ops.max(logits, axis=-1)
    # A row of -inf has no finite maximum; any shift works there.
    top = ops.where(ops.isfinite(top), top, ops.zeros_like(top))
    exponentials = ops.exp(logits - ops.expand_dims(top, -1))
    return top, exponentials, ops.log(ops.sum(exponentials, axis=-1))


def _last_size(tensor):
    """The size of the last axis: an int where it is static, else a tensor of
    `tensor`'s dtype (a `None` dimension under `tf.function`)."""
    size = tensor.shape[-1]
    if size is None:
        size = ops.cast(ops.shape(tensor)[-1], tensor.dtype)
    return size


def _log_probs(logits, top, log_sum):
    """`log_softmax(logits)`, differences taken from the row's maximum."""
    return (logits - ops.expand_dims(top, -1)) - ops.expand_dims(log_sum, -1)


def _where_valid(valid, values):
    """`values` (per-step, or with a trailing class axis) with the steps that
    are not `valid` selected to 0; `values` itself when `valid` is `None`."""
    if valid is None:
        return values
    if len(values.shape) > len(valid.shape):
        valid = ops.expand_dims(valid, -1)
    return ops.where(valid, values, ops.zeros_like(values))


def _same_shape(a: tuple, b: tuple) -> bool:
    """Whether two static shapes can be equal (unknown dims match)."""
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------
# The chunked linear cross-entropy.


def _linear_crossentropy(
    hidden,
    kernel,
    labels,
    bias,
    valid,
    sample_weight,
    reduction: str,
    chunk_size: int,
    label_smoothing: float,
    z_loss: float,
):
    """`(per_step, value)`: the per-step losses of `labels`' shape (0 where
    not `valid`) and `masked_reduce` of them.

    The tokens are flattened; padded rows of `hidden` are zeroed (a `where`,
    so NaN there cannot reach `kernel`'s gradient through `0 * NaN`) and carry
    a zero coefficient. PyTorch loops over the chunks in
    `kmask.torch_kernels.linear_crossentropy`, which computes the value's
    gradient in the forward pass (three matmuls instead of four; its
    docstring has the profile); the other backends pad the tokens to whole
    chunks for `_chunked_crossentropy`.
    """
    steps_shape = ops.shape(labels)
    hidden = ops.cast(hidden, "float32")
    kernel = ops.cast(ops.convert_to_tensor(kernel), "float32")
    width = kernel.shape[0]
    hidden = ops.reshape(hidden, (-1, width))
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    tokens = ops.shape(labels)[0]
    steps_valid = valid
    if valid is None:
        valid = ops.ones_like(labels, dtype="bool")
    else:
        valid = ops.reshape(broadcast_to_steps(valid, steps_shape), (-1,))
    labels = ops.where(valid, labels, ops.zeros_like(labels))
    hidden = ops.where(ops.expand_dims(valid, -1), hidden, ops.zeros_like(hidden))
    if bias is not None:
        bias = ops.cast(ops.convert_to_tensor(bias), "float32")
    if keras.backend.backend() == "torch":
        # Imported here: the module imports torch.
        from kmask import torch_kernels

        reduce = None
        # The weights' own gradient needs the per-step losses.
        if sample_weight is not None:  # a Keras variable shows its own grad
            sample_weight = ops.convert_to_tensor(sample_weight)
        if reduction != "none" and not getattr(sample_weight, "requires_grad", False):

            def reduce(values):
                return masked_reduce(values, steps_valid, reduction, sample_weight)

        per_step, value = torch_kernels.linear_crossentropy(
            hidden,
            kernel,
            bias,
            labels,
            valid,
            reduce,
            tuple(steps_shape),
            chunk_size,
            label_smoothing,
            z_loss,
        )
        per_step = ops.reshape(per_step, steps_shape)
        if value is None:
            value = masked_reduce(per_step, steps_valid, reduction, sample_weight)
        return per_step, value
    # A batch smaller than a chunk is one chunk of its own size.
    chunk = min(chunk_size, max(tokens, 1)) if isinstance(tokens, int) else chunk_size
    chunks = (tokens + chunk - 1) // chunk
    # An empty batch runs one chunk of padding, so the loop has a body.
    chunks = max(chunks, 1) if isinstance(chunks, int) else ops.maximum(chunks, 1)
    extra = chunks * chunk - tokens
    hidden = ops.reshape(ops.pad(hidden, [[0, extra], [0, 0]]), (chunks, chunk, width))
    labels = ops.reshape(ops.pad(labels, [[0, extra]]), (chunks, chunk))
    valid = ops.pad(ops.cast(valid, "int32"), [[0, extra]])
    valid = ops.cast(ops.reshape(valid, (chunks, chunk)), "bool")
    params = [hidden, kernel] if bias is None else [hidden, kernel, bias]
    per_step = _chunked_crossentropy(
        labels, valid, label_smoothing, z_loss, chunks, *params
    )
    per_step = ops.reshape(per_step, (-1,))[:tokens]
    per_step = ops.reshape(per_step, steps_shape)
    return per_step, masked_reduce(per_step, steps_valid, reduction, sample_weight)


def _chunked_crossentropy(labels, valid, label_smoothing, z_loss, chunks, *params):
    """The custom gradient over `(hidden [chunks, chunk, width], kernel[,
    bias])`: per-step losses `[chunks, chunk]`; both passes loop over chunks
    and the backward pass recomputes each chunk's logits."""

    def logits_of(chunk_hidden, kernel, bias):
        logits = ops.matmul(chunk_hidden, kernel)
        return logits if bias is None else logits + bias

    @ops.custom_gradient
    def crossentropy(*params):
        hidden, kernel, bias = (*params, None)[:3]
        rows = hidden.shape[1]

        def forward_chunk(index, buffers):
            logits = logits_of(ops.take(hidden, index, axis=0), kernel, bias)
            normalizer, per_step = _crossentropy_forward(
                logits, ops.take(labels, index, axis=0), label_smoothing, z_loss
            )
            return tuple(
                ops.slice_update(buffer, [index, 0], ops.expand_dims(value, 0))
                for buffer, value in zip(buffers, (*normalizer, per_step), strict=True)
            )

        empty = ops.zeros((chunks, rows), "float32")
        tops, log_sums, per_steps = ops.fori_loop(
            0, chunks, forward_chunk, (empty, empty, empty)
        )
        per_steps = ops.where(valid, per_steps, ops.zeros_like(per_steps))

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args

            def backward_chunk(index, grads):
                d_hidden, d_kernel, d_bias = grads
                chunk_hidden = ops.take(hidden, index, axis=0)
                d_logits = _crossentropy_grad(
                    logits_of(chunk_hidden, kernel, bias),
                    (ops.take(tops, index, axis=0), ops.take(log_sums, index, axis=0)),
                    ops.take(labels, index, axis=0),
                    ops.take(valid, index, axis=0),
                    ops.take(upstream, index, axis=0),
                    label_smoothing,
                    z_loss,
                )
                chunk_d_hidden = ops.matmul(d_logits, ops.transpose(kernel))
                return (
                    ops.slice_update(d_hidden, [index, 0, 0], chunk_d_hidden[None]),
                    d_kernel + ops.matmul(ops.transpose(chunk_hidden), d_logits),
                    d_bias + ops.sum(d_logits, axis=0),
                )

            zeros = (
                ops.zeros_like(hidden),
                ops.zeros_like(kernel),
                ops.zeros((kernel.shape[1],), "float32"),
            )
            d_hidden, d_kernel, d_bias = ops.fori_loop(0, chunks, backward_chunk, zeros)
            return (d_hidden, d_kernel, d_bias)[: len(params)]

        return per_steps, grad

    return crossentropy(*params)


def _steps_valid(labels, mask_value, mask, sample_weight):
    """The real steps of `labels`: its pad value, a mask, zero weights."""
    steps = tuple(labels.shape)
    target = None if mask_value is None else value_mask(labels, mask_value)
    weighted = None
    if sample_weight is not None:
        weighted = weight_mask(sample_weight, steps)
    return combine_masks(mask, target, weighted)


def _check_linear_shapes(hidden, kernel, labels, bias) -> None:
    hidden_shape, kernel_shape = tuple(hidden.shape), tuple(kernel.shape)
    labels_shape = tuple(labels.shape)
    if len(kernel_shape) != 2 or not _same(hidden_shape[-1], kernel_shape[0]):
        raise ValueError(
            "Argument `kernel` must have shape [hidden_size, vocabulary] with "
            "hidden_size the last axis of `hidden`. Received: "
            f"hidden.shape={hidden_shape}, kernel.shape={kernel_shape}"
        )
    if len(labels_shape) != len(hidden_shape) - 1 or not all(
        _same(a, b) for a, b in zip(labels_shape, hidden_shape[:-1], strict=True)
    ):
        raise ValueError(
            "Argument `labels` must have the shape of `hidden` without its last "
            f"axis. Received: labels.shape={labels_shape}, "
            f"hidden.shape={hidden_shape}"
        )
    if bias is not None and tuple(bias.shape) not in ((kernel_shape[1],), (None,)):
        raise ValueError(
            "Argument `bias` must have shape [vocabulary] = "
            f"({kernel_shape[1]},). Received: bias.shape={tuple(bias.shape)}"
        )


def _check_options(chunk_size: Any, label_smoothing: float) -> None:
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
        raise ValueError(
            "Invalid value for argument `chunk_size`. Expected a positive "
            f"integer. Received: chunk_size={chunk_size!r}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            "Invalid value for argument `label_smoothing`. Expected a value in "
            f"[0, 1]. Received: label_smoothing={label_smoothing}"
        )


def _same(a, b) -> bool:
    return a is None or b is None or a == b


def _is_pair(value) -> bool:
    """Whether a layer input (or its shape) is `[hidden, labels]`."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and not all(isinstance(item, int) or item is None for item in value)
    )
