"""Unusual and bad input: one behaviour on every backend (docs/edges.md).

Labels out of range, empty batches, empty metrics, arguments of the wrong
kind, sparse labels with a unit axis, a class axis other than the last,
configs with NumPy values, and Keras's reduction names. Every number comes
from the NumPy references (tools/parity/references.py).
"""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
from keras import ops

import kmask
from tests._grad import value_and_grad
from tools.parity.references import np_log_softmax, np_sparse_ce, np_token_mean

B, T, C = 2, 4, 5
LENGTHS = np.array([4, 2])
BACKEND = keras.backend.backend()
RTOL = 1e-5


def _valid():
    return np.arange(T)[None, :] < LENGTHS[:, None]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, C)).astype("float32")
    labels = rng.integers(0, C, size=(B, T)).astype("int32")
    return labels, logits


def _close(actual, expected, rtol=RTOL):
    np.testing.assert_allclose(
        np.asarray(ops.convert_to_numpy(actual), "float64"), expected, rtol=rtol
    )


# ----------------------------------------------------------------------------
# Labels out of range at a real step.

LABEL_USERS = {
    "scce_logits": lambda: kmask.MaskedSparseCategoricalCrossentropy(from_logits=True),
    "scce_probs": lambda: kmask.MaskedSparseCategoricalCrossentropy(),
    "wrapped_by_name": lambda: kmask.MaskedLoss(
        "sparse_categorical_crossentropy", from_logits=True
    ),
    "keras_instance": lambda: kmask.MaskedLoss(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ),
    "accuracy": lambda: kmask.MaskedSparseCategoricalAccuracy(),
    "perplexity": lambda: kmask.Perplexity(from_logits=True),
}


def _evaluate(user, labels, y_pred, sample_weight=None):
    """A loss's value, or a metric's result after one update."""
    if isinstance(user, keras.metrics.Metric):
        user.update_state(labels, y_pred, sample_weight=sample_weight)
        return user.result()
    return user(labels, y_pred, sample_weight=sample_weight)


def _predictions(name, logits):
    if name == "scce_probs":
        return np.exp(np_log_softmax(logits)).astype("float32")
    return logits


@pytest.mark.parametrize("bad", [7, 5, -5])
@pytest.mark.parametrize("name", sorted(LABEL_USERS))
def test_out_of_range_label_raises_in_eager_execution(name, bad):
    labels, logits = _data()
    labels[1, 1] = bad
    with pytest.raises(ValueError, match="Invalid value for argument `y_true`") as info:
        _evaluate(LABEL_USERS[name](), labels, _predictions(name, logits))
    message = str(info.value)
    assert f"y_true[1, 1]={bad}" in message
    assert f"[0, {C})" in message and f"{C} classes" in message


@pytest.mark.parametrize("name", sorted(LABEL_USERS))
def test_out_of_range_labels_at_padded_steps_are_padding(name):
    labels, logits = _data()
    valid = _valid()
    padded = np.where(valid, labels, 99).astype("int32")
    user = LABEL_USERS[name]()
    y_pred = _predictions(name, logits)
    actual = _evaluate(user, padded, y_pred, sample_weight=valid.astype("float32"))
    per_step = np_sparse_ce(labels, logits)
    if name == "accuracy":
        per_step = (logits.argmax(-1) == labels).astype("float64")
    expected = np_token_mean(per_step, valid)
    if name == "perplexity":
        expected = math.exp(expected)
    _close(actual, expected)


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch runs eagerly: it raises")
@pytest.mark.parametrize("xla", [False, True])
@pytest.mark.parametrize("bad", [7, -5])
def test_out_of_range_label_is_nan_when_compiled(bad, xla):
    if xla and BACKEND != "tensorflow":
        pytest.skip("jit_compile is TensorFlow's")
    labels, logits = _data()
    labels[1, 1] = bad
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True)
    value, grad = _compiled_value_and_grad(lambda x, y: loss(y, x), logits, labels, xla)
    assert np.isnan(value)
    # Only the loss says it: the other steps' gradients stay what they were.
    assert np.all(np.isfinite(grad))


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch runs eagerly: it raises")
def test_out_of_range_label_is_nan_in_a_compiled_metric():
    labels, logits = _data()
    labels[0, 2] = C
    metric = kmask.MaskedSparseCategoricalAccuracy()

    def update(y_pred, y_true):
        metric.update_state(y_true, y_pred)
        return metric.result() + ops.sum(y_pred) * 0.0

    value, _ = _compiled_value_and_grad(update, logits, labels, False)
    assert np.isnan(value)


