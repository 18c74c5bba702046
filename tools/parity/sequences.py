"""Parity cases beyond one sequence per row: masked CTC, packed sequences and
whole-sequence accuracy, with their NumPy references.

The CTC reference enumerates every path of a short sequence (`classes **
frames` of them) and keeps those that collapse to the labels: the value is
`-log` of their total probability, the gradient with respect to the logits
`softmax - E[path one-hot | labels]`. It shares nothing with a forward
algorithm, ours or a backend's.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

from tools.parity.cases import Case
from tools.parity.references import np_log_softmax, np_sequence_mask
from tools.parity.sources import NAN, case_rng

CTC_BATCH, CTC_FRAMES, CTC_CLASSES, CTC_LABELS = 4, 6, 4, 3
PAD_LABEL = -1


@cache
def _paths(frames: int, classes: int, blank: int) -> tuple[np.ndarray, list]:
    """Every path of `frames` symbols and the labels each collapses to."""
    paths = list(itertools.product(range(classes), repeat=frames))
    collapsed = []
    for path in paths:
        merged = [s for i, s in enumerate(path) if i == 0 or s != path[i - 1]]
        collapsed.append(tuple(s for s in merged if s != blank))
    return np.asarray(paths), collapsed


def np_ctc_enumerated(labels, logits, blank: int) -> tuple[float, np.ndarray]:
    """`-log p(labels)` over the frames of `logits` and its gradient with
    respect to them: inf and a zero gradient when no path fits."""
    frames, classes = logits.shape
    log_probs = np_log_softmax(np.asarray(logits, "float64"))
    paths, collapsed = _paths(frames, classes, blank)
    target = tuple(int(label) for label in labels)
    fits = np.array([labels_of == target for labels_of in collapsed])
    if not fits.any():
        return np.inf, np.zeros(logits.shape)
    kept = paths[fits]
    path_log_probs = log_probs[np.arange(frames), kept].sum(axis=1)
    total = np.logaddexp.reduce(path_log_probs)
    posterior = np.exp(path_log_probs - total)
    expected_one_hot = np.einsum("p,ptk->tk", posterior, np.eye(classes)[kept])
    return -total, np.exp(log_probs) - expected_one_hot


def np_ctc_reduced(y_true, logits, frame_lengths, weights, reduction, blank, zero_inf):
    """The value of `kmask.masked_ctc` and its gradient (of the sum of the
    values for `"none"`), from the enumerated per-sequence losses."""
    batch = len(y_true)
    losses, grads = np.zeros(batch), np.zeros(logits.shape)
    for row in range(batch):
        length = frame_lengths[row]
        if length == 0:
            continue
        labels = [label for label in y_true[row] if label != PAD_LABEL]
        losses[row], grads[row, :length] = np_ctc_enumerated(
            labels, logits[row, :length], blank
        )
        if np.isinf(losses[row]) and zero_inf:
            losses[row] = 0.0
    weights = np.ones(batch) if weights is None else np.asarray(weights, "float64")
    weights = weights * (np.asarray(frame_lengths) > 0)
    label_lengths = (np.asarray(y_true) != PAD_LABEL).sum(axis=1)
    denominator = {
        "token_mean": (label_lengths * weights).sum(),
        "sequence_mean": weights.sum(),
        "sum_over_batch_size": float(batch),
    }.get(reduction, 1.0)
    coefficient = weights / denominator if denominator else np.zeros(batch)
    weighted = np.where(weights != 0, losses, 0.0) * coefficient
    value = weighted if reduction == "none" else weighted.sum()
    return value, coefficient[:, None, None] * grads


def ctc_case(
    api: str,
    reduction: str,
    blank: int = 0,
    weights: bool = False,
    zero_infinity: bool = False,
    edge_rows: bool = False,
    compiled: bool = False,
) -> Case:
    """`kmask.masked_ctc` (`api="function"`, an explicit frame mask) or
    `kmask.MaskedCTC` behind `kmask.LengthMask` (`api="class"`): the value
    and its gradient with respect to the logits, NaN in the padded frames.
    `edge_rows` makes row 2 infeasible ("1 1" in 2 frames) and row 3 frameless."""
    parts = ["ctc", api, reduction, f"blank_{blank}"]
    parts += ["weights"] * weights + ["zero_infinity"] * zero_infinity
    parts += ["edge_rows"] * edge_rows + ["jit"] * compiled
    name = "/".join(parts)
    rng = case_rng(name)
    shape = (CTC_BATCH, CTC_FRAMES, CTC_CLASSES)
    logits = rng.normal(size=shape).astype("float32")
    lengths = rng.integers(3, CTC_FRAMES + 1, size=CTC_BATCH)
    non_blank = [c for c in range(CTC_CLASSES) if c != blank]
    y_true = np.full((CTC_BATCH, CTC_LABELS), PAD_LABEL, "int32")
    for row, length in enumerate(lengths):
        count = rng.integers(1, min(CTC_LABELS, (length + 1) // 2) + 1)
        y_true[row, :count] = rng.choice(non_blank, size=count)
    if edge_rows:
        lengths[2], lengths[3] = 2, 0
        y_true[2] = [non_blank[0], non_blank[0], PAD_LABEL]
    real = np_sequence_mask(lengths, CTC_FRAMES, "post")
    logits = np.where(real[..., None], logits, NAN).astype("float32")
    sample_weight = (
        rng.uniform(0.5, 2.0, CTC_BATCH).astype("float32") if weights else None
    )
    value, grad = np_ctc_reduced(
        y_true, logits, lengths, sample_weight, reduction, blank, zero_infinity
    )
    inputs = {"y_true": y_true, "y_pred": logits, "lengths": lengths.astype("int32")}
    if sample_weight is not None:
        inputs["sample_weight"] = sample_weight
    spec = {
        "api": api,
        "reduction": reduction,
        "blank_index": blank,
        "mask_value": PAD_LABEL,
        "zero_infinity": zero_infinity,
        "compiled": compiled,
        "half": [],
    }
    return Case(name, "ctc", spec, inputs, {"value": value, "grad": grad})


def np_shift_labels(tokens, ids) -> np.ndarray:
    same = (ids[:, :-1] == ids[:, 1:]) & (ids[:, :-1] != 0)
    labels = np.full(tokens.shape, -100)
    labels[:, :-1] = np.where(same, tokens[:, 1:], -100)
    return labels


def packed_case(api: str, compiled: bool = False) -> Case:
    """Sequences packed in rows, next-token labels from `kmask.shift_labels`,
    a masked sparse cross-entropy from logits counting every packed sequence
    once: `api="segment_ids"` (`masked_loss(..., segment_ids=ids,
    reduction="sequence_mean")`) or `api="segment_weights"` (`sample_weight=
    segment_weights(ids of the labelled steps)`). Outputs: the value, its
    gradient, the labels and the weights."""
    name = "/".join(["packed", api] + ["jit"] * compiled)
    rng = case_rng(name)
    batch, steps, vocabulary = 3, 10, 7
    ids = np.zeros((batch, steps), "int32")
    for row in range(batch):
        position, segment = 0, 1
        while position < steps - 1 and segment <= 3:
            length = int(rng.integers(1, 5))
            ids[row, position : position + length] = segment
            position, segment = position + length, segment + 1
    ids[: batch - 1, -1] = 0
    tokens = np.where(ids != 0, rng.integers(1, vocabulary, (batch, steps)), 0)
    logits = rng.normal(size=(batch, steps, vocabulary))
    logits = np.where((ids != 0)[..., None], logits, NAN).astype("float32")
    labels = np_shift_labels(tokens, ids)
    labelled = np.where(labels != -100, ids, 0)
    weights = np.zeros(ids.shape)
    grad = np.zeros(logits.shape)
    log_probs = np_log_softmax(np.nan_to_num(logits).astype("float64"))
    per_step = np.zeros(ids.shape)
    sequences = 0
    for row in range(batch):
        for segment in set(labelled[row]) - {0}:
            steps_of = labelled[row] == segment
            weights[row, steps_of] = 1.0 / steps_of.sum()
            sequences += 1
    used = labels != -100
    safe = np.where(used, labels, 0)
    per_step = -np.take_along_axis(log_probs, safe[..., None], -1)[..., 0]
    coefficient = np.where(used, weights, 0.0) / sequences
    value = (np.where(used, per_step, 0.0) * coefficient).sum()
    one_hot = np.eye(vocabulary)[safe]
    grad = coefficient[..., None] * (np.exp(log_probs) - one_hot)
    inputs = {"tokens": tokens.astype("int32"), "ids": ids, "y_pred": logits}
    expected = {
        "value": np.float64(value),
        "grad": grad,
        "labels": labels.astype("float64"),
    }
    if api == "segment_weights":
        expected["weights"] = weights
    spec = {"api": api, "compiled": compiled, "half": []}
    return Case(name, "packed", spec, inputs, expected)


def sequence_accuracy_case(source: str) -> Case:
    """`kmask.metrics.MaskedSequenceAccuracy` over two batches of different
    shapes: right rows / counted rows after each. `source`: `"pad"` (labels
    -100, `mask_value`), `"weights"` (a `[batch]` weight per row and -100),
    `"propagated"` (`Masking(0.0)` on zero predictions)."""
    name = f"metric/sequence_accuracy/{source}"
    rng = case_rng(name)
    inputs, expected = {}, {}
    right_total = counted_total = 0.0
    for batch, (size, steps) in enumerate([(6, 5), (4, 3)]):
        lengths = rng.integers(0, steps + 1, size)
        lengths[0] = steps
        real = np_sequence_mask(lengths, steps, "post")
        labels = rng.integers(0, 3, (size, steps))
        logits = rng.normal(size=(size, steps, 3))
        hits = rng.random((size, steps)) < 0.8
        np.put_along_axis(
            logits, labels[..., None], np.where(hits, 4.0, -4.0)[..., None], -1
        )
        row_weight = np.ones(size)
        if source == "propagated":
            logits = np.where(real[..., None], logits, 0.0)
        else:
            labels = np.where(real, labels, -100)
            logits = np.where(real[..., None], logits, NAN)
        if source == "weights":
            row_weight = rng.uniform(0.5, 2.0, size)
            inputs[f"sample_weight_{batch}"] = row_weight.astype("float32")
        right = ((logits.argmax(-1) == labels) | ~real).all(axis=1)
        counted = real.any(axis=1) * row_weight
        right_total += float((right * counted).sum())
        counted_total += float(counted.sum())
        inputs[f"y_true_{batch}"] = labels.astype("int32")
        inputs[f"y_pred_{batch}"] = logits.astype("float32")
        expected[f"result_{batch + 1}"] = np.float64(right_total / counted_total)
    kwargs = {} if source == "propagated" else {"mask_value": -100}
    spec = {
        "metric": "MaskedSequenceAccuracy",
        "kwargs": kwargs,
        "masking": 0.0 if source == "propagated" else None,
        "half": [],
    }
    return Case(name, "metric", spec, inputs, expected)


def sequence_cases() -> list[Case]:
    """The few cases of this module in the suite."""
    return [
        ctc_case("function", "token_mean", weights=True),
        ctc_case("function", "sequence_mean", blank=CTC_CLASSES - 1, compiled=True),
        ctc_case("class", "sum_over_batch_size"),
        ctc_case("function", "none", zero_infinity=True, edge_rows=True),
        ctc_case("function", "sum", edge_rows=True, weights=True, compiled=True),
        packed_case("segment_ids"),
        packed_case("segment_weights", compiled=True),
        sequence_accuracy_case("pad"),
        sequence_accuracy_case("weights"),
        sequence_accuracy_case("propagated"),
    ]
