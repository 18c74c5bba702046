"""`kmask.keras_hub.fused_causal_lm` on keras-hub's Gemma, GPT-2, Llama and
BART tasks, built from tiny configs (random weights, no download).

Ground truth is float64 NumPy from each task's own logits: the token mean of
the cross-entropy over the steps whose `sample_weight` is 1. keras-hub's own
`fit()` first turns arrays into a `grain` or `tf.data` dataset; neither is
installed beside the JAX or PyTorch backend here, so the array tests call
`keras.Model.fit`, which runs the same training step on the same batch; the
strings test (a tokenizer and preprocessor) runs where one of them is.
"""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest
from keras import ops

import kmask

try:
    import keras_hub

    import kmask.keras_hub as kmask_hub
except ImportError as error:  # keras-hub 0.32 does not import on keras-nightly
    pytest.skip(f"keras-hub does not import: {error}", allow_module_level=True)

VOCABULARY, STEPS, BATCH = 32, 6, 3
LENGTHS = (STEPS + 1, 4, 2)  # tokens per sequence, before the shift
TOLERANCE = 1e-5


def gemma() -> keras.Model:
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        final_logit_soft_cap=3.0,  # as Gemma 2 (tied, soft-capped)
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def gpt2() -> keras.Model:
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=STEPS + 2,
        dropout=0.0,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def llama() -> keras.Model:
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
    )  # untied: its logits come from a separate reverse kernel
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


TASKS = {"gemma": gemma, "gpt2": gpt2, "llama": llama}


def batch():
    """keras-hub's preprocessed `(x, y, sample_weight)`: the next token, and
    a weight of 0 where it is padding."""
    rng = np.random.default_rng(0)
    real = np.arange(STEPS + 1)[None, :] < np.array(LENGTHS)[:, None]
    tokens = np.where(real, rng.integers(1, VOCABULARY, real.shape), 0)
    x = {"token_ids": tokens[:, :-1].astype("int32"), "padding_mask": real[:, :-1]}
    return x, tokens[:, 1:].astype("int32"), real[:, 1:].astype("float32")


def numpy_reference(logits, labels, weights) -> dict[str, float]:
    """float64: the token mean of the cross-entropy, the token accuracy and
    the perplexity over the weighted steps; and the sum over batch x time."""
    logits = np.asarray(logits, "float64")
    top = logits.max(-1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    per_step = log_sum - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    total, count = float((per_step * weights).sum()), float(weights.sum())
    return {
        "loss": total / count,
        "accuracy": float(((logits.argmax(-1) == labels) * weights).sum() / count),
        "perplexity": float(np.exp(total / count)),
        "batch_x_time": total / weights.size,
    }


def logits_of(causal_lm, x) -> np.ndarray:
    return ops.convert_to_numpy(causal_lm(x, training=False))


def one_step(model, x, labels, weights) -> dict[str, float]:
    """The logs of one `fit` step on the batch: computed before the update."""
    history = keras.Model.fit(
        model, x, labels, sample_weight=weights, batch_size=BATCH, verbose=0
    )
    return {name: values[0] for name, values in history.history.items()}


def assert_the_numpy_token_mean(logs, expected):
    for name in ("loss", "accuracy", "perplexity"):
        np.testing.assert_allclose(logs[name], expected[name], rtol=TOLERANCE)
    # A third of the steps are padding: keras-hub's mean is another number.
    assert abs(expected["batch_x_time"] - expected["loss"]) > 0.5


def generated_alike(model, unwrapped, prompt, key) -> np.ndarray:
    """The `key` tokens of the wrapped model's greedy `generate()` from
    `prompt` (compiled with `sampler="greedy"`), equal to the unwrapped
    task's."""
    unwrapped.compile(sampler="greedy")
    ours = model.generate(dict(prompt), max_length=STEPS, stop_token_ids=None)
    theirs = unwrapped.generate(dict(prompt), max_length=STEPS, stop_token_ids=None)
    np.testing.assert_array_equal(ours[key], theirs[key])
    return ours[key]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_compiled_step_then_generate(task):
    """The loss of a step (compiled as `compile()` does by default: XLA on
    JAX and TensorFlow, eager PyTorch) is NumPy's token mean; `generate()`
    then gives the tokens of the unwrapped task with the trained weights."""
    keras.utils.set_random_seed(0)
    causal_lm = TASKS[task]()
    x, labels, weights = batch()
    expected = numpy_reference(logits_of(causal_lm, x), labels, weights)
    model = kmask_hub.fused_causal_lm(causal_lm, chunk_size=4)
    model.compile(optimizer=keras.optimizers.SGD(1.0), sampler="greedy")

    assert_the_numpy_token_mean(one_step(model, x, labels, weights), expected)

    trained = causal_lm.backbone.get_weights()
    unwrapped = TASKS[task]()
    assert not np.allclose(unwrapped.backbone.get_weights()[0], trained[0])
    unwrapped.backbone.set_weights(trained)
    prompt = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}
    prompt["padding_mask"] = prompt["padding_mask"] & (np.arange(STEPS) < 2)
    ours = generated_alike(model, unwrapped, prompt, "token_ids")
    assert not np.array_equal(ours[:, 2:], x["token_ids"][:, 2:])


