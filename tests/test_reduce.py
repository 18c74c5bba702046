"""Tests for `kmask.reduce`; every expectation comes from a NumPy reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops

import kmask
from kmask.reduce import masked_sum_and_count
from tests._grad import value_and_grad

SCALAR_REDUCTIONS = ("token_mean", "sequence_mean", "sum", "sum_over_batch_size")
KERAS_ALIASES = {
    None: "none",
    "mean": "sum_over_batch_size",
    "mean_with_sample_weight": "token_mean",
}
BACKEND = keras.backend.backend()


def to_numpy(tensor) -> np.ndarray:
    """float32 first: NumPy (and TensorFlow's conversion) lack bfloat16."""
    if keras.backend.standardize_dtype(tensor.dtype) not in ("float64", "float32"):
        tensor = ops.cast(tensor, "float32")
    return np.asarray(ops.convert_to_numpy(tensor))


def _leading(array, rank: int) -> np.ndarray:
    """`[batch]` or a leading part of the values' shape, trailing axes added."""
    return array.reshape(array.shape + (1,) * (rank - array.ndim))


def reference_weight(values, mask=None, sample_weight=None) -> np.ndarray:
    """`w*m` per step, in float64, broadcast to the values' shape."""
    values = np.asarray(values)
    weight = np.ones(values.shape)
    if mask is not None:
        weight = weight * _leading(np.asarray(mask, dtype=bool), values.ndim)
    if sample_weight is not None:
        weight = weight * _leading(np.asarray(sample_weight, "float64"), values.ndim)
    return weight


def _mask_count(values, mask=None) -> int:
    """What Keras's `sum_over_batch_size` divides by: the real steps of the
    mask, or every step without one."""
    values = np.asarray(values)
    if mask is None:
        return values.size
    real = _leading(np.asarray(mask, dtype=bool), values.ndim)
    return int(np.broadcast_to(real, values.shape).sum())


def _sequence_steps(weight) -> np.ndarray:
    """The number of real steps of each sequence: `n` in the docstring."""
    return (weight != 0).reshape(weight.shape[0], -1).sum(axis=1)


def reference_reduce(values, mask=None, reduction="token_mean", sample_weight=None):
    """The table in `kmask.reduce`'s docstring, in float64."""
    values = np.asarray(values, dtype="float64")
    weight = reference_weight(values, mask, sample_weight)
    per_step = np.where(weight != 0, values, 0.0) * weight
    if reduction == "none":
        return per_step
    if reduction == "sum":
        return per_step.sum()
    if reduction == "sum_over_batch_size":
        # Keras: the real steps of the mask, zero weights included.
        count = _mask_count(values, mask)
        return per_step.sum() / count if count else 0.0
    if reduction == "token_mean":
        total_weight = weight.sum()
        return per_step.sum() / total_weight if total_weight else 0.0
    batch = values.shape[0]
    steps = _sequence_steps(weight)
    present = steps > 0
    numerator = per_step.reshape(batch, -1).sum(axis=1)[present] / steps[present]
    denominator = weight.reshape(batch, -1).sum(axis=1)[present] / steps[present]
    return numerator.sum() / denominator.sum() if present.any() else 0.0


def reference_grad(values, mask=None, reduction="token_mean", sample_weight=None):
    """d result / d values: the weights over the (value-free) denominators;
    `none` is differentiated through its sum."""
    values = np.asarray(values)
    weight = reference_weight(values, mask, sample_weight)
    if reduction in ("none", "sum"):
        return weight
    if reduction == "sum_over_batch_size":
        count = _mask_count(values, mask)
        return weight / count if count else np.zeros(values.shape)
    if reduction == "token_mean":
        return weight / weight.sum() if weight.sum() else np.zeros(values.shape)
    steps = _leading(_sequence_steps(weight), values.ndim).astype("float64")
    per_sequence = np.divide(weight, steps, out=np.zeros(values.shape), where=steps > 0)
    total = per_sequence.sum()
    return per_sequence / total if total else np.zeros(values.shape)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(to_numpy(actual), expected, rtol=rtol, atol=atol)


# --- one batch, every reduction and mask/weight combination ----------------

_RNG = np.random.default_rng(7)
VALUES = _RNG.normal(size=(3, 5)).astype("float32") * 3
MASKS = {
    "no_mask": None,
    "batch_mask": np.array([True, False, True]),
    "step_mask": np.array(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=bool
    ),
}
WEIGHTS = {
    "no_weight": None,
    "batch_weight": np.array([0.5, 2.0, 1.0], "float32"),
    "step_weight": np.array(
        [[1, 2, 0, 1, 1], [0.5, 0.5, 1, 1, 0], [3, 1, 1, 0, 2]], "float32"
    ),
}


@pytest.mark.parametrize("weight_name", WEIGHTS)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
def test_masked_reduce_matches_numpy(reduction, mask_name, weight_name):
    mask, sample_weight = MASKS[mask_name], WEIGHTS[weight_name]
    result = kmask.masked_reduce(VALUES, mask, reduction, sample_weight)
    expected = reference_reduce(VALUES, mask, reduction, sample_weight)
    assert tuple(result.shape) == np.shape(expected)
    assert_close(result, expected)


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
def test_masked_reduce_features_with_step_mask(reduction):
    values = _RNG.normal(size=(2, 4, 3)).astype("float32")
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    sample_weight = np.array([2.0, 1.0], "float32")
    result = kmask.masked_reduce(values, mask, reduction, sample_weight)
    assert_close(result, reference_reduce(values, mask, reduction, sample_weight))


def test_masked_reduce_hand_computed_sequence_mean():
    """Guards the reference itself: the mean of the per-sequence means."""
    values = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=bool)
    assert reference_reduce(values, mask, "sequence_mean") == 3.0
    assert reference_reduce(values, mask, "token_mean") == 2.5
    assert_close(kmask.masked_reduce(values, mask, "sequence_mean"), 3.0)


