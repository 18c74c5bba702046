"""`kmask.sequence_loss` and `kmask.SequenceLoss` against a NumPy version of
TensorFlow Addons' `tfa.seq2seq` semantics: every flag combination TFA
accepts, the four pairs it rejects, ranks 0, 1 and 2."""

from __future__ import annotations

import inspect
import itertools

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import kmask
from tests._grad import value_and_grad
from tools.parity.references import np_log_softmax

FLAGS = (
    "average_across_timesteps",
    "average_across_batch",
    "sum_over_timesteps",
    "sum_over_batch",
)
# The pairs TFA rejects, with the words its error says.
REJECTED = {
    ("average_across_timesteps", "sum_over_timesteps"): "at same time",
    ("average_across_batch", "sum_over_batch"): "at same time",
    ("average_across_batch", "sum_over_timesteps"): "ambiguous order",
    ("average_across_timesteps", "sum_over_batch"): "ambiguous order",
}
ALL_COMBINATIONS = [
    dict(zip(FLAGS, values, strict=True))
    for values in itertools.product([False, True], repeat=4)
]


def _rejected_pair(flags: dict) -> tuple | None:
    for pair in REJECTED:
        if flags[pair[0]] and flags[pair[1]]:
            return pair
    return None


ACCEPTED = [flags for flags in ALL_COMBINATIONS if _rejected_pair(flags) is None]
REFUSED = [flags for flags in ALL_COMBINATIONS if _rejected_pair(flags) is not None]


def _flag_id(flags: dict) -> str:
    return "+".join(name for name, on in flags.items() if on) or "none"


def tfa_reference(logits, targets, weights, flags: dict, per_step=None) -> np.ndarray:
    """TFA's `sequence_loss` in float64 NumPy: the weighted per-step
    cross-entropy, then its reductions with `divide_no_nan`."""
    logits = np.asarray(logits, "float64")
    weights = np.asarray(weights, "float64")
    targets = np.asarray(targets)
    if per_step is None:
        log_probs = np_log_softmax(logits)
        if targets.ndim == 2:
            per_step = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        else:
            per_step = -(targets * log_probs).sum(-1)
    crossent = per_step * weights

    def divide_no_nan(numerator, denominator):
        safe = np.where(denominator == 0, 1.0, denominator)
        return np.where(denominator == 0, 0.0, numerator / safe)

    at, ab = flags["average_across_timesteps"], flags["average_across_batch"]
    st_, sb = flags["sum_over_timesteps"], flags["sum_over_batch"]
    if at and ab:
        return divide_no_nan(crossent.sum(), weights.sum())
    if st_ and sb:
        return divide_no_nan(crossent.sum(), np.count_nonzero(weights))
    if at or ab:
        axis = 0 if ab else 1
        return divide_no_nan(crossent.sum(axis), weights.sum(axis))
    if st_ or sb:
        axis = 0 if sb else 1
        return divide_no_nan(crossent.sum(axis), np.count_nonzero(weights, axis))
    return crossent


def _batch(targets_rank: int, seed: int = 0):
    """Logits, targets and weights with 0s (a whole sequence of them, so a
    per-batch-row denominator is 0), fractional and large weights, so that
    the sum of the weights and their non-zero count differ."""
    rng = np.random.default_rng(seed)
    batch, time, classes = 3, 4, 5
    logits = rng.normal(size=(batch, time, classes)).astype("float32")
    labels = rng.integers(0, classes, (batch, time))
    weights = np.array(
        [[1.0, 0.5, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0]],
        "float32",
    )
    if targets_rank == 2:
        return logits, labels.astype("int32"), weights
    soft = rng.uniform(size=(batch, time, classes))
    return logits, (soft / soft.sum(-1, keepdims=True)).astype("float32"), weights


def _expected_shape(flags: dict) -> tuple:
    batch, time = 3, 4
    across = {
        "time": flags["average_across_timesteps"] or flags["sum_over_timesteps"],
        "batch": flags["average_across_batch"] or flags["sum_over_batch"],
    }
    return tuple(
        size for size, axis in ((batch, "batch"), (time, "time")) if not across[axis]
    )


@pytest.mark.parametrize("targets_rank", [2, 3])
@pytest.mark.parametrize("flags", ACCEPTED, ids=_flag_id)
def test_function_matches_tfa_semantics(flags, targets_rank):
    logits, targets, weights = _batch(targets_rank)
    found = kmask.sequence_loss(logits, targets, weights, **flags)
    expected = tfa_reference(logits, targets, weights, flags)
    assert tuple(found.shape) == _expected_shape(flags) == expected.shape
    np.testing.assert_allclose(ops.convert_to_numpy(found), expected, rtol=1e-5)


