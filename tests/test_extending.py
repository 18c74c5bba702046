"""The two checklists of docs/development.md, followed from outside kmask.

A new reduction is one entry of `kmask.reduce.REGISTRY`; a new source of
padding in the targets is a loss's `target_mask`. Each is added here, in
this test module only, and then reaches every loss, `masked_loss` and the
chunked head with nothing else changed. The numbers come from NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

import kmask
from kmask import reduce
from tests._grad import value_and_grad
from tools.parity.references import np_log_softmax, np_sparse_ce

B, T, C, H = 3, 4, 5, 6
RNG = np.random.default_rng(3)
LOGITS = RNG.normal(size=(B, T, C)).astype("float32")
LABELS = RNG.integers(1, C, size=(B, T)).astype("int32")
LABELS[1, 2:] = 0
LABELS[2, 1:] = 0
VALID = LABELS != 0


@pytest.fixture
def largest_step(monkeypatch):
    """A reduction that is not linear: the largest loss of a real step."""

    def numerator(sums):
        # Real steps have a weight; the others must not win the max.
        real = ops.greater(sums.step_weight, 0)
        return ops.max(ops.where(real, sums.weighted, -1e30))

    entry = reduce.Reduction(numerator, None)
    monkeypatch.setitem(reduce.REGISTRY, "largest_step", entry)
    return "largest_step"


def test_a_new_reduction_reaches_the_losses(largest_step):
    expected = np_sparse_ce(LABELS, LOGITS)[VALID].max()
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=0, reduction=largest_step
    )
    np.testing.assert_allclose(float(loss(LABELS, LOGITS)), expected, rtol=1e-5)
    value = kmask.masked_loss(
        LABELS, LOGITS, "sparse_categorical_crossentropy", mask=VALID,
        reduction=largest_step, from_logits=True,
    )  # fmt: skip
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_a_new_reduction_that_is_not_linear_reaches_the_head(largest_step):
    """The head computes a linear reduction's gradient in its forward pass;
    a reduction the registry does not call linear is left to autodiff
    (the chunks recompute their logits in the backward pass): the gradient
    of the largest loss is that one step's."""
    hidden = RNG.normal(size=(B, T, H)).astype("float32")
    kernel = RNG.normal(size=(H, C)).astype("float32")
    logits = hidden.astype("float64") @ kernel
    per_step = np.where(VALID, np_sparse_ce(LABELS, logits), -np.inf)
    largest = np.unravel_index(np.argmax(per_step), per_step.shape)

    def head(x):
        return kmask.fused_linear_crossentropy(
            x, kernel, LABELS, mask_value=0, reduction=largest_step, chunk_size=4
        )

    value, grad = value_and_grad(head, hidden)
    np.testing.assert_allclose(float(value), per_step[largest], rtol=1e-5)
    # d l / d hidden at that step: (softmax - one_hot) @ kernel.T
    row = logits[largest]
    softmax = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    softmax[LABELS[largest]] -= 1.0
    expected = np.zeros(hidden.shape)
    expected[largest] = softmax @ kernel.T.astype("float64")
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


class _AboveVocabulary(kmask.MaskedSparseCategoricalCrossentropy):
    """A new source of padding: labels at or above `limit` are padding (as
    some tokenizers mark special tokens), besides `mask_value`."""

    limit = C - 1

    def target_mask(self, y_true):
        # Sparse labels come with a trailing axis of 1 (see `target_mask`).
        below = ops.less(y_true, ops.cast(self.limit, y_true.dtype))
        special = ops.all(below, axis=-1)
        found = super().target_mask(y_true)
        return special if found is None else ops.logical_and(found, special)


def test_a_new_mask_source_reaches_the_loss_and_a_metric():
    valid = VALID & (LABELS < C - 1)
    expected = np_sparse_ce(LABELS, LOGITS)[valid].mean()
    loss = _AboveVocabulary(from_logits=True, mask_value=0)
    np.testing.assert_allclose(float(loss(LABELS, LOGITS)), expected, rtol=1e-5)
    metric = kmask.MaskedMeanMetricWrapper(loss)
    metric.update_state(LABELS, LOGITS)
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-5)


# ----------------------------------------------------------------------------
# `call()` is the extension point of every loss class, as in Keras.


class _SquaredSequenceLoss(kmask.SequenceLoss):
    """Per step, the squared distance of the softmax to the one-hot label."""

    def call(self, y_true, y_pred):
        one_hot = ops.one_hot(ops.cast(y_true, "int32"), C)
        return ops.mean(ops.square(ops.softmax(y_pred, axis=-1) - one_hot), axis=-1)


def test_sequence_loss_honours_an_overridden_call():
    weights = np.where(VALID, RNG.uniform(0.5, 2.0, size=(B, T)), 0.0)
    logits = np.where(VALID[..., None], LOGITS, np.nan).astype("float32")
    probs = np.exp(np_log_softmax(LOGITS.astype("float64")))
    per_step = ((probs - np.eye(C)[LABELS]) ** 2).mean(-1)
    # SequenceLoss's defaults: sum over both axes, divided by the non-zero
    # weights.
    expected = (per_step * weights)[VALID].sum() / VALID.sum()
    value = _SquaredSequenceLoss()(LABELS, logits, weights.astype("float32"))
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


class _FirstFrameCTC(kmask.MaskedCTC):
    """A per-sequence loss of its own: minus the first frame's log-softmax
    of the first label."""

    def call(self, y_true, y_pred):
        log_probs = ops.log_softmax(y_pred[:, 0, :], axis=-1)
        first = ops.maximum(ops.cast(y_true[:, 0], "int32"), 0)
        return -ops.take_along_axis(log_probs, first[:, None], axis=-1)[:, 0]


def test_masked_ctc_honours_an_overridden_call():
    labels = np.array([[1, 2, -1], [3, -1, -1], [2, 2, 1]], "int32")
    logits = RNG.normal(size=(3, 6, C)).astype("float32")
    log_probs = np_log_softmax(logits[:, 0, :].astype("float64"))
    per_sequence = -log_probs[np.arange(3), labels[:, 0]]
    # token_mean: the sum over sequences over their real labels.
    expected = per_sequence.sum() / (labels != -1).sum()
    value = _FirstFrameCTC()(labels, logits)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