def test_an_eager_step():
    """`jit_compile=False` on the tied, soft-capped Gemma (the untied Llama
    runs eagerly on PyTorch in the test above)."""
    if keras.backend.backend() == "torch":
        pytest.skip("the compiled test above runs eagerly on PyTorch")
    keras.utils.set_random_seed(0)
    causal_lm = gemma()
    x, labels, weights = batch()
    expected = numpy_reference(logits_of(causal_lm, x), labels, weights)
    model = kmask_hub.fused_causal_lm(causal_lm, chunk_size=4)
    model.compile(jit_compile=False)

    assert_the_numpy_token_mean(one_step(model, x, labels, weights), expected)


def test_a_seq2seq_task_trains_its_decoder_s_token_mean():
    """BART: the loss is over the decoder's steps, as the task's is."""
    keras.utils.set_random_seed(5)
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=STEPS + 2,
        dropout=0.0,
    )
    seq2seq_lm = keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None)
    decoder, labels, weights = batch()
    x = {
        "encoder_token_ids": decoder["token_ids"][::-1].copy(),
        "encoder_padding_mask": decoder["padding_mask"][::-1].copy(),
        "decoder_token_ids": decoder["token_ids"],
        "decoder_padding_mask": decoder["padding_mask"],
    }
    expected = numpy_reference(logits_of(seq2seq_lm, x), labels, weights)
    model = kmask_hub.fused_causal_lm(seq2seq_lm, chunk_size=4)
    model.compile(sampler="greedy")

    assert_the_numpy_token_mean(one_step(model, x, labels, weights), expected)

    unwrapped = keras_hub.models.BartSeq2SeqLM(
        backbone=keras_hub.models.BartBackbone.from_config(backbone.get_config()),
        preprocessor=None,
    )
    unwrapped.backbone.set_weights(backbone.get_weights())
    prompt = {
        **x,
        "decoder_padding_mask": x["decoder_padding_mask"] & (np.arange(STEPS) < 2),
    }
    generated_alike(model, unwrapped, prompt, "decoder_token_ids")


def test_a_keras_file_keeps_the_task_the_tie_and_the_loss(tmp_path):
    keras.utils.set_random_seed(2)
    model = kmask_hub.fused_causal_lm(gemma(), chunk_size=4)
    x, labels, weights = batch()
    keras.Model.fit(
        model, x, labels, sample_weight=weights, batch_size=BATCH, verbose=0
    )
    expected = numpy_reference(logits_of(model.causal_lm, x), labels, weights)

    model.save(tmp_path / "fused.keras")
    restored = keras.models.load_model(tmp_path / "fused.keras")

    assert isinstance(restored, kmask_hub.FusedCausalLM)
    assert isinstance(restored.causal_lm, keras_hub.models.GemmaCausalLM)
    assert restored.backbone is restored.causal_lm.backbone
    assert restored.preprocessor is None
    assert restored.head.embedding is restored.backbone.token_embedding
    assert restored.head.softcap == 3.0
    np.testing.assert_allclose(logits_of(restored, x), logits_of(model, x), rtol=1e-6)
    logs = keras.Model.evaluate(
        restored, x, labels, sample_weight=weights, batch_size=BATCH, verbose=0,
        return_dict=True,
    )  # fmt: skip
    np.testing.assert_allclose(logs["loss"], expected["loss"], rtol=TOLERANCE)
    assert restored.optimizer.iterations.value == 1
    prompt = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}
    assert restored.generate(prompt, stop_token_ids=None)["token_ids"].shape == (
        BATCH,
        STEPS,
    )


