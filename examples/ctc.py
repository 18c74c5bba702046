"""Masked CTC on a small speech-like task: padded frames, padded labels.

Each utterance spells 1 to 5 symbols (classes 1-4, 0 is the CTC blank); each
symbol lasts 2 or 3 frames of noisy features, with a silent frame now and
then. Utterances are 6 to 24 frames long, padded to 24 frames of noise; the
labels are padded with -1. The frame lengths go through `kmask.LengthMask`
into a small model trained with `fit()` and `kmask.MaskedCTC`.

    KERAS_BACKEND=jax python examples/ctc.py   # KMASK_EXAMPLE_EPOCHS=15

Prints, on the trained model, Keras's `CTC` (which aligns every padded frame
as if it were real), kmask and a NumPy CTC side by side, then greedy-decoded
outputs. Exits with 1 if kmask and NumPy disagree, or if kmask's
`sum_over_batch_size` differs from Keras's `CTC` on the utterances that need
no padding.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
from _common import check, epochs, set_numpy_weights

import kmask

UTTERANCES, MAX_FRAMES, FEATURES, CLASSES, MAX_LABELS = 96, 24, 6, 5, 5
BLANK, PAD_LABEL, BATCH_SIZE = 0, -1, 16


def make_data(seed: int = 0):
    """Frames `[n, MAX_FRAMES, FEATURES]` (noise past each length), their
    lengths, and labels `[n, MAX_LABELS]` padded with -1. The last 16
    utterances fill every frame (silence at the end), for the comparison
    with Keras's `CTC`."""
    rng = np.random.RandomState(seed)
    x = rng.normal(scale=2.0, size=(UTTERANCES, MAX_FRAMES, FEATURES))
    y = np.full((UTTERANCES, MAX_LABELS), PAD_LABEL)
    lengths = np.zeros(UTTERANCES, int)
    for n in range(UTTERANCES):
        symbols, frames = [], []
        for symbol in rng.randint(1, CLASSES, rng.randint(1, MAX_LABELS + 1)):
            # Silence now and then, and always between two equal symbols.
            silence = rng.rand() < 0.3 or bool(symbols and symbols[-1] == symbol)
            sound = [BLANK] * silence + [symbol] * rng.randint(2, 4)
            if len(frames) + len(sound) > MAX_FRAMES:
                break
            symbols.append(symbol)
            frames += sound
        if n >= UTTERANCES - 16:
            frames += [BLANK] * (MAX_FRAMES - len(frames))
        lengths[n] = len(frames)
        y[n, : len(symbols)] = symbols
        x[n, : len(frames)] = np.eye(CLASSES, FEATURES)[frames] * 2.0
        x[n, : len(frames)] += rng.normal(scale=0.3, size=(len(frames), FEATURES))
    return x.astype("float32"), lengths.astype("int32"), y.astype("int32")


def build_model() -> keras.Model:
    frames = keras.Input((MAX_FRAMES, FEATURES), name="frames")
    lengths = keras.Input((), dtype="int32", name="lengths")
    masked = kmask.LengthMask()([frames, lengths])
    hidden = keras.layers.Dense(16, activation="tanh")(masked)
    logits = keras.layers.Dense(CLASSES)(hidden)
    model = keras.Model([frames, lengths], logits)
    set_numpy_weights(model, seed=1)
    return model


