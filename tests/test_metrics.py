"""Masked metrics vs NumPy: exact across batches, and in agreement with the losses."""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
from keras import ops

from kmask.layers import LengthMask
from kmask.losses import (
    MaskedMeanAbsoluteError,
    MaskedSparseCategoricalCrossentropy,
)
from kmask.metrics import (
    MaskedCategoricalAccuracy,
    MaskedMeanMetricWrapper,
    MaskedSequenceAccuracy,
    MaskedSparseCategoricalAccuracy,
    Perplexity,
)
from tools.parity.references import np_sparse_ce, np_token_mean

RTOL = 1e-5
NAN = float("nan")
PAD_LABEL = -100
PAD_VECTOR = [0, 0, 1]


def random_batch(rng, batch, time, classes, real_tokens):
    """Labels with exactly `real_tokens` real steps (the rest -100), and logits."""
    real = np.zeros(batch * time, bool)
    real[rng.choice(batch * time, real_tokens, replace=False)] = True
    real = real.reshape(batch, time)
    labels = np.where(real, rng.randint(0, classes, (batch, time)), PAD_LABEL)
    logits = rng.normal(size=(batch, time, classes))
    return labels.astype("int32"), logits.astype("float32"), real


def result(metric):
    return float(ops.convert_to_numpy(metric.result()))


# ----------------------------------------------------------------------------
# Exact across batches: 16 real tokens, then 1.


def test_sparse_accuracy_over_16_plus_1_tokens_is_the_accuracy_over_17():
    rng = np.random.RandomState(0)
    labels_a, logits_a, real_a = random_batch(rng, 2, 10, 4, real_tokens=16)
    labels_b, logits_b, real_b = random_batch(rng, 1, 3, 4, real_tokens=1)
    correct_a = (logits_a.argmax(-1) == labels_a)[real_a]
    correct_b = (logits_b.argmax(-1) == labels_b)[real_b]
    expected = np.concatenate([correct_a, correct_b]).mean()
    mean_of_batches = (correct_a.mean() + correct_b.mean()) / 2
    assert not np.isclose(expected, mean_of_batches)
    metric = MaskedSparseCategoricalAccuracy(mask_value=PAD_LABEL)

    metric.update_state(labels_a, logits_a)
    metric.update_state(labels_b, logits_b)

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)


def test_categorical_accuracy_over_16_plus_1_tokens_with_a_pad_vector():
    rng = np.random.RandomState(1)
    batches = []
    for batch, time, real_tokens in [(2, 10, 16), (1, 4, 1)]:
        labels, _, real = random_batch(rng, batch, time, 2, real_tokens)
        one_hot = np.eye(3)[np.where(real, labels, 2)]  # class 2 is the pad
        batches.append((one_hot, rng.normal(size=one_hot.shape), real))
    correct = [(t.argmax(-1) == p.argmax(-1))[real] for t, p, real in batches]
    expected = np.concatenate(correct).mean()
    assert not np.isclose(expected, np.mean([c.mean() for c in correct]))
    metric = MaskedCategoricalAccuracy(mask_value=PAD_VECTOR)

    for one_hot, y_pred, _ in batches:
        metric.update_state(one_hot.astype("float32"), y_pred.astype("float32"))

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)


def test_perplexity_is_exp_of_the_token_mean_over_every_batch():
    rng = np.random.RandomState(2)
    batches = [random_batch(rng, 2, 6, 5, real_tokens=n) for n in (11, 1, 4)]
    cross_entropy = np.concatenate(
        [
            np_sparse_ce(np.maximum(labels, 0), logits)[real]
            for labels, logits, real in batches
        ]
    )
    metric = Perplexity(from_logits=True, mask_value=PAD_LABEL)

    for labels, logits, _ in batches:
        metric.update_state(labels, logits)

    np.testing.assert_allclose(result(metric), np.exp(cross_entropy.mean()), rtol=RTOL)


