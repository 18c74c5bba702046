"""The numbers of the migration guides: hand-written and Keras losses against kmask.

    python examples/migration.py          # under the current KERAS_BACKEND

Two Markdown tables:

1. The three answers to the seed's question (how to mask the loss of the
   seq2seq model `examples/seed_seq2seq.py` builds), translated to Keras 3,
   on the seed model with fixed NumPy weights: the value each gives on the
   seed batch and on a batch that is all padding (inputs and targets),
   beside the kmask line that replaces it and NumPy's mean over the real
   steps.
2. Keras's `ignore_class` and `sample_weight` against the kmask losses, on a
   small batch of logits padded with -100: real steps only, per-step 0/1
   weights, fractional weights, an all-padding batch, NaN logits at the
   padded steps.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from seed_seq2seq import PAD_VECTOR, Y_TRUE, X, build_seed_model

import kmask

SEED_LENGTHS = [3, 4]  # '##abb', '#babb': left padding


def _yu_yang_loss(mask_value):
    """Answer 2: find the pad vector in y_true, sum(loss * mask) / sum(mask)."""
    mask_value = ops.convert_to_tensor(np.asarray(mask_value, "float32"))

    def masked_categorical_crossentropy(y_true, y_pred):
        mask = ops.all(ops.equal(y_true, mask_value), axis=-1)
        mask = 1 - ops.cast(mask, "float32")
        loss = keras.losses.categorical_crossentropy(y_true, y_pred) * mask
        return ops.sum(loss) / ops.sum(mask)

    return masked_categorical_crossentropy


def _daniel_loss(mask_value):
    """Answer 3: multiply y_true and y_pred by the mask, then the plain loss."""
    mask_value = ops.convert_to_tensor(np.asarray(mask_value, "float32"))

    def custom_loss(y_true, y_pred):
        is_mask = ops.all(ops.equal(y_true, mask_value), axis=-1)
        is_mask = ops.expand_dims(1 - ops.cast(is_mask, "float32"), -1)
        return keras.losses.categorical_crossentropy(y_true * is_mask, y_pred * is_mask)

    return custom_loss


def _numpy_masked_mean(y_true, y_pred) -> float:
    """Mean cross-entropy over the steps whose target is not the pad vector."""
    probs = np.clip(np.asarray(y_pred, "float64"), 1e-7, 1 - 1e-7)
    per_step = -(np.asarray(y_true) * np.log(probs)).sum(-1)
    real = ~np.all(np.asarray(y_true) == np.asarray(PAD_VECTOR), axis=-1)
    return float(per_step[real].mean()) if real.any() else 0.0


def seed_table() -> list[list[str]]:
    x = np.asarray(X, "float32")
    y_true = np.asarray(Y_TRUE, "float32")
    pad_x = np.zeros_like(x)
    pad_y = np.broadcast_to(np.asarray(PAD_VECTOR, "float32"), y_true.shape)
    model = build_seed_model()
    y_pred = model.predict(x, verbose=0)
    weights = kmask.sequence_mask(SEED_LENGTHS, 5, padding="pre")
    restored = keras.Model(
        model.input,
        kmask.AttachMask()([model.output, model.get_layer("masking").output]),
    )

    def evaluate(net, loss, padded=False, sample_weight=None):
        net.compile(loss=loss)
        inputs, targets = (pad_x, pad_y) if padded else (x, y_true)
        return net.evaluate(inputs, targets, sample_weight=sample_weight, verbose=0)

    masked = kmask.MaskedCategoricalCrossentropy(mask_value=PAD_VECTOR)
    rows = [
        (
            '1. "the mask propagates to the loss": loss="categorical_crossentropy"',
            evaluate(model, "categorical_crossentropy"),
            evaluate(model, "categorical_crossentropy", padded=True),
            "AttachMask()([outputs, masking.output])",
            evaluate(restored, "categorical_crossentropy"),
            evaluate(restored, "categorical_crossentropy", padded=True),
        ),
        (
            "2. sum(loss * mask) / sum(mask), mask from the pad vector",
            evaluate(model, _yu_yang_loss(PAD_VECTOR)),
            evaluate(model, _yu_yang_loss(PAD_VECTOR), padded=True),
            "MaskedCategoricalCrossentropy(mask_value=[0, 0, 1])",
            evaluate(model, masked),
            evaluate(model, masked, padded=True),
        ),
        (
            "3. y_true * mask, y_pred * mask, then the plain loss",
            evaluate(model, _daniel_loss(PAD_VECTOR)),
            evaluate(model, _daniel_loss(PAD_VECTOR), padded=True),
            'sample_weight=sequence_mask([3, 4], 5, padding="pre")',
            evaluate(model, kmask.MaskedCategoricalCrossentropy(), False, weights),
            evaluate(
                model,
                kmask.MaskedCategoricalCrossentropy(),
                True,
                np.zeros(np.shape(weights), "float32"),
            ),
        ),
    ]
    reference = f"{_numpy_masked_mean(y_true, y_pred):.6f}"
    return [
        [answer, f"{a:.6f}", f"{b:.6f}", f"`{line}`", f"{c:.6f}", f"{d:.6f}", reference]
        for answer, a, b, line, c, d in rows
    ]


def keras_table() -> list[list[str]]:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)).astype("float32")
    labels = np.array([[1, 2, 3, -100], [4, -100, -100, -100]], "int32")
    real = labels != -100
    weights = np.where(real, rng.uniform(0.5, 2.0, labels.shape), 0).astype("float32")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    per_step = -np.take_along_axis(log_probs, np.maximum(labels, 0)[..., None], -1)
    per_step = per_step[..., 0].astype("float64")
    zero_labels = np.where(real, labels, 0)
    nan_logits = np.where(real[..., None], logits, np.nan).astype("float32")
    all_padding = np.full_like(labels, -100)

    def keras_loss(**kwargs):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kwargs)

    def kmask_loss(**kwargs):
        return kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, **kwargs)

    def value(loss, y, p, sample_weight=None):
        try:
            return f"{float(loss(y, p, sample_weight=sample_weight)):.6f}"
        except Exception as error:  # the table shows what fails
            return f"raises {type(error).__name__}"

    real_mean = per_step[real].mean()
    cases = [
        (
            "labels padded with -100",
            "SparseCategoricalCrossentropy(ignore_class=-100)",
            value(keras_loss(ignore_class=-100), labels, logits),
            "MaskedSparseCategoricalCrossentropy(mask_value=-100)",
            value(kmask_loss(mask_value=-100), labels, logits),
            real_mean,
        ),
        (
            "labels padded with -100, no ignore_class",
            "SparseCategoricalCrossentropy()",
            value(keras_loss(), labels, logits),
            "MaskedSparseCategoricalCrossentropy(mask_value=-100)",
            value(kmask_loss(mask_value=-100), labels, logits),
            real_mean,
        ),
        (
            "0/1 weights per step",
            "SparseCategoricalCrossentropy(), sample_weight=mask",
            value(keras_loss(), zero_labels, logits, real.astype("float32")),
            "MaskedSparseCategoricalCrossentropy(), sample_weight=mask",
            value(kmask_loss(), zero_labels, logits, real.astype("float32")),
            real_mean,
        ),
        (
            "fractional weights per step",
            "SparseCategoricalCrossentropy(), sample_weight=w",
            value(keras_loss(), zero_labels, logits, weights),
            "MaskedSparseCategoricalCrossentropy(), sample_weight=w",
            value(kmask_loss(), zero_labels, logits, weights),
            (per_step * weights).sum() / weights.sum(),
        ),
        (
            "fractional weights, Keras's denominator",
            "SparseCategoricalCrossentropy(), sample_weight=w",
            value(keras_loss(), zero_labels, logits, weights),
            'MaskedSparseCategoricalCrossentropy(reduction="sum_over_batch_size")',
            value(
                kmask_loss(reduction="sum_over_batch_size"),
                zero_labels,
                logits,
                weights,
            ),
            (per_step * weights).sum() / labels.size,
        ),
        (
            "a batch that is all padding",
            "SparseCategoricalCrossentropy(ignore_class=-100)",
            value(keras_loss(ignore_class=-100), all_padding, logits),
            "MaskedSparseCategoricalCrossentropy(mask_value=-100)",
            value(kmask_loss(mask_value=-100), all_padding, logits),
            0.0,
        ),
        (
            "NaN logits at the padded steps",
            "SparseCategoricalCrossentropy(ignore_class=-100)",
            value(keras_loss(ignore_class=-100), labels, nan_logits),
            "MaskedSparseCategoricalCrossentropy(mask_value=-100)",
            value(kmask_loss(mask_value=-100), labels, nan_logits),
            real_mean,
        ),
        (
            "NaN logits at the padded steps",
            "SparseCategoricalCrossentropy(), sample_weight=mask",
            value(keras_loss(), zero_labels, nan_logits, real.astype("float32")),
            "MaskedSparseCategoricalCrossentropy(), sample_weight=mask",
            value(kmask_loss(), zero_labels, nan_logits, real.astype("float32")),
            real_mean,
        ),
    ]
    return [
        [case, f"`{k}`", kv, f"`{m}`", mv, f"{float(ref):.6f}"]
        for case, k, kv, m, mv, ref in cases
    ]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> int:
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}\n")
    header = ["answer", "its loss", "its loss, all padding", "kmask line", "kmask"]
    header += ["kmask, all padding", "NumPy, real steps"]
    print(markdown(header, seed_table()))
    print()
    header = ["case", "Keras", "Keras value", "kmask", "kmask value", "NumPy"]
    print(markdown(header, keras_table()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
