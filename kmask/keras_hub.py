"""kmask's token mean and chunked head inside a keras-hub `CausalLM`.

`fused_causal_lm(causal_lm)` wraps an existing keras-hub `CausalLM` task
(Gemma, GPT-2, Llama, ...) so that its training step computes the loss
through `kmask.FusedLinearCrossentropy` on the task's own output matrix (the
tied `ReversibleEmbedding`, or its untied reverse kernel) with the task's own
soft cap, divides by the real tokens, and never holds the `[batch, time,
vocabulary]` logits. Everything else is the task's: its backbone,
preprocessor, `generate()` and weights, which the wrapper shares.

Requires `keras-hub` (`pip install --no-deps keras-hub regex tokenizers`).
"""

from __future__ import annotations

from typing import Any

import keras
import keras_hub
from keras import ops

import kmask
from kmask.ops.linear import HEAD_STATS

__all__ = ["FusedCausalLM", "fused_causal_lm"]

# The keys under which the training step hands the labels and the
# preprocessor's sample weights to `call()`, beside the backbone's inputs.
LABELS = "kmask_labels"
SAMPLE_WEIGHT = "kmask_sample_weight"


def fused_causal_lm(causal_lm: Any, chunk_size: int | str = "auto") -> FusedCausalLM:
    """An existing keras-hub `CausalLM`, trained through kmask's chunked head.

    The returned model trains with the task's own `fit(strings)` or
    `fit(preprocessed)` calls and preprocessor; its loss is the token mean of
    the cross-entropy over the real tokens (a step whose `sample_weight` is 0
    is padding, as keras-hub's preprocessors mark it; any other weight counts
    as 1, since the head's layer takes padding as a mask), computed by
    `kmask.FusedLinearCrossentropy` on the task's own output matrix and soft
    cap, a `chunk_size` block of logits at a time. It logs `accuracy` and
    `perplexity` (`kmask.HeadAccuracy`, `kmask.HeadPerplexity`) from the
    head's per-step statistics. `generate()`, `backbone` and `preprocessor`
    are the task's, with the same weights, and it saves and reloads as a
    `.keras` file.

    Args:
        causal_lm: A `keras_hub.models.CausalLM` (e.g. `GemmaCausalLM`,
            `GPT2CausalLM`, `LlamaCausalLM`) whose logits are
            `backbone.token_embedding(hidden, reverse=True)`; or a
            `Seq2SeqLM` (a `CausalLM` in keras-hub, e.g. `BartSeq2SeqLM`),
            whose loss is the decoder's, of the same shape.
        chunk_size: Tokens per chunk of the head; see
            `kmask.fused_linear_crossentropy`.

    Returns:
        A compiled `FusedCausalLM` (Adam(2e-5), the head's loss, its accuracy
        and perplexity); `compile()` it again to change the optimizer.

    Example:

    >>> import keras_hub
    >>> import kmask.keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(
    ...     vocabulary_size=16, num_layers=1, num_heads=1, hidden_dim=4,
    ...     intermediate_dim=8, max_sequence_length=4,
    ... )
    >>> causal_lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    >>> model = kmask.keras_hub.fused_causal_lm(causal_lm)
    >>> model.backbone is causal_lm.backbone
    True
    """
    return FusedCausalLM(causal_lm, chunk_size=chunk_size)


