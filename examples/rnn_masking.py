"""Keras 3.16 turns RNN mask propagation off: what changes, and the one-line fixes.

keras-nightly 3.16 (keras-team/keras #23235) sets `supports_masking = False`
on `RNN`, `Bidirectional` and `TimeDistributed`. A `Masking` ->
`LSTM(return_sequences=True)` model then no longer carries its mask to the
loss, and Keras's built-in loss averages over the padding. This script
evaluates two models with fixed NumPy weights, each loss set-up in turn, and
says of each number whether it is NumPy's masked mean or its unmasked mean:

- `seed`: the seed's seq2seq model (`Masking` -> `LSTM` -> `RepeatVector` ->
  `LSTM(return_sequences=True)` -> `Dense`), left padding, pad step `[0, 0, 1]`;
- `tagger`: `Masking` -> `LSTM(return_sequences=True)` -> `Dense`, right
  padding, pad step `[0, 0, 0]`.

The set-ups (columns): Keras's built-in loss; a kmask loss reading the
propagated mask (`MaskedCategoricalCrossentropy()`); a kmask loss finding
the pad step in the targets (`mask_value=`); a kmask loss given the mask as
`sample_weight=kmask.sequence_mask(lengths, T)`; `AttachMask` after the
model; `LengthMask` on the output, fed the sequence lengths.

It also measures whether the RNN still skips padded steps in its own
recurrence: the real steps' outputs of the masked LSTM against the same LSTM
run on each sequence alone, unpadded.

    python examples/rnn_masking.py                   # every installed backend
    python examples/rnn_masking.py --backends torch

Exits 1 when a number matches neither NumPy mean, when a set-up that must be
masked on every Keras (mask_value, sample_weight, AttachMask, LengthMask) is
not, or when post-padding changes the real steps' outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from seed_seq2seq import (
    BACKENDS,
    PAD_VECTOR,
    TOLERANCE,
    Y_TRUE,
    X,
    agrees,
    build_seed_model,
    run_in_subprocess,
)

SETUPS = (
    "built-in",
    "kmask, propagated mask",
    "kmask, mask_value",
    "kmask, sample_weight",
    "AttachMask",
    "LengthMask",
)
# Masked on every Keras line: they do not depend on the RNN passing the mask on.
ALWAYS_MASKED = SETUPS[2:]


def seed_data():
    """The seed's batch ['##abb', '#babb'] (left padding), its lengths and pad."""
    import numpy as np

    x = np.asarray(X, "float32")
    y = np.asarray(Y_TRUE, "float32")
    lengths = (x.sum(-1) > 0).sum(-1).astype("int32")
    return x, y, lengths, "pre", PAD_VECTOR


def tagger_data():
    """Right-padded random steps; a step's class is its features' arg max."""
    import numpy as np

    rng = np.random.RandomState(0)
    lengths = np.array([6, 2, 4, 1], "int32")
    real = np.arange(6)[None, :] < lengths[:, None]
    x = np.where(real[..., None], rng.uniform(0.1, 1.0, (4, 6, 3)), 0.0)
    y = np.where(real[..., None], np.eye(3)[x.argmax(-1)], 0.0)
    return x.astype("float32"), y.astype("float32"), lengths, "post", [0, 0, 0]


def build_tagger():
    import keras
    import numpy as np

    inputs = keras.Input((6, 3))
    masked = keras.layers.Masking(name="masking")(inputs)
    hidden = keras.layers.LSTM(8, return_sequences=True, name="lstm")(masked)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.RandomState(7)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape) for w in model.get_weights()])
    return model


def numpy_means(y_true, y_pred, pad) -> tuple[float, float]:
    """NumPy's masked and unmasked mean cross-entropy."""
    import numpy as np

    y_true = np.asarray(y_true, "float64")
    probs = np.clip(np.asarray(y_pred, "float64"), 1e-7, 1 - 1e-7)
    probs = probs / probs.sum(-1, keepdims=True)
    per_step = -(y_true * np.log(probs)).sum(-1)
    real = ~np.all(y_true == np.asarray(pad, "float64"), axis=-1)
    return float(per_step[real].mean()), float(per_step.mean())


