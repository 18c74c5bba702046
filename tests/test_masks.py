"""Tests for `kmask.masks`; every expectation comes from a NumPy reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import kmask

NAN = float("nan")


def to_numpy(tensor) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(tensor))


def reference_sequence_mask(lengths, maxlen=None, padding="post") -> np.ndarray:
    """Right padding compares positions with lengths; left padding is its
    mirror image, as in the seed's `tf.reverse(tf.sequence_mask(...), [1])`."""
    lengths = np.asarray(lengths)
    if maxlen is None:
        maxlen = int(lengths.max())
    post = np.arange(maxlen)[None, :] < lengths[:, None]
    return post if padding == "post" else post[:, ::-1]


def reference_value_mask(y, mask_value) -> np.ndarray:
    """A step is padding when its value (every feature, when there is a
    feature axis) equals the pad value, NaN matching NaN."""
    y = np.asarray(y, dtype="float64")
    pad = np.asarray(mask_value, dtype="float64")
    is_pad = (y == pad) | (np.isnan(y) & np.isnan(pad))
    if pad.ndim == 1 or y.ndim >= 3:
        is_pad = is_pad.all(axis=-1)
    return ~is_pad


# --- sequence_mask ---------------------------------------------------------


@pytest.mark.parametrize(
    ("padding", "expected"),
    [
        ("post", [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]),
        ("pre", [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]),
    ],
)
def test_sequence_mask_seed_example(padding, expected):
    mask = kmask.sequence_mask([3, 4], 5, padding=padding)
    np.testing.assert_array_equal(to_numpy(mask), np.array(expected, dtype=bool))
    np.testing.assert_array_equal(
        to_numpy(mask), reference_sequence_mask([3, 4], 5, padding)
    )


@pytest.mark.parametrize("padding", ["post", "pre"])
def test_sequence_mask_maxlen_defaults_to_longest_length(padding):
    lengths = np.array([2, 5, 0, 1])
    mask = kmask.sequence_mask(lengths, padding=padding)
    assert tuple(mask.shape) == (4, 5)
    np.testing.assert_array_equal(
        to_numpy(mask), reference_sequence_mask(lengths, 5, padding)
    )


@pytest.mark.parametrize(
    "lengths",
    [
        [3, 1],
        np.array([3, 1], dtype="int64"),
        np.array([3, 1], dtype="int32"),
        ops.convert_to_tensor([3, 1], dtype="int32"),
    ],
    ids=["list", "int64", "int32", "tensor"],
)
def test_sequence_mask_is_boolean_for_any_lengths_type(lengths):
    mask = kmask.sequence_mask(lengths, 4)
    assert keras.backend.standardize_dtype(mask.dtype) == "bool"
    np.testing.assert_array_equal(to_numpy(mask), reference_sequence_mask([3, 1], 4))


def test_sequence_mask_rejects_unknown_padding():
    with pytest.raises(ValueError, match="padding") as error:
        kmask.sequence_mask([1, 2], 3, padding="left")
    message = str(error.value)
    assert "'pre'" in message
    assert "'post'" in message
    assert "'left'" in message


@pytest.mark.parametrize(
    ("lengths", "maxlen"), [([3, 6], 5), ([-1, 2], 5), ([2, 3], 2)]
)
def test_sequence_mask_rejects_lengths_out_of_range(lengths, maxlen):
    with pytest.raises(ValueError, match="lengths") as error:
        kmask.sequence_mask(lengths, maxlen)
    assert str(lengths) in str(error.value)
    assert f"maxlen={maxlen}" in str(error.value)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 8), min_size=1, max_size=6),
    extra_steps=st.one_of(st.none(), st.integers(0, 3)),
    padding=st.sampled_from(["post", "pre"]),
)
def test_sequence_mask_matches_numpy(lengths, extra_steps, padding):
    maxlen = None if extra_steps is None else max(lengths) + extra_steps
    mask = kmask.sequence_mask(lengths, maxlen, padding=padding)
    expected = reference_sequence_mask(lengths, maxlen, padding)
    assert tuple(mask.shape) == expected.shape
    np.testing.assert_array_equal(to_numpy(mask), expected)
    # Each row keeps its own number of real steps whatever the padding side.
    np.testing.assert_array_equal(to_numpy(mask).sum(axis=1), lengths)


class _SequenceMaskLayer(keras.layers.Layer):
    def __init__(self, maxlen, padding, **kwargs):
        super().__init__(**kwargs)
        self.maxlen = maxlen
        self.padding = padding

    def call(self, lengths):
        return kmask.sequence_mask(lengths, self.maxlen, padding=self.padding)