@pytest.mark.parametrize("flags", ACCEPTED, ids=_flag_id)
def test_class_matches_tfa_semantics(flags):
    logits, targets, weights = _batch(2, seed=1)
    loss = kmask.SequenceLoss(**flags)
    found = loss(targets, logits, sample_weight=weights)
    expected = tfa_reference(logits, targets, weights, flags)
    assert tuple(found.shape) == expected.shape
    np.testing.assert_allclose(ops.convert_to_numpy(found), expected, rtol=1e-5)


def test_seven_combinations_accepted_nine_rejected():
    assert len(ACCEPTED) == 7 and len(REFUSED) == 9
    assert {len(_expected_shape(flags)) for flags in ACCEPTED} == {0, 1, 2}


@pytest.mark.parametrize("flags", REFUSED, ids=_flag_id)
def test_rejected_pairs_raise_tfa_value_error(flags):
    first, second = _rejected_pair(flags)
    words = REJECTED[(first, second)]
    logits, targets, weights = _batch(2)
    pattern = f"`{first}` and `{second}`.*{words}|`{second}` and `{first}`.*{words}"
    with pytest.raises(ValueError, match=pattern):
        kmask.sequence_loss(logits, targets, weights, **flags)
    with pytest.raises(ValueError, match=pattern):
        kmask.SequenceLoss(**flags)


def test_defaults_are_tfa_defaults():
    function = inspect.signature(kmask.sequence_loss).parameters
    cls = inspect.signature(kmask.SequenceLoss).parameters
    assert [function[name].default for name in FLAGS] == [True, True, False, False]
    assert [cls[name].default for name in FLAGS] == [False, False, True, True]
    assert function["softmax_loss_function"].default is None
    assert cls["softmax_loss_function"].default is None
    assert list(function)[:3] == ["logits", "targets", "weights"]


def test_weights_none_means_all_ones():
    logits, targets, _ = _batch(2)
    ones = np.ones(targets.shape, "float32")
    for flags in ACCEPTED:
        found = kmask.sequence_loss(logits, targets, None, **flags)
        expected = tfa_reference(logits, targets, ones, flags)
        np.testing.assert_allclose(ops.convert_to_numpy(found), expected, rtol=1e-5)
    found = kmask.SequenceLoss()(targets, logits)
    expected = tfa_reference(logits, targets, ones, ACCEPTED_DEFAULT_CLASS)
    np.testing.assert_allclose(ops.convert_to_numpy(found), expected, rtol=1e-5)


ACCEPTED_DEFAULT_CLASS = dict(zip(FLAGS, (False, False, True, True), strict=True))


@pytest.mark.parametrize("flags", ACCEPTED, ids=_flag_id)
def test_nan_at_zero_weight_steps_never_leaks(flags):
    """TFA multiplies by the weights after the loss (NaN * 0 = NaN); kmask
    neutralises the zero-weight steps first, in the value and the gradient."""
    logits, targets, weights = _batch(2)
    poisoned = np.where((weights == 0)[..., None], np.nan, logits).astype("float32")
    labels_out_of_range = np.where(weights == 0, -100, targets).astype("int32")

    def total(x):
        found = kmask.sequence_loss(x, labels_out_of_range, weights, **flags)
        return ops.sum(found)

    value, grad = value_and_grad(total, poisoned)
    expected = tfa_reference(logits, targets, weights, flags)
    np.testing.assert_allclose(value, expected.sum(), rtol=1e-5)
    assert np.isfinite(grad).all()
    assert (grad[weights == 0] == 0).all()


@pytest.mark.parametrize("flags", ACCEPTED, ids=_flag_id)
def test_all_zero_weights_give_zero_not_nan(flags):
    """TFA's `divide_no_nan`: every denominator is 0, every result is 0."""
    logits, targets, weights = _batch(2)
    zeros = np.zeros_like(weights)
    value, grad = value_and_grad(
        lambda x: ops.sum(kmask.sequence_loss(x, targets, zeros, **flags)), logits
    )
    found = kmask.sequence_loss(logits, targets, zeros, **flags)
    np.testing.assert_array_equal(ops.convert_to_numpy(found), 0.0)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_default_equals_the_kmask_token_mean():
    """What the TFA guide recommends for exact means across replicas gives
    the function's default on one device."""
    logits, targets, weights = _batch(2)
    token_mean = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True)
    expected = tfa_reference(logits, targets, weights, dict.fromkeys(FLAGS, False))
    expected = expected.sum() / weights.sum()
    assert float(token_mean(targets, logits, sample_weight=weights)) == pytest.approx(
        expected, rel=1e-5
    )
    assert float(kmask.sequence_loss(logits, targets, weights)) == pytest.approx(
        expected, rel=1e-5
    )