def test_perplexity_from_one_hot_probabilities():
    probs = np.array([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]], "float32")
    one_hot = np.array([[[1, 0, 0], [0, 1, 0], PAD_VECTOR]], "float32")
    expected = np.exp(-(np.log(0.5) + np.log(0.6)) / 2)
    metric = Perplexity(mask_value=PAD_VECTOR)

    metric.update_state(one_hot, probs)

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)


def test_perplexity_takes_labels_with_a_trailing_axis():
    logits = np.array([[[2.0, 0.0], [0.0, 1.0], [9.0, 9.0]]], "float32")
    labels = np.array([[[0], [0], [PAD_LABEL]]], "int32")
    expected = np.exp(np_sparse_ce(np.maximum(labels[..., 0], 0), logits)[0, :2].mean())
    metric = Perplexity(from_logits=True, mask_value=PAD_LABEL)

    metric.update_state(labels, logits)

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)


# ----------------------------------------------------------------------------
# The mask sources: propagated, mask_value, sample_weight; NaN; all padding.


def test_propagated_mask_on_y_pred_is_honoured():
    rng = np.random.RandomState(3)
    y_pred = rng.uniform(0.1, 1.0, size=(2, 5, 3)).astype("float32")
    real = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    y_pred[~real] = 0.0  # `Masking(0.0)` marks these steps as padding
    labels = rng.randint(0, 3, (2, 5))
    expected = (y_pred.argmax(-1) == labels)[real].mean()
    assert not np.isclose(expected, (y_pred.argmax(-1) == labels).mean())
    masked = keras.layers.Masking(mask_value=0.0)(ops.convert_to_tensor(y_pred))
    metric = MaskedSparseCategoricalAccuracy()

    metric.update_state(labels, masked)

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)


@pytest.mark.parametrize("weight_shape", ["per-sequence", "per-step"])
def test_sample_weight_weights_tokens_and_zero_weight_is_padding(weight_shape):
    rng = np.random.RandomState(4)
    labels, logits, real = random_batch(rng, 3, 4, 3, real_tokens=9)
    if weight_shape == "per-sequence":
        weights = np.array([0.5, 0.0, 2.0], "float32")
    else:
        weights = rng.choice([0.0, 1.0, 3.0], size=(3, 4)).astype("float32")
    logits[np.broadcast_to(weights.reshape(3, -1) == 0, (3, 4))] = np.nan
    correct = np.nan_to_num(logits).argmax(-1) == labels
    expected = np_token_mean(correct, real, weights)
    metric = MaskedSparseCategoricalAccuracy(mask_value=PAD_LABEL)

    metric.update_state(labels, logits, sample_weight=weights)

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)


def test_nan_at_padded_steps_is_ignored():
    y_true = np.array([[[1.0], [2.0], [NAN]], [[0.5], [NAN], [NAN]]], "float32")
    y_pred = np.array([[[1.5], [1.0], [NAN]], [[0.0], [np.inf], [NAN]]], "float32")
    real = ~np.isnan(y_true[..., 0])
    expected = np.abs(y_true - y_pred)[..., 0][real].mean()
    metric = MaskedMeanMetricWrapper("mae", mask_value=NAN)
    perplexity = Perplexity(from_logits=True, mask_value=PAD_LABEL)
    logits = np.array([[[0.0, 0.0], [NAN, NAN]]], "float32")

    metric.update_state(y_true, y_pred)
    perplexity.update_state(np.array([[1, PAD_LABEL]]), logits)

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)
    np.testing.assert_allclose(result(perplexity), 2.0, rtol=RTOL)


def _recording_mae(seen: list):
    """A per-step MAE that keeps what it was given."""

    def per_step(y_true, y_pred):
        seen.append((ops.convert_to_numpy(y_true), ops.convert_to_numpy(y_pred)))
        return ops.mean(ops.abs(ops.cast(y_true, y_pred.dtype) - y_pred), axis=-1)

    return per_step


