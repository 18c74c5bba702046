"""Tests for `kmask.ctc`: a NumPy CTC forward algorithm written here, and the
backend's own independent CTC (optax under JAX, PyTorch's under torch)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import kmask
from kmask.layers import LengthMask
from tests._grad import value_and_grad
from tools.parity.references import np_log_softmax

BACKEND = keras.backend.backend()
RTOL = 1e-5
PAD_LABEL = -1


def np_ctc_one(labels, logits, blank: int) -> float:
    """-log p(labels | logits) by the CTC forward algorithm, in float64."""
    log_probs = np_log_softmax(np.asarray(logits, "float64"))
    extended = [blank]
    for label in labels:
        extended += [int(label), blank]
    alpha = np.full(len(extended), -np.inf)
    alpha[0] = log_probs[0, blank]
    if len(extended) > 1:
        alpha[1] = log_probs[0, extended[1]]
    for frame in range(1, len(log_probs)):
        previous = alpha.copy()
        for s, symbol in enumerate(extended):
            paths = [previous[s]]
            if s >= 1:
                paths.append(previous[s - 1])
            if s >= 2 and symbol != blank and symbol != extended[s - 2]:
                paths.append(previous[s - 2])
            alpha[s] = np.logaddexp.reduce(paths) + log_probs[frame, symbol]
    ends = alpha[-2:] if len(extended) > 1 else alpha[-1:]
    return float(-np.logaddexp.reduce(ends))


def np_ctc(y_true, logits, frame_lengths, blank=0, zero_infinity=False):
    """Per-sequence losses; 0 without a real frame, inf (or 0) if infeasible."""
    losses = []
    for labels, frames, length in zip(y_true, logits, frame_lengths, strict=True):
        labels = [label for label in labels if label != PAD_LABEL]
        if length == 0:
            losses.append(0.0)
            continue
        loss = np_ctc_one(labels, frames[:length], blank)
        losses.append(0.0 if zero_infinity and np.isinf(loss) else loss)
    return np.asarray(losses)


def np_reduce(losses, label_lengths, has_frames, reduction, weights=None):
    weights = np.ones(len(losses)) if weights is None else np.asarray(weights, float)
    weights = weights * has_frames
    weighted = np.where(weights != 0, losses, 0.0) * weights
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "sum_over_batch_size":
        return weighted.sum() / len(losses)
    if reduction == "sequence_mean":
        return weighted.sum() / weights.sum()
    return weighted.sum() / (label_lengths * weights).sum()


def make_batch(seed=0, batch=4, frames=9, classes=5, max_labels=4, blank=0):
    """Variable frame and label lengths, NaN in the padded frames, labels
    that avoid the blank and fit their frames."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, frames, classes)).astype("float32")
    frame_lengths = rng.integers(1, frames + 1, size=batch)
    frame_lengths[0] = frames
    non_blank = [c for c in range(classes) if c != blank]
    y_true = np.full((batch, max_labels), PAD_LABEL, "int32")
    for row, length in enumerate(frame_lengths):
        count = rng.integers(0, min(max_labels, (length + 1) // 2) + 1)
        y_true[row, :count] = rng.choice(non_blank, size=count)
    mask = np.arange(frames)[None, :] < frame_lengths[:, None]
    logits = np.where(mask[..., None], logits, np.nan).astype("float32")
    return y_true, logits, mask, frame_lengths


def label_lengths_of(y_true):
    return (np.asarray(y_true) != PAD_LABEL).sum(axis=1)


def to_numpy(tensor):
    return np.asarray(ops.convert_to_numpy(ops.cast(tensor, "float32")))


@pytest.mark.parametrize(
    "reduction", ["token_mean", "sequence_mean", "sum", "sum_over_batch_size", "none"]
)
@pytest.mark.parametrize("blank", [0, 2, 4])
def test_every_reduction_matches_the_numpy_forward_algorithm(reduction, blank):
    y_true, logits, mask, lengths = make_batch(seed=blank, blank=blank)
    weights = np.array([1.0, 0.5, 2.0, 1.0])
    expected = np_reduce(
        np_ctc(y_true, logits, lengths, blank),
        label_lengths_of(y_true),
        lengths > 0,
        reduction,
        weights,
    )
    found = kmask.masked_ctc(
        y_true, logits, mask, blank, reduction=reduction, sample_weight=weights
    )
    np.testing.assert_allclose(to_numpy(found), expected, rtol=RTOL)


def test_the_loss_class_reads_the_propagated_mask_of_length_mask():
    y_true, logits, _, lengths = make_batch(seed=3)
    masked = LengthMask()(
        [ops.convert_to_tensor(logits), ops.convert_to_tensor(lengths)]
    )
    found = kmask.MaskedCTC()(y_true, masked)
    expected = np_reduce(
        np_ctc(y_true, logits, lengths),
        label_lengths_of(y_true),
        lengths > 0,
        "token_mean",
    )
    np.testing.assert_allclose(to_numpy(found), expected, rtol=RTOL)


def test_sum_over_batch_size_is_keras_ctc_when_nothing_is_padded():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 8, 4)).astype("float32")
    y_true = rng.integers(1, 4, size=(3, 3)).astype("int32")
    keras_value = keras.losses.CTC()(y_true, logits)
    found = kmask.masked_ctc(y_true, logits, reduction="sum_over_batch_size")
    np.testing.assert_allclose(to_numpy(found), to_numpy(keras_value), rtol=RTOL)
    expected = np_ctc(y_true, logits, [8, 8, 8]).mean()
    np.testing.assert_allclose(to_numpy(found), expected, rtol=RTOL)


