"""AttachMask, LengthMask and ValueMask vs NumPy references, in and out of fit()."""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from kmask.layers import AttachMask, LengthMask, ValueMask
from kmask.losses import MaskedCategoricalCrossentropy, MaskedMeanSquaredError
from kmask.masks import keras_mask
from tests._grad import value_and_grad
from tools.parity.references import np_categorical, np_sequence_mask

RTOL = 1e-5
NAN = float("nan")


def mask_of(tensor):
    mask = keras_mask(tensor)
    return None if mask is None else ops.convert_to_numpy(mask)


# ----------------------------------------------------------------------------
# AttachMask


def test_attach_mask_returns_the_tensor_with_the_other_mask():
    source = np.array([[[0.0], [1.0], [2.0]], [[3.0], [0.0], [0.0]]], "float32")
    masked = keras.layers.Masking(mask_value=0.0)(ops.convert_to_tensor(source))
    tensor = ops.convert_to_tensor(np.arange(12, dtype="float32").reshape(2, 3, 2))

    outputs = AttachMask()([tensor, masked])

    np.testing.assert_array_equal(
        ops.convert_to_numpy(outputs), np.arange(12).reshape(2, 3, 2)
    )
    assert outputs.dtype == tensor.dtype
    np.testing.assert_array_equal(mask_of(outputs), np.any(source != 0.0, axis=-1))
    assert keras_mask(tensor) is None, "the input tensor must not get the mask"


def test_attach_mask_replaces_a_mask_already_on_the_tensor():
    masked = keras.layers.Masking()(ops.convert_to_tensor([[[1.0], [0.0]]]))
    tensor = keras.layers.Masking()(ops.convert_to_tensor([[[0.0], [1.0]]]))

    outputs = AttachMask()([tensor, masked])

    np.testing.assert_array_equal(mask_of(outputs), [[True, False]])
    np.testing.assert_array_equal(mask_of(tensor), [[False, True]])


def test_attach_mask_keeps_integer_dtype():
    masked = keras.layers.Masking()(ops.ones((2, 3, 1)))
    tensor = ops.convert_to_tensor(np.array([[1, 2, 3], [4, 5, 6]], "int32"))

    outputs = AttachMask()([tensor, masked])

    assert keras.backend.standardize_dtype(outputs.dtype) == "int32"
    np.testing.assert_array_equal(ops.convert_to_numpy(outputs), [[1, 2, 3], [4, 5, 6]])


def test_attach_mask_without_a_mask_on_the_second_input_raises():
    with pytest.raises(ValueError, match="second input to carry a Keras mask"):
        AttachMask()([ops.ones((2, 3, 1)), ops.ones((2, 3, 1))])


def test_attach_mask_time_axis_mismatch_raises_with_both_shapes():
    masked = keras.layers.Masking()(keras.Input((4, 1)))
    with pytest.raises(ValueError, match=r"\(None, 4\).*\(None, 5, 2\)"):
        AttachMask()([keras.Input((5, 2)), masked])


def test_attach_mask_needs_two_inputs():
    with pytest.raises(ValueError, match="list of two inputs"):
        AttachMask()(ops.ones((2, 3)))


def _seed_like_model(attach: bool) -> keras.Model:
    """The seed's shape: the encoder drops the mask; optionally restored."""
    inputs = keras.Input((5, 3))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    encoded = keras.layers.LSTM(4)(masked)
    repeated = keras.layers.RepeatVector(5)(encoded)
    decoded = keras.layers.LSTM(4, return_sequences=True)(repeated)
    outputs = keras.layers.Dense(3, activation="softmax")(decoded)
    if attach:
        outputs = AttachMask()([outputs, masked])
    model = keras.Model(inputs, outputs)
    rng = np.random.RandomState(0)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape) for w in model.get_weights()])
    return model


# Left padding: pad input step [0, 0, 0], pad target [0, 0, 1].
SEED_X = np.array(
    [
        [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
        [[0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]],
        [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]],
    ],
    "float32",
)
SEED_REAL = np.any(SEED_X != 0, axis=-1)
SEED_Y = np.where(SEED_REAL[..., None], SEED_X, np.array([0, 0, 1])).astype("float32")


