"""A small language model whose last layer is `kmask.FusedLinearCrossentropy`.

The layer owns the output projection (`hidden @ kernel + bias`) and adds the
masked cross-entropy of the next token to the model's loss, a chunk of tokens
at a time, forward and backward, so the `[batch, time, vocabulary]` logits
and their gradient are never held (see `kmask.fused`). The sequences have
random lengths: token 0 pads the inputs (the mask `Embedding(mask_zero=True)`
starts reaches the layer too) and -100 pads the labels.

    KERAS_BACKEND=torch python examples/language_model.py   # KMASK_EXAMPLE_EPOCHS=3

Trains briefly, then prints the loss `evaluate` reports beside NumPy (float64,
from the model's hidden states and the layer's weights) and beside the
materialised `Dense` + `MaskedSparseCategoricalCrossentropy` on the same
weights; exits with 1 if they disagree.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
from _common import check, epochs, set_numpy_weights
from keras import ops

import kmask

NUM_SEQUENCES, MAX_LENGTH, VOCABULARY, WIDTH = 64, 16, 512, 32
PAD_TOKEN, PAD_LABEL = 0, -100
CHUNK_SIZE = 128


def make_data(seed: int = 0):
    """Sequences where each token determines the next; labels are the inputs
    shifted by one step."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(2, MAX_LENGTH + 2, NUM_SEQUENCES)
    sequences = np.zeros((NUM_SEQUENCES, MAX_LENGTH + 1), "int64")
    sequences[:, 0] = rng.randint(1, VOCABULARY, NUM_SEQUENCES)
    for step in range(1, MAX_LENGTH + 1):
        sequences[:, step] = (sequences[:, step - 1] * 7 + 3) % (VOCABULARY - 1) + 1
    positions = np.arange(MAX_LENGTH + 1)[None, :]
    sequences = np.where(positions < lengths[:, None], sequences, PAD_TOKEN)
    tokens = sequences[:, :-1]
    labels = np.where(sequences[:, 1:] == PAD_TOKEN, PAD_LABEL, sequences[:, 1:])
    return tokens.astype("int32"), labels.astype("int32")


def build_model() -> keras.Model:
    tokens = keras.Input((MAX_LENGTH,), dtype="int32", name="tokens")
    labels = keras.Input((MAX_LENGTH,), dtype="int32", name="labels")
    hidden = keras.layers.Embedding(VOCABULARY, WIDTH, mask_zero=True)(tokens)
    hidden = keras.layers.GRU(WIDTH, return_sequences=True, name="features")(hidden)
    head = kmask.FusedLinearCrossentropy(
        VOCABULARY, mask_value=PAD_LABEL, chunk_size=CHUNK_SIZE, name="head"
    )
    model = keras.Model([tokens, labels], head([hidden, labels]))
    set_numpy_weights(model, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=None)
    return model


def numpy_loss(hidden: np.ndarray, kernel, bias, labels) -> float:
    """The token mean of the cross-entropy of `hidden @ kernel + bias`."""
    real = labels != PAD_LABEL
    logits = hidden[real].astype("float64") @ kernel + bias
    top = logits.max(-1, keepdims=True)
    log_normalizer = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    label_logits = logits[np.arange(len(logits)), labels[real]]
    return float((log_normalizer - label_logits).mean())


def main() -> int:
    keras.utils.set_random_seed(0)
    tokens, labels = make_data()
    model = build_model()
    print(
        f"backend {keras.backend.backend()}: {int((labels != PAD_LABEL).sum())} real "
        f"tokens; the logits would be {tokens.size} x {VOCABULARY} floats, the "
        f"layer holds {CHUNK_SIZE} x {VOCABULARY} at a time"
    )
    history = model.fit(
        [tokens, labels], epochs=epochs(3), batch_size=16, shuffle=False, verbose=0
    )
    for epoch, loss in enumerate(history.history["loss"], start=1):
        print(f"epoch {epoch}: loss {loss:.4f}")
    # One batch, so that evaluate's loss is the token mean over all the data.
    evaluated = model.evaluate([tokens, labels], batch_size=NUM_SEQUENCES, verbose=0)
    features = keras.Model(model.inputs[0], model.get_layer("features").output)
    hidden = ops.convert_to_numpy(features(tokens))
    kernel, bias = model.get_layer("head").get_weights()
    materialised = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD_LABEL
    )(labels, ops.add(ops.matmul(hidden, kernel), bias))
    expected = numpy_loss(hidden, kernel, bias, labels)
    ok = check(
        [
            ("evaluate, FusedLinearCrossentropy (chunked)", float(evaluated), expected),
            (
                "Dense + MaskedSparseCategoricalCrossentropy",
                float(materialised),
                expected,
            ),
        ]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