def evaluate_setups(model, x, y, lengths, padding, pad) -> dict:
    """Each set-up's loss, labelled with the NumPy mean it equals."""
    import keras

    import kmask

    masking_output = model.get_layer("masking").output
    attached = keras.Model(
        model.input, kmask.AttachMask()([model.output, masking_output])
    )
    lengths_input = keras.Input((), dtype="int32", name="lengths")
    length_masked = keras.Model(
        [model.input, lengths_input],
        kmask.LengthMask(padding=padding)([model.output, lengths_input]),
    )
    weights = kmask.sequence_mask(lengths, x.shape[1], padding=padding)
    runs = {
        "built-in": (model, "categorical_crossentropy", x, None),
        "kmask, propagated mask": (
            model,
            kmask.MaskedCategoricalCrossentropy(),
            x,
            None,
        ),
        "kmask, mask_value": (
            model,
            kmask.MaskedCategoricalCrossentropy(mask_value=pad),
            x,
            None,
        ),
        "kmask, sample_weight": (
            model,
            kmask.MaskedCategoricalCrossentropy(),
            x,
            keras.ops.convert_to_numpy(weights).astype("float32"),
        ),
        "AttachMask": (attached, "categorical_crossentropy", x, None),
        "LengthMask": (length_masked, "categorical_crossentropy", [x, lengths], None),
    }
    masked, unmasked = numpy_means(y, model.predict(x, verbose=0), pad)
    found = {}
    for name, (net, loss, inputs, sample_weight) in runs.items():
        net.compile(loss=loss)
        value = float(
            net.evaluate(
                inputs, y, sample_weight=sample_weight, batch_size=len(x), verbose=0
            )
        )
        if agrees(value, masked):
            label = "masked"
        elif agrees(value, unmasked):
            label = "unmasked"
        else:
            label = f"MISMATCH (NumPy masked {masked:.6f}, unmasked {unmasked:.6f})"
        found[name] = {"value": value, "label": label}
    return found


def recurrence_gaps() -> dict:
    """Largest gap between an LSTM's real-step outputs on a padded batch and
    the same LSTM on each sequence alone. Padding (zeros) comes before ("pre")
    or after ("post") the real steps; the set-ups are: a `Masking` layer right
    in front, no mask at all, and the second of two stacked LSTMs behind
    `Masking` (on Keras 3.16 the first one no longer passes the mask on)."""
    import keras
    import numpy as np

    rng = np.random.RandomState(3)
    lengths = [5, 2, 3]
    steps = [rng.uniform(0.1, 1.0, (n, 2)).astype("float32") for n in lengths]
    first = keras.layers.LSTM(4, return_sequences=True)
    second = keras.layers.LSTM(4, return_sequences=True)
    first.build((None, None, 2))
    second.build((None, None, 4))
    # Random biases too: with zero biases a zero step leaves a zero state as it is.
    for lstm in (first, second):
        lstm.set_weights([rng.uniform(-0.5, 0.5, w.shape) for w in lstm.get_weights()])
    masking = keras.layers.Masking()
    setups = {
        "Masking": (lambda x: first(masking(x)), first),
        "no mask": (first, first),
        "2nd stacked LSTM": (
            lambda x: second(first(masking(x))),
            lambda x: second(first(x)),
        ),
    }
    gaps = {}
    for padding in ("post", "pre"):
        padded = np.zeros((len(lengths), max(lengths), 2), "float32")
        for row, sequence in enumerate(steps):
            if padding == "post":
                padded[row, : len(sequence)] = sequence
            else:
                padded[row, max(lengths) - len(sequence) :] = sequence
        for name, (on_batch, alone) in setups.items():
            outputs = keras.ops.convert_to_numpy(on_batch(padded))
            gap = 0.0
            for row, sequence in enumerate(steps):
                expected = keras.ops.convert_to_numpy(alone(sequence[None]))[0]
                real = (
                    outputs[row, : len(sequence)]
                    if padding == "post"
                    else outputs[row, max(lengths) - len(sequence) :]
                )
                gap = max(gap, float(np.abs(real - expected).max()))
            gaps[f"{padding}, {name}"] = gap
    return gaps


def run_backend() -> dict:
    import keras

    models = {
        "seed": (build_seed_model(), *seed_data()),
        "tagger": (build_tagger(), *tagger_data()),
    }
    return {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "models": {
            name: evaluate_setups(*arguments) for name, arguments in models.items()
        },
        "recurrence": recurrence_gaps(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_backend()))
        return 0

    rows = [
        run_in_subprocess(backend, __file__)
        for backend in args.backends
        if importlib.util.find_spec(backend) is not None
    ]
    header = ("model", "Keras", "backend", *SETUPS)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    all_ok = True
    for model in ("seed", "tagger"):
        for row in rows:
            found = row["models"][model]
            cells = [
                f"{found[name]['value']:.6f} {found[name]['label']}" for name in SETUPS
            ]
            ok = all(found[name]["label"] in ("masked", "unmasked") for name in SETUPS)
            ok &= all(found[name]["label"] == "masked" for name in ALWAYS_MASKED)
            all_ok &= ok
            print(
                "| " + " | ".join([model, row["keras"], row["backend"], *cells]) + " |"
            )
    print()
    print("Largest gap, real steps of a masked LSTM vs each sequence run alone:")
    gap_names = list(rows[0]["recurrence"]) if rows else []
    header = ("Keras", "backend", *gap_names)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [f"{row['recurrence'][name]:.1e}" for name in gap_names]
        print("| " + " | ".join([row["keras"], row["backend"], *cells]) + " |")
    # What kmask recommends rests on this: after post-padding, a forward RNN's
    # real steps never see the padding, whether or not a mask reaches it.
    all_ok &= all(
        gap <= TOLERANCE
        for row in rows
        for name, gap in row["recurrence"].items()
        if name.startswith("post")
    )
    if not all_ok:
        print(
            "\nMISMATCH: a number matches neither NumPy mean, a fix is not masked, "
            "or post-padding changed the real steps"
        )
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