@pytest.mark.skipif(BACKEND != "jax", reason="optax is the JAX reference")
def test_matches_optax_ctc_loss():
    optax = pytest.importorskip("optax")
    y_true, logits, mask, _ = make_batch(seed=7, batch=5)
    label_paddings = (y_true == PAD_LABEL).astype("float32")
    expected = optax.ctc_loss(
        np.nan_to_num(logits),
        (~mask).astype("float32"),
        np.where(y_true == PAD_LABEL, 0, y_true),
        label_paddings,
    )
    found = kmask.masked_ctc(y_true, logits, mask, reduction="none")
    np.testing.assert_allclose(to_numpy(found), np.asarray(expected), rtol=RTOL)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's ctc_loss is its reference")
def test_matches_torch_ctc_loss():
    import torch

    y_true, logits, mask, lengths = make_batch(seed=8, batch=5)
    log_probs = torch.log_softmax(torch.tensor(np.nan_to_num(logits)), -1)
    expected = torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1).double(),
        torch.tensor(np.where(y_true == PAD_LABEL, 0, y_true)),
        torch.tensor(lengths),
        torch.tensor(label_lengths_of(y_true)),
        blank=0,
        reduction="none",
    )
    found = kmask.masked_ctc(y_true, logits, mask, reduction="none")
    np.testing.assert_allclose(to_numpy(found), expected.numpy(), rtol=RTOL)


@pytest.mark.parametrize("jit", [False, True])
def test_padding_never_reaches_the_gradient(jit):
    y_true, logits, mask, _ = make_batch(seed=11)
    logits[~mask] = np.inf
    logits[1, -1, 0] = np.nan

    def loss(x):
        return kmask.masked_ctc(y_true, x, mask)

    value, grad = value_and_grad(loss, logits, jit=jit)
    assert np.isfinite(value)
    assert np.all(grad[~mask] == 0)
    assert np.all(np.isfinite(grad))
    assert np.any(grad[mask] != 0)


def test_a_sequence_without_real_frames_contributes_zero():
    y_true, logits, mask, lengths = make_batch(seed=12)
    mask[2] = False
    lengths[2] = 0
    per_sequence = kmask.masked_ctc(y_true, logits, mask, reduction="none")
    assert to_numpy(per_sequence)[2] == 0
    expected = np_reduce(
        np_ctc(y_true, logits, lengths),
        label_lengths_of(y_true),
        lengths > 0,
        "sequence_mean",
    )
    found = kmask.masked_ctc(y_true, logits, mask, reduction="sequence_mean")
    np.testing.assert_allclose(to_numpy(found), expected, rtol=RTOL)


def test_all_padding_gives_zero_with_a_zero_gradient():
    y_true, logits, _, _ = make_batch(seed=13)
    mask = np.zeros(logits.shape[:2], bool)
    for reduction in ("token_mean", "sequence_mean", "sum", "sum_over_batch_size"):
        value, grad = value_and_grad(
            lambda x, r=reduction: kmask.masked_ctc(y_true, x, mask, reduction=r),
            logits,
        )
        assert value == 0, reduction
        assert np.all(grad == 0), reduction


def infeasible_batch():
    """Row 0 feasible; row 1 has "1 1" (3 frames needed) in 2 real frames."""
    rng = np.random.default_rng(14)
    logits = rng.normal(size=(2, 4, 3)).astype("float32")
    y_true = np.array([[1, 2, -1], [1, 1, -1]], "int32")
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    return y_true, logits, mask


def test_an_infeasible_sequence_is_inf_as_in_pytorch():
    y_true, logits, mask = infeasible_batch()
    found = to_numpy(kmask.masked_ctc(y_true, logits, mask, reduction="none"))
    expected = np_ctc(y_true, logits, mask.sum(1))
    assert np.isinf(expected[1]) and np.isinf(found[1])
    np.testing.assert_allclose(found[0], expected[0], rtol=RTOL)
    assert np.isinf(to_numpy(kmask.masked_ctc(y_true, logits, mask)))


