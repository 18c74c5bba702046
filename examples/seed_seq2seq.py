"""The seed's seq2seq model: Keras's built-in loss counts padding, kmask does not.

The encoder `LSTM(return_sequences=False)` and `RepeatVector` drop the mask that
`Masking` started, so `loss="categorical_crossentropy"` silently averages over
the padded steps too. `kmask.MaskedCategoricalCrossentropy(mask_value=[0, 0, 1])`
finds the padding in the targets instead.

    python examples/seed_seq2seq.py                      # every installed backend
    python examples/seed_seq2seq.py --backends jax torch

Each backend runs in its own subprocess (the backend is fixed per process) with
the same fixed weights, so every row shows the same numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

BACKENDS = ("tensorflow", "jax", "torch")
MAX_SENTENCE_LENGTH = 5
PAD_VECTOR = [0, 0, 1]  # the one-hot code of the placeholder '#'
TOLERANCE = 1e-5

# The batch is ['##abb', '#babb']: left padding, pad step one-hot [0, 0, 1].
X = [
    [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
    [[0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
]
Y_TRUE = [
    [[0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
    [[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
]


def build_seed_model():
    """The seed's model with fixed weights drawn by NumPy (same on every backend)."""
    import keras
    import numpy as np
    from keras import layers

    inputs = keras.Input(shape=(MAX_SENTENCE_LENGTH, 3))
    masked = layers.Masking(mask_value=0.0, name="masking")(inputs)
    encoded = layers.LSTM(10, return_sequences=False, name="encoder")(masked)
    repeated = layers.RepeatVector(MAX_SENTENCE_LENGTH)(encoded)
    decoded = layers.LSTM(10, return_sequences=True, name="decoder")(repeated)
    outputs = layers.Dense(3, activation="softmax")(decoded)
    model = keras.Model(inputs, outputs)
    rng = np.random.RandomState(123)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape) for w in model.get_weights()])
    return model


def numpy_references(y_true, y_pred):
    """Masked and unmasked mean cross-entropy, computed in NumPy."""
    import numpy as np

    y_true = np.asarray(y_true, dtype="float64")
    y_pred = np.asarray(y_pred, dtype="float64")
    probs = np.clip(y_pred / y_pred.sum(-1, keepdims=True), 1e-7, 1 - 1e-7)
    per_step = -(y_true * np.log(probs)).sum(-1)
    real = ~np.all(y_true == np.asarray(PAD_VECTOR), axis=-1)
    return float(per_step[real].mean()), float(per_step.mean())


def run_backend() -> dict:
    """Evaluates the seed model on this process's backend."""
    import keras
    import numpy as np

    import kmask

    x = np.asarray(X, dtype="float32")
    y_true = np.asarray(Y_TRUE, dtype="float32")
    model = build_seed_model()
    model.compile(loss="categorical_crossentropy")
    builtin = model.evaluate(x, y_true, verbose=0)
    # The report runs the model once on the batch and reads the masks Keras
    # attaches at run time.
    report = kmask.mask_report(model, x)
    model.compile(loss=kmask.MaskedCategoricalCrossentropy(mask_value=PAD_VECTOR))
    masked = model.evaluate(x, y_true, verbose=0)
    y_pred = model.predict(x, verbose=0)
    masked_reference, unmasked_reference = numpy_references(y_true, y_pred)
    restored = keras.Model(
        model.input,
        kmask.AttachMask()([model.output, model.get_layer("masking").output]),
    )
    restored.compile(loss="categorical_crossentropy")
    # The seed model as a block of a bigger one, compiled with the kmask loss:
    # its layers show indented, and the verdict counts the loss's mask_value.
    steps = keras.Input(model.input.shape[1:], name="steps")
    bigger = keras.Model(steps, model(steps), name="bigger")
    bigger.compile(loss=kmask.MaskedCategoricalCrossentropy(mask_value=PAD_VECTOR))
    return {
        "backend": keras.backend.backend(),
        "report": str(report),
        "report_restored": str(kmask.mask_report(restored, x)),
        "report_nested": str(kmask.mask_report(bigger, x)),
        "builtin": float(builtin),
        "attach_mask": float(restored.evaluate(x, y_true, verbose=0)),
        "kmask": float(masked),
        "numpy_masked": masked_reference,
        "numpy_unmasked": unmasked_reference,
    }


def run_in_subprocess(backend: str, script: str = __file__) -> dict:
    """Runs `script --worker` under `backend`; the JSON on its last line."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, script, "--worker"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{backend} worker failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def agrees(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(1.0, abs(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_backend()))
        return 0

    header = (
        "backend",
        "Keras built-in evaluate",
        "AttachMask + built-in",
        "kmask evaluate",
        "NumPy masked",
        "NumPy unmasked",
    )
    rows = {}
    for backend in args.backends:
        if importlib.util.find_spec(backend) is not None:
            rows[backend] = run_in_subprocess(backend)
    if rows:
        first = next(iter(rows.values()))
        print(first["report"], end="\n\n")
        print("after AttachMask()([outputs, masking.output]):")
        print(first["report_restored"], end="\n\n")
        print("the seed model nested in a bigger one, compiled with the kmask loss:")
        print(first["report_nested"], end="\n\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    all_ok = True
    for backend in args.backends:
        if backend not in rows:
            print(f"| {backend} | not installed | | | | |")
            continue
        row = rows[backend]
        ok = (
            agrees(row["builtin"], row["numpy_unmasked"])
            and agrees(row["attach_mask"], row["numpy_masked"])
            and agrees(row["kmask"], row["numpy_masked"])
        )
        all_ok &= ok
        cells = [f"{row[key]:.6f}" for key in ("builtin", "attach_mask", "kmask")]
        cells += [f"{row[key]:.6f}" for key in ("numpy_masked", "numpy_unmasked")]
        print("| " + " | ".join([backend, *cells]) + " |" + ("" if ok else " MISMATCH"))
    print()
    if all_ok:
        print(
            "On every backend the built-in loss is the unmasked mean (padding "
            "counted) and kmask is the masked NumPy reference."
        )
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
