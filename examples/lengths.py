"""A model fed sequence lengths: `LengthMask` masks what lies past each length.

No pad value needed: the padded steps here hold random noise. The sequences
are left-padded (the seed's `##abb`), so the layer takes `padding="pre"`.
`LengthMask("pre")([x, lengths])` puts `kmask.masks.sequence_mask(lengths, time,
"pre")` on `x`, and the LSTM skips the padded steps. From Keras 3.16 the LSTM
no longer passes the mask on, so a second `LengthMask` after it puts the mask
on the output (on Keras 3.15 it is the same mask again), where Keras's plain
`loss="categorical_crossentropy"` honours it.

    KERAS_BACKEND=tensorflow python examples/lengths.py   # KMASK_EXAMPLE_EPOCHS=5

Prints masked and unmasked numbers beside NumPy, and exits with 1 if kmask and
NumPy disagree.
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

from kmask.layers import LengthMask
from kmask.metrics import MaskedCategoricalAccuracy
from kmask.report import mask_report

NUM_SEQUENCES, MAX_LENGTH, FEATURES, CLASSES = 48, 8, 3, 3
BATCH_SIZE = 16


def make_data(seed: int = 0):
    """Each real step's class is the arg max of its features; the padded steps
    (on the left) hold noise and an all-zero target."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, MAX_LENGTH + 1, NUM_SEQUENCES)
    real = np.arange(MAX_LENGTH)[None, :] >= MAX_LENGTH - lengths[:, None]
    x = rng.normal(size=(NUM_SEQUENCES, MAX_LENGTH, FEATURES))
    one_hot = np.eye(CLASSES)[x.argmax(-1)]
    x = np.where(real[..., None], x, 5.0 * rng.normal(size=x.shape))
    y = np.where(real[..., None], one_hot, 0.0)
    return x.astype("float32"), lengths.astype("int32"), y.astype("float32"), real


def build_model(padding: str) -> keras.Model:
    steps = keras.Input((MAX_LENGTH, FEATURES), name="steps")
    lengths = keras.Input((), dtype="int32", name="lengths")
    masked = LengthMask(padding=padding)([steps, lengths])
    hidden = keras.layers.LSTM(8, return_sequences=True)(masked)
    hidden = LengthMask(padding=padding)([hidden, lengths])
    probs = keras.layers.Dense(CLASSES, activation="softmax")(hidden)
    model = keras.Model([steps, lengths], probs)
    set_numpy_weights(model, seed=1)
    return model


def numpy_numbers(y_true: np.ndarray, y_pred: np.ndarray, real: np.ndarray) -> dict:
    """Cross-entropy and accuracy over the real steps, and over every step."""
    probs = np.clip(y_pred.astype("float64"), 1e-7, 1 - 1e-7)
    cross_entropy = -(y_true * np.log(probs)).sum(-1)
    correct = y_true.argmax(-1) == y_pred.argmax(-1)
    return {
        "masked loss": cross_entropy[real].mean(),
        "unmasked loss": cross_entropy.mean(),
        "masked accuracy": correct[real].mean(),
    }


def main() -> int:
    keras.utils.set_random_seed(0)
    x, lengths, y, real = make_data()
    model = build_model("pre")
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="categorical_crossentropy",
        metrics=[MaskedCategoricalAccuracy(name="accuracy")],
    )
    print(f"backend: {keras.backend.backend()}")
    print(mask_report(model))
    print()

    def losses(y_pred):
        found = numpy_numbers(y, y_pred, real)
        return {name: found[name] for name in ("masked loss", "unmasked loss")}

    curves, _ = fit_with_curves(model, [x, lengths], y, losses, BATCH_SIZE)
    print()

    # One batch, so Keras's loss is the token mean of the whole data set.
    results = model.evaluate(
        [x, lengths], y, batch_size=len(x), verbose=0, return_dict=True
    )
    reference = numpy_numbers(y, model.predict([x, lengths], verbose=0), real)
    print(f"unmasked (padding counted), NumPy: {reference['unmasked loss']:.6f}")
    ok = check(
        [
            ("built-in loss", results["loss"], reference["masked loss"]),
            ("accuracy", results["accuracy"], reference["masked accuracy"]),
        ]
    )
    save_plot(curves, "lengths_loss.png", "lengths: real steps vs all steps")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