@pytest.mark.parametrize("attach", [True, False])
def test_builtin_loss_under_fit_ignores_padding_only_with_attach_mask(attach):
    model = _seed_like_model(attach)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    per_step = np_categorical(SEED_Y, model.predict(SEED_X, verbose=0))[0]
    masked, unmasked = per_step[SEED_REAL].mean(), per_step.mean()
    assert not np.isclose(masked, unmasked, rtol=1e-3)

    history = model.fit(SEED_X, SEED_Y, batch_size=len(SEED_X), epochs=2, verbose=0)

    # The first epoch's loss is computed before the single update.
    expected = masked if attach else unmasked
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=RTOL)
    per_step = np_categorical(SEED_Y, model.predict(SEED_X, verbose=0))[0]
    evaluated = model.evaluate(SEED_X, SEED_Y, verbose=0)
    expected = per_step[SEED_REAL].mean() if attach else per_step.mean()
    np.testing.assert_allclose(evaluated, expected, rtol=RTOL)


# ----------------------------------------------------------------------------
# LengthMask


@pytest.mark.parametrize("padding", ["post", "pre"])
@pytest.mark.parametrize("lengths_shape", [(3,), (3, 1)])
def test_length_mask_matches_numpy(padding, lengths_shape):
    lengths = np.array([0, 2, 4], "int32")
    x = ops.convert_to_tensor(np.arange(24, dtype="float32").reshape(3, 4, 2))

    outputs = LengthMask(padding=padding)(
        [x, ops.convert_to_tensor(lengths.reshape(lengths_shape))]
    )

    np.testing.assert_array_equal(
        ops.convert_to_numpy(outputs), np.arange(24).reshape(3, 4, 2)
    )
    np.testing.assert_array_equal(
        mask_of(outputs), np_sequence_mask(lengths, 4, padding)
    )
    assert keras_mask(x) is None


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    padding=st.sampled_from(["post", "pre"]),
)
def test_length_mask_property(lengths, padding):
    x = ops.zeros((len(lengths), 6, 1))
    outputs = LengthMask(padding=padding)(
        [x, ops.convert_to_tensor(np.array(lengths, "int32"))]
    )
    np.testing.assert_array_equal(
        mask_of(outputs), np_sequence_mask(lengths, 6, padding)
    )


def test_length_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"Expected one of .*Received: padding='left'"):
        LengthMask(padding="left")
    with pytest.raises(ValueError, match=r"lengths.*Received: lengths=\[2, 7\]"):
        LengthMask()([ops.zeros((2, 4, 1)), ops.convert_to_tensor([2, 7])])
    with pytest.raises(ValueError, match=r"\[batch\] or \[batch, 1\].*\(2, 2\)"):
        LengthMask()([ops.zeros((2, 4, 1)), ops.ones((2, 2), dtype="int32")])


def _length_model(padding: str, time: int | None) -> keras.Model:
    steps = keras.Input((time, 2))
    lengths = keras.Input((), dtype="int32")
    hidden = keras.layers.Dense(3, activation="softmax")(steps)
    outputs = LengthMask(padding=padding)([hidden, lengths])
    model = keras.Model([steps, lengths], outputs)
    rng = np.random.RandomState(1)
    model.set_weights([rng.uniform(-1, 1, w.shape) for w in model.get_weights()])
    return model


@pytest.mark.parametrize(
    ("padding", "time", "loss"),
    [
        ("pre", 5, "categorical_crossentropy"),
        ("post", 5, "kmask"),
        ("post", None, "categorical_crossentropy"),
    ],
)
def test_length_mask_under_fit_masks_the_loss(padding, time, loss):
    rng = np.random.RandomState(2)
    x = rng.normal(size=(4, 5, 2)).astype("float32")
    lengths = np.array([5, 1, 3, 0], "int32")
    y = np.eye(3)[rng.randint(0, 3, (4, 5))].astype("float32")
    real = np_sequence_mask(lengths, 5, padding)
    model = _length_model(padding, time)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=MaskedCategoricalCrossentropy() if loss == "kmask" else loss,
    )
    per_step = np_categorical(y, model.predict([x, lengths], verbose=0))[0]

    history = model.fit([x, lengths], y, batch_size=4, epochs=1, verbose=0)

    np.testing.assert_allclose(
        history.history["loss"][0], per_step[real].mean(), rtol=RTOL
    )


# ----------------------------------------------------------------------------
# ValueMask


