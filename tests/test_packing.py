"""Tests for `kmask.packing` and `segment_ids=`: packed sequences count once,
labels stop at every boundary. Every expectation is a NumPy loop written here."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import kmask
from tests._grad import value_and_grad


def to_numpy(tensor) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(tensor))


@st.composite
def packed_rows(draw, max_batch=3, max_time=8):
    """Rows of segment ids `1, 1, 2, 2, 2, ..., 0, 0`: random lengths, rows of
    padding only, rows without padding, one-step segments."""
    batch = draw(st.integers(1, max_batch))
    time = draw(st.integers(1, max_time))
    rows = []
    for _ in range(batch):
        lengths = draw(st.lists(st.integers(1, time), max_size=time))
        row = []
        for segment, length in enumerate(lengths, start=1):
            row += [segment] * length
        row = row[:time]
        rows.append(row + [0] * (time - len(row)))
    return np.asarray(rows, "int32")


def np_segments(row):
    """The (start, stop) of each run of equal non-zero ids."""
    runs, start = [], 0
    for t in range(1, len(row) + 1):
        if t == len(row) or row[t] != row[start]:
            if row[start] != 0:
                runs.append((start, t))
            start = t
    return runs


def np_segment_weights(ids):
    weights = np.zeros(ids.shape)
    for b, row in enumerate(ids):
        for start, stop in np_segments(row):
            weights[b, start:stop] = 1.0 / (stop - start)
    return weights


def np_per_segment_mean(values, ids, valid=None):
    valid = np.ones(ids.shape, bool) if valid is None else valid
    means = []
    for b, row in enumerate(ids):
        for start, stop in np_segments(row):
            real = valid[b, start:stop]
            if real.any():
                means.append(values[b, start:stop][real].mean())
    return float(np.mean(means)) if means else 0.0


@settings(max_examples=40, deadline=None)
@given(packed_rows())
def test_segment_weights_are_one_over_the_segment_length(ids):
    found = to_numpy(kmask.segment_weights(ids))
    assert found.dtype == np.float32
    np.testing.assert_allclose(found, np_segment_weights(ids), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(packed_rows(), st.integers(0, 2**31 - 1))
def test_token_mean_with_segment_weights_is_the_per_segment_mean(ids, seed):
    values = np.random.default_rng(seed).normal(size=ids.shape)
    values[ids == 0] = np.nan
    found = kmask.masked_reduce(values, sample_weight=kmask.segment_weights(ids))
    # float32 sums of values of order 1: an absolute error of order 1e-7,
    # which a mean near 0 (the segments' means cancelling) cannot hold to
    # 1e-5 of itself (seed 17621 on `[[1, 1, 1, 1, 1, 1, 2]]`: -1.87e-4).
    expected = np_per_segment_mean(values, ids)
    assert float(found) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(packed_rows(), st.integers(0, 2**31 - 1))
def test_sequence_mean_with_segment_ids_is_the_per_segment_mean(ids, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=ids.shape)
    valid = rng.random(ids.shape) < 0.8
    values[~valid] = np.inf
    found = kmask.masked_reduce(values, valid, "sequence_mean", segment_ids=ids)
    expected = np_per_segment_mean(values, ids, valid)
    assert float(found) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_segment_ids_mark_padding_for_the_other_reductions():
    ids = np.array([[1, 1, 2, 0], [1, 1, 1, 1]])
    values = np.arange(8.0).reshape(2, 4)
    real = ids != 0
    for reduction, expected in {
        "token_mean": values[real].mean(),
        "sum": values[real].sum(),
    }.items():
        found = kmask.masked_reduce(values, reduction=reduction, segment_ids=ids)
        assert float(found) == pytest.approx(expected), reduction


def test_masked_loss_takes_segment_ids_and_its_gradient_skips_padding():
    ids = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]], "int32")
    rng = np.random.default_rng(0)
    y_true = rng.normal(size=(2, 6, 1)).astype("float32")
    y_pred = rng.normal(size=(2, 6, 1)).astype("float32")
    y_pred[ids == 0] = np.nan
    per_step = np.abs(y_true - np.nan_to_num(y_pred))[..., 0]

    def loss(x):
        return kmask.masked_loss(
            y_true, x, "mae", reduction="sequence_mean", segment_ids=ids
        )

    value, grad = value_and_grad(loss, y_pred)
    assert value == pytest.approx(np_per_segment_mean(per_step, ids), rel=1e-5)
    assert np.all(grad[ids == 0] == 0) and np.all(np.isfinite(grad))
    weighted = kmask.masked_loss(
        y_true, y_pred, "mae", sample_weight=kmask.segment_weights(ids)
    )
    assert float(weighted) == pytest.approx(value, rel=1e-5)


def test_segment_ids_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"argument `segment_ids`.*shape=\(2, 3\)"):
        kmask.masked_reduce(np.ones((2, 4)), segment_ids=np.ones((2, 3), "int32"))
    with pytest.raises(ValueError, match=r"argument `segment_ids`.*shape=\(2, 3\)"):
        kmask.masked_loss(
            np.ones((2, 4, 1)), np.ones((2, 4, 1)), "mae", segment_ids=np.ones((2, 3))
        )


def np_shift_labels(tokens, ids=None, mask_value=-100):
    tokens = np.asarray(tokens)
    ids = np.ones(tokens.shape, int) if ids is None else np.asarray(ids)
    labels = np.full(tokens.shape, mask_value)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if ids[b, t] != 0 and ids[b, t] == ids[b, t + 1]:
                labels[b, t] = tokens[b, t + 1]
    return labels


@settings(max_examples=40, deadline=None)
@given(packed_rows(), st.integers(0, 2**31 - 1))
def test_shift_labels_never_cross_a_boundary(ids, seed):
    tokens = np.random.default_rng(seed).integers(1, 50, size=ids.shape)
    found = to_numpy(kmask.shift_labels(tokens, ids))
    np.testing.assert_array_equal(found, np_shift_labels(tokens, ids))


def test_shift_labels_without_segments_masks_the_last_step_only():
    tokens = np.array([[3, 4, 5], [6, 7, 8]], "int32")
    found = to_numpy(kmask.shift_labels(tokens, mask_value=-1))
    np.testing.assert_array_equal(found, [[4, 5, -1], [7, 8, -1]])


def test_segment_weights_refuse_ids_that_are_not_batch_by_time():
    with pytest.raises(ValueError, match=r"argument `segment_ids`.*\(4,\)"):
        kmask.segment_weights(np.ones(4, "int32"))


def test_shift_labels_refuse_bad_shapes():
    with pytest.raises(ValueError, match=r"argument `tokens`.*\(3,\)"):
        kmask.shift_labels(np.arange(3))
    with pytest.raises(ValueError, match=r"argument `segment_ids`.*\(1, 2\)"):
        kmask.shift_labels(np.ones((1, 3), "int32"), np.ones((1, 2), "int32"))


def test_packed_language_model_loss_counts_each_sequence_once():
    """Two sequences packed in one row, next-token labels from `shift_labels`:
    weighted by the segments of the labelled steps, the token mean is the
    mean of the two sequences' means; `sequence_mean` with `segment_ids`
    gives it too."""
    tokens = np.array([[5, 6, 7, 8, 2, 3, 4, 0]], "int32")
    ids = np.array([[1, 1, 1, 1, 1, 2, 2, 0]], "int32")
    labels = kmask.shift_labels(tokens, ids)
    logits = np.random.default_rng(1).normal(size=(1, 8, 10)).astype("float32")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    first = -np.mean([log_probs[0, t, tokens[0, t + 1]] for t in range(4)])
    second = -log_probs[0, 5, 4]
    expected = (first + second) / 2

    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=-100)
    labelled_ids = np.where(to_numpy(labels) == -100, 0, ids)
    weighted = loss(labels, logits, sample_weight=kmask.segment_weights(labelled_ids))
    assert float(weighted) == pytest.approx(expected, rel=1e-5)
    per_segment = kmask.masked_loss(
        labels, logits, loss, reduction="sequence_mean", segment_ids=ids
    )
    assert float(per_segment) == pytest.approx(expected, rel=1e-5)
    assert float(loss(labels, logits)) == pytest.approx(
        (4 * first + second) / 5, rel=1e-5
    )
