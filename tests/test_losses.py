"""MaskedLoss and its subclasses against NumPy (and Keras, for drop-in parity)."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
from keras import ops

import kmask
from tests._grad import value_and_grad
from tools.parity.references import (
    np_absolute,
    np_binary,
    np_categorical,
    np_huber,
    np_reduce,
    np_sparse_categorical,
    np_squared,
    np_token_mean,
)

RTOL = 1e-5
BACKEND = keras.backend.backend()


# ----------------------------------------------------------------------------
# Data: a batch of 4 sequences of 6 steps, 5 classes, with right padding.

B, T, C = 4, 6, 5
LENGTHS = np.array([6, 3, 1, 4])


def _valid(lengths=LENGTHS, steps=T):
    return np.arange(steps)[None, :] < np.asarray(lengths)[:, None]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, C)).astype("float32")
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, C, size=(B, T))
    one_hot = np.eye(C, dtype="float32")[labels]
    regression = rng.normal(size=(B, T, 2)).astype("float32")
    targets = rng.normal(size=(B, T, 2)).astype("float32")
    binary = rng.integers(0, 2, size=(B, T, 1)).astype("float32")
    return dict(
        logits=logits,
        probs=probs.astype("float32"),
        labels=labels,
        one_hot=one_hot,
        regression=regression,
        targets=targets,
        binary=binary,
    )


# (kmask class, kwargs, Keras class, NumPy per-step reference, y_true key, y_pred key)
CASES = {
    "cce_probs": (
        kmask.MaskedCategoricalCrossentropy,
        {},
        keras.losses.CategoricalCrossentropy,
        np_categorical,
        "one_hot",
        "probs",
    ),
    "cce_logits_smooth": (
        kmask.MaskedCategoricalCrossentropy,
        {"from_logits": True, "label_smoothing": 0.1},
        keras.losses.CategoricalCrossentropy,
        np_categorical,
        "one_hot",
        "logits",
    ),
    "scce_probs": (
        kmask.MaskedSparseCategoricalCrossentropy,
        {},
        keras.losses.SparseCategoricalCrossentropy,
        np_sparse_categorical,
        "labels",
        "probs",
    ),
    "scce_logits": (
        kmask.MaskedSparseCategoricalCrossentropy,
        {"from_logits": True},
        keras.losses.SparseCategoricalCrossentropy,
        np_sparse_categorical,
        "labels",
        "logits",
    ),
    "bce_probs": (
        kmask.MaskedBinaryCrossentropy,
        {},
        keras.losses.BinaryCrossentropy,
        np_binary,
        "binary",
        "probs1",
    ),
    "bce_logits_smooth": (
        kmask.MaskedBinaryCrossentropy,
        {"from_logits": True, "label_smoothing": 0.2},
        keras.losses.BinaryCrossentropy,
        np_binary,
        "binary",
        "logits1",
    ),
    "mse": (
        kmask.MaskedMeanSquaredError,
        {},
        keras.losses.MeanSquaredError,
        np_squared,
        "targets",
        "regression",
    ),
    "mae": (
        kmask.MaskedMeanAbsoluteError,
        {},
        keras.losses.MeanAbsoluteError,
        np_absolute,
        "targets",
        "regression",
    ),
    "huber": (
        kmask.MaskedHuber,
        {"delta": 0.5},
        keras.losses.Huber,
        np_huber,
        "targets",
        "regression",
    ),
}


def _case_arrays(case, seed=0):
    data = _data(seed)
    data["probs1"] = data["probs"][..., :1]
    data["logits1"] = data["logits"][..., :1]
    _, _, _, _, true_key, pred_key = CASES[case]
    return data[true_key], data[pred_key]


def _np_per_step(case, y_true, y_pred):
    _, kwargs, _, reference, _, _ = CASES[case]
    return reference(y_true, y_pred, **kwargs)[0]


def _close(actual, expected, rtol=RTOL):
    np.testing.assert_allclose(
        np.asarray(actual, "float64"), expected, rtol=rtol, atol=1e-6
    )


# ----------------------------------------------------------------------------
# Drop-in: nothing masked, Keras's reduction -> Keras's numbers.


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rank", [2, 3])
def test_drop_in_matches_keras_when_nothing_is_masked(case, rank):
    cls, kwargs, keras_cls, _, _, _ = CASES[case]
    y_true, y_pred = _case_arrays(case)
    if rank == 2:
        y_true, y_pred = y_true[:, 0], y_pred[:, 0]
    expected = float(keras_cls(**kwargs)(y_true, y_pred))
    actual = float(cls(**kwargs, reduction="sum_over_batch_size")(y_true, y_pred))
    _close(actual, expected)
    reference = _np_per_step(case, y_true, y_pred).mean()
    _close(actual, reference)


@pytest.mark.parametrize("case", sorted(CASES))
def test_drop_in_matches_keras_with_sample_weight(case):
    cls, kwargs, keras_cls, _, _, _ = CASES[case]
    y_true, y_pred = _case_arrays(case)
    weight = np.linspace(0.5, 2.0, B * T).reshape(B, T).astype("float32")
    expected = float(keras_cls(**kwargs)(y_true, y_pred, sample_weight=weight))
    actual = cls(**kwargs, reduction="sum_over_batch_size")(
        y_true, y_pred, sample_weight=weight
    )
    _close(actual, expected)


# ----------------------------------------------------------------------------
# Masked: every loss, several mask sources, against NumPy.


@pytest.mark.parametrize("case", sorted(CASES))
def test_lengths_through_sample_weight(case):
    cls, kwargs, _, _, _, _ = CASES[case]
    y_true, y_pred = _case_arrays(case)
    sample_weight = kmask.sequence_mask(LENGTHS, T)
    actual = cls(**kwargs)(y_true, y_pred, sample_weight=sample_weight)
    expected = np_token_mean(_np_per_step(case, y_true, y_pred), _valid())
    _close(actual, expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_explicit_mask_with_nan_padding_matches_gathered_real_steps(case):
    """A masked call equals the plain call on the real steps gathered (optax's idea)."""
    _, kwargs, keras_cls, _, _, _ = CASES[case]
    y_true, y_pred = _case_arrays(case)
    valid = _valid()
    poisoned = np.where(
        valid[..., None] if y_pred.ndim == 3 else valid, y_pred, np.nan
    ).astype("float32")
    loss = (
        "sparse_categorical_crossentropy"
        if keras_cls is keras.losses.SparseCategoricalCrossentropy
        else keras_cls(**kwargs)
    )
    extra = kwargs if isinstance(loss, str) else {}
    actual = kmask.masked_loss(y_true, poisoned, loss, mask=valid, **extra)
    gathered = float(keras_cls(**kwargs)(y_true[valid], y_pred[valid]))
    _close(actual, gathered)
    _close(actual, _np_per_step(case, y_true[valid], y_pred[valid]).mean())


def test_scalar_pad_id_minus_100_sparse():
    data = _data()
    labels = np.where(_valid(), data["labels"], -100)
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=-100)
    actual = loss(labels, data["logits"])
    per_step = np_sparse_categorical(
        np.where(_valid(), labels, 0), data["logits"], from_logits=True
    )[0]
    _close(actual, np_token_mean(per_step, _valid()))