@pytest.mark.parametrize(
    ("x", "mask_value", "valid"),
    [
        ([[[1.0], [NAN], [2.0]]], NAN, [[True, False, True]]),
        ([[[0, 0, 1], [1, 0, 0]]], [0, 0, 1], [[False, True]]),
        ([[5, -100, 7, -100]], -100, [[True, False, True, False]]),
        ([[[0.0, 0.0], [0.0, 3.0]]], 0.0, [[False, True]]),
    ],
    ids=["nan", "one-hot-vector", "sparse-ids", "scalar-features"],
)
def test_value_mask_matches_numpy(x, mask_value, valid):
    x = np.asarray(x)
    valid = np.asarray(valid)
    expected = np.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, 0)

    outputs = ValueMask(mask_value=mask_value)(ops.convert_to_tensor(x))

    np.testing.assert_array_equal(ops.convert_to_numpy(outputs), expected)
    np.testing.assert_array_equal(mask_of(outputs), valid)
    assert outputs.dtype == ops.convert_to_tensor(x).dtype


def test_value_mask_gradient_is_finite_and_zero_on_nan_steps():
    x = np.array([[[1.0], [NAN], [2.0], [NAN]]], "float32")

    def total(inputs):
        return ops.sum(ops.square(ValueMask(mask_value=NAN)(inputs)))

    value, grad = value_and_grad(total, x)

    np.testing.assert_allclose(value, 5.0, rtol=RTOL)
    np.testing.assert_allclose(grad, [[[2.0], [0.0], [4.0], [0.0]]], rtol=RTOL)


def test_value_mask_with_nan_inputs_and_targets_trains_finitely():
    rng = np.random.RandomState(3)
    real = np_sequence_mask([4, 2, 3], 4, "post")
    x = np.where(real[..., None], rng.normal(size=(3, 4, 1)), np.nan).astype("float32")
    y = np.where(real[..., None], rng.normal(size=(3, 4, 1)), np.nan).astype("float32")
    inputs = keras.Input((4, 1))
    hidden = keras.layers.LSTM(3, return_sequences=True)(
        ValueMask(mask_value=NAN)(inputs)
    )
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape) for w in model.get_weights()])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=MaskedMeanSquaredError(mask_value=NAN)
    )
    y_pred = model.predict(x, verbose=0)
    expected = ((y_pred[..., 0] - np.nan_to_num(y[..., 0])) ** 2)[real].mean()

    history = model.fit(x, y, batch_size=3, epochs=2, verbose=0)

    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=RTOL)
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(model.predict(x, verbose=0)))


# ----------------------------------------------------------------------------
# Serialization


@pytest.mark.parametrize(
    "layer",
    [
        AttachMask(name="attach"),
        LengthMask(padding="pre", name="lengths"),
        ValueMask(mask_value=[0, 0, 1], name="pad_vector"),
        ValueMask(mask_value=NAN),
    ],
    ids=["attach", "length", "value-vector", "value-nan"],
)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    assert _constructor_arguments(type(layer)) <= set(config)
    restored = type(layer).from_config(config)
    assert type(restored) is type(layer)
    np.testing.assert_equal(restored.get_config(), config)
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"kmask>{type(layer).__name__}"
    assert type(keras.saving.deserialize_keras_object(serialized)) is type(layer)


def test_model_with_every_layer_survives_keras_save_and_load(tmp_path):
    steps = keras.Input((4, 2))
    lengths = keras.Input((), dtype="int32")
    masked = ValueMask(mask_value=NAN)(steps)
    encoded = keras.layers.LSTM(3)(masked)
    repeated = keras.layers.RepeatVector(4)(encoded)
    restored = AttachMask()([repeated, masked])
    by_length = LengthMask(padding="pre")([repeated, lengths])
    model = keras.Model([steps, lengths], [restored, by_length])
    x = np.ones((2, 4, 2), "float32")
    x[1, :3] = np.nan
    lengths_value = np.array([4, 1], "int32")
    inputs = [ops.convert_to_tensor(x), ops.convert_to_tensor(lengths_value)]

    path = str(tmp_path / "layers.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)

    got, want = loaded(inputs), model(inputs)
    for got_output, want_output in zip(got, want, strict=True):
        np.testing.assert_allclose(
            ops.convert_to_numpy(got_output),
            ops.convert_to_numpy(want_output),
            rtol=RTOL,
        )
    np.testing.assert_array_equal(mask_of(got[0]), ~np.isnan(x).all(-1))
    np.testing.assert_array_equal(
        mask_of(got[1]), np_sequence_mask(lengths_value, 4, "pre")
    )
    names = {type(layer).__name__ for layer in loaded.layers}
    assert {"ValueMask", "AttachMask", "LengthMask"} <= names


def _constructor_arguments(cls) -> set[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD} - {"self"}
