"""A tagger whose class 0 is 90 % of the tokens, trained with and without
class weights on the sequence labels.

Keras's `fit(class_weight=...)` refuses `[batch, time]` labels; kmask's loss
takes `class_weight=` itself. The weights come from
`kmask.class_weight_for` (inverse frequencies, padding left out). Each
class's recall is read with `kmask.MaskedSparseCategoricalAccuracy` whose
class weights are 1 for that class and 0 for the others, beside NumPy's
recall of the same predictions; the balanced accuracy is the accuracy
weighted by the inverse frequencies, beside NumPy's mean recall.

    KERAS_BACKEND=jax python examples/class_weight.py
"""

from __future__ import annotations

import sys

import keras
import numpy as np
from _common import agrees, epochs, set_numpy_weights

import kmask

PAD = -100
SHARES = (0.9, 0.06, 0.04)
CENTRES = np.array([[0.0, 0.0], [1.6, 0.0], [0.0, 1.6]])
BATCH, TIME = 256, 12


def make_data(seed: int):
    """`[BATCH, TIME, 2]` features around each class's centre and the
    labels, `PAD` after each sequence's length."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(SHARES), size=(BATCH, TIME), p=SHARES)
    features = CENTRES[labels] + rng.normal(size=(BATCH, TIME, 2))
    lengths = rng.integers(4, TIME + 1, BATCH)
    real = np.arange(TIME)[None, :] < lengths[:, None]
    return features.astype("float32"), np.where(real, labels, PAD).astype("int32")


def train(features, labels, class_weight):
    inputs = keras.Input((TIME, 2))
    model = keras.Model(inputs, keras.layers.Dense(len(SHARES))(inputs))
    set_numpy_weights(model, seed=0)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=kmask.MaskedSparseCategoricalCrossentropy(
            from_logits=True, mask_value=PAD, class_weight=class_weight
        ),
    )
    model.fit(
        features, labels, batch_size=32, epochs=epochs(20), shuffle=False, verbose=0
    )
    return model


def recalls(predictions, labels):
    """Per class: kmask's class-weighted accuracy and NumPy's recall."""
    predicted = predictions.argmax(-1)
    found = []
    for class_id in range(len(SHARES)):
        only = [1.0 if c == class_id else 0.0 for c in range(len(SHARES))]
        metric = kmask.MaskedSparseCategoricalAccuracy(
            mask_value=PAD, class_weight=only
        )
        metric.update_state(labels, predictions)
        in_class = labels == class_id
        found.append(
            (float(metric.result()), float((predicted[in_class] == class_id).mean()))
        )
    return found


def main() -> int:
    features, labels = make_data(seed=1)
    test_features, test_labels = make_data(seed=2)
    weights = kmask.class_weight_for(labels, mask_value=PAD)
    print(f"backend {keras.backend.backend()}; class shares {SHARES}")
    print(
        "class weights (kmask.class_weight_for):",
        {c: round(w, 3) for c, w in weights.items()},
    )
    rows, ok = {}, True
    for name, class_weight in (("without", None), ("with", weights)):
        model = train(features, labels, class_weight)
        predictions = np.asarray(model.predict(test_features, verbose=0))
        rows[name] = recalls(predictions, test_labels)
        balanced = kmask.MaskedSparseCategoricalAccuracy(
            mask_value=PAD,
            class_weight=kmask.class_weight_for(test_labels, mask_value=PAD),
        )
        balanced.update_state(test_labels, predictions)
        numpy_balanced = np.mean([numpy for _, numpy in rows[name]])
        rows[name].append((float(balanced.result()), float(numpy_balanced)))
        ok &= all(agrees(got, want) for got, want in rows[name])
    print("\nrecall on held-out data (kmask metric / NumPy)")
    print("| class | share | without class_weight | with class_weight |")
    print("|---|---|---|---|")
    names = [str(c) for c in range(len(SHARES))] + ["balanced"]
    shares = [f"{s:.0%}" for s in SHARES] + ["-"]
    for index, (name, share) in enumerate(zip(names, shares, strict=True)):
        cells = [
            f"{rows[k][index][0]:.3f} / {rows[k][index][1]:.3f}"
            for k in ("without", "with")
        ]
        print(f"| {name} | {share} | {cells[0]} | {cells[1]} |")
    print("\nkmask's metrics equal NumPy's:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