@pytest.mark.parametrize("padding", ["post", "pre"])
def test_sequence_mask_in_a_compiled_model(padding):
    lengths = keras.Input(shape=(), dtype="int32")
    model = keras.Model(lengths, _SequenceMaskLayer(6, padding)(lengths))
    # torch.compile needs a C++ toolchain and ~25 s here; the functional model
    # above already traced the layer with symbolic lengths on every backend.
    model.compile(jit_compile=keras.backend.backend() != "torch")
    batch = np.array([0, 3, 6, 1], dtype="int32")
    mask = model.predict(batch, batch_size=4, verbose=0)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, reference_sequence_mask(batch, 6, padding))


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras-torch retries a failed symbolic call on placeholder tensors "
    "filled with ones, so the error is swallowed and maxlen becomes 1.",
)
def test_sequence_mask_needs_maxlen_for_symbolic_lengths():
    lengths = keras.Input(shape=(), dtype="int32")
    with pytest.raises(ValueError, match="maxlen"):
        _SequenceMaskLayer(None, "post")(lengths)


# --- value_mask ------------------------------------------------------------


@pytest.mark.parametrize("pad_id", [0, -100])
def test_value_mask_scalar_pad_id_on_sparse_labels(pad_id):
    labels = np.array([[5, 3, pad_id, pad_id], [pad_id, 7, 1, pad_id]], "int32")
    mask = kmask.value_mask(labels, pad_id)
    assert keras.backend.standardize_dtype(mask.dtype) == "bool"
    np.testing.assert_array_equal(to_numpy(mask), labels != pad_id)


def _seed_targets() -> np.ndarray:
    """The seed's `##abb` and `#babb`, one-hot over `a`, `b`, `#`."""
    alphabet = "ab#"
    sentences = ["##abb", "#babb"]
    return np.array(
        [[np.eye(3)[alphabet.index(c)] for c in sentence] for sentence in sentences],
        dtype="float32",
    )


def test_value_mask_one_hot_pad_vector_seed():
    y_true = _seed_targets()
    mask = kmask.value_mask(y_true, [0, 0, 1])
    assert tuple(mask.shape) == (2, 5)
    expected = [[False, False, True, True, True], [False, True, True, True, True]]
    np.testing.assert_array_equal(to_numpy(mask), np.array(expected))
    np.testing.assert_array_equal(to_numpy(mask), y_true.argmax(-1) != 2)


def test_value_mask_scalar_on_features_needs_every_feature_equal():
    y = np.array([[[0, 0], [0, 1], [1, 0]], [[2, 2], [0, 0], [0, 0]]], "float32")
    mask = kmask.value_mask(y, 0)
    assert tuple(mask.shape) == (2, 3)
    np.testing.assert_array_equal(to_numpy(mask), np.any(y != 0, axis=-1))


def test_value_mask_nan_scalar_on_regression_targets():
    y = np.array([[1.0, NAN, 0.0], [NAN, NAN, 2.0]], "float32")
    np.testing.assert_array_equal(to_numpy(kmask.value_mask(y, NAN)), ~np.isnan(y))


def test_value_mask_nan_scalar_on_features():
    y = np.array([[[NAN, NAN], [NAN, 1.0], [0.0, 0.0]]], "float32")
    mask = kmask.value_mask(y, NAN)
    np.testing.assert_array_equal(to_numpy(mask), [[False, True, True]])


def test_value_mask_nan_inside_pad_vector():
    y = np.array(
        [[[NAN, 0.0], [NAN, 1.0], [0.0, 0.0], [0.0, NAN], [NAN, NAN]]], "float32"
    )
    mask = kmask.value_mask(y, [NAN, 0.0])
    np.testing.assert_array_equal(to_numpy(mask), [[False, True, True, True, True]])
    np.testing.assert_array_equal(to_numpy(mask), reference_value_mask(y, [NAN, 0]))


def test_value_mask_rejects_pad_vector_of_wrong_length():
    y = np.zeros((2, 5, 4), "float32")
    with pytest.raises(ValueError, match="`mask_value`") as error:
        kmask.value_mask(y, [0, 0, 1])
    message = str(error.value)
    assert "length 3" in message
    assert "(2, 5, 4)" in message


def test_value_mask_rejects_matrix_pad_value():
    with pytest.raises(ValueError, match="`mask_value`"):
        kmask.value_mask(np.zeros((2, 3, 2)), [[0, 0], [0, 0]])