def _compiled_value_and_grad(fn, x, labels, xla):
    """Traced as training traces it: the labels are an argument too."""
    from tools import backends

    step = backends.value_and_grad(fn, argnums=(0,), jit=True, xla=xla)
    value, (grad,) = step(ops.convert_to_tensor(x), ops.convert_to_tensor(labels))
    return float(ops.convert_to_numpy(value)), np.asarray(ops.convert_to_numpy(grad))


# ----------------------------------------------------------------------------
# Empty batches and empty metrics.

EMPTY_LOSSES = {
    "scce_logits": (
        lambda r: kmask.MaskedSparseCategoricalCrossentropy(
            from_logits=True, reduction=r
        ),
        "labels",
    ),
    "scce_probs": (
        lambda r: kmask.MaskedSparseCategoricalCrossentropy(reduction=r),
        "labels",
    ),
    "cce_logits": (
        lambda r: kmask.MaskedCategoricalCrossentropy(from_logits=True, reduction=r),
        "dense",
    ),
    "bce": (lambda r: kmask.MaskedBinaryCrossentropy(reduction=r), "dense"),
    "mse": (lambda r: kmask.MaskedMeanSquaredError(reduction=r), "dense"),
    "mae_wrapped": (lambda r: kmask.MaskedLoss("mae", reduction=r), "dense"),
    "huber": (lambda r: kmask.MaskedHuber(reduction=r), "dense"),
}


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
@pytest.mark.parametrize("name", sorted(EMPTY_LOSSES))
def test_empty_batch_gives_zero_and_a_zero_gradient(name, reduction):
    make, kind = EMPTY_LOSSES[name]
    y_pred = np.zeros((0, T, C), "float32")
    y_true = np.zeros((0, T), "int32") if kind == "labels" else y_pred
    loss = make(reduction)
    if reduction == "none":
        assert tuple(loss(y_true, y_pred).shape) == (0, T)
        return
    value, grad = value_and_grad(lambda x: loss(y_true, x), y_pred)
    assert float(value) == 0.0
    assert grad.shape == y_pred.shape


@pytest.mark.parametrize(
    "metric",
    [
        kmask.MaskedSparseCategoricalAccuracy,
        lambda: kmask.Perplexity(from_logits=True),
        lambda: kmask.MaskedMeanMetricWrapper("sparse_categorical_crossentropy"),
    ],
)
def test_metric_on_an_empty_batch_is_zero(metric):
    metric = metric()
    metric.update_state(np.zeros((0, T), "int32"), np.zeros((0, T, C), "float32"))
    assert float(metric.result()) == 0.0


def test_perplexity_with_no_real_step_is_zero():
    metric = kmask.Perplexity(from_logits=True, mask_value=-100)
    assert float(metric.result()) == 0.0
    labels, logits = _data()
    metric.update_state(np.full((B, T), -100), logits)
    assert float(metric.result()) == 0.0
    metric.update_state(labels, logits)
    _close(metric.result(), math.exp(np_sparse_ce(labels, logits).mean()))
    metric.reset_state()
    assert float(metric.result()) == 0.0