def numpy_ctc(labels, logits) -> float:
    """-log p(labels | logits): the CTC forward pass over the blank-extended
    labels, vectorized along them, in float64."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    extended = np.full(2 * len(labels) + 1, BLANK)
    extended[1::2] = labels
    # A state may skip the blank before it unless it repeats the label two back.
    skip = np.zeros(len(extended), bool)
    skip[2:] = (extended[2:] != BLANK) & (extended[2:] != extended[:-2])
    alpha = np.full(len(extended), -np.inf)
    alpha[:2] = log_probs[0, extended[:2]]
    for frame_log_probs in log_probs[1:]:
        stay = alpha
        step = np.concatenate([[-np.inf], alpha[:-1]])
        jump = np.where(skip, np.concatenate([[-np.inf, -np.inf], alpha[:-2]]), -np.inf)
        alpha = np.logaddexp(np.logaddexp(stay, step), jump)
        alpha = alpha + frame_log_probs[extended]
    return float(-np.logaddexp.reduce(alpha[-2:]))


def greedy_decode(logits, length: int) -> list[int]:
    best = logits[:length].argmax(-1)
    merged = [s for i, s in enumerate(best) if i == 0 or s != best[i - 1]]
    return [int(s) for s in merged if s != BLANK]


def main() -> int:
    keras.utils.set_random_seed(0)
    x, lengths, y = make_data()
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=kmask.MaskedCTC())
    print(f"backend: {keras.backend.backend()}")
    history = model.fit(
        [x, lengths],
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs(15),
        shuffle=False,
        verbose=0,
    )
    print("epoch | MaskedCTC (token mean, logged by fit)")
    for epoch, value in enumerate(history.history["loss"], start=1):
        print(f"{epoch} | {value:.4f}")
    print()

    logits = model.predict([x, lengths], verbose=0)
    label_lengths = (y != PAD_LABEL).sum(1)
    per_utterance = np.array(
        [
            numpy_ctc(y[n, : label_lengths[n]], logits[n, : lengths[n]])
            for n in range(len(y))
        ]
    )
    # Keras's CTC takes 0 as the pad (and blank) and every frame as real.
    keras_labels = np.where(y == PAD_LABEL, 0, y)
    keras_ctc = float(keras.losses.CTC()(keras_labels, logits))
    keras_numpy = np.mean(
        [numpy_ctc(y[n, : label_lengths[n]], logits[n]) for n in range(len(y))]
    )
    # One batch: `evaluate` gives MaskedCTC's token mean over the whole set,
    # the frames masked by the model's LengthMask.
    evaluated = model.evaluate([x, lengths], y, batch_size=UTTERANCES, verbose=0)
    mask = kmask.sequence_mask(lengths, MAX_FRAMES)
    found = {
        "token_mean": float(kmask.masked_ctc(y, logits, mask)),
        "sum_over_batch_size": float(
            kmask.masked_ctc(y, logits, mask, reduction="sum_over_batch_size")
        ),
    }
    full = slice(UTTERANCES - 16, UTTERANCES)
    kmask_full = float(
        kmask.masked_ctc(y[full], logits[full], reduction="sum_over_batch_size")
    )
    keras_full = float(keras.losses.CTC()(keras_labels[full], logits[full]))
    token_mean = per_utterance.sum() / label_lengths.sum()
    rows = [
        ("evaluate(): MaskedCTC through LengthMask", float(evaluated), token_mean),
        ("masked_ctc, token mean", found["token_mean"], token_mean),
        (
            "masked_ctc, mean over utterances",
            found["sum_over_batch_size"],
            per_utterance.mean(),
        ),
        ("Keras CTC (padded frames aligned)", keras_ctc, keras_numpy),
        ("no padding: kmask vs Keras CTC", kmask_full, keras_full),
    ]
    ok = check(rows, header="quantity | value | NumPy (or Keras)")
    print(
        f"Keras's CTC over padded frames is {keras_ctc:.4f}; over the real frames "
        f"the same utterances give {per_utterance.mean():.4f}."
    )
    print()

    decoded = [greedy_decode(logits[n], lengths[n]) for n in range(len(y))]
    targets = [y[n, : label_lengths[n]].tolist() for n in range(len(y))]
    right = sum(d == t for d, t in zip(decoded, targets, strict=True))
    print("utterance | frames | labels | greedy decoding")
    for n in range(0, UTTERANCES, 16):
        print(f"{n} | {lengths[n]} | {targets[n]} | {decoded[n]}")
    print(f"exact transcriptions: {right}/{len(y)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