@st.composite
def _targets_and_pad(draw):
    """Small integer targets (so pad values occur often), rank 2 or 3, with a
    scalar or vector pad value; some float targets get NaN."""
    batch = draw(st.integers(1, 4))
    time = draw(st.integers(1, 6))
    features = draw(st.one_of(st.none(), st.integers(1, 3)))
    shape = (batch, time) if features is None else (batch, time, features)
    choices = [0, 1, -100, NAN] if draw(st.booleans()) else [0, 1, -100]
    flat = draw(st.lists(st.sampled_from(choices), min_size=int(np.prod(shape))))
    y = np.array(flat[: int(np.prod(shape))], "float32").reshape(shape)
    if features is not None and draw(st.booleans()):
        pad = draw(st.lists(st.sampled_from(choices), min_size=features))[:features]
    else:
        pad = draw(st.sampled_from(choices))
    return y, pad


@settings(max_examples=40, deadline=None)
@given(_targets_and_pad())
def test_value_mask_matches_numpy(targets_and_pad):
    y, pad = targets_and_pad
    mask = kmask.value_mask(y, pad)
    expected = reference_value_mask(y, pad)
    assert tuple(mask.shape) == expected.shape
    np.testing.assert_array_equal(to_numpy(mask), expected)


# --- combine_masks ---------------------------------------------------------


def test_combine_masks_sequence_with_step_mask():
    per_sequence = np.array([True, False, True])
    per_step = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=bool)
    expected = per_sequence[:, None] & per_step
    for masks in [(per_sequence, per_step), (per_step, per_sequence)]:
        combined = kmask.combine_masks(*masks)
        assert keras.backend.standardize_dtype(combined.dtype) == "bool"
        np.testing.assert_array_equal(to_numpy(combined), expected)


def test_combine_masks_three_masks_and_none():
    rng = np.random.default_rng(0)
    masks = [rng.random((2, 4)) > 0.3 for _ in range(3)]
    combined = kmask.combine_masks(masks[0], None, masks[1], masks[2], None)
    np.testing.assert_array_equal(to_numpy(combined), masks[0] & masks[1] & masks[2])


def test_combine_masks_none_handling():
    assert kmask.combine_masks() is None
    assert kmask.combine_masks(None, None) is None
    only = np.array([[1, 0, 2]])
    combined = kmask.combine_masks(None, only)
    assert keras.backend.standardize_dtype(combined.dtype) == "bool"
    np.testing.assert_array_equal(to_numpy(combined), only != 0)


# --- keras_mask ------------------------------------------------------------


def _padded_features() -> np.ndarray:
    x = np.arange(1, 25, dtype="float32").reshape(2, 4, 3)
    x[0, 1] = 0.0
    x[1, 2:] = 0.0
    x[1, 0, 0] = 0.0  # one zero feature does not make a pad step
    return x


def test_keras_mask_after_masking_layer():
    x = _padded_features()
    output = keras.layers.Masking(mask_value=0.0)(ops.convert_to_tensor(x))
    mask = kmask.keras_mask(output)
    assert mask is not None, "the mask Masking set is not found on its output"
    np.testing.assert_array_equal(to_numpy(mask), np.any(x != 0.0, axis=-1))


def test_keras_mask_propagated_through_a_model():
    x = _padded_features()
    model = keras.Sequential(
        [keras.Input((4, 3)), keras.layers.Masking(0.0), keras.layers.Dense(2)]
    )
    mask = kmask.keras_mask(model(x))
    assert mask is not None, "the model's output carries no mask"
    np.testing.assert_array_equal(to_numpy(mask), np.any(x != 0.0, axis=-1))


class _MaskOfMasking(keras.layers.Layer):
    def call(self, x):
        return kmask.keras_mask(keras.layers.Masking(0.0)(x))


def test_keras_mask_inside_a_compiled_model():
    """Under `jax.jit` the mask cannot be an attribute of the traced array;
    eager JAX arrays (Keras 3.15.1) do take the attribute, so only a traced
    call shows that `keras_mask` finds it where Keras keeps it."""
    x = _padded_features()
    inputs = keras.Input((4, 3))
    model = keras.Model(inputs, _MaskOfMasking()(inputs))
    model.compile(jit_compile=keras.backend.backend() != "torch")
    mask = model.predict(x, batch_size=2, verbose=0)
    np.testing.assert_array_equal(mask, np.any(x != 0.0, axis=-1))


def test_keras_mask_is_none_without_masking():
    assert kmask.keras_mask(ops.ones((2, 3))) is None