def test_masked_reduce_mask_with_trailing_unit_axis():
    mask = MASKS["step_mask"][..., None]
    result = kmask.masked_reduce(VALUES, mask)
    assert_close(result, reference_reduce(VALUES, MASKS["step_mask"]))


def test_masked_reduce_tensor_inputs():
    mask, sample_weight = MASKS["step_mask"], WEIGHTS["batch_weight"]
    result = kmask.masked_reduce(
        ops.convert_to_tensor(VALUES),
        ops.convert_to_tensor(mask),
        "sequence_mean",
        ops.convert_to_tensor(sample_weight),
    )
    assert_close(result, reference_reduce(VALUES, mask, "sequence_mean", sample_weight))


@pytest.mark.parametrize("alias", list(KERAS_ALIASES))
def test_masked_reduce_accepts_keras_reduction_names(alias):
    mask, sample_weight = MASKS["step_mask"], WEIGHTS["step_weight"]
    result = kmask.masked_reduce(VALUES, mask, alias, sample_weight)
    expected = reference_reduce(VALUES, mask, KERAS_ALIASES[alias], sample_weight)
    assert_close(result, expected)


def test_masked_reduce_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="`reduction`") as error:
        kmask.masked_reduce(VALUES, reduction="average")
    message = str(error.value)
    for name in kmask.REDUCTIONS:
        assert repr(name) in message
    assert "reduction='average'" in message


@pytest.mark.parametrize(
    ("argument", "shape"),
    [
        ("mask", (2,)),
        ("mask", (3, 4)),
        ("mask", (5, 3)),
        ("mask", (3, 5, 2)),
        ("sample_weight", (4,)),
        ("sample_weight", (3, 6)),
    ],
)
def test_masked_reduce_rejects_shapes_that_do_not_fit(argument, shape):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        kmask.masked_reduce(VALUES, **{argument: np.ones(shape)})
    message = str(error.value)
    assert str(VALUES.shape) in message
    assert str(shape) in message


# --- padding: all of it, and what it holds ---------------------------------