# ----------------------------------------------------------------------------
# Arguments of the wrong kind.


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: kmask.sequence_mask([3.5, 2.0], 5), "lengths"),
        (lambda: kmask.sequence_mask(np.array([3.0, 2.0]), 5), "lengths"),
        (lambda: kmask.sequence_mask([[3, 2]], 5), "lengths"),
        (lambda: kmask.sequence_mask([3, 2], 5.0), "maxlen"),
        (
            lambda: kmask.LengthMask()([keras.Input((T, 2)), keras.Input(())]),
            "lengths",
        ),
        (lambda: kmask.sequence_mask([3, 9], 5), "lengths"),
        (lambda: kmask.sequence_mask([3, 2], 5, padding="left"), "padding"),
        (lambda: kmask.MaskedLoss("mse", mask_value="pad"), "mask_value"),
        (lambda: kmask.MaskedLoss("mse", mask_value={"pad": 0}), "mask_value"),
        (lambda: kmask.MaskedLoss("mse", mask_value=[[0, 1]]), "mask_value"),
        (
            lambda: kmask.MaskedCategoricalAccuracy(mask_value="x"),
            "mask_value",
        ),
        (lambda: kmask.ValueMask(mask_value="pad"), "mask_value"),
        (lambda: kmask.value_mask(np.zeros((B, T, 3)), [0, 1]), "mask_value"),
        (
            lambda: kmask.MaskedCategoricalCrossentropy(mask_value=[0, 1])(
                np.zeros((B, T, 3)), np.full((B, T, 3), 1 / 3)
            ),
            "mask_value",
        ),
        (lambda: kmask.MaskedLoss("mse", reduction="average"), "reduction"),
        (
            lambda: kmask.MaskedSparseCategoricalCrossentropy(axis=3)(
                np.zeros((B, T), "int32"), np.zeros((B, T, C))
            ),
            "axis",
        ),
        (
            lambda: kmask.MaskedMeanSquaredError()(
                np.zeros((B, T, 1)), np.zeros((B, T, 1)), np.ones((B, T + 1))
            ),
            "sample_weight",
        ),
    ],
)
def test_wrong_kind_of_argument_is_a_value_error_naming_it(call, argument):
    with pytest.raises(ValueError, match=f"argument `{argument}`"):
        call()


# ----------------------------------------------------------------------------
# Sparse labels [batch, time, 1], with every mask source.


def _masked_logits(logits, valid):
    """`logits` behind a Masking layer: padded steps -9 everywhere."""
    padded = np.where(valid[..., None], logits, -9.0).astype("float32")
    return keras.layers.Masking(mask_value=-9.0)(padded)


@pytest.mark.parametrize(
    "source", ["ignore_class", "mask_value", "sample_weight", "mask", "propagated"]
)
def test_sparse_labels_with_a_unit_axis_work_with_every_mask_source(source):
    labels, logits = _data(1)
    valid = _valid()
    padded = np.where(valid, labels, 0 if source == "ignore_class" else -1)
    if source == "ignore_class":
        labels = np.where(labels == 0, 1, labels)
        padded = np.where(valid, labels, 0)
    column = padded[..., None].astype("int32")
    options = {"from_logits": True}
    call = {}
    y_pred = logits
    if source == "ignore_class":
        options["ignore_class"] = 0
    elif source == "mask_value":
        options["mask_value"] = -1
    elif source == "sample_weight":
        call["sample_weight"] = valid[..., None].astype("float32")
    elif source == "propagated":
        y_pred = _masked_logits(logits, valid)
    if source == "mask":
        value = kmask.masked_loss(
            column, y_pred, "sparse_categorical_crossentropy", mask=valid, **options
        )
    else:
        loss = kmask.MaskedSparseCategoricalCrossentropy(**options)
        value = loss(column, y_pred, **call)
    _close(value, np_token_mean(np_sparse_ce(labels, logits), valid))


# ----------------------------------------------------------------------------
# A class axis other than the last.


@pytest.mark.parametrize("axis", [0, 1, -3])
@pytest.mark.parametrize("from_logits", [True, False])
def test_sparse_class_axis_anywhere(axis, from_logits):
    labels, logits = _data(2)
    valid = _valid()
    y_pred = logits if from_logits else np.exp(np_log_softmax(logits))
    moved = np.moveaxis(y_pred, -1, axis).astype("float32")
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=from_logits, axis=axis, mask_value=-100
    )
    value = loss(np.where(valid, labels, -100), moved)
    _close(value, np_token_mean(np_sparse_ce(labels, logits), valid))


@pytest.mark.parametrize("axis", [0, 1])
def test_categorical_class_axis_anywhere_with_a_pad_vector(axis):
    labels, logits = _data(3)
    labels = np.where(labels == C - 1, 0, labels)  # the pad is class C - 1
    valid = _valid()
    one_hot = np.eye(C, dtype="float32")[labels]
    pad = np.eye(C, dtype="float32")[C - 1]
    targets = np.where(valid[..., None], one_hot, pad)
    loss = kmask.MaskedCategoricalCrossentropy(
        from_logits=True, axis=axis, mask_value=pad
    )
    value = loss(np.moveaxis(targets, -1, axis), np.moveaxis(logits, -1, axis))
    _close(value, np_token_mean(np_sparse_ce(labels, logits), valid))