def test_gradient_matches_numpy():
    """d/dlogits of TFA's default scalar: w * (softmax - onehot) / sum(w)."""
    logits, targets, weights = _batch(2)

    def mean(x):
        return kmask.sequence_loss(x, targets, weights)

    _, grad = value_and_grad(mean, logits)
    probs = np.exp(np_log_softmax(logits.astype("float64")))
    onehot = np.eye(logits.shape[-1])[targets]
    expected = weights[..., None] * (probs - onehot) / weights.sum()
    np.testing.assert_allclose(grad, expected, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    weights=st.lists(
        st.sampled_from([0.0, 0.25, 1.0, 3.0]), min_size=6, max_size=6
    ).map(lambda w: np.array(w, "float32").reshape(2, 3)),
    flags=st.sampled_from(ACCEPTED),
)
def test_random_weights_match_tfa_semantics(weights, flags):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 3, 4)).astype("float32")
    targets = rng.integers(0, 4, (2, 3)).astype("int32")
    found = kmask.sequence_loss(logits, targets, weights, **flags)
    expected = tfa_reference(logits, targets, weights, flags)
    np.testing.assert_allclose(
        ops.convert_to_numpy(found), expected, rtol=1e-5, atol=1e-7
    )


def test_softmax_loss_function_gets_named_flattened_steps():
    """TFA calls `softmax_loss_function(labels=..., logits=...)` on
    `[batch * time]` labels and `[batch * time, classes]` logits."""
    logits, targets, weights = _batch(2)
    seen = {}

    def doubled_crossentropy(labels, logits):
        seen["shapes"] = (tuple(labels.shape), tuple(logits.shape))
        seen["dtype"] = keras.backend.standardize_dtype(labels.dtype)
        return 2.0 * ops.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )

    flags = dict(zip(FLAGS, (False, False, True, True), strict=True))
    found = kmask.sequence_loss(
        logits, targets, weights, softmax_loss_function=doubled_crossentropy, **flags
    )
    expected = tfa_reference(logits, targets, weights, flags)
    np.testing.assert_allclose(float(found), 2 * expected, rtol=1e-5)
    assert seen["shapes"] == ((12,), (12, 5))
    assert seen["dtype"] == "int32"


def test_rank_errors_name_the_argument():
    logits, targets, weights = _batch(2)
    with pytest.raises(ValueError, match=r"argument `logits`.*logits.shape=\(3, 4\)"):
        kmask.sequence_loss(logits[..., 0], targets, weights)
    with pytest.raises(ValueError, match="argument `targets`"):
        kmask.sequence_loss(logits, targets[:, 0], weights)
    with pytest.raises(ValueError, match="argument `weights`"):
        kmask.sequence_loss(logits, targets, weights[..., None])


def test_propagated_mask_counts_as_zero_weight():
    logits, targets, weights = _batch(2)
    ones = np.ones_like(weights)
    masked = keras.layers.Masking(mask_value=0.0)
    hidden = np.where((weights == 0)[..., None], 0.0, logits).astype("float32")
    with_mask = masked(hidden)
    flags = dict(zip(FLAGS, (False, False, True, True), strict=True))
    found = kmask.sequence_loss(with_mask, targets, ones, **flags)
    expected = tfa_reference(logits, targets, (weights != 0).astype("float32"), flags)
    np.testing.assert_allclose(float(found), expected, rtol=1e-5)


def test_config_round_trip_and_saved_model(tmp_path):
    loss = kmask.SequenceLoss(
        average_across_timesteps=True, sum_over_timesteps=False, sum_over_batch=False
    )
    config = loss.get_config()
    assert config == {
        "average_across_timesteps": True,
        "average_across_batch": False,
        "sum_over_timesteps": False,
        "sum_over_batch": False,
        "softmax_loss_function": None,
        "name": "sequence_loss",
    }
    assert kmask.SequenceLoss.from_config(config).get_config() == config

    inputs = keras.Input((4, 5))
    model = keras.Model(inputs, keras.layers.Dense(5)(inputs))
    model.compile(optimizer="sgd", loss=kmask.SequenceLoss())
    logits, targets, weights = _batch(2)
    before = model.evaluate(logits, targets, sample_weight=weights, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.loss, kmask.SequenceLoss)
    assert reloaded.loss.get_config() == kmask.SequenceLoss().get_config()
    after = reloaded.evaluate(logits, targets, sample_weight=weights, verbose=0)
    assert after == pytest.approx(before, rel=1e-6)


def test_fit_with_the_class_default():
    """In `compile()`: `sample_weight` plays TFA's `weights`."""
    logits, targets, weights = _batch(2)
    inputs = keras.Input((4, 5))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.compile(loss=kmask.SequenceLoss())
    found = model.evaluate(logits, targets, sample_weight=weights, verbose=0)
    expected = tfa_reference(logits, targets, weights, ACCEPTED_DEFAULT_CLASS)
    assert found == pytest.approx(float(expected), rel=1e-5)