@pytest.mark.parametrize("reduction", SCALAR_REDUCTIONS)
@pytest.mark.parametrize(
    ("mask", "sample_weight"),
    [
        (np.zeros((3, 5), bool), None),
        (np.zeros(3, bool), None),
        (None, np.zeros((3, 5), "float32")),
        (np.ones(3, bool), np.zeros(3, "float32")),
    ],
    ids=["step_mask", "batch_mask", "zero_weights", "zero_batch_weights"],
)
@pytest.mark.parametrize("padding_value", [0.0, float("nan"), float("inf")])
def test_all_padding_is_exactly_zero(reduction, mask, sample_weight, padding_value):
    values = np.full((3, 5), padding_value, "float32")
    result = to_numpy(kmask.masked_reduce(values, mask, reduction, sample_weight))
    assert result == 0.0


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
@pytest.mark.parametrize("padding_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_padding_does_not_change_the_result(reduction, padding_value):
    mask, sample_weight = MASKS["step_mask"], WEIGHTS["step_weight"]
    padding = reference_weight(VALUES, mask, sample_weight) == 0
    poisoned = np.where(padding, padding_value, VALUES).astype("float32")
    result = to_numpy(kmask.masked_reduce(poisoned, mask, reduction, sample_weight))
    clean = to_numpy(kmask.masked_reduce(VALUES, mask, reduction, sample_weight))
    assert np.all(np.isfinite(result))
    np.testing.assert_array_equal(result, clean)
    assert_close(result, reference_reduce(VALUES, mask, reduction, sample_weight))


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
def test_one_token(reduction):
    values = np.array([[7.5, np.nan, np.nan], [np.nan, np.nan, np.nan]], "float32")
    mask = np.array([[True, False, False], [False, False, False]])
    result = kmask.masked_reduce(values, mask, reduction)
    assert_close(result, reference_reduce(np.nan_to_num(values), mask, reduction))


@pytest.mark.parametrize("reduction", SCALAR_REDUCTIONS)
def test_an_empty_batch_is_zero_with_a_zero_gradient(reduction):
    """No sequences at all: 0 like Keras's `divide_no_nan`, never 0 / 0."""
    empty = np.zeros((0, 5), "float32")
    value, grad = value_and_grad(
        lambda v: kmask.masked_reduce(v, None, reduction), empty
    )
    assert float(value) == 0.0
    assert tuple(grad.shape) == (0, 5)


# --- dtypes ----------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_float16_mean_of_100k_tokens(reduction, masked):
    """float16 holds neither 100,000 nor a sum of 100,000 ones: the sums
    must be accumulated in float32."""
    values = np.random.default_rng(0).uniform(0.0, 4.0, (100, 1000))
    values = values.astype("float16")
    mask = None
    if masked:
        lengths = np.random.default_rng(1).integers(0, 1001, 100)
        mask = np.arange(1000)[None, :] < lengths[:, None]
    result = kmask.masked_reduce(ops.convert_to_tensor(values), mask, reduction)
    assert keras.backend.standardize_dtype(result.dtype) == "float16"
    expected = reference_reduce(values, mask, KERAS_ALIASES.get(reduction, reduction))
    assert_close(result, expected, rtol=2e-3)


def test_float16_ones_of_100k_tokens():
    values = ops.ones((100, 1000), dtype="float16")
    result = kmask.masked_reduce(values)
    assert keras.backend.standardize_dtype(result.dtype) == "float16"
    assert to_numpy(result) == 1.0


FLOAT_DTYPES = [
    "float16",
    "bfloat16",
    "float32",
    pytest.param(
        "float64",
        marks=pytest.mark.skipif(
            BACKEND == "jax", reason="JAX runs without x64 by default"
        ),
    ),
]


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_result_dtype_is_the_values_dtype(dtype, reduction):
    values = ops.convert_to_tensor(VALUES, dtype=dtype)
    mask = MASKS["step_mask"]
    result = kmask.masked_reduce(values, mask, reduction)
    assert keras.backend.standardize_dtype(result.dtype) == dtype
    rounded = to_numpy(values).astype("float64")
    rtol = 1e-2 if dtype in ("float16", "bfloat16") else 1e-5
    assert_close(result, reference_reduce(rounded, mask, reduction), rtol, 1e-2)


@pytest.mark.skipif(BACKEND == "jax", reason="JAX runs without x64 by default")
@pytest.mark.parametrize("reduction", SCALAR_REDUCTIONS)
def test_float64_is_accumulated_in_float64(reduction):
    """1 + 1e-9 is 1 in float32: a float32 sum would be off by ~5e-9."""
    values = 1.0 + 1e-9 * np.arange(15.0).reshape(3, 5)
    mask = MASKS["step_mask"]
    result = kmask.masked_reduce(
        ops.convert_to_tensor(values, "float64"), mask, reduction
    )
    assert_close(result, reference_reduce(values, mask, reduction), 1e-13, 0.0)


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
def test_integer_values_give_float32(reduction):
    values = np.arange(15, dtype="int32").reshape(3, 5)
    mask = MASKS["step_mask"]
    result = kmask.masked_reduce(values, mask, reduction)
    assert keras.backend.standardize_dtype(result.dtype) == "float32"
    assert_close(result, reference_reduce(values, mask, reduction))


# --- masked_sum_and_count --------------------------------------------------


@pytest.mark.parametrize("weight_name", WEIGHTS)
@pytest.mark.parametrize("mask_name", MASKS)
def test_masked_sum_and_count_matches_numpy(mask_name, weight_name):
    mask, sample_weight = MASKS[mask_name], WEIGHTS[weight_name]
    padding = reference_weight(VALUES, mask, sample_weight) == 0
    poisoned = np.where(padding, np.nan, VALUES).astype("float16")
    total, count = masked_sum_and_count(poisoned, mask, sample_weight)
    weight = reference_weight(VALUES, mask, sample_weight)
    rounded = np.where(padding, 0.0, poisoned.astype("float64"))
    assert keras.backend.standardize_dtype(total.dtype) == "float32"
    assert keras.backend.standardize_dtype(count.dtype) == "float32"
    assert_close(total, (rounded * weight).sum())
    assert_close(count, weight.sum())


# --- property-based --------------------------------------------------------


@st.composite
def _leading_mask(draw, shape):
    """A mask of shape `[batch]` up to `shape`; all real and all padding
    are drawn often."""
    part = shape[: draw(st.integers(1, len(shape)))]
    fill = draw(st.sampled_from(["random", "random", "all_real", "all_padding"]))
    if fill == "random":
        return draw(hnp.arrays("bool", part))
    return np.full(part, fill == "all_real")


@st.composite
def _leading_weight(draw, shape):
    part = shape[: draw(st.integers(1, len(shape)))]
    return draw(hnp.arrays("float32", part, elements=st.sampled_from([0, 0.5, 1, 2])))


@st.composite
def _reduce_case(draw):
    """Values of 1 to 3 axes, an optional mask and weight, any reduction name,
    and sometimes NaN at every padded step."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    values = draw(hnp.arrays("float32", shape, elements=st.floats(-100, 100, width=32)))
    mask = draw(st.one_of(st.none(), _leading_mask(shape)))
    sample_weight = draw(st.one_of(st.none(), _leading_weight(shape)))
    reduction = draw(st.sampled_from([*kmask.REDUCTIONS, *KERAS_ALIASES]))
    if draw(st.booleans()):
        padding = reference_weight(values, mask, sample_weight) == 0
        values = np.where(padding, np.nan, values).astype("float32")
    return values, mask, reduction, sample_weight


@settings(max_examples=40, deadline=None)
@given(_reduce_case())
def test_masked_reduce_matches_numpy_property(case):
    values, mask, reduction, sample_weight = case
    result = kmask.masked_reduce(values, mask, reduction, sample_weight)
    reduction = KERAS_ALIASES.get(reduction, reduction)
    expected = reference_reduce(values, mask, reduction, sample_weight)
    assert tuple(result.shape) == np.shape(expected)
    # float32 rounding is relative to the terms summed, not to their sum.
    scale = np.max(reference_reduce(np.abs(values), mask, reduction, sample_weight))
    assert_close(result, expected, rtol=1e-5, atol=1e-5 * scale + 1e-6)


# --- gradients -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(_reduce_case())
def test_value_gradient_is_the_gradient_of_the_reduction_property(case):
    """`value_gradient` (what the head's forward pass multiplies by) is the
    gradient of the NumPy reduction: it is linear, so its gradient at step
    `i` is its value on the one-hot values `e_i`."""
    values, mask, reduction, sample_weight = case
    reduction = KERAS_ALIASES.get(reduction, reduction)
    if reduction == "none":
        with pytest.raises(ValueError, match="linear reduction"):
            kmask.reduce.value_gradient(values.shape, reduction=reduction)
        return
    mask_, weight = (
        None if x is None else ops.convert_to_tensor(x) for x in (mask, sample_weight)
    )
    found = kmask.reduce.value_gradient(values.shape, mask_, reduction, weight)
    expected = np.zeros(values.shape)
    for index in np.ndindex(values.shape):
        one_hot = np.zeros(values.shape)
        one_hot[index] = 1.0
        expected[index] = reference_reduce(one_hot, mask, reduction, sample_weight)
    assert_close(found, expected, rtol=1e-6, atol=1e-7)


def _reduce_fn(mask, reduction, sample_weight):
    def fn(values):
        result = kmask.masked_reduce(values, mask, reduction, sample_weight)
        return ops.sum(result) if reduction == "none" else result

    return fn


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
def test_gradient_is_zero_at_padding_even_with_nan(reduction, jit):
    mask, sample_weight = MASKS["step_mask"], WEIGHTS["step_weight"]
    padding = reference_weight(VALUES, mask, sample_weight) == 0
    poisoned = np.where(padding, np.nan, VALUES).astype("float32")
    value, grad = value_and_grad(
        _reduce_fn(mask, reduction, sample_weight), poisoned, jit=jit
    )
    assert np.all(np.isfinite(grad))
    assert np.all(grad[padding] == 0.0)
    expected = reference_reduce(VALUES, mask, reduction, sample_weight)
    np.testing.assert_allclose(value, np.sum(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        grad, reference_grad(VALUES, mask, reduction, sample_weight), rtol=1e-5
    )


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
def test_gradient_is_zero_on_an_all_padding_batch(reduction):
    values = np.full((3, 5), np.nan, "float32")
    value, grad = value_and_grad(_reduce_fn(np.zeros(3, bool), reduction, None), values)
    assert value == 0.0
    np.testing.assert_array_equal(grad, np.zeros((3, 5)))


def test_gradient_with_batch_mask_and_batch_weight():
    mask, sample_weight = MASKS["batch_mask"], WEIGHTS["batch_weight"]
    padding = reference_weight(VALUES, mask, sample_weight) == 0
    poisoned = np.where(padding, np.inf, VALUES).astype("float32")
    _, grad = value_and_grad(_reduce_fn(mask, "sequence_mean", sample_weight), poisoned)
    np.testing.assert_allclose(
        grad, reference_grad(VALUES, mask, "sequence_mean", sample_weight), rtol=1e-5
    )


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays("float64", st.integers(1, 6), elements=st.floats(-5, 5)),
    st.integers(0, 2**31 - 1),
)
def test_token_counts_make_token_mean_a_mean_over_tokens(losses, seed):
    """One value per sequence standing for `counts` tokens (a CTC loss):
    `sum(l*w*m) / sum(counts*w*m)`."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, size=losses.shape)
    mask = rng.random(losses.shape) < 0.8
    weights = rng.random(losses.shape)
    found = kmask.masked_reduce(
        losses, mask, sample_weight=weights, token_counts=counts
    )
    keep = mask & (weights != 0)
    denominator = (counts * weights)[keep].sum()
    expected = (losses * weights)[keep].sum() / denominator if denominator else 0.0
    assert float(found) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_token_counts_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"argument `token_counts`.*\(3,\)"):
        kmask.masked_reduce(np.ones((2,)), token_counts=np.ones((3,)))