def test_padded_steps_never_reach_the_per_step_function():
    seen = []
    y_true = np.array([[[1.0], [NAN]], [[NAN], [2.0]]], "float32")
    y_pred = np.array([[[0.0], [np.inf]], [[NAN], [4.0]]], "float32")
    metric = MaskedMeanMetricWrapper(_recording_mae(seen), mask_value=NAN)

    metric.update_state(y_true, y_pred)

    assert all(np.isfinite(array).all() for pair in seen for array in pair)
    np.testing.assert_allclose(result(metric), (1.0 + 2.0) / 2, rtol=RTOL)


def test_zero_weight_steps_are_padding_even_without_a_mask_value():
    seen = []
    labels = np.array([[2, 1, PAD_LABEL], [PAD_LABEL, 0, 0]], "int32")
    weights = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], "float32")
    logits = np.random.RandomState(9).normal(size=(2, 3, 3)).astype("float32")
    cross_entropy = np_sparse_ce(np.maximum(labels, 0), logits)
    recording = MaskedMeanMetricWrapper(_recording_mae(seen))
    perplexity = Perplexity(from_logits=True)

    recording.update_state(labels[..., None], logits[..., :1], sample_weight=weights)
    perplexity.update_state(labels, logits, sample_weight=weights)

    assert min(pair[0].min() for pair in seen) >= 0
    expected = np_token_mean(cross_entropy, np.ones_like(weights, bool), weights)
    np.testing.assert_allclose(result(perplexity), np.exp(expected), rtol=RTOL)


def test_all_padding_gives_zero_perplexity_included():
    labels = np.full((2, 3), PAD_LABEL)
    logits = np.full((2, 3, 4), NAN, "float32")
    metrics = {
        "accuracy": MaskedSparseCategoricalAccuracy(mask_value=PAD_LABEL),
        "loss": MaskedMeanMetricWrapper(
            "sparse_categorical_crossentropy", mask_value=PAD_LABEL, from_logits=True
        ),
        "perplexity": Perplexity(from_logits=True, mask_value=PAD_LABEL),
    }

    for metric in metrics.values():
        metric.update_state(labels, logits)

    # 0 like Keras's metrics and keras-hub's Perplexity (once 1.0 here).
    assert [result(m) for m in metrics.values()] == [0.0, 0.0, 0.0]


def test_reset_state_starts_over():
    metric = MaskedSparseCategoricalAccuracy(mask_value=PAD_LABEL)
    metric.update_state([[0, PAD_LABEL]], [[[1.0, 0.0], [0.0, 1.0]]])
    assert result(metric) == 1.0

    metric.reset_state()
    metric.update_state([[0, 1]], [[[0.0, 1.0], [0.0, 1.0]]])

    assert result(metric) == 0.5


def test_state_is_float32_and_counts_past_float16_precision():
    labels = np.zeros((1, 3001), "int32")
    labels[0, -1] = PAD_LABEL
    y_pred = np.zeros((1, 3001, 2), "float16")
    y_pred[0, :1001, 0] = 1.0  # 1001 right out of 3000 real tokens
    y_pred[0, 1001:, 1] = 1.0
    metric = MaskedSparseCategoricalAccuracy(mask_value=PAD_LABEL, dtype="float32")

    metric.update_state(labels, ops.convert_to_tensor(y_pred))

    assert [v.dtype for v in metric.variables] == ["float32", "float32"]
    assert float(ops.convert_to_numpy(metric.count)) == 3000.0
    np.testing.assert_allclose(result(metric), 1001 / 3000, rtol=RTOL)


def test_half_precision_predictions_are_reduced_in_float32():
    rng = np.random.RandomState(10)
    labels = rng.randint(0, 50, (4, 16))
    logits = (8 * rng.normal(size=(4, 16, 50))).astype("float16")
    expected = np_sparse_ce(labels, logits.astype("float64")).mean()
    metric = MaskedMeanMetricWrapper(
        "sparse_categorical_crossentropy", mask_value=PAD_LABEL, from_logits=True
    )

    metric.update_state(labels, ops.convert_to_tensor(logits))

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)


# ----------------------------------------------------------------------------
# A metric and a loss given the same data agree.