def test_zero_infinity_gives_zero_and_a_zero_gradient():
    y_true, logits, mask = infeasible_batch()

    def loss(x):
        return kmask.masked_ctc(y_true, x, mask, reduction="sum", zero_infinity=True)

    value, grad = value_and_grad(loss, logits)
    expected = np_ctc(y_true, logits, mask.sum(1), zero_infinity=True)
    np.testing.assert_allclose(value, expected.sum(), rtol=RTOL)
    assert np.all(grad[1] == 0)
    assert np.all(np.isfinite(grad)) and np.any(grad[0] != 0)


def test_a_pre_padded_frame_mask_is_refused_naming_post():
    y_true, logits, _, _ = make_batch(seed=15)
    mask = np.ones(logits.shape[:2], bool)
    mask[1, :3] = False
    with pytest.raises(ValueError, match="'post'"):
        kmask.masked_ctc(y_true, logits, mask)
    masked = LengthMask(padding="pre")(
        [ops.convert_to_tensor(logits), ops.convert_to_tensor([9, 5, 9, 9])]
    )
    with pytest.raises(ValueError, match="'post'"):
        kmask.MaskedCTC()(y_true, masked)


def test_bad_shapes_and_reductions_are_refused():
    y_true, logits, mask, _ = make_batch(seed=16)
    with pytest.raises(ValueError, match=r"argument `y_pred`.*y_pred.shape=\(4, 9\)"):
        kmask.masked_ctc(y_true, logits[..., 0])
    with pytest.raises(ValueError, match=r"argument `y_true`.*y_true.shape=\(3, 4\)"):
        kmask.masked_ctc(y_true[:3], logits)
    with pytest.raises(ValueError, match=r"argument `mask`.*mask.shape=\(4, 8\)"):
        kmask.masked_ctc(y_true, logits, mask[:, :8])
    with pytest.raises(ValueError, match="reduction='average'"):
        kmask.MaskedCTC(reduction="average")


def test_get_config_round_trip_and_keras_save(tmp_path):
    loss = kmask.MaskedCTC(
        blank_index=3, mask_value=-7, reduction="sum", zero_infinity=True
    )
    config = loss.get_config()
    assert config == kmask.MaskedCTC.from_config(config).get_config()
    assert config["blank_index"] == 3 and config["zero_infinity"] is True
    inputs = keras.Input((6, 2))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    model.compile(optimizer="sgd", loss=loss)
    model.save(tmp_path / "ctc.keras")
    restored = keras.saving.load_model(tmp_path / "ctc.keras")
    assert restored.loss.get_config() == config


def test_token_mean_divides_by_the_label_count_of_every_replica(monkeypatch):
    """Two replicas, as a backend's all-reduce would show them: the label
    count is global, the sum of losses this replica's own."""
    monkeypatch.setattr(kmask.distribute, "_replica_denominator", lambda d: d * 2.0)
    y_true, logits, mask, lengths = make_batch(seed=17)
    losses = np_ctc(y_true, logits, lengths)
    found = kmask.masked_ctc(y_true, logits, mask)
    expected = losses.sum() / (2 * label_lengths_of(y_true).sum())
    np.testing.assert_allclose(to_numpy(found), expected, rtol=RTOL)
    with kmask.distribute.local():
        found = kmask.masked_ctc(y_true, logits, mask)
    np.testing.assert_allclose(to_numpy(found), 2 * expected, rtol=RTOL)


def test_accumulation_weights_of_the_labels_give_the_window_token_mean():
    """With `reduction="sum"` and per-sequence weights `steps / labels in the
    window` (from `accumulation_weights` of the label mask), the mean of the
    micro-batch losses (what the optimizer averages) is the window's token
    mean. Every sequence has a label here: one without gets weight 0."""
    y_true, logits, mask, lengths = make_batch(seed=18, batch=4)
    y_true[:, 0] = np.where(y_true[:, 0] == PAD_LABEL, 1, y_true[:, 0])
    weights = kmask.accumulation_weights(y_true != PAD_LABEL, 2, 2).max(axis=1)
    micro = [
        to_numpy(
            kmask.masked_ctc(
                y_true[i : i + 2],
                logits[i : i + 2],
                mask[i : i + 2],
                reduction="sum",
                sample_weight=weights[i : i + 2],
            )
        )
        for i in (0, 2)
    ]
    expected = np_ctc(y_true, logits, lengths).sum() / label_lengths_of(y_true).sum()
    np.testing.assert_allclose(np.mean(micro), expected, rtol=RTOL)
