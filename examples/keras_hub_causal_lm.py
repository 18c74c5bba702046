"""A keras-hub Gemma, trained two ways: keras-hub's default `compile()`, and
kmask's token mean through the fused head on Gemma's own tied embedding.

keras-hub's `CausalLM.compile()` passes the padding mask as `sample_weight`
to `SparseCategoricalCrossentropy`, whose `"sum_over_batch_size"` divides by
batch x time: padded steps count in the denominator, so the loss it reports
(and the gradient it takes) shrinks with the padding. kmask's head divides by
the real tokens, uses the `ReversibleEmbedding` matrix as it is stored (no
`[hidden, vocabulary]` copy), soft-caps the logits as Gemma 2 does
(`final_logit_soft_cap`), and never holds the `[batch, time, vocabulary]`
logits.

    KERAS_BACKEND=jax python examples/keras_hub_causal_lm.py
    KERAS_BACKEND=torch python examples/keras_hub_causal_lm.py --table

The backbone is built from a small config with random weights: no download,
no tokenizer files. It prints each model's loss (as `evaluate` reports it)
beside the float64 NumPy references computed from the model's own logits:
the token mean over the real tokens, and keras-hub's sum over batch x time.
Exits with 1 if kmask's loss is not the token mean, or if keras-hub's is not
the batch x time mean. `--table` then measures one training step of the head
at Gemma's vocabulary (262144), in this process.

keras-hub installs without its dependencies (they pull `tensorflow-text`,
which wants the full `tensorflow` wheel beside `tensorflow-cpu`); model
construction needs only `regex` and `tokenizers` beside it:

    pip install -c constraints.txt --no-deps keras-hub regex tokenizers
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import keras
import keras_hub
import numpy as np
from _common import check, epochs
from keras import ops

import kmask

VOCABULARY, SEQUENCE, BATCH = 512, 16, 8
SOFTCAP = 30.0  # Gemma 2's final_logit_soft_cap
PAD_LABEL = -100
CONFIG = {
    "vocabulary_size": VOCABULARY,
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 32,
    "intermediate_dim": 64,
    "head_dim": 16,
    "final_logit_soft_cap": SOFTCAP,
}


def make_data(seed: int = 0):
    """Padded token ids, keras-hub's inputs and labels, and kmask's labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQUENCE + 1, 4 * BATCH)
    real = np.arange(SEQUENCE + 1)[None, :] < lengths[:, None]
    tokens = np.where(real, rng.integers(1, VOCABULARY, real.shape), 0)
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": real[:, :-1],
    }
    # The next token; a step whose next token is padding has no label.
    weights = real[:, 1:].astype("float32")
    labels = tokens[:, 1:].astype("int32")
    kmask_labels = np.where(real[:, 1:], labels, PAD_LABEL).astype("int32")
    return x, labels, weights, kmask_labels


