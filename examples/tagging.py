"""Sequence tagging with sparse labels: token id 0 pads the inputs, -100 the labels.

`Embedding(mask_zero=True)` starts a mask that the GRU and the Dense layers
carry to the output; the labels are padded with -100, which Keras's sparse
cross-entropy cannot take (on TensorFlow it raises). kmask's loss and metrics
leave both kinds of padding out, and count tokens across batches: Keras's own
`loss` in `evaluate` is a mean of batch means, while
`MaskedMeanMetricWrapper(loss)` is the token mean over the whole data set.

    KERAS_BACKEND=jax python examples/tagging.py    # KMASK_EXAMPLE_EPOCHS=5

Prints masked and unmasked (padding counted) numbers beside NumPy, and exits
with 1 if kmask and NumPy disagree.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
from _common import (
    check,
    fit_with_curves,
    save_plot,
    set_numpy_weights,
)

from kmask.losses import MaskedSparseCategoricalCrossentropy
from kmask.metrics import (
    MaskedMeanMetricWrapper,
    MaskedSparseCategoricalAccuracy,
    Perplexity,
)
from kmask.report import mask_report

NUM_SEQUENCES, MAX_LENGTH, VOCABULARY, NUM_TAGS = 64, 12, 20, 3
PAD_TOKEN, PAD_LABEL = 0, -100
BATCH_SIZE = 16


def make_data(seed: int = 0):
    """Random tokens 1..19 tagged `token % 3`, right-padded to 12 steps."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, MAX_LENGTH + 1, NUM_SEQUENCES)
    real = np.arange(MAX_LENGTH)[None, :] < lengths[:, None]
    tokens = np.where(real, rng.randint(1, VOCABULARY, real.shape), PAD_TOKEN)
    labels = np.where(real, tokens % NUM_TAGS, PAD_LABEL)
    return tokens.astype("int32"), labels.astype("int32")


def build_model() -> keras.Model:
    tokens = keras.Input((MAX_LENGTH,), dtype="int32")
    embedded = keras.layers.Embedding(VOCABULARY, 8, mask_zero=True)(tokens)
    hidden = keras.layers.GRU(16, return_sequences=True)(embedded)
    logits = keras.layers.Dense(NUM_TAGS)(hidden)
    model = keras.Model(tokens, logits)
    set_numpy_weights(model, seed=1)
    return model


def numpy_numbers(labels: np.ndarray, logits: np.ndarray) -> dict:
    """Cross-entropy, accuracy and perplexity over the real tokens, and the
    same counting every step (padded labels read as tag 0)."""
    logits = logits.astype("float64")
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    real = labels != PAD_LABEL
    as_tags = np.where(real, labels, 0)
    cross_entropy = -np.take_along_axis(log_probs, as_tags[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == as_tags
    masked_loss = cross_entropy[real].mean()
    return {
        "masked loss": masked_loss,
        "unmasked loss": cross_entropy.mean(),
        "masked accuracy": correct[real].mean(),
        "unmasked accuracy": correct.mean(),
        "masked perplexity": np.exp(masked_loss),
    }


def main() -> int:
    keras.utils.set_random_seed(0)
    tokens, labels = make_data()
    model = build_model()
    loss = MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=PAD_LABEL)
    model.compile(
        # Not Adam: on TensorFlow it updates the embedding rows a batch does
        # not use differently (sparse gradients), and this example prints the
        # same numbers on every backend.
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=loss,
        metrics=[
            MaskedSparseCategoricalAccuracy(mask_value=PAD_LABEL, name="accuracy"),
            Perplexity(from_logits=True, mask_value=PAD_LABEL),
            MaskedMeanMetricWrapper(loss, name="token_mean_loss"),
        ],
    )
    print(f"backend: {keras.backend.backend()}")
    print(mask_report(model))
    print()

    def losses(logits):
        found = numpy_numbers(labels, logits)
        return {name: found[name] for name in ("masked loss", "unmasked loss")}

    curves, _ = fit_with_curves(model, tokens, labels, losses, BATCH_SIZE)
    print()

    results = model.evaluate(
        tokens, labels, batch_size=BATCH_SIZE, verbose=0, return_dict=True
    )
    reference = numpy_numbers(labels, model.predict(tokens, verbose=0))
    print(
        f"padding counted, as NumPy finds it: loss {reference['unmasked loss']:.6f}, "
        f"accuracy {reference['unmasked accuracy']:.6f}"
    )
    print(
        f"Keras's `loss` in evaluate (a mean of {len(tokens) // BATCH_SIZE} batch "
        f"means, batches of different token counts): {results['loss']:.6f}"
    )
    ok = check(
        [
            ("token mean loss", results["token_mean_loss"], reference["masked loss"]),
            ("accuracy", results["accuracy"], reference["masked accuracy"]),
            ("perplexity", results["perplexity"], reference["masked perplexity"]),
        ]
    )
    save_plot(curves, "tagging_loss.png", "tagging: real tokens vs all steps")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