@pytest.mark.parametrize("weighted", [False, True])
def test_masked_mean_of_a_kmask_loss_equals_the_loss_on_the_concatenated_batches(
    weighted,
):
    rng = np.random.RandomState(5)
    batches = [random_batch(rng, 2, 6, 4, real_tokens=n) for n in (12, 1, 5)]
    weights = [rng.uniform(0.5, 2.0, (2, 6)).astype("float32") for _ in batches]
    labels = np.concatenate([b[0] for b in batches])
    logits = np.concatenate([b[1] for b in batches])
    real = np.concatenate([b[2] for b in batches])
    all_weights = np.concatenate(weights) if weighted else None
    expected = np_token_mean(
        np_sparse_ce(np.maximum(labels, 0), logits), real, all_weights
    )
    loss = MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=PAD_LABEL)
    metric = MaskedMeanMetricWrapper(loss)

    for (batch_labels, batch_logits, _), batch_weights in zip(
        batches, weights, strict=True
    ):
        metric.update_state(
            batch_labels,
            batch_logits,
            sample_weight=batch_weights if weighted else None,
        )
    whole = loss(labels, logits, sample_weight=all_weights)

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)
    np.testing.assert_allclose(float(ops.convert_to_numpy(whole)), expected, rtol=RTOL)


def test_masked_mean_of_a_regression_loss_with_nan_padding():
    rng = np.random.RandomState(6)
    targets = [rng.normal(size=(2, 5, 2)).astype("float32") for _ in range(3)]
    preds = [rng.normal(size=(2, 5, 2)).astype("float32") for _ in range(3)]
    for target, count in zip(targets, (7, 1, 10), strict=True):
        target.reshape(-1, 2)[count:] = np.nan
    y_true, y_pred = np.concatenate(targets), np.concatenate(preds)
    real = ~np.isnan(y_true).all(-1)
    expected = np.abs(y_true - y_pred).mean(-1)[real].mean()
    loss = MaskedMeanAbsoluteError(mask_value=NAN)
    metric = MaskedMeanMetricWrapper(loss)

    for target, pred in zip(targets, preds, strict=True):
        metric.update_state(target, pred)

    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(loss(y_true, y_pred))), expected, rtol=RTOL
    )


def _tagger() -> keras.Model:
    tokens = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(7, 4, mask_zero=True)(tokens)
    model = keras.Model(tokens, keras.layers.Dense(3)(embedded))
    rng = np.random.RandomState(7)
    model.set_weights([rng.uniform(-1, 1, w.shape) for w in model.get_weights()])
    return model


def _tagging_data():
    rng = np.random.RandomState(8)
    lengths = np.array([6, 1, 2, 5, 3, 1])
    real = np.arange(6)[None, :] < lengths[:, None]
    tokens = np.where(real, rng.randint(1, 7, (6, 6)), 0).astype("int32")
    labels = np.where(real, rng.randint(0, 3, (6, 6)), PAD_LABEL).astype("int32")
    return tokens, labels, real


def _compiled_tagger() -> keras.Model:
    model = _tagger()
    loss = MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=PAD_LABEL)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=loss,
        metrics=[
            MaskedSparseCategoricalAccuracy(mask_value=PAD_LABEL, name="accuracy"),
            # No mask_value: the mask `Embedding(mask_zero=True)` propagates.
            MaskedSparseCategoricalAccuracy(name="propagated_accuracy"),
            Perplexity(from_logits=True, mask_value=PAD_LABEL),
            MaskedMeanMetricWrapper(loss, name="token_mean_loss"),
        ],
    )
    return model