def test_binary_axis_anywhere():
    rng = np.random.default_rng(4)
    targets = rng.integers(0, 2, size=(B, T, 3)).astype("float32")
    logits = rng.normal(size=(B, T, 3)).astype("float32")
    valid = _valid()
    targets = np.where(valid[..., None], targets, -1.0)
    loss = kmask.MaskedBinaryCrossentropy(from_logits=True, axis=0, mask_value=-1)
    value = loss(np.moveaxis(targets, -1, 0), np.moveaxis(logits, -1, 0))
    log_p, log_q = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)
    per_step = -(targets * log_p + (1 - targets) * log_q).mean(-1)
    _close(value, np_token_mean(per_step, valid))


# ----------------------------------------------------------------------------
# Configs: plain Python, and a `.keras` round trip.

CONFIGURED = [
    (
        lambda: kmask.MaskedCategoricalCrossentropy(mask_value=np.array([0, 0, 1])),
        "mask_value",
        [0, 0, 1],
    ),
    (
        lambda: kmask.MaskedSparseCategoricalCrossentropy(mask_value=np.int64(-100)),
        "mask_value",
        -100,
    ),
    (lambda: kmask.MaskedHuber(delta=np.float32(2.0)), "delta", 2.0),
    (lambda: kmask.MaskedLoss("mse", mask_value=(0.0, 1.0)), "mask_value", [0, 1]),
    (
        lambda: kmask.MaskedMeanAbsoluteError(mask_value=np.float64("nan")),
        "mask_value",
        "nan",
    ),
    (
        lambda: kmask.MaskedCategoricalAccuracy(mask_value=np.array([0.0, 1.0])),
        "mask_value",
        [0, 1],
    ),
    (lambda: kmask.ValueMask(mask_value=np.array([0, 1])), "mask_value", [0, 1]),
]


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(_plain(item) for item in value.values())
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    return value is None or type(value) in (bool, int, float, str)


@pytest.mark.parametrize("index", range(len(CONFIGURED)))
def test_get_config_is_plain_python_and_round_trips(index):
    make, key, expected = CONFIGURED[index]
    instance = make()
    config = instance.get_config()
    assert _plain(config), config
    if expected == "nan":
        assert math.isnan(config[key])
    else:
        assert config[key] == expected
    json.dumps(config)
    again = type(instance).from_config(config)
    assert json.dumps(again.get_config()) == json.dumps(config)


def test_model_with_numpy_configs_saves_and_reloads(tmp_path):
    pad = np.array([0, 0, 1])
    inputs = keras.Input((T, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(
        loss=kmask.MaskedCategoricalCrossentropy(from_logits=True, mask_value=pad),
        metrics=[kmask.MaskedCategoricalAccuracy(mask_value=pad)],
    )
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, T, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=(B, T))]
    model.optimizer.build(model.trainable_variables)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    before = float(ops.convert_to_numpy(model.loss(y, model(x))))
    after = float(ops.convert_to_numpy(loaded.loss(y, loaded(x))))
    assert after == pytest.approx(before, rel=1e-6)
    logits = np.asarray(ops.convert_to_numpy(model(x)), "float64")
    labels = y.argmax(-1)
    valid = y[..., 2] != 1
    _close(after, np_token_mean(np_sparse_ce(labels, logits), valid))


# ----------------------------------------------------------------------------
# Keras's reduction names compute Keras's numbers.


def test_sum_over_batch_size_with_a_propagated_mask_is_keras_masked_mean():
    labels, logits = _data(6)
    valid = _valid()
    weight = np.linspace(0.0, 2.0, B * T).reshape(B, T).astype("float32")
    per_step = np_sparse_ce(labels, logits)
    expected = float((per_step * weight)[valid].sum() / valid.sum())
    for name in ("sum_over_batch_size", "mean"):
        loss = kmask.MaskedSparseCategoricalCrossentropy(
            from_logits=True, reduction=name
        )
        _close(loss(labels, _masked_logits(logits, valid), weight), expected)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _close(keras_loss(labels, _masked_logits(logits, valid), weight), expected)


