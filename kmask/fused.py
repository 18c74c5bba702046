"""A large-vocabulary head that never holds its logits, and the fused
per-step ops of `kmask.ops` under their first names.

`fused_linear_crossentropy` computes the logits `hidden @ kernel + bias` a
chunk of tokens at a time, so memory holds one `[chunk_size, vocabulary]`
block instead of `[tokens, vocabulary]` (`kmask.ops.linear`). For a linear
reduction (all but `"none"`), when a gradient is being taken (not under
`torch.compile`), the forward pass computes the gradients of `hidden`,
`kernel` and `bias` in the same loop, three matmuls per chunk as `Dense`
plus a loss does; padded tokens are left out of the chunks, so they cost no
matmul at all. `FusedLinearCrossentropy` puts it at the end of a
language model. Its padding comes from the same pipeline as every kmask
loss's, and it reduces with `kmask.reduce`: see
`kmask.reduce` for the reductions.

`sparse_crossentropy_with_logits`, `categorical_crossentropy_with_logits` and
`mean_squared_error` live in `kmask.ops` and stay importable from here.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kmask import _head, class_weights
from kmask._keras_compat import upstream_layer
from kmask._resolve import plain
from kmask.ops import (
    categorical_crossentropy_with_logits,
    mean_squared_error,
    sparse_crossentropy_with_logits,
)
from kmask.ops._rows import softcap
from kmask.ops.linear import HEAD_STATS
from kmask.reduce import (
    reduce_steps,
    standardize_reduction,
)
from kmask.typing import Tensor

__all__ = [
    "HEAD_STATS",
    "FusedLinearCrossentropy",
    "categorical_crossentropy_with_logits",
    "fused_linear_crossentropy",
    "mean_squared_error",
    "sparse_crossentropy_with_logits",
]


def fused_linear_crossentropy(
    hidden: Any,
    kernel: Any,
    labels: Any,
    bias: Any = None,
    mask_value: Any = None,
    mask: Any = None,
    sample_weight: Any = None,
    reduction: str | None = "token_mean",
    chunk_size: int | str = "auto",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    transpose_kernel: bool = False,
    softcap: float | None = None,
    return_token_accuracy: bool = False,
    class_weight: Any = None,
    return_stats: bool = False,
    temperature: float = 1.0,
) -> Tensor | tuple[Tensor, Any]:
    """The masked sparse cross-entropy of `hidden @ kernel + bias`, in chunks.

    Equals `kmask.MaskedSparseCategoricalCrossentropy(from_logits=True)` on
    the logits `hidden @ kernel + bias`, without ever holding them: tokens are
    processed `chunk_size` at a time, forward and backward (see
    `kmask.fused`). The padding comes from `mask_value`, `mask` and
    `sample_weight` (a weight of 0), as in `kmask.masked_loss`; padded steps
    reach neither the result nor any gradient, even when `hidden` holds NaN
    there. Computed in float32 whatever the input dtypes (bfloat16 and
    float16 `hidden` and `kernel` are accumulated in float32).

    Args:
        hidden: `[batch, ..., hidden_size]` features, e.g. `[batch, time,
            hidden_size]`.
        kernel: `[hidden_size, vocabulary]` projection, or `[vocabulary,
            hidden_size]` (a tied embedding matrix) with `transpose_kernel`.
        labels: Integer labels `[batch, ...]`, `hidden`'s shape without its
            last axis.
        bias: Optional `[vocabulary]` bias.
        mask_value: Optional pad label, e.g. `0` or `-100`.
        mask: Optional boolean mask, `True` on real steps: `[batch]` or
            `labels`' shape.
        sample_weight: Optional weights, `[batch]` or `labels`' shape.
        reduction: A kmask reduction name; see `kmask.reduce`.
        chunk_size: Tokens per chunk: memory holds `chunk_size * vocabulary`
            logits (and their gradient) at a time. `"auto"` (the default)
            picks the largest power of two whose float32 logits, their
            gradient and the chunk's rows of `hidden` fit 128 MiB, from the
            kernel's static shape (256 at a vocabulary of 32768 and a hidden
            size of 512); see docs/guides/large-vocabulary.md.
        label_smoothing: Smoothing towards the uniform distribution over the
            vocabulary, in `[0, 1]`.
        z_loss: Coefficient of `logsumexp(logits) ** 2` added per step.
        transpose_kernel: Whether `kernel` is `[vocabulary, hidden_size]`,
            as an embedding matrix is; it is used as it is stored, never
            copied or transposed in memory.
        softcap: Optional positive `c`: the cross-entropy (and the accuracy)
            of `c * tanh(logits / c)`, as Gemma 2's `final_logit_soft_cap`.
        return_token_accuracy: Whether to return `(loss, accuracy)`: the
            token accuracy of the argmax of the (capped) logits over the real
            steps, reduced as `"token_mean"` with the same padding and
            weights, computed inside the chunks. It has no gradient.
        class_weight: Optional `{class: weight}` dict or `[vocabulary]`
            vector: each real token weighs its label's class weight on top of
            `sample_weight`, and `"token_mean"` divides by their sum
            (PyTorch's `weight=` with `ignore_index`); the accuracy is
            weighted the same way. See "Class weights" in the reductions'
            concepts page.
        return_stats: Whether to return `(loss, stats)`: `stats` is a dict
            of the per-step statistics `kmask.fused.HEAD_STATS` by name
            (`labels`' shape, 0 on padding, no gradient), computed inside
            the chunks.
        temperature: Positive temperature of the statistics `log_prob` and
            `entropy`; the loss is at temperature 1.

    Returns:
        A float32 scalar, or per-step losses of `labels`' shape with
        `reduction="none"`; with `return_token_accuracy`, `(loss, accuracy)`;
        with `return_stats`, `(loss, stats)` (and with both, `(loss,
        accuracy, stats)`).

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
    options = _head.linear_options(
        chunk_size, label_smoothing, z_loss, softcap, transpose_kernel, temperature
    )
    hidden = ops.convert_to_tensor(hidden)
    kernel = ops.convert_to_tensor(kernel)
    per_step, value, stats = _head.head(
        hidden,
        kernel,
        labels,
        bias,
        (mask_value, reduction, options),
        mask,
        sample_weight,
        return_token_accuracy or return_stats,
        class_weights.standardize(class_weight),
    )
    if stats is None:
        return value
    results: tuple = (value,)
    if return_token_accuracy:
        correct, weight = stats["correct"], stats["weight"]
        results += (reduce_steps(correct, None, "token_mean", weight),)
    if return_stats:
        results += ({"loss": per_step, **stats},)
    return results


@keras.saving.register_keras_serializable(package="kmask")
class FusedLinearCrossentropy(keras.layers.Layer):
    """The output layer of a language model and its loss, in chunks.

    Projects to the vocabulary with a `Dense(vocabulary_size)` kernel of its
    own, or with a tied embedding's matrix (`embedding=`). Called on
    `[hidden, labels]`, it adds the masked sparse cross-entropy of the logits
    to the model's losses (`add_loss`) through
    `kmask.fused_linear_crossentropy`, so the `[batch, time, vocabulary]`
    logits are never held, and returns the per-step losses (0 at padding).
    Compile the model with `loss=None`. Called on `hidden` alone it returns
    the (capped) logits, for generation. A mask Keras propagates onto
    `hidden` marks padding too.

    Args:
        vocabulary_size: Number of classes.
        embedding: Optional tied embedding: a Keras `Embedding`, or any layer
            with an `embeddings` variable `[vocabulary_size, hidden_size]`
            (keras-hub's `ReversibleEmbedding`), used in the same model. The
            head then owns no kernel and trains that matrix, used as it is
            stored (never transposed in memory). In a functional model a
            `.keras` save and reload keeps the tie: the config names the
            layer, which the head finds again upstream of its input.
        softcap: Optional positive `c`: the loss is computed on
            `c * tanh(logits / c)`, as Gemma 2's `final_logit_soft_cap`.
        use_bias: Whether the projection has a bias.
        mask_value: Optional pad label, e.g. `0` or `-100`.
        reduction: A kmask reduction other than `"none"`; see `kmask.reduce`.
        chunk_size: Tokens per chunk, or `"auto"` (the default) for one
            from a memory budget; see `kmask.fused_linear_crossentropy`.
        label_smoothing: Smoothing towards the uniform distribution over the
            vocabulary, in `[0, 1]`.
        z_loss: Coefficient of `logsumexp(logits) ** 2` added per step.
        return_stats: Whether the call on `[hidden, labels]` returns the
            per-step statistics `kmask.fused.HEAD_STATS` (`loss`, `nll`,
            `correct`, `weight`, `z_loss`, `predicted`, `log_prob`,
            `entropy`) on a last axis of 8 instead of the per-step losses:
            compile with `metrics=[kmask.HeadAccuracy(),
            kmask.HeadPerplexity()]` (and `kmask.HeadZLoss()`,
            `kmask.HeadEntropy()`) and they report the token accuracy,
            perplexity, z-loss and entropy, exact across batches, without
            holding the logits.
        temperature: Positive temperature of the statistics `log_prob` and
            `entropy` and of `score` (the loss is at temperature 1), e.g.
            the sampling temperature of an RL fine-tuning run.
        class_weight: Optional `{class: weight}` dict or
            `[vocabulary_size]` vector: each real token weighs its label's
            class weight (see `kmask.fused_linear_crossentropy`); the
            statistics' `weight` includes it, so the head's metrics are
            class-weighted too.
        kernel_initializer: Initializer of the `[hidden_size, vocabulary_size]`
            kernel (without `embedding`).
        bias_initializer: Initializer of the bias.
        **kwargs: Passed to `keras.layers.Layer` (`name`, `dtype`, ...).

    Returns:
        Called on `[hidden, labels]`, the float32 per-step losses, of
        `labels`' shape (with `return_stats`, `labels`' shape plus 8); called
        on `hidden`, the logits.

    Example:

    >>> import keras
    >>> import kmask
    >>> import numpy as np
    >>> tokens = keras.Input((6,), dtype="int32")
    >>> labels = keras.Input((6,), dtype="int32")
    >>> embedding = keras.layers.Embedding(10, 4)
    >>> hidden = embedding(tokens)
    >>> head = kmask.FusedLinearCrossentropy(
    ...     10, embedding=embedding, softcap=30.0, mask_value=-100, chunk_size=4
    ... )
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
        embedding: Any = None,
        softcap: float | None = None,
        use_bias: bool = True,
        mask_value: Any = None,
        reduction: str = "token_mean",
        chunk_size: int | str = "auto",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        return_stats: bool = False,
        class_weight: Any = None,
        temperature: float = 1.0,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        reduction = standardize_reduction(reduction)
        if reduction == "none":
            raise ValueError(
                "Invalid value for argument `reduction`: the layer adds a scalar "
                "loss and returns the per-step losses itself. Expected a reduction "
                "other than 'none'. Received: reduction='none'"
            )
        self._linear_options = _head.linear_options(
            chunk_size,
            label_smoothing,
            z_loss,
            softcap,
            embedding is not None,
            temperature,
        )
        self.temperature = temperature
        self.vocabulary_size = vocabulary_size
        self.softcap = softcap
        self.use_bias = use_bias
        self.mask_value = mask_value
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.return_stats = bool(return_stats)
        self.class_weight = class_weights.standardize(class_weight)
        if self.class_weight is not None:
            class_weights.vector(self.class_weight, vocabulary_size)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        # Held outside Keras's tracking: the embedding belongs to the model
        # (it embeds the tokens), not to the head, and is saved there once.
        self._tie = _Tie(embedding)
        self.supports_masking = True

    @property
    def embedding(self) -> Any:
        """The tied embedding layer, its name until found, or `None`."""
        return self._tie.layer

    def build(self, input_shape: Any) -> None:
        hidden_shape = input_shape[0] if _is_pair(input_shape) else input_shape
        self.kernel = None
        if self._tie.layer is None:
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

    def projection(self) -> Any:
        """The `[hidden, vocabulary]` kernel, or the tied `[vocabulary,
        hidden]` embedding matrix."""
        if self._tie.layer is None:
            return self.kernel
        return self._tie.matrix()

    def call(self, inputs: Any, mask: Tensor | None = None) -> Tensor:
        options = self._linear_options
        if not _is_pair(inputs):
            kernel = self.projection()
            if options.transpose_kernel:
                logits = ops.matmul(inputs, ops.transpose(kernel))
            else:
                logits = ops.matmul(inputs, kernel)
            if self.bias is not None:
                logits = logits + self.bias
            return softcap(logits, options.softcap)
        hidden, labels = inputs
        hidden_mask = mask[0] if mask is not None else None
        per_step, value, stats = _head.head(
            hidden,
            self.projection(),
            labels,
            self.bias,
            (self.mask_value, self.reduction, options),
            hidden_mask,
            return_stats=self.return_stats,
            class_weight=self.class_weight,
        )
        self.add_loss(value)
        if stats is None:
            return per_step
        by_name = dict(stats, loss=per_step)
        return ops.stack([by_name[stat] for stat in HEAD_STATS], axis=-1)

    def score(
        self,
        hidden: Any,
        labels: Any,
        mask: Any = None,
        sample_weight: Any = None,
        per_token: bool = False,
    ) -> Tensor:
        """The log-probability of `labels` under the head, at its
        `temperature`, computed in chunks (the logits are never held).

        Args:
            hidden: `[batch, ..., hidden_size]` features.
            labels: Integer labels, `hidden`'s shape without its last axis;
                the head's `mask_value` marks padding.
            mask: Optional boolean mask, `True` on real steps.
            sample_weight: Optional weights; a weight of 0 marks padding.
            per_token: Whether to return the per-token log-probabilities
                (0 on padding) rather than their sum per sequence.

        Returns:
            float32 `[batch]`: each sequence's summed log-probability over
            its real tokens (0 for a sequence of padding); with
            `per_token`, `labels`' shape.

        Example:

        >>> import kmask
        >>> import numpy as np
        >>> head = kmask.FusedLinearCrossentropy(4, mask_value=-100)
        >>> hidden = np.zeros((2, 3, 5), "float32")
        >>> scores = head.score(hidden, [[1, 2, -100], [3, -100, -100]])
        >>> np.round(np.asarray(scores), 4)  # log(1/4) per real token
        array([-2.7726, -1.3863], dtype=float32)
        """
        hidden, labels = ops.convert_to_tensor(hidden), ops.convert_to_tensor(labels)
        if not self.built:
            self.build([tuple(hidden.shape), tuple(labels.shape)])
        _, _, stats = _head.head(
            hidden,
            self.projection(),
            labels,
            self.bias,
            # "none": no value, so no gradient computed ahead.
            (self.mask_value, "none", self._linear_options),
            mask,
            sample_weight,
            return_stats=True,
        )
        log_prob = stats["log_prob"]
        if per_token:
            return log_prob
        return ops.sum(ops.reshape(log_prob, (ops.shape(log_prob)[0], -1)), axis=-1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        if _is_pair(input_shape):
            return (*input_shape[1], *self._stats_axis())
        return (*input_shape[:-1], self.vocabulary_size)

    def _stats_axis(self) -> tuple[int, ...]:
        return (len(HEAD_STATS),) if self.return_stats else ()

    def compute_output_spec(self, inputs: Any, mask: Tensor | None = None) -> Any:
        self._tie.find(inputs[0] if _is_pair(inputs) else inputs)
        if _is_pair(inputs):
            shape = (*inputs[1].shape, *self._stats_axis())
            return keras.KerasTensor(shape, dtype="float32")
        shape = (*inputs.shape[:-1], self.vocabulary_size)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def compute_mask(self, inputs: Any, mask: Tensor | None = None) -> Tensor | None:
        # The per-step losses are 0 on padding: nothing downstream needs a mask.
        return None if _is_pair(inputs) else mask

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "embedding": self._tie.name(),
            "softcap": self.softcap,
            "use_bias": self.use_bias,
            "mask_value": plain(self.mask_value),
            "reduction": self.reduction,
            "chunk_size": self.chunk_size,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "return_stats": self.return_stats,
            "class_weight": self.class_weight,
            "temperature": self.temperature,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


class _Tie:
    """The head's tied embedding: a layer, or, after `from_config`, the
    layer's name, found upstream of the head's input in a functional graph
    when the model is rebuilt (before any weight is loaded)."""

    def __init__(self, layer: Any):
        if not (
            layer is None or isinstance(layer, str) or hasattr(layer, "embeddings")
        ):
            raise ValueError(
                "Invalid value for argument `embedding`. Expected a layer "
                "with an `embeddings` variable [vocabulary, hidden_size], "
                "such as keras.layers.Embedding. Received: "
                f"embedding={layer!r}"
            )
        self.layer = layer

    def name(self) -> str | None:
        if self.layer is None or isinstance(self.layer, str):
            return self.layer
        return self.layer.name

    def find(self, tensor: Any) -> None:
        """Binds a tie known by name to the layer of that name upstream of
        the symbolic `tensor`."""
        if not isinstance(self.layer, str):
            return
        found = upstream_layer(tensor, self.layer)
        if found is None:
            raise ValueError(
                f"Invalid value for argument `embedding`: no layer named "
                f"{self.layer!r} feeds the head's input. A head tied by name "
                "(from a saved config) must follow its embedding in the same "
                "functional model."
            )
        self.layer = found

    def matrix(self) -> Any:
        if isinstance(self.layer, str):
            raise ValueError(
                f"The head's tied embedding {self.layer!r} was never found: "
                "call the head on a symbolic input of its model first (a "
                "reloaded functional model does this)."
            )
        return self.layer.embeddings


def _is_pair(value) -> bool:
    """Whether a layer input (or its shape) is `[hidden, labels]`."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and not all(isinstance(item, int) or item is None for item in value)
    )