def test_metrics_in_evaluate_are_token_means_over_every_batch():
    tokens, labels, real = _tagging_data()
    model = _compiled_tagger()
    logits = model.predict(tokens, verbose=0)
    cross_entropy = np_sparse_ce(np.maximum(labels, 0), logits)[real]
    accuracy = (logits.argmax(-1) == labels)[real].mean()

    results = model.evaluate(tokens, labels, batch_size=2, verbose=0, return_dict=True)

    np.testing.assert_allclose(
        results["token_mean_loss"], cross_entropy.mean(), rtol=RTOL
    )
    np.testing.assert_allclose(results["accuracy"], accuracy, rtol=RTOL)
    np.testing.assert_allclose(results["propagated_accuracy"], accuracy, rtol=RTOL)
    np.testing.assert_allclose(
        results["perplexity"], np.exp(cross_entropy.mean()), rtol=RTOL
    )


def test_metrics_under_fit_match_numpy_before_the_update():
    tokens, labels, real = _tagging_data()
    model = _compiled_tagger()
    logits = model.predict(tokens, verbose=0)
    cross_entropy = np_sparse_ce(np.maximum(labels, 0), logits)[real]

    history = model.fit(tokens, labels, batch_size=len(tokens), epochs=1, verbose=0)

    np.testing.assert_allclose(
        history.history["loss"][0], cross_entropy.mean(), rtol=RTOL
    )
    np.testing.assert_allclose(
        history.history["token_mean_loss"][0], cross_entropy.mean(), rtol=RTOL
    )
    np.testing.assert_allclose(
        history.history["accuracy"][0],
        (logits.argmax(-1) == labels)[real].mean(),
        rtol=RTOL,
    )


# ----------------------------------------------------------------------------
# Serialization and arguments.


METRICS = {
    "sparse-accuracy": lambda: MaskedSparseCategoricalAccuracy(
        mask_value=PAD_LABEL, name="acc"
    ),
    "categorical-accuracy": lambda: MaskedCategoricalAccuracy(mask_value=PAD_VECTOR),
    "perplexity": lambda: Perplexity(from_logits=True, mask_value=NAN),
    "sequence-accuracy": lambda: MaskedSequenceAccuracy(mask_value=PAD_LABEL),
    "wrapper-name": lambda: MaskedMeanMetricWrapper(
        "sparse_categorical_crossentropy", mask_value=PAD_LABEL, from_logits=True
    ),
    "wrapper-function": lambda: MaskedMeanMetricWrapper(
        keras.metrics.sparse_categorical_accuracy, mask_value=0
    ),
    "wrapper-kmask-loss": lambda: MaskedMeanMetricWrapper(
        MaskedSparseCategoricalCrossentropy(from_logits=True, ignore_class=2), name="ce"
    ),
}


@pytest.mark.parametrize("make", METRICS.values(), ids=METRICS.keys())
def test_get_config_round_trip(make):
    metric = make()
    config = metric.get_config()
    assert _constructor_arguments(type(metric)) <= set(config)
    restored = type(metric).from_config(config)
    assert type(restored) is type(metric)
    np.testing.assert_equal(restored.get_config(), config)
    serialized = keras.saving.serialize_keras_object(metric)
    assert serialized["registered_name"] == f"kmask>{type(metric).__name__}"
    assert (
        keras.saving.deserialize_keras_object(serialized).get_config()["name"]
        == metric.name
    )


def test_restored_wrapper_of_a_kmask_loss_keeps_its_padding():
    metric = METRICS["wrapper-kmask-loss"]()
    restored = MaskedMeanMetricWrapper.from_config(metric.get_config())
    labels = np.array([[0, 2]])  # ignore_class=2 makes the 2nd step padding
    logits = np.array([[[0.0, 0.0, 0.0], [NAN, NAN, NAN]]], "float32")

    restored.update_state(labels, logits)

    np.testing.assert_allclose(result(restored), np.log(3.0), rtol=RTOL)


