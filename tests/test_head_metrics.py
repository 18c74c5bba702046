"""The large-vocabulary head's own metrics: its per-step statistics
(`return_stats=True`) and `kmask.HeadAccuracy` / `kmask.HeadPerplexity`,
checked against float64 NumPy, alone and inside `fit()` / `evaluate()`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import kmask
from kmask.fused import HEAD_STATS
from tests._numeric import close, linear_data
from tools.parity.references import np_sparse_ce

B, T, H, V = 3, 7, 5, 11
LENGTHS = np.array([7, 3, 1])
PAD = -100


def _valid(lengths=LENGTHS):
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


def np_stats(logits, labels, valid, softcap=None, label_smoothing=0.0, z_loss=0.0):
    """float64 `(loss, nll, correct, weight)` per step, 0 on padding."""
    logits = np.asarray(logits, "float64")
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    labels = np.where(valid, labels, 0)
    columns = {
        "loss": np_sparse_ce(labels, logits, label_smoothing, z_loss),
        "nll": np_sparse_ce(labels, logits),
        "correct": (logits.argmax(-1) == labels).astype("float64"),
        "weight": valid.astype("float64"),
    }
    return np.stack([np.where(valid, columns[k], 0.0) for k in HEAD_STATS], -1)


def _close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected, "float64")
    assert np.shape(actual) == expected.shape, (np.shape(actual), expected.shape)
    close(actual, expected, rtol)


def _data(seed=0):
    return linear_data(np.random.default_rng(seed), B, T, H, V)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"softcap": 2.0},
        {"label_smoothing": 0.2, "z_loss": 0.01},
        {"softcap": 2.0, "label_smoothing": 0.1, "z_loss": 0.001},
    ],
    ids=["plain", "softcap", "smoothing-z", "all"],
)
def test_head_stats_match_numpy(options):
    head = kmask.FusedLinearCrossentropy(
        V, mask_value=PAD, chunk_size=4, return_stats=True, **options
    )
    head.build([(None, T, H), (None, T)])
    data = _data(3)
    head.set_weights([data["kernel"], data["bias"]])
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    # NaN in the padded features reaches no statistic.
    hidden = np.where(valid[..., None], data["hidden"], np.nan).astype("float32")
    stats = head([hidden, labels])
    logits = data["hidden"].astype("float64") @ data["kernel"] + data["bias"]
    expected = np_stats(logits, labels, valid, **options)
    assert tuple(stats.shape) == (B, T, len(HEAD_STATS))
    _close(stats, expected, rtol=2e-5)
    # The added loss is still the token mean of the per-step losses.
    _close(head.losses[-1], expected[..., 0].sum() / valid.sum(), rtol=2e-5)


def test_head_metrics_are_token_weighted_across_updates():
    accuracy, perplexity = kmask.HeadAccuracy(), kmask.HeadPerplexity()
    assert (accuracy.name, perplexity.name) == ("accuracy", "perplexity")
    assert float(accuracy.result()) == 0.0 and float(perplexity.result()) == 0.0
    rng = np.random.default_rng(5)
    batches = []
    for real in (12, 1):
        stats = np.zeros((2, 8, len(HEAD_STATS)), "float32")
        valid = (np.arange(16) < real).reshape(2, 8)
        stats[..., 1] = np.where(valid, rng.uniform(0.1, 3.0, (2, 8)), np.nan)
        stats[..., 2] = np.where(valid, rng.integers(0, 2, (2, 8)), np.nan)
        stats[..., 3] = valid
        batches.append((stats, valid))
        accuracy.update_state(None, stats)
        perplexity.update_state(None, stats)
    nll = np.concatenate([s[..., 1][v] for s, v in batches])
    correct = np.concatenate([s[..., 2][v] for s, v in batches])
    _close(accuracy.result(), correct.mean())
    _close(perplexity.result(), np.exp(nll.mean()))
    # Not the mean of the two batch means.
    means = [s[..., 2][v].mean() for s, v in batches]
    assert abs(np.mean(means) - correct.mean()) > 0.05
    # `sample_weight` multiplies the head's step weights.
    accuracy.reset_state()
    assert float(accuracy.result()) == 0.0
    stats, valid = batches[0]
    row_weight = np.array([2.0, 0.5], "float32")
    accuracy.update_state(None, stats, sample_weight=row_weight)
    weight = valid * row_weight[:, None]
    expected = np.nansum(stats[..., 2] * weight) / weight.sum()
    _close(accuracy.result(), expected)


def test_head_metrics_reject_other_outputs_and_round_trip():
    with pytest.raises(ValueError, match=r"`y_pred`.*return_stats=True.*\(2, 7\)"):
        kmask.HeadAccuracy().update_state(None, np.zeros((2, 7), "float32"))
    with pytest.raises(ValueError, match=r"`y_pred`.*\(2, 7, 11\)"):
        kmask.HeadPerplexity().update_state(None, np.zeros((2, 7, 11), "float32"))
    stats = np.zeros((2, 7, len(HEAD_STATS)), "float32")
    with pytest.raises(ValueError, match=r"`sample_weight`.*\(3,\).*\(2, 7, 4\)"):
        kmask.HeadAccuracy().update_state(None, stats, sample_weight=np.ones(3))
    metric = kmask.HeadPerplexity(name="ppl")
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(restored) is kmask.HeadPerplexity and restored.name == "ppl"


def test_head_metrics_read_the_mask_keras_propagated_onto_the_statistics():
    """The statistics come through the pipeline: a step the propagated mask
    pads adds nothing, whatever its weight column and values hold."""
    rng = np.random.default_rng(3)
    stats = np.zeros((2, 5, len(HEAD_STATS)), "float32")
    stats[..., 1] = rng.uniform(0.1, 3.0, (2, 5))
    stats[..., 3] = 1.0
    propagated = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    stats[..., 1] = np.where(propagated, stats[..., 1], np.nan)
    source = keras.layers.Masking()(
        ops.convert_to_tensor(propagated[..., None].astype("float32"))
    )
    masked = kmask.AttachMask()([ops.convert_to_tensor(stats), source])
    metric = kmask.HeadPerplexity()
    metric.update_state(None, masked)
    _close(metric.result(), np.exp(stats[..., 1][propagated].astype("float64").mean()))


def _model(**kwargs):
    tokens = keras.Input((T,), dtype="int32")
    labels = keras.Input((T,), dtype="int32")
    embedding = keras.layers.Embedding(V, H, name="tokens")
    hidden = keras.layers.Dense(H, activation="tanh", name="mix")(embedding(tokens))
    head = kmask.FusedLinearCrossentropy(
        V, embedding=embedding, mask_value=PAD, chunk_size=4, return_stats=True,
        name="head", **kwargs,
    )  # fmt: skip
    model = keras.Model([tokens, labels], head([hidden, labels]))
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=None,
        metrics=[kmask.HeadAccuracy(), kmask.HeadPerplexity()],
    )
    return model


def _tokens_and_labels(lengths=LENGTHS):
    rng = np.random.default_rng(13)
    valid = _valid(lengths)
    tokens = np.where(valid, rng.integers(1, V, (len(lengths), T)), 0).astype("int32")
    labels = np.where(valid, rng.integers(0, V, (len(lengths), T)), PAD)
    return tokens, labels.astype("int32"), valid


def _np_model_stats(model, tokens, labels, valid, softcap=None):
    features = keras.Model(model.inputs[0], model.get_layer("mix").output)
    hidden = ops.convert_to_numpy(features(tokens)).astype("float64")
    matrix = ops.convert_to_numpy(model.get_layer("tokens").embeddings)
    bias = ops.convert_to_numpy(model.get_layer("head").bias)
    return np_stats(hidden @ matrix.T.astype("float64") + bias, labels, valid, softcap)


def test_head_metrics_in_fit_and_evaluate_are_exact_over_uneven_batches(tmp_path):
    keras.utils.set_random_seed(2)
    model = _model(softcap=3.0)
    tokens, labels, valid = _tokens_and_labels()
    history = model.fit([tokens, labels], epochs=2, batch_size=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "perplexity"}
    assert np.all(np.isfinite(history.history["perplexity"]))
    # Batches of 7, 3 and 1 real tokens: the metrics are over all 11.
    logs = model.evaluate([tokens, labels], batch_size=1, verbose=0, return_dict=True)
    stats = _np_model_stats(model, tokens, labels, valid, softcap=3.0)
    real = valid.sum()
    _close(logs["accuracy"], stats[..., 2].sum() / real, rtol=1e-5)
    _close(logs["perplexity"], np.exp(stats[..., 1].sum() / real), rtol=1e-4)
    per_row = stats[..., 1].sum(-1) / valid.sum(-1)
    assert abs(np.exp(per_row.mean()) - np.exp(stats[..., 1].sum() / real)) > 0.01
    # The output is the statistics, for `predict` too.
    _close(model.predict([tokens, labels], verbose=0), stats, rtol=1e-4)
    # A `.keras` file keeps the option and the metrics.
    path = tmp_path / "head_metrics.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.get_layer("head").return_stats
    again = restored.evaluate(
        [tokens, labels], batch_size=1, verbose=0, return_dict=True
    )
    for name in ("accuracy", "perplexity"):
        _close(again[name], logs[name], rtol=1e-6)


def test_a_partial_last_batch_of_unknown_size():
    """`evaluate` with a batch size that does not divide the data: the
    batch axis is unknown when the model is traced (TensorFlow), and the
    head's step weights take their shape from the labels' dynamic shape."""
    rng = np.random.default_rng(7)
    tokens = keras.Input((T,), dtype="int32")
    labels = keras.Input((T,), dtype="int32")
    embedding = keras.layers.Embedding(V, H)
    embedding.build((None,))
    head = kmask.FusedLinearCrossentropy(
        V, embedding=embedding, mask_value=PAD, return_stats=True
    )
    model = keras.Model([tokens, labels], head([embedding(tokens), labels]))
    model.compile(loss=None, metrics=[kmask.HeadAccuracy()])
    x = rng.integers(0, V, size=(B, T)).astype("int32")
    y = np.where(_valid(), rng.integers(0, V, size=(B, T)), PAD).astype("int32")
    _, accuracy = model.evaluate([x, y], batch_size=2, verbose=0)
    matrix = np.asarray(ops.convert_to_numpy(embedding.embeddings), "float64")
    logits = matrix[x] @ matrix.T
    right = (logits.argmax(-1) == y)[_valid()]
    np.testing.assert_allclose(accuracy, right.mean(), rtol=1e-6)