@pytest.mark.parametrize("source", ["mask_value", "ignore_class"])
def test_sum_over_batch_size_counts_the_real_steps_of_every_mask(source):
    labels, logits = _data(7)
    labels = np.where(labels == 0, 1, labels)
    valid = _valid()
    per_step = np_sparse_ce(labels, logits)
    options = {"mask_value": 0} if source == "mask_value" else {"ignore_class": 0}
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, reduction="sum_over_batch_size", **options
    )
    _close(loss(np.where(valid, labels, 0), logits), per_step[valid].mean())


def test_sum_over_batch_size_with_weights_and_no_mask_divides_by_every_step():
    labels, logits = _data(8)
    weight = np.array([[1, 2, 0, 0], [0.5, 0, 0, 0]], "float32")
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, reduction="sum_over_batch_size"
    )
    expected = float((np_sparse_ce(labels, logits) * weight).sum() / (B * T))
    _close(loss(labels, logits, sample_weight=weight), expected)


def test_a_keras_loss_instance_with_another_axis():
    labels, logits = _data(9)
    valid = _valid()
    one_hot = np.eye(C, dtype="float32")[labels]
    wrapped = keras.losses.CategoricalCrossentropy(from_logits=True, axis=0)
    loss = kmask.MaskedLoss(wrapped)
    value = loss(
        np.moveaxis(one_hot, -1, 0),
        np.moveaxis(logits, -1, 0),
        sample_weight=valid.astype("float32"),
    )
    _close(value, np_token_mean(np_sparse_ce(labels, logits), valid))


def test_fused_head_checks_its_labels_too():
    rng = np.random.default_rng(10)
    hidden = rng.normal(size=(B, T, 3)).astype("float32")
    kernel = rng.normal(size=(3, C)).astype("float32")
    labels, _ = _data(10)
    labels[0, 3] = -100
    valid = labels != -100
    value = kmask.fused_linear_crossentropy(hidden, kernel, labels, mask_value=-100)
    expected = np_token_mean(
        np_sparse_ce(np.where(valid, labels, 0), hidden @ kernel), valid
    )
    _close(value, expected)
    labels[1, 2] = C
    with pytest.raises(ValueError, match=r"labels\[1, 2\]=5"):
        kmask.fused_linear_crossentropy(hidden, kernel, labels, mask_value=-100)
    if BACKEND != "torch":

        def step(h, y):
            return kmask.fused_linear_crossentropy(h, kernel, y, mask_value=-100)

        value, _ = _compiled_value_and_grad(step, hidden, labels, False)
        assert np.isnan(value)


@pytest.mark.parametrize("name", ["scce_logits", "perplexity"])
def test_a_pad_label_is_compared_label_by_label_at_any_rank(name):
    """Labels `[batch, time, part]` for `y_pred` `[batch, time, part, classes]`:
    the pad value marks single labels, not whole rows of them."""
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(B, T, 3, C)).astype("float32")
    labels = rng.integers(0, C, size=(B, T, 3)).astype("int32")
    valid = rng.random((B, T, 3)) < 0.6
    padded = np.where(valid, labels, -100)
    if name == "perplexity":
        metric = kmask.Perplexity(from_logits=True, mask_value=-100)
        metric.update_state(padded, logits)
        value, transform = metric.result(), math.exp
    else:
        loss = kmask.MaskedSparseCategoricalCrossentropy(
            from_logits=True, mask_value=-100
        )
        value, transform = loss(padded, logits), float
    _close(value, transform(np_token_mean(np_sparse_ce(labels, logits), valid)))


@pytest.mark.parametrize("wrapped", ["name", "instance", "metric"])
def test_a_wrapped_keras_ignore_class_is_padding_not_out_of_range(wrapped):
    labels, logits = _data(12)
    valid = _valid()
    padded = np.where(valid, labels, -1)
    if wrapped == "name":
        user = kmask.MaskedLoss(
            "sparse_categorical_crossentropy", from_logits=True, ignore_class=-1
        )
    elif wrapped == "instance":
        user = kmask.MaskedLoss(
            keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=-1
            )
        )
    else:
        user = kmask.MaskedMeanMetricWrapper(
            "sparse_categorical_crossentropy", from_logits=True, ignore_class=-1
        )
    _close(
        _evaluate(user, padded, logits),
        np_token_mean(np_sparse_ce(labels, logits), valid),
    )