def test_compiled_metrics_survive_keras_save_and_load(tmp_path):
    tokens, labels, _ = _tagging_data()
    model = _compiled_tagger()
    before = model.evaluate(tokens, labels, batch_size=2, verbose=0, return_dict=True)

    path = str(tmp_path / "metrics.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    after = loaded.evaluate(tokens, labels, batch_size=2, verbose=0, return_dict=True)

    assert after.keys() == before.keys()
    for name, value in before.items():
        np.testing.assert_allclose(after[name], value, rtol=RTOL, err_msg=name)


def test_default_names():
    loss = MaskedSparseCategoricalCrossentropy()
    assert MaskedMeanMetricWrapper("mae").name == "masked_mae"
    assert MaskedMeanMetricWrapper(keras.losses.huber).name == "masked_huber"
    assert (
        MaskedMeanMetricWrapper(loss).name == "masked_sparse_categorical_crossentropy"
    )
    assert Perplexity().name == "perplexity"


def test_a_loss_class_is_instantiated_and_round_trips():
    metric = MaskedMeanMetricWrapper(
        keras.losses.BinaryCrossentropy, mask_value=-1.0, from_logits=True
    )
    restored = MaskedMeanMetricWrapper.from_config(metric.get_config())
    y_true = np.array([[[0.0], [-1.0], [1.0]]], "float32")
    logits = np.array([[[1.0], [5.0], [-0.5]]], "float32")
    x, y = logits[0, [0, 2], 0].astype("float64"), y_true[0, [0, 2], 0]
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    for each in (metric, restored):
        each.update_state(y_true, logits)
        assert float(each.result()) == pytest.approx(bce.mean(), rel=1e-6)
    assert restored.name == "masked_binary_crossentropy"


def test_a_loss_with_its_own_class_axis_masks_the_other_axes():
    """`CategoricalCrossentropy(axis=1)` on `[batch, classes, time]`: the
    per-step shape, so the weights' shape, is `[batch, time]`."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=(2, 4))
    y_true = np.eye(3, dtype="float32")[labels].transpose(0, 2, 1)
    y_pred = rng.uniform(0.1, 1.0, size=(2, 3, 4)).astype("float32")
    y_pred /= y_pred.sum(1, keepdims=True)
    weight = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], "float32")
    metric = MaskedMeanMetricWrapper(keras.losses.CategoricalCrossentropy(axis=1))
    metric.update_state(y_true, y_pred, sample_weight=weight)
    per_step = -np.log((y_true * y_pred).sum(1))
    expected = (per_step * weight).sum() / weight.sum()
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)


def test_invalid_fn_raises():
    with pytest.raises(ValueError, match="not a Keras loss or metric function name"):
        MaskedMeanMetricWrapper("no_such_metric")
    with pytest.raises(ValueError, match="Invalid value for argument `fn`"):
        MaskedMeanMetricWrapper(3)
    with pytest.raises(ValueError, match="fn_kwargs"):
        MaskedMeanMetricWrapper(keras.losses.MeanAbsoluteError(), axis=-1)


def _constructor_arguments(cls) -> set[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD} - {"self"}


@pytest.mark.parametrize(
    ("y_true_shape", "y_pred_shape"),
    [((2, 1, 1), (2, 5, 1)), ((2, 5, 1), (1, 5, 1)), ((2, 1), (2, 5, 3))],
)
def test_targets_that_would_broadcast_are_rejected(y_true_shape, y_pred_shape):
    # The same check as the losses': Keras would broadcast these silently.
    metric = MaskedMeanMetricWrapper("mae")
    if len(y_true_shape) < len(y_pred_shape):
        metric = MaskedSparseCategoricalAccuracy()
    pattern = (
        rf"`y_true`.*\({y_true_shape[0]}, {y_true_shape[1]}.*\({y_pred_shape[0]}, "
    )
    with pytest.raises(ValueError, match=pattern):
        metric.update_state(np.zeros(y_true_shape), np.full(y_pred_shape, 0.5))


# ----------------------------------------------------------------------------
# Whole-sequence accuracy: right rows / counted rows.


def np_sequence_accuracy(labels, scores, valid, row_weights=None):
    """Rows whose every real step has arg max == label, over rows with a real
    step; `row_weights` weight the rows."""
    right = (np.asarray(scores).argmax(-1) == np.asarray(labels)) | ~valid
    counted = valid.any(axis=1)
    weights = np.ones(len(counted)) if row_weights is None else row_weights
    weights = weights * counted
    return (right.all(axis=1) * weights).sum() / weights.sum()


def _sequence_batch(seed, batch=6, time=5, classes=3):
    """Logits whose arg max is the label at most steps, so that some rows are
    entirely right; lengths 0 to `time`, NaN in the padding."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(0, time + 1, batch)
    lengths[0] = time
    valid = np.arange(time)[None, :] < lengths[:, None]
    labels = rng.randint(0, classes, (batch, time))
    logits = rng.normal(size=(batch, time, classes))
    hits = rng.rand(batch, time) < 0.85
    np.put_along_axis(
        logits, labels[..., None], np.where(hits, 5.0, -5.0)[..., None], axis=-1
    )
    logits = np.where(valid[..., None], logits, NAN).astype("float32")
    return np.where(valid, labels, PAD_LABEL).astype("int32"), logits, valid


def test_sequence_accuracy_is_exact_over_several_batches():
    metric = MaskedSequenceAccuracy(mask_value=PAD_LABEL)
    batches = [_sequence_batch(seed) for seed in range(3)]
    for labels, logits, _ in batches:
        metric.update_state(labels, logits)
    labels, logits, valid = (
        np.concatenate(parts) for parts in zip(*batches, strict=True)
    )
    expected = np_sequence_accuracy(labels, logits, valid)
    assert 0 < expected < 1
    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)
    assert len(metric.variables) == 2