def numpy_losses(logits, labels, weights) -> dict[str, float]:
    """float64 cross-entropy of the logits: the token mean over the real
    tokens and keras-hub's sum over batch x time; and the token accuracy
    and perplexity over the real tokens."""
    logits = np.asarray(logits, "float64")
    top = logits.max(-1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    label_logit = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    per_step = log_sum - label_logit
    total = float((per_step * weights).sum())
    right = (logits.argmax(-1) == labels) * weights
    return {
        "token_mean": total / float(weights.sum()),
        "batch_x_time": total / weights.size,
        "accuracy": float(right.sum() / weights.sum()),
        "perplexity": float(np.exp(total / float(weights.sum()))),
    }


def keras_hub_model(weights) -> keras.Model:
    backbone = keras_hub.models.GemmaBackbone(**CONFIG)
    backbone.set_weights(weights)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile()  # keras-hub's defaults: Adam(2e-5), SparseCE, accuracy
    return model


def kmask_model(weights):
    """The same backbone, kmask's head on its tied, soft-capped embedding,
    reporting its token accuracy and perplexity (`return_stats`)."""
    backbone = keras_hub.models.GemmaBackbone(**CONFIG)
    backbone.set_weights(weights)
    labels = keras.Input((SEQUENCE,), dtype="int32", name="labels")
    head = kmask.FusedLinearCrossentropy(
        VOCABULARY,
        embedding=backbone.token_embedding,
        softcap=SOFTCAP,
        use_bias=False,
        mask_value=PAD_LABEL,
        chunk_size=64,
        return_stats=True,
        name="head",
    )
    inputs = {**backbone.input, "labels": labels}
    model = keras.Model(inputs, head([backbone(backbone.input), labels]))
    model.compile(
        optimizer=keras.optimizers.Adam(2e-5),
        loss=None,
        metrics=[kmask.HeadAccuracy(), kmask.HeadPerplexity()],
    )
    return model, backbone


def train(x, labels, weights, kmask_labels) -> list[tuple[str, float, float]]:
    keras.utils.set_random_seed(0)
    start = keras_hub.models.GemmaBackbone(**CONFIG).get_weights()
    hub = keras_hub_model(start)
    ours, backbone = kmask_model(start)
    # keras-hub's own fit/evaluate/predict first turn arrays into a `grain` or
    # `tf.data` dataset, and neither is installed beside the JAX or PyTorch
    # backend here; with `preprocessor=None` that step changes nothing, so
    # Keras's own methods run the same compiled model on the same batches.
    keras.Model.fit(
        hub, x, labels, sample_weight=weights, batch_size=BATCH, epochs=epochs(2),
        shuffle=False, verbose=0,
    )  # fmt: skip
    ours.fit({**x, "labels": kmask_labels}, batch_size=BATCH, epochs=epochs(2),
             verbose=0)  # fmt: skip

    hub_loss = keras.Model.evaluate(hub, x, labels, sample_weight=weights, verbose=0)
    logits = keras.Model.predict(hub, x, verbose=0)
    hub_numpy = numpy_losses(logits, labels, weights)
    ours_logs = ours.evaluate(
        {**x, "labels": kmask_labels}, verbose=0, return_dict=True
    )
    ours_loss = ours_logs["loss"]
    capped = backbone.token_embedding(backbone(x), reverse=True)
    ours_numpy = numpy_losses(ops.convert_to_numpy(capped), labels, weights)
    print(f"\nkeras-hub Gemma ({CONFIG['num_layers']} layers, vocabulary "
          f"{VOCABULARY}, soft cap {SOFTCAP}), {epochs(2)} epochs of "
          f"{len(labels) // BATCH} steps, {int(weights.sum())} real tokens of "
          f"{weights.size}\n")  # fmt: skip
    print("| model | loss evaluate reports | NumPy token mean | NumPy sum / (B x T) |")
    print("|---|---|---|---|")
    for name, logged, reference in (
        ("keras-hub compile()", hub_loss[0], hub_numpy),
        ("kmask head, tied + soft-capped", ours_loss, ours_numpy),
    ):
        print(f"| {name} | {logged:.6f} | {reference['token_mean']:.6f} | "
              f"{reference['batch_x_time']:.6f} |")  # fmt: skip
    # A .keras file keeps the tie: the reloaded head reads the reloaded
    # backbone's embedding, not a copy.
    with tempfile.TemporaryDirectory() as folder:
        ours.save(f"{folder}/gemma_kmask.keras")
        restored = keras.models.load_model(f"{folder}/gemma_kmask.keras")
    tied = restored.get_layer("head").embedding
    inner = restored.get_layer(backbone.name).token_embedding
    restored_loss = restored.evaluate({**x, "labels": kmask_labels}, verbose=0)[0]
    return [
        ("keras-hub = sum / (B x T)", hub_loss[0], hub_numpy["batch_x_time"]),
        ("kmask = token mean", ours_loss, ours_numpy["token_mean"]),
        ("kmask head accuracy", ours_logs["accuracy"], ours_numpy["accuracy"]),
        ("kmask head perplexity", ours_logs["perplexity"], ours_numpy["perplexity"]),
        ("kmask after a .keras reload", restored_loss, ours_loss),
        ("reloaded head tied to the reloaded embedding", float(tied is inner), 1.0),
    ]


def table(vocabulary: int = 262144, tokens: int = 8192, width: int = 512) -> None:
    """One forward + backward step of the head at Gemma's vocabulary, in
    this process: peak resident memory, its growth over the step, the time;
    and what the materialised logits would need."""
    rng = np.random.default_rng(1)
    hidden = ops.convert_to_tensor(
        rng.standard_normal((tokens // 1024, 1024, width), dtype=np.float32)
    )
    embedding = keras.layers.Embedding(vocabulary, width)
    embedding.build((None,))
    labels = rng.integers(0, vocabulary, (tokens // 1024, 1024)).astype("int32")
    labels[:, 768:] = PAD_LABEL

    def loss(hidden):
        return kmask.fused_linear_crossentropy(
            hidden, embedding.embeddings, labels, mask_value=PAD_LABEL,
            transpose_kernel=True, softcap=SOFTCAP, chunk_size=256,
        )  # fmt: skip

    before = _rss_mib()
    started = time.perf_counter()
    value, d_hidden = _value_and_grad(loss, hidden)
    ops.convert_to_numpy(d_hidden)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logits_gib = 2 * 4 * tokens * vocabulary / 2**30
    print(f"\nOne training step of the head, {tokens} tokens, hidden {width}, "
          f"vocabulary {vocabulary} ({keras.backend.backend()}):\n")  # fmt: skip
    print("| variant | peak RSS MiB | step MiB | time s |")
    print("|---|---|---|---|")
    print(f"| kmask, tied + soft-capped | {peak:.0f} | {peak - before:.0f} | "
          f"{seconds:.1f} |")  # fmt: skip
    print(f"| materialised logits | not run: the logits and their gradient alone "
          f"need {logits_gib:.0f} GiB | | |")  # fmt: skip
    print(f"loss {float(value):.4f}")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _value_and_grad(fn, x):
    """`fn(x)` and its gradient, with the backend's own autodiff."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(jax.value_and_grad(fn))(x)
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        return value, tape.gradient(value, x)
    x = x.detach().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true",
                        help="also time one step at a 262144 vocabulary")  # fmt: skip
    args = parser.parse_args(argv)
    ok = check(train(*make_data()))
    if args.table:
        table()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