def test_without_sample_weight_every_step_is_a_token():
    keras.utils.set_random_seed(6)
    model = kmask_hub.fused_causal_lm(gpt2(), chunk_size=4)
    x, labels, weights = batch()
    every = np.ones_like(weights)
    expected = numpy_reference(logits_of(model, x), labels, every)

    logs = keras.Model.evaluate(
        model, x, labels, batch_size=BATCH, verbose=0, return_dict=True
    )

    np.testing.assert_allclose(logs["loss"], expected["loss"], rtol=TOLERANCE)
    np.testing.assert_allclose(logs["accuracy"], expected["accuracy"], rtol=TOLERANCE)


def test_the_non_fused_one_liner_is_the_numpy_token_mean():
    keras.utils.set_random_seed(3)
    causal_lm = gemma()
    x, labels, weights = batch()
    expected = numpy_reference(logits_of(causal_lm, x), labels, weights)

    causal_lm.compile(loss=kmask.MaskedSparseCategoricalCrossentropy(from_logits=True))
    ours = keras.Model.evaluate(
        causal_lm, x, labels, sample_weight=weights, batch_size=BATCH, verbose=0
    )
    causal_lm.compile()  # keras-hub's default: sum over batch x time
    theirs = keras.Model.evaluate(
        causal_lm, x, labels, sample_weight=weights, batch_size=BATCH, verbose=0
    )

    np.testing.assert_allclose(ours[0], expected["loss"], rtol=TOLERANCE)
    np.testing.assert_allclose(theirs[0], expected["batch_x_time"], rtol=TOLERANCE)


def _gpt2_with_a_preprocessor():
    vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "Ġa": 3, "Ġb": 4, "Ġ": 5}
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=["Ġ a"])
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=STEPS
    )
    causal_lm = gpt2()
    causal_lm.preprocessor = preprocessor
    return causal_lm


STRINGS = ["a b a", "b", "a a b b"]


def _as_numpy(preprocessed):
    x, labels, weights = preprocessed
    x = {key: ops.convert_to_numpy(value) for key, value in x.items()}
    return x, ops.convert_to_numpy(labels), ops.convert_to_numpy(weights)


def test_fit_on_what_the_task_s_preprocessor_gives():
    keras.utils.set_random_seed(4)
    causal_lm = _gpt2_with_a_preprocessor()
    x, labels, weights = _as_numpy(causal_lm.preprocessor(STRINGS))
    assert 0 < weights.sum() < weights.size  # padded
    expected = numpy_reference(logits_of(causal_lm, x), labels, weights)
    model = kmask_hub.fused_causal_lm(causal_lm, chunk_size=4)
    assert model.preprocessor is causal_lm.preprocessor

    history = keras.Model.fit(
        model, x, labels, sample_weight=weights, batch_size=len(STRINGS), verbose=0
    )

    np.testing.assert_allclose(
        history.history["loss"][0], expected["loss"], rtol=TOLERANCE
    )


@pytest.mark.skipif(
    not any(importlib.util.find_spec(name) for name in ("grain", "tensorflow_text")),
    reason="keras-hub's fit() tokenizes in grain, or in tf.data with tensorflow-text",
)
def test_fit_on_strings():
    keras.utils.set_random_seed(4)
    causal_lm = _gpt2_with_a_preprocessor()
    x, labels, weights = _as_numpy(causal_lm.preprocessor(STRINGS))
    expected = numpy_reference(logits_of(causal_lm, x), labels, weights)
    model = kmask_hub.fused_causal_lm(causal_lm, chunk_size=4)

    # keras-hub turns the strings into a tf.data pipeline, which Keras will not
    # shuffle (it warns when asked to).
    history = model.fit(STRINGS, batch_size=len(STRINGS), shuffle=False, verbose=0)

    np.testing.assert_allclose(
        history.history["loss"][0], expected["loss"], rtol=TOLERANCE
    )


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="`causal_lm`"):
        kmask_hub.fused_causal_lm(keras.Sequential([keras.layers.Dense(2)]))
    model = kmask_hub.fused_causal_lm(gpt2())
    with pytest.raises(ValueError, match="`loss`"):
        model.compile(loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="`chunk_size`"):
        kmask_hub.fused_causal_lm(gpt2(), chunk_size=0)