def test_ignore_class_and_mask_value_combine():
    data = _data()
    labels = np.where(_valid(), data["labels"], -1)
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=-1, ignore_class=2
    )
    valid = _valid() & (labels != 2)
    per_step = np_sparse_categorical(
        np.where(valid, labels, 0), data["logits"], from_logits=True
    )[0]
    _close(loss(labels, data["logits"]), np_token_mean(per_step, valid))


def test_one_hot_pad_vector_on_the_seed_targets():
    y_true = np.array(
        [
            [[0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
            [[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
        ],
        "float32",
    )
    rng = np.random.default_rng(3)
    y_pred = rng.dirichlet(np.ones(3), size=(2, 5)).astype("float32")
    loss = kmask.MaskedCategoricalCrossentropy(mask_value=[0, 0, 1])
    valid = ~np.all(y_true == [0, 0, 1], axis=-1)
    expected = np_token_mean(np_categorical(y_true, y_pred)[0], valid)
    _close(loss(y_true, y_pred), expected)
    # The seed's question: lengths, left padding, through sample_weight.
    by_lengths = kmask.MaskedCategoricalCrossentropy()(
        y_true, y_pred, sample_weight=kmask.sequence_mask([3, 4], 5, padding="pre")
    )
    _close(by_lengths, expected)


def test_nan_regression_targets():
    data = _data()
    valid = _valid()
    targets = np.where(valid[..., None], data["targets"], np.nan).astype("float32")
    for cls, reference in [
        (kmask.MaskedMeanSquaredError, np_squared),
        (kmask.MaskedHuber, np_huber),
    ]:
        actual = cls(mask_value=float("nan"))(targets, data["regression"])
        expected = np_token_mean(
            reference(np.nan_to_num(targets), data["regression"])[0], valid
        )
        _close(actual, expected)


def test_propagated_keras_mask_is_used():
    data = _data()
    valid = _valid()
    padded_pred = np.where(valid[..., None], data["regression"], -9.0).astype("float32")
    masked_pred = keras.layers.Masking(mask_value=-9.0)(padded_pred)
    loss = kmask.MaskedMeanAbsoluteError()
    expected = np_token_mean(
        np_absolute(
            data["targets"], np.where(valid[..., None], data["regression"], 0.0)
        )[0],
        valid,
    )
    _close(loss(data["targets"], masked_pred), expected)


def test_all_mask_sources_and_weights_combine():
    data = _data()
    valid_lengths = _valid()
    labels = data["labels"].copy()
    labels[0, 1] = -100  # a pad id inside the first sequence
    padded_pred = np.where(valid_lengths[..., None], data["logits"], -9.0).astype(
        "float32"
    )
    padded_pred[1, 0] = -9.0  # the propagated mask drops one more step
    masked_pred = keras.layers.Masking(mask_value=-9.0)(padded_pred)
    explicit = np.ones((B, T), bool)
    explicit[3, 0] = False
    weight = np.linspace(1, 2, B * T).reshape(B, T).astype("float32")
    weight[2, 0] = 0.0  # zero weight is padding
    actual = kmask.masked_loss(
        labels,
        masked_pred,
        "sparse_categorical_crossentropy",
        mask=explicit,
        mask_value=-100,
        sample_weight=weight,
        from_logits=True,
    )
    valid = (
        valid_lengths & (labels != -100) & ~np.all(padded_pred == -9.0, -1) & explicit
    )
    per_step = np_sparse_categorical(
        np.where(valid, labels, 0), data["logits"], from_logits=True
    )[0]
    _close(actual, np_token_mean(per_step, valid, weight))


# ----------------------------------------------------------------------------
# Reductions.


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
@pytest.mark.parametrize("weighting", ["none", "per_sequence", "per_step"])
def test_reductions_match_numpy(reduction, weighting):
    data = _data(1)
    valid = _valid()
    weight = {
        "none": None,
        "per_sequence": np.array([1.0, 2.0, 0.5, 3.0], "float32"),
        "per_step": np.linspace(0.1, 2.0, B * T).reshape(B, T).astype("float32"),
    }[weighting]
    labels = np.where(valid, data["labels"], 0)
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, reduction=reduction
    )
    mask_weight = (
        valid.astype("float32")
        if weight is None
        else (valid * (weight if weight.ndim == 2 else weight[:, None])).astype(
            "float32"
        )
    )
    actual = loss(labels, data["logits"], sample_weight=mask_weight)
    per_step = np_sparse_categorical(labels, data["logits"], from_logits=True)[0]
    # The padding arrives as zero weights, not as a mask: every step is real
    # to the reduction (Keras's `sum_over_batch_size` divides by all of them).
    every_step = np.ones_like(valid)
    _close(actual, np_reduce(per_step, every_step, mask_weight, reduction)[0])


def test_sequence_mean_is_mean_of_sequence_means():
    data = _data(2)
    valid = _valid()
    loss = kmask.MaskedMeanSquaredError(reduction="sequence_mean")
    actual = loss(
        data["targets"], data["regression"], sample_weight=valid.astype("float32")
    )
    per_step = np_squared(data["targets"], data["regression"])[0]
    expected = np.mean([per_step[b, : LENGTHS[b]].mean() for b in range(B)])
    _close(actual, expected)


def test_unknown_reduction_is_a_value_error():
    with pytest.raises(
        ValueError, match=r"reduction.*token_mean.*Received: reduction='average'"
    ):
        kmask.MaskedLoss("mse", reduction="average")


# ----------------------------------------------------------------------------
# Padding never leaks: NaN/inf, all padding, gradients.


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_is_finite_and_zero_at_padding(case):
    cls, kwargs, _, _, _, _ = CASES[case]
    y_true, y_pred = _case_arrays(case)
    valid = _valid()
    poisoned_pred = np.where(valid[..., None], y_pred, np.nan).astype("float32")
    poisoned_pred[1, -1] = np.inf  # sequence 1 has 3 real steps
    bad = np.nan if y_true.dtype.kind == "f" else -100
    poisoned_true = np.where(
        valid[..., None] if y_true.ndim == 3 else valid, y_true, bad
    )
    loss = cls(**kwargs)
    value, grad = value_and_grad(
        lambda yp: loss(poisoned_true, yp, sample_weight=valid.astype("float32")),
        poisoned_pred,
    )
    _close(value, np_token_mean(_np_per_step(case, y_true, y_pred), valid))
    assert np.all(np.isfinite(grad))
    assert np.all(grad[~valid] == 0.0)
    assert np.any(grad[valid] != 0.0)


@pytest.mark.parametrize(
    "reduction", ["token_mean", "sequence_mean", "sum", "sum_over_batch_size"]
)
@pytest.mark.parametrize("case", ["cce_probs", "scce_logits", "mse"])
def test_all_padding_gives_zero_and_zero_gradient(case, reduction):
    cls, kwargs, _, _, _, _ = CASES[case]
    y_true, y_pred = _case_arrays(case)
    poisoned = np.full_like(y_pred, np.nan)
    loss = cls(**kwargs, reduction=reduction)
    value, grad = value_and_grad(
        lambda yp: loss(y_true, yp, sample_weight=np.zeros((B, T), "float32")), poisoned
    )
    assert value == 0.0
    assert np.all(grad == 0.0)


def test_reduction_none_returns_zero_at_padding():
    data = _data()
    valid = _valid()
    poisoned = np.where(valid[..., None], data["regression"], np.inf).astype("float32")
    loss = kmask.MaskedMeanSquaredError(reduction="none")
    per_step = ops.convert_to_numpy(
        loss(data["targets"], poisoned, sample_weight=valid)
    )
    expected = np.where(valid, np_squared(data["targets"], data["regression"])[0], 0.0)
    _close(per_step, expected)


# ----------------------------------------------------------------------------
# Sparse extras: label smoothing and z-loss.


@pytest.mark.parametrize("from_logits", [True, False])
def test_sparse_label_smoothing_matches_categorical(from_logits):
    data = _data(4)
    y_pred = data["logits"] if from_logits else data["probs"]
    valid = _valid()
    labels = np.where(valid, data["labels"], -100)
    sparse = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=from_logits, label_smoothing=0.1, mask_value=-100
    )
    per_step = np_categorical(
        data["one_hot"], y_pred, from_logits=from_logits, label_smoothing=0.1
    )[0]
    _close(sparse(labels, y_pred), np_token_mean(per_step, valid))


def test_sparse_z_loss_is_masked():
    data = _data(5)
    valid = _valid()
    logits = np.where(valid[..., None], data["logits"] * 4, np.nan).astype("float32")
    labels = np.where(valid, data["labels"], 0)
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, z_loss=1e-2)
    per_step = np_sparse_categorical(
        labels, data["logits"] * 4, from_logits=True, z_loss=1e-2
    )[0]
    _close(loss(labels, logits, sample_weight=valid), np_token_mean(per_step, valid))


def test_sparse_argument_errors():
    with pytest.raises(ValueError, match=r"z_loss.*from_logits"):
        kmask.MaskedSparseCategoricalCrossentropy(z_loss=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        kmask.MaskedSparseCategoricalCrossentropy(label_smoothing=1.5)


# ----------------------------------------------------------------------------
# Precision and dtypes.


def test_float16_predictions_with_100k_tokens_keep_the_mean():
    y_pred = np.full((100, 1000, 1), 3.0, "float16")
    y_true = np.zeros((100, 1000, 1), "float16")
    valid = np.ones((100, 1000), bool)
    valid[:, 900:] = False
    result = kmask.MaskedMeanSquaredError()(y_true, y_pred, sample_weight=valid)
    assert float(result) == 9.0
    total = kmask.MaskedMeanSquaredError(reduction="sum")(
        y_true, y_pred, sample_weight=valid
    )
    assert float(total) == 9.0 * 90_000


def test_result_has_the_loss_dtype():
    data = _data()
    loss = kmask.MaskedMeanSquaredError(dtype="float16")
    result = loss(data["targets"], data["regression"])
    assert keras.backend.standardize_dtype(result.dtype) == "float16"
    _close(
        float(result),
        np_squared(data["targets"], data["regression"])[0].mean(),
        rtol=1e-3,
    )


# ----------------------------------------------------------------------------
# Bad input.


def test_incompatible_shapes_name_both():
    loss = kmask.MaskedCategoricalCrossentropy()
    with pytest.raises(ValueError, match=r"shape.*\(2, 5, 3\).*\(2, 4, 3\)"):
        loss(np.zeros((2, 5, 3)), np.zeros((2, 4, 3)))


def test_mask_value_length_must_match_feature_axis():
    loss = kmask.MaskedCategoricalCrossentropy(mask_value=[0, 1])
    with pytest.raises(ValueError, match=r"mask_value.*\[0\.0, 1\.0\].*\(2, 5, 3\)"):
        loss(np.zeros((2, 5, 3)), np.ones((2, 5, 3)))


def test_mask_that_does_not_fit():
    with pytest.raises(ValueError, match=r"`mask`.*\(2, 5\).*\(2, 4\).*\(2, 5, 3\)"):
        kmask.masked_loss(
            np.zeros((2, 5, 3)), np.ones((2, 5, 3)), "mse", mask=np.ones((2, 4), bool)
        )


def test_sample_weight_that_does_not_fit():
    with pytest.raises(ValueError, match=r"sample_weight.*\(2, 4\)"):
        kmask.MaskedMeanSquaredError()(
            np.zeros((2, 5, 3)), np.ones((2, 5, 3)), sample_weight=np.ones((2, 4))
        )


def test_unknown_loss_name_fails_at_construction():
    with pytest.raises(ValueError, match=r"loss.*'not_a_loss'"):
        kmask.MaskedLoss("not_a_loss")


# ----------------------------------------------------------------------------
# Wrapping: names, instances, classes, callables.


def test_wraps_names_instances_classes_and_callables():
    data = _data()
    valid = _valid()
    expected = np_token_mean(
        np_categorical(data["one_hot"], data["logits"], from_logits=True)[0],
        valid,
    )
    variants = [
        kmask.MaskedLoss("categorical_crossentropy", from_logits=True),
        kmask.MaskedLoss("CategoricalCrossentropy", from_logits=True),
        kmask.MaskedLoss(keras.losses.CategoricalCrossentropy(from_logits=True)),
        kmask.MaskedLoss(keras.losses.CategoricalCrossentropy, from_logits=True),
        kmask.MaskedLoss(
            lambda t, p: keras.losses.categorical_crossentropy(t, p, from_logits=True)
        ),
    ]
    for loss in variants:
        _close(loss(data["one_hot"], data["logits"], sample_weight=valid), expected)


# ----------------------------------------------------------------------------
# Serialization.

ALL_CLASSES = [
    (
        kmask.MaskedLoss,
        {
            "loss": "huber",
            "delta": 0.3,
            "mask_value": float("nan"),
            "reduction": "sequence_mean",
        },
    ),
    (
        kmask.MaskedCategoricalCrossentropy,
        {"from_logits": True, "label_smoothing": 0.1, "mask_value": [0, 0, 1]},
    ),
    (
        kmask.MaskedSparseCategoricalCrossentropy,
        {
            "from_logits": True,
            "ignore_class": 3,
            "mask_value": -100,
            "label_smoothing": 0.1,
            "z_loss": 1e-4,
        },
    ),
    (
        kmask.MaskedBinaryCrossentropy,
        {"label_smoothing": 0.2, "mask_value": -1, "reduction": "sum"},
    ),
    (kmask.MaskedMeanSquaredError, {"mask_value": 0}),
    (kmask.MaskedMeanAbsoluteError, {"reduction": "sum_over_batch_size"}),
    (kmask.MaskedHuber, {"delta": 2.0}),
]


def _same(a, b):
    """Equality that treats NaN as equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


@pytest.mark.parametrize(
    ("cls", "kwargs"), ALL_CLASSES, ids=lambda v: getattr(v, "__name__", "")
)
def test_config_round_trip(cls, kwargs):
    loss = cls(**kwargs)
    config = loss.get_config()
    for key, value in kwargs.items():
        assert _same(config[key], value), key
    restored_config = cls.from_config(config).get_config()
    assert restored_config.keys() == config.keys()
    assert all(_same(restored_config[key], config[key]) for key in config)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(again) is cls


def test_model_saved_with_a_kmask_loss_reloads_without_custom_objects(tmp_path):
    inputs = keras.Input((T, C))
    outputs = keras.layers.Dense(C)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="sgd",
        loss=kmask.MaskedSparseCategoricalCrossentropy(
            from_logits=True, mask_value=-100
        ),
    )
    data = _data()
    labels = np.where(_valid(), data["labels"], -100)
    before = model.evaluate(data["logits"], labels, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.loss, kmask.MaskedSparseCategoricalCrossentropy)
    assert restored.loss.get_config() == model.loss.get_config()
    _close(restored.evaluate(data["logits"], labels, verbose=0), before)
    predictions = ops.convert_to_numpy(restored(data["logits"]))
    per_step = np_sparse_categorical(
        np.where(_valid(), labels, 0), predictions, from_logits=True
    )[0]
    _close(before, np_token_mean(per_step, _valid()), rtol=1e-4)


# ----------------------------------------------------------------------------
# Inside Keras training.


def _tagger(jit_compile):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((T,), dtype="int32")
    embedded = keras.layers.Embedding(7, 8, mask_zero=True)(inputs)
    outputs = keras.layers.Dense(C)(embedded)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=kmask.MaskedSparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_and_evaluate_use_the_propagated_mask(jit_compile):
    if jit_compile and BACKEND == "torch":
        pytest.skip("Keras's torch backend compiles with torch.compile, not used here")
    data = _data(6)
    tokens = np.where(_valid(), data["labels"] + 1, 0).astype("int32")
    labels = np.where(_valid(), data["labels"], 99)  # out-of-range labels at padding
    model = _tagger(jit_compile)
    history = model.fit(tokens, labels, epochs=2, batch_size=B, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    evaluated = model.evaluate(tokens, labels, batch_size=B, verbose=0)
    logits = ops.convert_to_numpy(model.predict(tokens, verbose=0))
    per_step = np_sparse_categorical(
        np.where(_valid(), labels, 0), logits, from_logits=True
    )[0]
    _close(evaluated, np_token_mean(per_step, _valid()), rtol=1e-4)


def test_mixed_float16_training():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = _tagger(False)
        data = _data(7)
        tokens = np.where(_valid(), data["labels"] + 1, 0).astype("int32")
        labels = np.where(_valid(), data["labels"], 0)
        evaluated = model.evaluate(tokens, labels, batch_size=B, verbose=0)
        logits = ops.convert_to_numpy(model.predict(tokens, verbose=0)).astype(
            "float64"
        )
        per_step = np_sparse_categorical(labels, logits, from_logits=True)[0]
        _close(evaluated, np_token_mean(per_step, _valid()), rtol=1e-3)
        history = model.fit(tokens, labels, epochs=1, batch_size=B, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


# ----------------------------------------------------------------------------
# call(): the per-step extension point.


class _DoubledSparse(kmask.MaskedSparseCategoricalCrossentropy):
    """Overrides call(); the fused path must step aside for it."""

    def call(self, y_true, y_pred):
        return 2.0 * super().call(y_true, y_pred) + 1.0


class _DoubledSquaredError(kmask.MaskedMeanSquaredError):
    def call(self, y_true, y_pred):
        return 2.0 * super().call(y_true, y_pred) + 1.0


class _DoubledCategorical(kmask.MaskedCategoricalCrossentropy):
    def call(self, y_true, y_pred):
        return 2.0 * super().call(y_true, y_pred) + 1.0


def _override_cases(data, valid):
    """(overriding loss, y_true with padding, y_pred, NumPy per-step loss)."""
    labels = np.where(valid, data["labels"], -100)
    pad_vector = np.eye(C, dtype="float32")[C - 1]
    one_hot = np.where(valid[..., None], data["one_hot"], pad_vector)
    targets = np.where(valid[..., None], data["targets"], np.nan)
    return {
        "sparse": (
            _DoubledSparse(from_logits=True, mask_value=-100),
            labels,
            data["logits"],
            np_sparse_categorical(data["labels"], data["logits"], True)[0],
        ),
        "categorical": (
            _DoubledCategorical(from_logits=True, mask_value=pad_vector),
            one_hot,
            data["logits"],
            np_categorical(data["one_hot"], data["logits"], True)[0],
        ),
        "squared_error": (
            _DoubledSquaredError(mask_value=np.nan),
            targets,
            data["regression"],
            np_squared(data["targets"], data["regression"])[0],
        ),
    }


@pytest.mark.parametrize("case", ["sparse", "categorical", "squared_error"])
def test_an_overridden_call_is_honoured_on_the_fused_path(case):
    data = _data(21)
    valid = _valid()
    # The one-hot pad is the last class; keep real steps off it.
    data["labels"] = np.minimum(data["labels"], C - 2)
    data["one_hot"] = np.eye(C, dtype="float32")[data["labels"]]
    loss, y_true, y_pred, per_step = _override_cases(data, valid)[case]
    expected = np_token_mean(2.0 * per_step + 1.0, valid)
    poisoned = np.where(valid[..., None], y_pred, np.nan).astype("float32")
    value, grad = value_and_grad(lambda x: loss(y_true, x), poisoned)
    _close(value, expected)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[~valid] == 0.0)


@pytest.mark.parametrize(
    ("loss", "y_true_key", "y_pred_key", "reference"),
    [
        (
            kmask.MaskedSparseCategoricalCrossentropy(from_logits=True),
            "labels",
            "logits",
            lambda d: np_sparse_categorical(d["labels"], d["logits"], True)[0],
        ),
        (
            kmask.MaskedSparseCategoricalCrossentropy(),
            "labels",
            "probs",
            lambda d: np_sparse_categorical(d["labels"], d["probs"])[0],
        ),
        (
            kmask.MaskedCategoricalCrossentropy(from_logits=True),
            "one_hot",
            "logits",
            lambda d: np_categorical(d["one_hot"], d["logits"], True)[0],
        ),
        (
            kmask.MaskedMeanSquaredError(),
            "targets",
            "regression",
            lambda d: np_squared(d["targets"], d["regression"])[0],
        ),
        (
            kmask.MaskedLoss("mae"),
            "targets",
            "regression",
            lambda d: np_absolute(d["targets"], d["regression"])[0],
        ),
    ],
    ids=["sparse_logits", "sparse_probs", "categorical_logits", "mse", "mae"],
)
def test_call_and_the_loss_run_the_same_per_step_code(
    loss, y_true_key, y_pred_key, reference
):
    data = _data(22)
    y_true, y_pred = data[y_true_key], data[y_pred_key]
    per_step = loss.call(ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred))
    _close(per_step, reference(data))
    # The value comes from NumPy above; here the property: calling the loss
    # (with no padding) runs the very code `call()` runs, to the bit.
    unreduced = kmask.MaskedLoss(loss, reduction="none")
    _close(unreduced(y_true, y_pred), ops.convert_to_numpy(per_step), rtol=0)
    _close(
        kmask.masked_loss(y_true, y_pred, loss, reduction="none"),
        ops.convert_to_numpy(per_step),
        rtol=0,
    )


def test_masked_loss_takes_a_kmask_loss_with_its_own_padding():
    data = _data(23)
    valid = _valid()
    labels = np.where(valid, data["labels"], -100)
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=-100)
    per_step = np_sparse_categorical(data["labels"], data["logits"], True)[0]
    lengths_mask = kmask.sequence_mask([6, 6, 6, 2], T)
    both = valid & ops.convert_to_numpy(lengths_mask)
    found = kmask.masked_loss(labels, data["logits"], loss, mask=lengths_mask)
    _close(found, np_token_mean(per_step, both))


@pytest.mark.parametrize(
    ("loss", "y_true_shape", "y_pred_shape"),
    [
        (kmask.MaskedMeanSquaredError(), (B, 1, 2), (B, T, 2)),
        (kmask.MaskedMeanAbsoluteError(), (B, T, 2), (1, T, 2)),
        (kmask.MaskedSparseCategoricalCrossentropy(), (B, 1), (B, T, C)),
        (kmask.MaskedCategoricalCrossentropy(), (B, 1, C), (B, T, C)),
    ],
    ids=["mse_time_1", "mae_batch_1", "sparse_time_1", "categorical_time_1"],
)
def test_targets_that_would_broadcast_are_rejected(loss, y_true_shape, y_pred_shape):
    # Keras would broadcast these silently into a number for the wrong steps.
    pattern = (
        rf"`y_true`.*{re.escape(str(y_true_shape))}.*{re.escape(str(y_pred_shape))}"
    )
    with pytest.raises(ValueError, match=pattern):
        loss(np.zeros(y_true_shape, "float32"), np.full(y_pred_shape, 0.5, "float32"))


@pytest.mark.parametrize("jit", [False, True])
def test_a_class_axis_in_the_middle_masks_the_other_axes(jit):
    # `[batch, classes, time]`: the mask is `[batch, time]`, the padding NaN.
    data = _data(24)
    valid = _valid()
    one_hot = np.moveaxis(data["one_hot"], -1, 1)
    logits = np.moveaxis(np.where(valid[..., None], data["logits"], np.nan), -1, 1)
    loss = kmask.MaskedCategoricalCrossentropy(from_logits=True, axis=1)
    per_step = np_categorical(data["one_hot"], data["logits"], True)[0]
    mask = ops.convert_to_tensor(valid)
    value, grad = value_and_grad(
        lambda x: kmask.masked_loss(one_hot, x, loss, mask=mask),
        logits.astype("float32"),
        jit=jit,
    )
    _close(value, np_token_mean(per_step, valid))
    assert np.all(np.moveaxis(grad, 1, -1)[~valid] == 0.0)
    assert np.all(np.isfinite(grad))