@pytest.mark.parametrize("pad", [-1.0, float("nan")])
def test_a_pad_value_marks_rows_of_rank_2_dense_targets(pad):
    """Targets `[batch, features]` (no time axis): a row of pad values is
    one padded step, as for `[batch, time, features]`."""
    rng = np.random.default_rng(13)
    targets = rng.normal(size=(4, 3)).astype("float32")
    predictions = rng.normal(size=(4, 3)).astype("float32")
    real = np.array([True, False, True, False])
    padded = np.where(real[:, None], targets, pad).astype("float32")
    value = kmask.MaskedMeanAbsoluteError(mask_value=pad)(padded, predictions)
    _close(value, np.abs(targets - predictions).mean(-1)[real].mean())


# ----------------------------------------------------------------------------
# Targets of the wrong kind: one ValueError about `y_true`, on every backend.

ONE_HOT = np.eye(C, dtype="float32")[_data()[0]]
WRONG_KIND = {
    "sparse_loss_one_hot": (
        lambda: kmask.MaskedSparseCategoricalCrossentropy(from_logits=True),
        ONE_HOT,
        "kmask.MaskedCategoricalCrossentropy",
    ),
    "sparse_loss_by_name_one_hot": (
        lambda: kmask.MaskedLoss("sparse_categorical_crossentropy", from_logits=True),
        ONE_HOT,
        "kmask.MaskedCategoricalCrossentropy",
    ),
    "categorical_loss_labels": (
        lambda: kmask.MaskedCategoricalCrossentropy(from_logits=True),
        _data()[0],
        "kmask.MaskedSparseCategoricalCrossentropy",
    ),
    # A pad vector as long as the class axis: the error is about the
    # targets, not about `mask_value`.
    "categorical_loss_labels_pad_vector": (
        lambda: kmask.MaskedCategoricalCrossentropy(
            from_logits=True, mask_value=[0] * (C - 1) + [1]
        ),
        _data()[0],
        "kmask.MaskedSparseCategoricalCrossentropy",
    ),
    "keras_categorical_instance_labels": (
        lambda: kmask.MaskedLoss(keras.losses.CategoricalCrossentropy()),
        _data()[0],
        "kmask.MaskedSparseCategoricalCrossentropy",
    ),
    "sparse_accuracy_one_hot": (
        kmask.MaskedSparseCategoricalAccuracy,
        ONE_HOT,
        "kmask.MaskedCategoricalAccuracy",
    ),
    "categorical_accuracy_labels": (
        kmask.MaskedCategoricalAccuracy,
        _data()[0],
        "kmask.MaskedSparseCategoricalAccuracy",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_KIND))
def test_targets_of_the_wrong_kind_name_y_true_both_shapes_and_what_fits(case):
    make, y_true, fits = WRONG_KIND[case]
    logits = _data()[1]
    with pytest.raises(ValueError) as info:
        _evaluate(make(), y_true, logits)
    message = str(info.value)
    assert message.startswith("Invalid shape for argument `y_true`"), message
    assert f"y_true.shape={y_true.shape}" in message
    assert f"y_pred.shape={logits.shape}" in message
    assert message.endswith(f"take {fits}."), message
    assert "mask_value" not in message


@pytest.mark.parametrize("pad", [-100, -1])
def test_a_negative_pad_label_without_mask_value_suggests_it(pad):
    labels, logits = _data()
    labels[1, 2:] = pad
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match=f"y_true\\[1, 2\\]={pad}") as info:
        loss(labels, logits)
    assert f"pass mask_value={pad}" in str(info.value)
    # ... and with it, the loss is NumPy's token mean of the other steps.
    valid = labels != pad
    masked = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=pad)
    expected = np_token_mean(np_sparse_ce(labels % C, logits), valid)
    _close(masked(labels, logits), expected)