@keras.saving.register_keras_serializable(package="kmask")
class FusedCausalLM(keras_hub.models.CausalLM):
    """A keras-hub `CausalLM` whose training step runs kmask's chunked head.

    Built by `kmask.keras_hub.fused_causal_lm`, which documents what it does.
    The training and evaluation steps hand the labels and sample weights to
    `call()`, which runs the backbone and `kmask.FusedLinearCrossentropy`
    (`return_stats=True`) on the task's output matrix: the head adds the
    loss, and the model's output is the head's per-step statistics, read by
    the compiled `kmask.HeadAccuracy` and `kmask.HeadPerplexity`. Called
    without labels (`predict()`, `model(x)`) it returns the task's logits.

    Args:
        causal_lm: The keras-hub `CausalLM` task to train.
        chunk_size: Tokens per chunk of the head, or `"auto"` (the default)
            for one from a memory budget.
        **kwargs: Passed to `keras.Model` (`name`, ...).

    Returns:
        Called on the backbone's inputs: the task's logits.

    Example:

    >>> import keras_hub
    >>> import kmask.keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(
    ...     vocabulary_size=16, num_layers=1, num_heads=1, hidden_dim=4,
    ...     intermediate_dim=8, max_sequence_length=4,
    ... )
    >>> causal_lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    >>> model = kmask.keras_hub.FusedCausalLM(causal_lm, chunk_size=64)
    >>> model.head.softcap is None  # GPT-2 does not cap its logits
    True
    """

    def __init__(
        self, causal_lm: Any, chunk_size: int | str = "auto", **kwargs: Any
    ) -> None:
        if not isinstance(causal_lm, keras_hub.models.CausalLM):
            raise ValueError(
                "Invalid value for argument `causal_lm`. Expected a "
                "keras_hub.models.CausalLM. Received: "
                f"causal_lm={type(causal_lm).__name__}"
            )
        matrix, softcap = _output_matrix(causal_lm)
        head = kmask.FusedLinearCrossentropy(
            causal_lm.backbone.token_embedding.input_dim,
            embedding=matrix,
            softcap=softcap,
            use_bias=False,
            chunk_size=chunk_size,
            return_stats=True,
            name="head",
        )
        # A functional graph, as keras-hub's own tasks are (keras-hub's
        # `PipelineModel` resets its base class to `keras.Model` whenever a
        # subclassed task is built, which would break every functional one).
        features = dict(causal_lm.backbone.input)
        # A `Seq2SeqLM` (a `CausalLM` in keras-hub) predicts the decoder's.
        tokens = "decoder_token_ids" if "decoder_token_ids" in features else "token_ids"
        steps = features[tokens].shape[1:]
        labels = keras.Input(steps, dtype="int32", name=LABELS, optional=True)
        weights = keras.Input(steps, name=SAMPLE_WEIGHT, optional=True)
        hidden = causal_lm.backbone(features)
        if isinstance(hidden, dict):
            hidden = hidden["decoder_sequence_output"]
        # keras-hub's preprocessors give the padding as a 0/1 weight; the
        # head's layer takes padding as a mask (it has no `sample_weight`).
        stats = head([hidden, labels], mask=[ops.not_equal(weights, 0), None])
        kwargs.setdefault("name", f"fused_{causal_lm.name}")
        super().__init__(
            inputs={**features, LABELS: labels, SAMPLE_WEIGHT: weights},
            outputs=stats,
            compile=False,
            **kwargs,
        )
        self.causal_lm = causal_lm
        self.head = head
        self.chunk_size = chunk_size
        self.dtype_policy = causal_lm.dtype_policy
        self.compile()

    @property
    def backbone(self) -> Any:
        """The task's backbone."""
        causal_lm = getattr(self, "causal_lm", None)
        return None if causal_lm is None else causal_lm.backbone

    @backbone.setter
    def backbone(self, value: Any) -> None:
        self.causal_lm.backbone = value

    @property
    def preprocessor(self) -> Any:
        """The task's preprocessor (`None` for preprocessed inputs)."""
        causal_lm = getattr(self, "causal_lm", None)
        return None if causal_lm is None else causal_lm.preprocessor

    @preprocessor.setter
    def preprocessor(self, value: Any) -> None:
        self.causal_lm.preprocessor = value

    def compile(
        self,
        optimizer: Any = "auto",
        loss: Any = None,
        *,
        metrics: Any = "auto",
        sampler: Any = "top_k",
        **kwargs: Any,
    ) -> None:
        """Configures training and generation.

        Args:
            optimizer: `"auto"` (keras-hub's `Adam(2e-5)`) or an optimizer.
            loss: Must be `None` or `"auto"`: the head adds the loss itself.
            metrics: `"auto"` (`kmask.HeadAccuracy()` and
                `kmask.HeadPerplexity()`, logged as `accuracy` and
                `perplexity`) or metrics that read the head's per-step
                statistics.
            sampler: The sampler of `generate()`, as keras-hub takes it.
            **kwargs: Passed to `keras.Model.compile` (`jit_compile`, ...).
        """
        if loss not in (None, "auto"):
            raise ValueError(
                "Invalid value for argument `loss`: the head computes the loss "
                "itself. Expected None or 'auto'. Received: "
                f"loss={loss!r}"
            )
        if metrics == "auto":
            metrics = [kmask.HeadAccuracy(), kmask.HeadPerplexity()]
        super().compile(
            optimizer=optimizer,
            loss=None,
            metrics=metrics,
            weighted_metrics=None,
            sampler=sampler,
            **kwargs,
        )
        # Keras builds the compiled metrics on the first batch as it comes,
        # without labels in `x`, so on the task's logits; built here on
        # statistics whose every step is padding (a weight of 0 adds
        # nothing), they see the head's statistics from the start.
        no_steps = ops.zeros((1, 1, len(HEAD_STATS)))
        self.compute_metrics(None, None, no_steps, None)
        # Built now, so that a `.keras` file saved before any training step
        # holds the same optimizer variables as one saved after.
        self.optimizer.build(self.trainable_variables)
        # `generate()` is the task's own: it samples with this sampler.
        self.causal_lm.sampler = self.sampler
        self.causal_lm.generate_function = None

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """Compiles a reloaded model as it was saved (its optimizer, its
        metrics); the head adds the loss, as always."""
        config = keras.saving.deserialize_keras_object(config)
        for fixed in ("loss", "weighted_metrics"):
            config.pop(fixed, None)
        self.compile(**config)

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # Without labels (`predict()`, `model(x)`) the model is the task.
        if isinstance(inputs, dict) and LABELS not in inputs:
            return self.causal_lm(inputs, *args, **kwargs)
        return super().__call__(inputs, *args, **kwargs)

    def train_step(self, *args: Any) -> Any:
        *state, data = args  # JAX passes its state before the data.
        return super().train_step(*state, _labels_as_inputs(data))

    def test_step(self, *args: Any) -> Any:
        *state, data = args
        return super().test_step(*state, _labels_as_inputs(data))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The task's own `generate()`, with the shared weights."""
        return self.causal_lm.generate(*args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        causal_lm = keras.saving.serialize_keras_object(self.causal_lm)
        # The task is compiled here (its sampler): keras-hub's custom
        # `compile()` cannot be restored from a config, and warns if asked.
        causal_lm.pop("compile_config", None)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "causal_lm": causal_lm,
            "chunk_size": self.chunk_size,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FusedCausalLM:
        config = dict(config)
        config["causal_lm"] = keras.saving.deserialize_keras_object(config["causal_lm"])
        return cls(**config)


class _ReverseKernel:
    """An untied `ReversibleEmbedding`'s reverse kernel `[hidden,
    vocabulary]`, seen as the `[vocabulary, hidden]` matrix the head takes
    from a tied embedding (a transposed view where the backend has one)."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.name = layer.name

    @property
    def embeddings(self) -> Any:
        return ops.transpose(self.layer.reverse_embeddings)


def _output_matrix(causal_lm: Any) -> tuple[Any, float | None]:
    """The task's output matrix, as the head's `embedding=` takes it, and the
    soft cap its `ReversibleEmbedding` applies to the logits."""
    embedding = getattr(causal_lm.backbone, "token_embedding", None)
    if not isinstance(embedding, keras.layers.ReversibleEmbedding):
        raise ValueError(
            "Invalid value for argument `causal_lm`. Expected a task whose "
            "backbone has a `token_embedding` ReversibleEmbedding (its logits "
            "are `token_embedding(hidden, reverse=True)`). Received: "
            f"token_embedding={type(embedding).__name__}"
        )
    if embedding.quantization_mode is not None:
        raise ValueError(
            "Invalid value for argument `causal_lm`: the head needs the "
            "embedding's float matrix. Received: quantization_mode="
            f"{embedding.quantization_mode!r}"
        )
    matrix = embedding if embedding.tie_weights else _ReverseKernel(embedding)
    return matrix, embedding.logit_soft_cap


def _labels_as_inputs(data: Any) -> tuple[dict[str, Any]]:
    """`(x, y, sample_weight)` as one input dict, for `call()`."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not isinstance(x, dict) or y is None:
        raise ValueError(
            "Invalid value for argument `x`. Expected the backbone's input "
            "dict with labels `y` (as the task's preprocessor gives them). "
            f"Received: x={type(x).__name__}, y={type(y).__name__}"
        )
    if sample_weight is None:
        sample_weight = ops.ones(ops.shape(y))
    return ({**x, LABELS: y, SAMPLE_WEIGHT: sample_weight},)