def test_sequence_accuracy_reads_every_mask_source():
    labels, logits, valid = _sequence_batch(4)
    expected = np_sequence_accuracy(labels, logits, valid)
    by_weight = MaskedSequenceAccuracy()
    by_weight.update_state(np.where(valid, labels, 0), logits, valid.astype("float32"))
    np.testing.assert_allclose(result(by_weight), expected, rtol=RTOL)

    masked = LengthMask()(
        [ops.convert_to_tensor(logits), ops.convert_to_tensor(valid.sum(1))]
    )
    by_propagated = MaskedSequenceAccuracy()
    by_propagated.update_state(np.where(valid, labels, 0), masked)
    np.testing.assert_allclose(result(by_propagated), expected, rtol=RTOL)


def test_sequence_accuracy_weights_rows_and_drops_empty_rows():
    labels, logits, valid = _sequence_batch(7)
    valid[3] = False
    labels[3] = PAD_LABEL
    row_weights = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 0.0])
    metric = MaskedSequenceAccuracy(mask_value=PAD_LABEL)
    metric.update_state(labels, logits, row_weights)
    expected = np_sequence_accuracy(labels, logits, valid, row_weights)
    unweighted = np_sequence_accuracy(labels, logits, valid, row_weights != 0)
    assert abs(expected - unweighted) > 0.01  # the weights matter here
    np.testing.assert_allclose(result(metric), expected, rtol=RTOL)


def test_sequence_accuracy_of_all_padding_is_zero():
    labels, logits, _ = _sequence_batch(6)
    metric = MaskedSequenceAccuracy(mask_value=PAD_LABEL)
    metric.update_state(np.full_like(labels, PAD_LABEL), logits)
    assert result(metric) == 0.0


def test_sequence_accuracy_in_evaluate_over_uneven_batches():
    """Labels are the model's own arg max, one step changed in every other
    row: half the rows are right, over batches of 4 and 2 rows."""
    tokens, _, real = _tagging_data()
    model = _tagger()
    logits = model.predict(tokens, verbose=0)
    labels = logits.argmax(-1)
    labels[1::2, 0] = (labels[1::2, 0] + 1) % 3
    labels = np.where(real, labels, PAD_LABEL).astype("int32")
    loss = MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=PAD_LABEL)
    model.compile(loss=loss, metrics=[MaskedSequenceAccuracy(name="sequences")])
    results = model.evaluate(tokens, labels, batch_size=4, verbose=0, return_dict=True)
    expected = np_sequence_accuracy(labels, logits, real)
    assert expected == 0.5
    np.testing.assert_allclose(results["sequences"], expected, rtol=RTOL)
