"""A keras-hub Gemma task trained through kmask's chunked head, in one line:
`kmask.keras_hub.fused_causal_lm(causal_lm)`.

    KERAS_BACKEND=jax python examples/keras_hub_causal_lm.py

The task is built from a small config with random weights (no download, no
tokenizer). The example trains it two ways from the same weights: with
keras-hub's default `compile()`, whose `"sum_over_batch_size"` divides by
batch x time (padding counted), and wrapped by `fused_causal_lm`, whose loss
is the token mean over the real tokens, computed on Gemma's tied,
soft-capped embedding a chunk of tokens at a time. It prints each loss beside
the float64 NumPy reference from the task's own logits, generates with the
wrapped model, and reloads it from a `.keras` file. Exits with 1 on a
mismatch. Memory at Gemma's vocabulary: `benchmarks/keras_hub_step.py`.

keras-hub installs without its dependencies (they pull `tensorflow-text`,
which wants the full `tensorflow` wheel beside `tensorflow-cpu`); model
construction needs only `regex` and `tokenizers` beside it:

    pip install -c constraints.txt --no-deps keras-hub regex tokenizers
"""

from __future__ import annotations

import sys
import tempfile

import keras
import keras_hub
import numpy as np
from _common import check, epochs
from keras import ops

import kmask.keras_hub

VOCABULARY, SEQUENCE, BATCH = 512, 16, 8
CONFIG = {
    "vocabulary_size": VOCABULARY,
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 32,
    "intermediate_dim": 64,
    "head_dim": 16,
    "final_logit_soft_cap": 30.0,  # as Gemma 2
}


def make_data(seed: int = 0):
    """What a `GemmaCausalLMPreprocessor` gives: the inputs, the next token,
    and a `sample_weight` of 0 where the next token is padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQUENCE + 1, 4 * BATCH)
    real = np.arange(SEQUENCE + 1)[None, :] < lengths[:, None]
    tokens = np.where(real, rng.integers(1, VOCABULARY, real.shape), 0)
    x = {"token_ids": tokens[:, :-1].astype("int32"), "padding_mask": real[:, :-1]}
    return x, tokens[:, 1:].astype("int32"), real[:, 1:].astype("float32")


def numpy_losses(logits, labels, weights) -> dict[str, float]:
    """float64 cross-entropy of the logits: the token mean over the real
    tokens and keras-hub's sum over batch x time."""
    logits = np.asarray(logits, "float64")
    top = logits.max(-1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    per_step = log_sum - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    total = float((per_step * weights).sum())
    return {
        "token_mean": total / float(weights.sum()),
        "batch_x_time": total / weights.size,
    }


def task(weights) -> keras.Model:
    backbone = keras_hub.models.GemmaBackbone(**CONFIG)
    backbone.set_weights(weights)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def main() -> int:
    keras.utils.set_random_seed(0)
    x, labels, weights = make_data()
    start = keras_hub.models.GemmaBackbone(**CONFIG).get_weights()
    hub = task(start)  # compiled with keras-hub's defaults
    model = kmask.keras_hub.fused_causal_lm(task(start), chunk_size=64)

    # With a preprocessor this is `model.fit(strings)`. keras-hub's own `fit()`
    # first turns arrays into a grain or tf.data dataset, which needs one of
    # them installed; `keras.Model.fit` runs the same step on the same batches.
    for each in (hub, model):
        keras.Model.fit(
            each, x, labels, sample_weight=weights, batch_size=BATCH,
            epochs=epochs(2), shuffle=False, verbose=0,
        )  # fmt: skip

    def evaluate(each) -> float:
        logs = keras.Model.evaluate(
            each, x, labels, sample_weight=weights, batch_size=len(labels),
            verbose=0, return_dict=True,
        )  # fmt: skip
        return logs["loss"]

    hub_numpy = numpy_losses(ops.convert_to_numpy(hub(x)), labels, weights)
    ours_numpy = numpy_losses(ops.convert_to_numpy(model(x)), labels, weights)
    ours = evaluate(model)
    print(f"\nkeras-hub Gemma, vocabulary {VOCABULARY}, {int(weights.sum())} real "
          f"tokens of {weights.size}\n")  # fmt: skip
    print("| model | loss evaluate reports | NumPy token mean | NumPy sum / (B x T) |")
    print("|---|---|---|---|")
    for name, logged, reference in (
        ("keras-hub compile()", evaluate(hub), hub_numpy),
        ("kmask.keras_hub.fused_causal_lm", ours, ours_numpy),
    ):
        print(f"| {name} | {logged:.6f} | {reference['token_mean']:.6f} | "
              f"{reference['batch_x_time']:.6f} |")  # fmt: skip

    model.compile(sampler="greedy")
    prompt = {"token_ids": x["token_ids"][:2], "padding_mask": x["padding_mask"][:2]}
    generated = model.generate(prompt, max_length=SEQUENCE, stop_token_ids=None)
    print("\ngenerated token ids:\n", generated["token_ids"])
    with tempfile.TemporaryDirectory() as folder:
        model.save(f"{folder}/gemma.keras")
        restored = keras.models.load_model(f"{folder}/gemma.keras")
    return check(
        [
            ("keras-hub = sum / (B x T)", evaluate(hub), hub_numpy["batch_x_time"]),
            ("fused_causal_lm = token mean", ours, ours_numpy["token_mean"]),
            ("after a .keras reload", evaluate(restored), ours),
        ]
    )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
