"""Packed sequences: every document counts once, no label crosses a boundary.

Documents of 2 to 9 tokens are packed greedily into rows of 16 steps;
`segment_ids` number the documents of each row (0 is padding). A next-token
model (embedding then a dense layer, so a step's logits depend on its own
token only) is trained with `fit()` on labels from `kmask.shift_labels` and
weights from `kmask.segment_weights`.

    KERAS_BACKEND=torch python examples/packing.py   # KMASK_EXAMPLE_EPOCHS=10

Prints, on the trained model, Keras's built-in loss on labels shifted along
the row (what one writes without segment ids), kmask's token mean and
per-document mean, and NumPy's mean over the documents taken one by one,
unpacked; then one row's labels where a boundary falls. Exits with 1 if
kmask and NumPy disagree or if `shift_labels` lets a label cross a boundary.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
from _common import agrees, epochs, set_numpy_weights

import kmask

DOCUMENTS, VOCABULARY, ROW, BATCH_SIZE = 64, 12, 16, 8
PAD_TOKEN, PAD_LABEL = 0, -100


def make_documents(seed: int = 0) -> list[np.ndarray]:
    """Documents that mostly count up by one (mod the vocabulary, skipping 0),
    so the next token is learnable."""
    rng = np.random.RandomState(seed)
    documents = []
    for _ in range(DOCUMENTS):
        start, length = rng.randint(1, VOCABULARY), rng.randint(2, 10)
        tokens = (start - 1 + np.arange(length)) % (VOCABULARY - 1) + 1
        noisy = rng.rand(length) < 0.1
        tokens[noisy] = rng.randint(1, VOCABULARY, noisy.sum())
        documents.append(tokens)
    return documents


def pack(documents: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and segment ids `[rows, ROW]`: each document goes in the first
    row with room for it."""
    rows: list[list[int]] = []
    ids: list[list[int]] = []
    for document in documents:
        for tokens, segments in zip(rows, ids, strict=True):
            if len(tokens) + len(document) <= ROW:
                segments += [segments[-1] + 1] * len(document)
                tokens += list(document)
                break
        else:
            rows.append(list(document))
            ids.append([1] * len(document))
    tokens = np.zeros((len(rows), ROW), "int32")
    segment_ids = np.zeros((len(rows), ROW), "int32")
    for n, (row, segments) in enumerate(zip(rows, ids, strict=True)):
        tokens[n, : len(row)] = row
        segment_ids[n, : len(segments)] = segments
    return tokens, segment_ids


def build_model() -> keras.Model:
    tokens = keras.Input((None,), dtype="int32")
    embedded = keras.layers.Embedding(VOCABULARY, 8)(tokens)
    model = keras.Model(tokens, keras.layers.Dense(VOCABULARY)(embedded))
    set_numpy_weights(model, seed=1)
    return model


def numpy_log_softmax(logits):
    shifted = logits.astype("float64") - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def numpy_document_losses(model, documents) -> list[float]:
    """Each document's mean next-token loss, the document run on its own."""
    losses = []
    for document in documents:
        logits = keras.ops.convert_to_numpy(model(document[None]))[0]
        log_probs = numpy_log_softmax(logits)
        picked = log_probs[np.arange(len(document) - 1), document[1:]]
        losses.append(float(-picked.mean()))
    return losses


def main() -> int:
    keras.utils.set_random_seed(0)
    documents = make_documents()
    tokens, segment_ids = pack(documents)
    to_numpy = keras.ops.convert_to_numpy
    labels = to_numpy(kmask.shift_labels(tokens, segment_ids, PAD_LABEL))
    # The last step of each document has no label: weigh each document by
    # its labelled steps.
    labelled_ids = np.where(labels == PAD_LABEL, 0, segment_ids)
    weights = to_numpy(kmask.segment_weights(labelled_ids))
    print(f"backend: {keras.backend.backend()}")
    print(f"{DOCUMENTS} documents packed into {len(tokens)} rows of {ROW} steps")

    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD_LABEL
    )
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    model.fit(
        tokens,
        labels,
        sample_weight=weights,
        batch_size=BATCH_SIZE,
        epochs=epochs(10),
        shuffle=False,
        verbose=0,
    )

    logits = model.predict(tokens, verbose=0)
    # Without segment ids: the row shifted by one, only padding masked.
    naive = np.full_like(tokens, PAD_LABEL)
    naive[:, :-1] = np.where(segment_ids[:, 1:] != 0, tokens[:, 1:], PAD_LABEL)
    builtin = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=PAD_LABEL
    )
    per_document = numpy_document_losses(model, documents)
    per_token = [
        (loss_value, len(document) - 1)
        for loss_value, document in zip(per_document, documents, strict=True)
    ]
    token_mean = sum(v * n for v, n in per_token) / sum(n for _, n in per_token)
    rows = [
        ("Keras built-in, row-shifted labels", float(builtin(naive, logits)), None),
        ("Keras built-in, shift_labels", float(builtin(labels, logits)), token_mean),
        ("kmask token mean, shift_labels", float(loss(labels, logits)), token_mean),
        (
            "kmask per-document mean, segment_weights",
            float(loss(labels, logits, sample_weight=weights)),
            float(np.mean(per_document)),
        ),
        (
            "kmask per-document mean, segment_ids=",
            float(
                kmask.masked_loss(
                    labels,
                    logits,
                    loss,
                    reduction="sequence_mean",
                    segment_ids=segment_ids,
                )
            ),
            float(np.mean(per_document)),
        ),
    ]
    print()
    print("quantity | kmask or Keras | NumPy, documents one by one")
    ok = True
    for name, got, want in rows:
        agree = want is None or agrees(got, want)
        ok &= agree
        shown = "-" if want is None else f"{want:.6f}"
        print(f"{name} | {got:.6f} | {shown}" + ("" if agree else "  <- MISMATCH"))

    boundary = (segment_ids[:, :-1] != segment_ids[:, 1:]) & (segment_ids[:, 1:] != 0)
    leaked = int((boundary & (naive[:, :-1] != PAD_LABEL)).sum())
    kept = int((boundary & (labels[:, :-1] != PAD_LABEL)).sum())
    print()
    print(f"labels that cross a document boundary: row-shifted {leaked}, ", end="")
    print(f"shift_labels {kept}")
    row = int(np.argmax(boundary.any(axis=1)))
    print("row", row)
    print("segment ids  ", segment_ids[row].tolist())
    print("tokens       ", tokens[row].tolist())
    print("row-shifted  ", naive[row].tolist())
    print("shift_labels ", labels[row].tolist())
    ok &= kept == 0 and leaked > 0
    if not ok:
        print("MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
