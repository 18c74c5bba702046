"""The fused cross-entropy and the chunked linear cross-entropy against NumPy."""

from __future__ import annotations

import keras
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import kmask
import kmask.ops._chunks
from kmask.fused import categorical_crossentropy_with_logits, mean_squared_error
from kmask.ops._rows import column_ids, column_slice, column_update, row_crossentropy
from tests._grad import value_and_grad
from tests._numeric import close as _close
from tests._numeric import linear_data
from tools.parity import references
from tools.parity.references import (
    np_categorical,
    np_log_softmax,
    np_reduce,
    np_sparse_categorical,
    np_sparse_ce,
)

BACKEND = keras.backend.backend()
B, T, H, V = 3, 7, 5, 11
LENGTHS = np.array([7, 3, 1])
PAD = -100


# ----------------------------------------------------------------------------
# NumPy references, float64.


def _valid(lengths=LENGTHS, steps=T):
    return np.arange(steps)[None, :] < np.asarray(lengths)[:, None]


def np_linear(hidden, kernel, bias, labels, valid, weight=None, reduction="token_mean",
              label_smoothing=0.0, z_loss=0.0):  # fmt: skip
    """Value and gradients (hidden, kernel, bias) of the linear cross-entropy:
    the float64 NumPy reference of the parity suite."""
    found = references.np_linear(
        hidden, kernel, bias, labels, valid, weight, reduction,
        label_smoothing=label_smoothing, z_loss=z_loss,
    )  # fmt: skip
    return (found["value"], found["grad_hidden"], found["grad_kernel"],
            found["grad_bias"])  # fmt: skip


def _data(seed=0):
    rng = np.random.default_rng(seed)
    data = linear_data(rng, B, T, H, V)
    data["logits"] = rng.normal(scale=2.0, size=(B, T, V)).astype("float32")
    return data


# ----------------------------------------------------------------------------
# sparse_crossentropy_with_logits


@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.0, 0.0), (0.1, 0.05)])
@pytest.mark.parametrize("jit", [False, True])
def test_sparse_crossentropy_matches_numpy(label_smoothing, z_loss, jit):
    data = _data()
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    logits = np.where(valid[..., None], data["logits"], np.nan).astype("float32")
    upstream = np.random.default_rng(1).normal(size=(B, T)).astype("float32")
    upstream_tensor = ops.convert_to_tensor(upstream)

    def objective(x):
        per_step = kmask.sparse_crossentropy_with_logits(
            labels, x, valid, label_smoothing, z_loss
        )
        return ops.sum(per_step * upstream_tensor)

    value, grad = value_and_grad(objective, logits, jit=jit)
    per_step, step_grad = np_sparse_categorical(
        np.where(valid, labels, 0), data["logits"], True, label_smoothing, z_loss
    )
    _close(value, np.where(valid, per_step * upstream, 0.0).sum())
    _close(grad, np.where(valid[..., None], step_grad * upstream[..., None], 0.0))
    assert np.all(grad[~valid] == 0.0)


def test_sparse_crossentropy_without_mask_and_all_padding():
    data = _data(2)
    per_step = kmask.sparse_crossentropy_with_logits(data["labels"], data["logits"])
    _close(per_step, np_sparse_ce(data["labels"], data["logits"]))
    nothing = np.zeros((B, T), bool)
    value, grad = value_and_grad(
        lambda x: ops.sum(
            kmask.sparse_crossentropy_with_logits(data["labels"], x, nothing)
        ),
        np.full((B, T, V), np.nan, "float32"),
    )
    assert value == 0.0
    assert np.all(grad == 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sparse_crossentropy_computes_half_precision_in_float32(dtype):
    data = _data(3)
    rounded = data["logits"].astype(
        ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    )
    per_step = kmask.sparse_crossentropy_with_logits(
        data["labels"], ops.cast(data["logits"], dtype)
    )
    assert keras.backend.standardize_dtype(per_step.dtype) == "float32"
    # Half-precision arithmetic would be off by ~1e-3.
    _close(
        per_step,
        np_sparse_ce(data["labels"], rounded.astype("float64")),
    )


def test_masked_sparse_loss_takes_labels_with_a_trailing_axis():
    data = _data(4)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=PAD)
    per_step, _ = np_sparse_categorical(
        np.where(valid, labels, 0), data["logits"], True
    )
    expected, _ = np_reduce(per_step, valid, None, "token_mean")
    _close(loss(labels[..., None], data["logits"]), expected)


# ----------------------------------------------------------------------------
# fused_linear_crossentropy


def _check_linear(data, labels, valid, weight=None, jit=False, **kwargs):
    """Value and the three gradients against `np_linear`."""
    reduction = kwargs.get("reduction", "token_mean")
    use_bias = kwargs.pop("use_bias", True)
    bias = data["bias"] if use_bias else None

    def loss(hidden, kernel, bias):
        value = kmask.fused_linear_crossentropy(
            hidden, kernel, labels, bias, sample_weight=weight, **kwargs
        )
        return ops.sum(value)

    expected = np_linear(
        data["hidden"],
        data["kernel"],
        bias,
        labels,
        valid,
        weight,
        reduction,
        kwargs.get("label_smoothing", 0.0),
        kwargs.get("z_loss", 0.0),
    )
    hidden = np.where(valid[..., None], data["hidden"], np.nan).astype("float32")
    value, d_hidden = value_and_grad(
        lambda x: loss(x, data["kernel"], bias), hidden, jit=jit
    )
    _, d_kernel = value_and_grad(
        lambda x: loss(hidden, x, bias), data["kernel"], jit=jit
    )
    _close(value, np.sum(expected[0]))
    _close(d_hidden, expected[1])
    _close(d_kernel, expected[2])
    assert np.all(np.isfinite(d_kernel))
    assert np.all(d_hidden[~valid] == 0.0)
    if use_bias:
        _, d_bias = value_and_grad(
            lambda x: loss(hidden, data["kernel"], x), data["bias"], jit=jit
        )
        _close(d_bias, expected[3])


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, 21, 100])
def test_linear_matches_numpy_for_every_reduction_and_chunk(reduction, chunk_size):
    data = _data(5)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    _check_linear(
        data,
        labels,
        valid,
        mask_value=PAD,
        reduction=reduction,
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "source", ["mask", "sequence_mask", "step_weight", "sequence_weight"]
)
def test_linear_mask_sources(source, jit):
    data = _data(6)
    valid = _valid()
    labels = np.where(valid, data["labels"], 3)  # a valid label at the padding
    kwargs, weight = {}, None
    if source == "mask":
        kwargs["mask"] = valid
    elif source == "sequence_mask":
        # [batch] masks drop whole sequences; the lengths come in as weights.
        kwargs["mask"] = np.array([True, False, True])
        weight = valid.astype("float32")
        valid = valid & kwargs["mask"][:, None]
    elif source == "step_weight":
        weight = (np.linspace(0.5, 2, B * T).reshape(B, T) * valid).astype("float32")
    else:
        kwargs["mask"] = valid
        weight = np.array([1.0, 0.0, 2.0], "float32")
        valid = valid & (weight[:, None] != 0)
    _check_linear(
        data,
        labels,
        valid,
        weight,
        jit=jit,
        chunk_size=4,
        label_smoothing=0.1,
        **kwargs,
    )


@pytest.mark.parametrize("jit", [False, True])
def test_linear_smoothing_z_loss_and_no_bias(jit):
    data = _data(7)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    _check_linear(
        data,
        labels,
        valid,
        jit=jit,
        mask_value=PAD,
        chunk_size=5,
        label_smoothing=0.2,
        z_loss=0.01,
        use_bias=False,
    )


def test_linear_all_padding_gives_zero_and_zero_gradients():
    data = _data(8)
    labels = np.full((B, T), PAD, "int32")
    hidden = np.full((B, T, H), np.nan, "float32")
    value, d_hidden = value_and_grad(
        lambda x: kmask.fused_linear_crossentropy(
            x, data["kernel"], labels, data["bias"], mask_value=PAD, chunk_size=4
        ),
        hidden,
    )
    _, d_kernel = value_and_grad(
        lambda x: kmask.fused_linear_crossentropy(
            hidden, x, labels, data["bias"], mask_value=PAD, chunk_size=4
        ),
        data["kernel"],
    )
    assert value == 0.0
    assert np.all(d_hidden == 0.0)
    assert np.all(d_kernel == 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_linear_computes_half_precision_in_float32(dtype):
    data = _data(9)
    half = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    hidden = data["hidden"].astype(half).astype("float32")
    kernel = data["kernel"].astype(half).astype("float32")
    loss = kmask.fused_linear_crossentropy(
        ops.cast(data["hidden"], dtype),
        ops.cast(data["kernel"], dtype),
        data["labels"],
        chunk_size=4,
    )
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    expected = np_linear(hidden, kernel, None, data["labels"], np.ones((B, T), bool))
    _close(loss, expected[0])


def test_linear_one_dimensional_tokens():
    data = _data(10)
    hidden, labels = data["hidden"].reshape(-1, H), data["labels"].reshape(-1)
    loss = kmask.fused_linear_crossentropy(
        hidden, data["kernel"], labels, reduction="sum", chunk_size=8
    )
    expected = np_linear(
        hidden[None], data["kernel"], None, labels[None], np.ones((1, B * T), bool),
        reduction="sum",
    )  # fmt: skip
    _close(loss, expected[0])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="unknown dims exist in TF graphs")
def test_linear_with_an_unknown_batch_size_in_a_tf_graph():
    import tensorflow as tf

    data = _data(11)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, T, H], "float32"),
            tf.TensorSpec([None, T], "int32"),
        ]
    )
    def loss(hidden, labels):
        return kmask.fused_linear_crossentropy(
            hidden, data["kernel"], labels, data["bias"], mask_value=PAD, chunk_size=4
        )

    expected = np_linear(data["hidden"], data["kernel"], data["bias"], labels, valid)
    _close(loss(data["hidden"], labels), expected[0])


def test_linear_argument_errors():
    data = _data()
    args = (data["hidden"], data["kernel"], data["labels"])
    with pytest.raises(ValueError, match=r"chunk_size.*Received: chunk_size=0"):
        kmask.fused_linear_crossentropy(*args, chunk_size=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        kmask.fused_linear_crossentropy(*args, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"reduction.*'average'"):
        kmask.fused_linear_crossentropy(*args, reduction="average")
    with pytest.raises(ValueError, match=r"kernel.*\(4, 11\).*\(3, 7, 5\)"):
        kmask.fused_linear_crossentropy(
            data["hidden"], data["kernel"][:4], data["labels"]
        )
    with pytest.raises(ValueError, match=r"labels.*\(3, 6\).*\(3, 7, 5\)"):
        kmask.fused_linear_crossentropy(
            data["hidden"], data["kernel"], data["labels"][:, :6]
        )
    with pytest.raises(ValueError, match=r"bias.*\(11,\).*\(10,\)"):
        kmask.fused_linear_crossentropy(*args, bias=data["bias"][:10])


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_value_and_per_step_losses_differentiated_together(reduction, use_bias):
    # The value (PyTorch: gradient computed in the forward pass, scaled by
    # its upstream) and the per-step losses (the logits recomputed), both in
    # one objective: what a layer's loss plus its returned losses need.
    from kmask.ops import linear_crossentropy
    from kmask.ops.linear import LinearOptions

    data = _data(13)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    bias = data["bias"] if use_bias else None
    cotangent = np.random.default_rng(14).normal(size=(B, T)).astype("float32")

    def objective(hidden, kernel, bias):
        mask = ops.convert_to_tensor(valid)
        gradient = kmask.reduce.value_gradient((B, T), mask, reduction)
        per_step, value, _ = linear_crossentropy(
            hidden, kernel, labels, bias, mask, gradient,
            LinearOptions(chunk_size=4, label_smoothing=0.1, z_loss=0.01),
        )  # fmt: skip
        return 2.5 * value + ops.sum(per_step * ops.convert_to_tensor(cotangent))

    options = {"label_smoothing": 0.1, "z_loss": 0.01}
    reduced = np_linear(data["hidden"], data["kernel"], bias, labels, valid,
                        reduction=reduction, **options)  # fmt: skip
    per_step = np_linear(data["hidden"], data["kernel"], bias, labels, valid,
                         cotangent, "sum", **options)  # fmt: skip
    expected = [2.5 * a + b for a, b in zip(reduced, per_step, strict=True)]
    hidden = np.where(valid[..., None], data["hidden"], np.nan).astype("float32")
    value, d_hidden = value_and_grad(
        lambda x: objective(x, data["kernel"], bias), hidden
    )
    _, d_kernel = value_and_grad(lambda x: objective(hidden, x, bias), data["kernel"])
    _close(value, expected[0])
    _close(d_hidden, expected[1])
    _close(d_kernel, expected[2])
    assert np.all(d_hidden[~valid] == 0.0)
    if use_bias:
        _, d_bias = value_and_grad(
            lambda x: objective(hidden, data["kernel"], x), data["bias"]
        )
        _close(d_bias, expected[3])


@pytest.mark.parametrize("reduction", kmask.REDUCTIONS)
def test_linear_value_alone_and_an_empty_batch(reduction):
    data = _data(15)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    value = kmask.fused_linear_crossentropy(
        data["hidden"], data["kernel"], labels, data["bias"], mask_value=PAD,
        reduction=reduction, chunk_size=4,
    )  # fmt: skip
    expected = np_linear(data["hidden"], data["kernel"], data["bias"], labels,
                         valid, reduction=reduction)  # fmt: skip
    _close(value, expected[0])
    empty = kmask.fused_linear_crossentropy(
        np.zeros((0, T, H), "float32"), data["kernel"], np.zeros((0, T), "int32"),
        reduction=reduction,
    )  # fmt: skip
    assert tuple(empty.shape) == ((0, T) if reduction == "none" else ())
    assert np.all(ops.convert_to_numpy(empty) == 0)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's chunk loop")
def test_linear_torch_gradient_modes():
    import torch

    data = _data(16)
    valid = _valid()
    labels = torch.tensor(np.where(valid, data["labels"], PAD))
    hidden = torch.tensor(data["hidden"], requires_grad=True)
    kernel = torch.tensor(data["kernel"], requires_grad=True)
    expected = np_linear(data["hidden"], data["kernel"], None, labels.numpy(), valid)

    def loss(**kwargs):
        return kmask.fused_linear_crossentropy(
            hidden, kernel, labels, mask_value=PAD, chunk_size=4, **kwargs
        )

    # Under no_grad: the value alone, no gradient computed in advance.
    with torch.no_grad():
        _close(loss(), expected[0])
    # The gradient computed in the forward pass is used once.
    value = loss()
    value.backward(retain_graph=True)
    _close(hidden.grad, expected[1])
    _close(kernel.grad, expected[2])
    with pytest.raises(RuntimeError, match="backward through its graph runs once"):
        value.backward()
    # No second derivative through a gradient computed in the forward pass.
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss(), [hidden], create_graph=True)
    # Weights that want a gradient: it is the per-step losses (masked).
    weight = torch.tensor(valid.astype("float32") * 0.5, requires_grad=True)
    value = loss(reduction="sum", sample_weight=weight)
    d_hidden, d_weight = torch.autograd.grad(value, [hidden, weight])
    summed = np_linear(
        data["hidden"], data["kernel"], None, labels.numpy(), valid, reduction="sum"
    )
    _close(d_hidden, 0.5 * summed[1])
    logits = data["hidden"].astype("float64") @ data["kernel"]
    per_step = np_sparse_ce(np.where(valid, data["labels"], 0), logits)
    per_step = np.where(valid, per_step, 0.0)
    _close(d_weight, per_step)
    # A trainable Keras variable as the weights gets the same gradient.
    variable = keras.Variable(valid.astype("float32") * 0.5)
    value = loss(reduction="sum", sample_weight=variable)
    (d_variable,) = torch.autograd.grad(value, [variable.value])
    _close(d_variable, per_step)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a None axis under tf.function")
def test_dense_fused_losses_with_an_unknown_last_axis():
    import tensorflow as tf

    rng = np.random.default_rng(5)
    y = rng.normal(size=(2, 3, 4)).astype("float32")
    p = rng.normal(size=(2, 3, 4)).astype("float32")
    probs = np.exp(p) / np.exp(p).sum(-1, keepdims=True)
    valid = np.array([[True, True, False], [True, False, False]])
    spec = tf.TensorSpec([None, None, None])

    @tf.function(input_signature=[spec, spec, tf.TensorSpec([None, None], tf.bool)])
    def losses(y, p, valid):
        return (
            kmask.fused.mean_squared_error(y, p, valid),
            kmask.fused.categorical_crossentropy_with_logits(
                tf.nn.softmax(p * 2.0), p, valid, label_smoothing=0.1
            ),
        )

    squared, crossentropy = losses(y, p, valid)
    smoothed = (np.exp(2 * p) / np.exp(2 * p).sum(-1, keepdims=True)) * 0.9 + 0.1 / 4
    expected_ce = -(smoothed * np.log(probs)).sum(-1)
    _close(squared, np.where(valid, ((p - y) ** 2).mean(-1), 0.0))
    _close(crossentropy, np.where(valid, expected_ce, 0.0))


# ----------------------------------------------------------------------------
# FusedLinearCrossentropy


def _head(**kwargs):
    head = kmask.FusedLinearCrossentropy(V, chunk_size=4, **kwargs)
    head.build([(None, T, H), (None, T)])
    data = _data(12)
    head.set_weights([data["kernel"], data["bias"]])
    return head, data


def test_layer_adds_the_loss_and_returns_per_step_losses():
    head, data = _head(mask_value=PAD, reduction="sequence_mean")
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    per_step = head([data["hidden"], labels])
    logits = data["hidden"].astype("float64") @ data["kernel"] + data["bias"]
    expected_steps = np_sparse_ce(np.where(valid, labels, 0), logits)
    _close(per_step, np.where(valid, expected_steps, 0.0))
    (added,) = head.losses
    _close(added, np_reduce(expected_steps, valid, None, "sequence_mean")[0])


def test_layer_returns_logits_without_labels_and_reads_a_propagated_mask():
    head, data = _head()
    _close(head(data["hidden"]), data["hidden"] @ data["kernel"] + data["bias"])
    valid = _valid()
    padded = np.where(valid[..., None], data["hidden"], 0.0).astype("float32")
    masked = keras.layers.Masking(0.0)(padded)
    head([masked, data["labels"]])
    expected = np_linear(
        data["hidden"], data["kernel"], data["bias"], data["labels"], valid
    )
    _close(head.losses[-1], expected[0])


def _language_model(**kwargs):
    tokens = keras.Input((T,), dtype="int32")
    labels = keras.Input((T,), dtype="int32")
    hidden = keras.layers.Embedding(V, H, mask_zero=True)(tokens)
    hidden = keras.layers.Dense(H, activation="tanh")(hidden)
    head = kmask.FusedLinearCrossentropy(V, chunk_size=4, name="head", **kwargs)
    model = keras.Model([tokens, labels], head([hidden, labels]))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=None)
    return model


def _tokens_and_labels():
    data = _data(13)
    valid = _valid()
    tokens = np.where(valid, data["labels"] % (V - 1) + 1, 0).astype("int32")
    labels = np.where(valid, np.roll(tokens, -1, axis=1), PAD).astype("int32")
    return tokens, labels, valid


def test_layer_trains_in_a_model_and_matches_numpy():
    keras.utils.set_random_seed(0)
    model = _language_model(mask_value=PAD)
    tokens, labels, valid = _tokens_and_labels()
    before = model.evaluate([tokens, labels], verbose=0)
    history = model.fit([tokens, labels], epochs=3, batch_size=B, verbose=0)
    after = model.evaluate([tokens, labels], verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < before
    features = keras.Model(model.inputs[0], model.get_layer("head").input[0])
    hidden = ops.convert_to_numpy(features(tokens))
    kernel, bias = model.get_layer("head").get_weights()
    _close(after, np_linear(hidden, kernel, bias, labels, valid)[0], rtol=1e-4)


def test_layer_config_round_trip_and_keras_file(tmp_path):
    kwargs = {
        "use_bias": False,
        "mask_value": PAD,
        "reduction": "sum",
        "chunk_size": 3,
        "label_smoothing": 0.1,
        "z_loss": 1e-4,
    }
    head = kmask.FusedLinearCrossentropy(V, **kwargs)
    config = head.get_config()
    assert {key: config[key] for key in kwargs} == kwargs
    assert kmask.FusedLinearCrossentropy.from_config(config).get_config() == config
    model = _language_model(mask_value=PAD)
    tokens, labels, _ = _tokens_and_labels()
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.get_layer("head"), kmask.FusedLinearCrossentropy)
    _close(
        restored.evaluate([tokens, labels], verbose=0),
        model.evaluate([tokens, labels], verbose=0),
    )


def test_layer_rejects_reduction_none():
    with pytest.raises(ValueError, match=r"reduction.*Received: reduction='none'"):
        kmask.FusedLinearCrossentropy(V, reduction="none")


# ----------------------------------------------------------------------------
# The head's options: a tied [vocabulary, hidden] kernel, a soft cap, token
# accuracy, per-token weights, half precision.


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("softcap", [None, 0.7])
@pytest.mark.parametrize("transpose_kernel", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_options_match_numpy(transpose_kernel, softcap, weighted, jit):
    data = _data(21)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    rng = np.random.default_rng(22)
    weight = rng.uniform(0.0, 2.0, (B, T)).astype("float32") if weighted else None
    kernel = data["kernel"].T.copy() if transpose_kernel else data["kernel"]
    # Scaled so that the cap (0.7) bends the logits a lot.
    hidden = np.where(valid[..., None], data["hidden"], np.nan).astype("float32")

    def loss(hidden, kernel):
        value, accuracy = kmask.fused_linear_crossentropy(
            hidden,
            kernel,
            labels,
            data["bias"],
            mask_value=PAD,
            sample_weight=weight,
            chunk_size=4,
            transpose_kernel=transpose_kernel,
            softcap=softcap,
            return_token_accuracy=True,
        )
        return value, accuracy

    expected = references.np_linear(
        data["hidden"], data["kernel"], data["bias"], labels, valid, weight,
        "token_mean", softcap=softcap,
    )  # fmt: skip
    (value, accuracy), d_hidden = value_and_grad(
        lambda x: loss(x, kernel), hidden, has_aux=True, jit=jit
    )
    (_, _), d_kernel = value_and_grad(
        lambda x: loss(hidden, x), kernel, has_aux=True, jit=jit
    )
    _close(value, expected["value"])
    _close(accuracy, expected["accuracy"])
    assert 0.0 < expected["accuracy"] < 1.0  # the argmax is right and wrong
    _close(d_hidden, expected["grad_hidden"])
    grad_kernel = expected["grad_kernel"]
    _close(d_kernel, grad_kernel.T if transpose_kernel else grad_kernel)
    assert np.all(d_hidden[~valid] == 0.0)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    ("transpose_kernel", "softcap", "label_smoothing", "z_loss", "shards"),
    [
        (False, None, 0.0, 0.0, 1),
        (True, 0.7, 0.0, 0.0, 1),
        (False, 0.7, 0.2, 0.01, 1),
        (True, None, 0.0, 0.0, 2),
        (False, 0.7, 0.2, 0.01, 2),
    ],
)
def test_linear_in_vocabulary_slices_matches_numpy(
    transpose_kernel, softcap, label_smoothing, z_loss, shards, jit, monkeypatch
):
    """Each chunk's loss and gradients computed over slices of the
    vocabulary's 12 classes (`kmask.ops._chunks.vocabulary_slices`), as a
    large vocabulary is: 4 slices of 3, or, as the vocabulary is cut over 2
    devices of a Keras `ModelParallel` distribution, 3 steps of 2 columns of
    each half. The PyTorch kernel has no slices and passes it unchanged."""
    monkeypatch.setattr(kmask.ops._chunks, "SLICE_BYTES", 1)
    monkeypatch.setattr(kmask.ops._chunks, "MAX_SLICES", 4)
    monkeypatch.setattr(kmask.ops._chunks, "vocabulary_shards", lambda: shards)
    vocabulary = 12
    expected_slices = (3, 1) if shards == 1 else (2, 2)
    assert kmask.ops._chunks.vocabulary_slices(H, vocabulary) == expected_slices
    data = linear_data(np.random.default_rng(23), B, T, H, vocabulary)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    weight = np.random.default_rng(24).uniform(0.0, 2.0, (B, T)).astype("float32")
    kernel = data["kernel"].T.copy() if transpose_kernel else data["kernel"]

    def loss(hidden, kernel, bias):
        return kmask.fused_linear_crossentropy(
            hidden, kernel, labels, bias, mask_value=PAD, sample_weight=weight,
            chunk_size=4, transpose_kernel=transpose_kernel, softcap=softcap,
            label_smoothing=label_smoothing, z_loss=z_loss,
        )  # fmt: skip

    expected = references.np_linear(
        data["hidden"], data["kernel"], data["bias"], labels, valid, weight,
        "token_mean", softcap=softcap, label_smoothing=label_smoothing,
        z_loss=z_loss,
    )  # fmt: skip
    inputs = (data["hidden"], kernel, data["bias"])
    found = [
        value_and_grad(
            lambda x, i=i: loss(*inputs[:i], x, *inputs[i + 1 :]), inputs[i], jit=jit
        )
        for i in range(3)
    ]
    _close(found[0][0], expected["value"])
    _close(found[0][1], expected["grad_hidden"])
    grad_kernel = expected["grad_kernel"]
    _close(found[1][1], grad_kernel.T if transpose_kernel else grad_kernel)
    _close(found[2][1], expected["grad_bias"])


SLICES_OF_12 = [(1, 1), (2, 1), (3, 1), (4, 1), (6, 1), (12, 1), (1, 2), (2, 2)]
SLICES_OF_12 += [(3, 2), (1, 3), (2, 3), (1, 4)]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(SLICES_OF_12),
    st.sampled_from([0.1, 3.0, 60.0]),
    st.sampled_from([0.0, 0.2]),
    st.sampled_from([0.0, 1e-2]),
)
def test_rows_read_in_slices_match_numpy_property(
    seed, slices, scale, label_smoothing, z_loss
):
    """`row_crossentropy(..., slices=(size, shards))` (the online sum over
    the vocabulary's slices that the head's chunks use, within each of
    `shards` shards) against NumPy, with maxima in any slice, logits far
    apart and classes of probability 0."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(5, 12)).astype("float32")
    labels = rng.integers(0, 12, size=(5,)).astype("int32")
    # A class of probability 0 in some rows, never at the label.
    off = (labels + 1 + rng.integers(0, 11, size=(5,))) % 12
    logits[np.arange(5)[:3], off[:3]] = -np.inf
    # The reference's own sums take no -inf; exp(-1e4) is 0 in float64 too.
    finite = np.where(np.isfinite(logits), logits, -1e4).astype("float64")
    # With smoothing, the mean of every logit counts: of -inf, -inf.
    given_logits = finite.astype("float32") if label_smoothing else logits
    rows = row_crossentropy(
        ops.convert_to_tensor(given_logits), ops.convert_to_tensor(labels),
        label_smoothing, z_loss, slices=slices,
    )  # fmt: skip
    _close(rows.per_step, np_sparse_ce(labels, finite, label_smoothing, z_loss))
    _close(rows.nll, np_sparse_ce(labels, finite))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_column_slices_of_shards_match_numpy_property(data):
    """`column_slice`, `column_update` and `column_ids`: the columns `[start,
    start + size)` of each shard of an axis, against NumPy indexing."""
    shape = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    axis = data.draw(st.integers(0, len(shape)))
    shards = data.draw(st.sampled_from([1, 2, 3]))
    width = data.draw(st.sampled_from([1, 2, 4]))
    size = data.draw(st.integers(1, width))
    start = data.draw(st.integers(0, width - size))
    shape.insert(axis, shards * width)
    array = np.arange(np.prod(shape), dtype="float32").reshape(shape)
    columns = np.concatenate(
        [np.arange(start, start + size) + shard * width for shard in range(shards)]
    )
    expected = np.take(array, columns, axis=axis)
    found = column_slice(ops.convert_to_tensor(array), start, size, shards, axis)
    np.testing.assert_array_equal(ops.convert_to_numpy(found), expected)
    update = -1.0 - np.arange(expected.size, dtype="float32").reshape(expected.shape)
    updated = column_update(
        ops.convert_to_tensor(array), start, ops.convert_to_tensor(update), shards, axis
    )
    want = array.copy()
    index = [slice(None)] * len(shape)
    index[axis] = columns
    want[tuple(index)] = update
    np.testing.assert_array_equal(ops.convert_to_numpy(updated), want)
    ids = column_ids(shards * width, start, size, shards)
    np.testing.assert_array_equal(ops.convert_to_numpy(ids), columns)


def test_softcap_changes_the_loss_and_accuracy_has_no_gradient():
    data = _data(23)
    labels = data["labels"]

    def loss(hidden, softcap):
        value, accuracy = kmask.fused_linear_crossentropy(
            hidden, data["kernel"], labels, softcap=softcap,
            return_token_accuracy=True,
        )  # fmt: skip
        return accuracy, value

    capped, _ = value_and_grad(lambda x: loss(x, 0.5), data["hidden"], has_aux=True)
    plain, _ = value_and_grad(lambda x: loss(x, None), data["hidden"], has_aux=True)
    assert abs(float(capped[1]) - float(plain[1])) > 0.1
    # Differentiating the accuracy gives zeros: it is a count, not a loss.
    _, d_hidden = value_and_grad(lambda x: loss(x, 0.5)[0], data["hidden"])
    assert np.all(ops.convert_to_numpy(d_hidden) == 0.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_linear_half_precision_inputs_accumulate_in_float32(dtype):
    data = _data(24)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    hidden = data["hidden"].astype(dtype)
    kernel = data["kernel"].T.astype(dtype)
    value = kmask.fused_linear_crossentropy(
        hidden, kernel, labels, mask_value=PAD, transpose_kernel=True, softcap=2.0
    )
    assert ops.convert_to_numpy(value).dtype == np.float32
    expected = references.np_linear(
        hidden.astype("float64"), kernel.T.astype("float64"), None, labels, valid,
        None, "token_mean", softcap=2.0,
    )  # fmt: skip
    _close(value, expected["value"])


def test_linear_options_are_checked():
    data = _data()
    args = (data["hidden"], data["kernel"], data["labels"])
    for softcap in (0.0, -1.0, "30", True):
        with pytest.raises(ValueError, match=r"`softcap`.*Received: softcap="):
            kmask.fused_linear_crossentropy(*args, softcap=softcap)
    with pytest.raises(ValueError, match=r"\[vocabulary, hidden_size\]"):
        kmask.fused_linear_crossentropy(*args, transpose_kernel=True)


def _tied_model(softcap=None):
    tokens = keras.Input((T,), dtype="int32")
    labels = keras.Input((T,), dtype="int32")
    embedding = keras.layers.Embedding(V, H, mask_zero=True, name="tokens")
    hidden = keras.layers.Dense(H, activation="tanh", name="mix")(embedding(tokens))
    head = kmask.FusedLinearCrossentropy(
        V, embedding=embedding, softcap=softcap, mask_value=PAD, chunk_size=4,
        name="head",
    )  # fmt: skip
    model = keras.Model([tokens, labels], head([hidden, labels]))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=None)
    return model


def _tied_numpy_loss(model, tokens, labels, valid, softcap):
    features = keras.Model(model.inputs[0], model.get_layer("mix").output)
    hidden = ops.convert_to_numpy(features(tokens))
    matrix = ops.convert_to_numpy(model.get_layer("tokens").embeddings)
    bias = ops.convert_to_numpy(model.get_layer("head").bias)
    return references.np_linear(
        hidden, matrix.T, bias, labels, valid, None, "token_mean", softcap=softcap
    )["value"]


def test_layer_ties_the_embedding_trains_it_and_keeps_the_tie_in_a_keras_file(
    tmp_path,
):
    keras.utils.set_random_seed(1)
    model = _tied_model(softcap=3.0)
    head, embedding = model.get_layer("head"), model.get_layer("tokens")
    assert head.embedding is embedding
    assert [w.name for w in head.weights] == ["bias"]  # no kernel of its own
    tokens, labels, valid = _tokens_and_labels()
    before = ops.convert_to_numpy(embedding.embeddings).copy()
    _close(
        model.evaluate([tokens, labels], verbose=0),
        _tied_numpy_loss(model, tokens, labels, valid, 3.0),
        rtol=1e-4,
    )
    model.fit([tokens, labels], epochs=2, batch_size=B, verbose=0)
    after = ops.convert_to_numpy(embedding.embeddings)
    # The head's gradient reaches rows that only the head uses: the labels'
    # rows of tokens that never occur as inputs are still trained.
    unused_as_input = sorted(set(labels[valid].tolist()) - set(tokens[valid].tolist()))
    assert unused_as_input and not np.allclose(
        after[unused_as_input], before[unused_as_input]
    )
    path = tmp_path / "tied.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    tied = restored.get_layer("head")
    assert tied.embedding is restored.get_layer("tokens")
    assert tied.get_config()["embedding"] == "tokens"
    _close(
        restored.evaluate([tokens, labels], verbose=0),
        model.evaluate([tokens, labels], verbose=0),
    )
    # Still one matrix after reloading: training moves the embedding the
    # head reads.
    restored.fit([tokens, labels], epochs=1, batch_size=B, verbose=0)
    _close(
        restored.evaluate([tokens, labels], verbose=0),
        _tied_numpy_loss(restored, tokens, labels, valid, 3.0),
        rtol=1e-4,
    )


def test_layer_rejects_an_embedding_without_embeddings():
    with pytest.raises(ValueError, match=r"`embedding`.*Received: embedding="):
        kmask.FusedLinearCrossentropy(V, embedding=keras.layers.Dense(3))


# ----------------------------------------------------------------------------
# categorical_crossentropy_with_logits and mean_squared_error (dense targets)


def _soft_targets(seed, soft):
    """One-hot targets, or random soft ones (rows summing to 1)."""
    rng = np.random.default_rng(seed)
    if not soft:
        return np.eye(V, dtype="float32")[rng.integers(0, V, (B, T))]
    weights = rng.random((B, T, V))
    return (weights / weights.sum(-1, keepdims=True)).astype("float32")


def _poisoned(values, valid, value):
    """`values` with every padded step set to `value` (NaN, inf)."""
    return np.where(valid[..., None], values, value).astype("float32")


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("soft", "label_smoothing"), [(False, 0.0), (True, 0.2)])
@pytest.mark.parametrize("jit", [False, True])
def test_categorical_crossentropy_matches_numpy(soft, label_smoothing, jit, poison):
    data = _data(13)
    valid = _valid()
    targets = _soft_targets(13, soft)
    # Positive, so that the sum has no cancellation to lose float32 digits to.
    upstream = np.random.default_rng(2).uniform(0.5, 1.5, (B, T)).astype("float32")
    upstream_tensor = ops.convert_to_tensor(upstream)
    poisoned_logits = _poisoned(data["logits"], valid, poison)
    poisoned_targets = _poisoned(targets, valid, poison)

    def objective(logits, targets):
        per_step = categorical_crossentropy_with_logits(
            targets, logits, valid, label_smoothing
        )
        return ops.sum(per_step * upstream_tensor)

    per_step, d_logits = np_categorical(targets, data["logits"], True, label_smoothing)
    # d/dtargets of -sum(smoothed * log_softmax(logits)).
    d_targets = (label_smoothing - 1) * np_log_softmax(data["logits"].astype("float64"))
    value, grad = value_and_grad(
        lambda x: objective(x, poisoned_targets), poisoned_logits, jit=jit
    )
    _, target_grad = value_and_grad(
        lambda t: objective(poisoned_logits, t), poisoned_targets, jit=jit
    )
    mask = valid[..., None]
    _close(value, np.where(valid, per_step * upstream, 0.0).sum())
    _close(grad, np.where(mask, d_logits * upstream[..., None], 0.0))
    _close(target_grad, np.where(mask, d_targets * upstream[..., None], 0.0))
    assert np.all(grad[~valid] == 0.0)
    assert np.all(target_grad[~valid] == 0.0)


def test_categorical_crossentropy_without_mask_and_all_padding():
    data = _data(14)
    targets = _soft_targets(14, soft=True)
    per_step = categorical_crossentropy_with_logits(targets, data["logits"])
    _close(per_step, np_categorical(targets, data["logits"], True)[0])
    nothing = np.zeros((B, T), bool)
    value, grad = value_and_grad(
        lambda x: ops.sum(categorical_crossentropy_with_logits(x, x, nothing)),
        np.full((B, T, V), np.nan, "float32"),
    )
    assert value == 0.0
    assert np.all(grad == 0.0)


def test_categorical_crossentropy_is_exact_for_large_logits():
    # Differences from the row's maximum: logits of 1e4 that differ by 1.
    logits = np.array([[1e4, 1e4 + 1.0, 1e4 - 1.0]], "float32")
    targets = np.array([[0.0, 0.0, 1.0]], "float32")
    per_step = categorical_crossentropy_with_logits(targets, logits)
    expected = np_categorical(targets, logits, True)[0]
    _close(per_step, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dense_losses_compute_half_precision_in_float32(dtype):
    if dtype == "float64" and BACKEND == "jax":
        pytest.skip("JAX runs without float64 unless jax_enable_x64 is set")
    data = _data(15)
    targets = _soft_targets(15, soft=False)
    half = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    rounded = data["logits"].astype(half).astype("float64")
    logits = ops.cast(data["logits"], dtype)
    crossentropy = categorical_crossentropy_with_logits(targets, logits)
    squared = mean_squared_error(targets, logits)
    expected = "float64" if dtype == "float64" else "float32"
    for per_step in (crossentropy, squared):
        assert keras.backend.standardize_dtype(per_step.dtype) == expected
    _close(crossentropy, np_categorical(targets, rounded, True)[0])
    _close(squared, ((rounded - targets) ** 2).mean(-1))


@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("jit", [False, True])
def test_mean_squared_error_matches_numpy(jit, poison):
    data = _data(16)
    valid = _valid()
    targets = np.random.default_rng(16).normal(size=(B, T, V)).astype("float32")
    upstream = np.random.default_rng(3).uniform(0.5, 1.5, (B, T)).astype("float32")
    upstream_tensor = ops.convert_to_tensor(upstream)
    predictions = _poisoned(data["logits"], valid, poison)
    poisoned_targets = _poisoned(targets, valid, poison)

    def objective(predictions, targets):
        per_step = mean_squared_error(targets, predictions, valid)
        return ops.sum(per_step * upstream_tensor)

    value, grad = value_and_grad(
        lambda x: objective(x, poisoned_targets), predictions, jit=jit
    )
    _, target_grad = value_and_grad(
        lambda t: objective(predictions, t), poisoned_targets, jit=jit
    )
    difference = data["logits"].astype("float64") - targets
    per_step = (difference**2).mean(-1)
    expected_grad = np.where(
        valid[..., None], 2 * difference * upstream[..., None] / V, 0.0
    )
    _close(value, np.where(valid, per_step * upstream, 0.0).sum())
    _close(grad, expected_grad)
    _close(target_grad, -expected_grad)
    assert np.all(grad[~valid] == 0.0)
    assert np.all(target_grad[~valid] == 0.0)


def test_mean_squared_error_without_mask_and_all_padding():
    data = _data(17)
    per_step = mean_squared_error(data["hidden"], data["hidden"] + 2.0)
    _close(per_step, np.full((B, T), 4.0))
    nothing = np.zeros((B, T), bool)
    value, grad = value_and_grad(
        lambda x: ops.sum(mean_squared_error(x, x * 2.0, nothing)),
        np.full((B, T, H), np.nan, "float32"),
    )
    assert value == 0.0
    assert np.all(grad == 0.0)


def test_dense_losses_reject_different_shapes():
    data = _data()
    for loss in (categorical_crossentropy_with_logits, mean_squared_error):
        with pytest.raises(ValueError, match=r"same shape.*\(3, 7, 1\).*\(3, 7, 11\)"):
            loss(data["logits"][..., :1], data["logits"])


def test_a_tied_kernel_takes_its_vocabulary_from_its_first_axis():
    # [vocabulary, hidden]: the last class is V - 1, and V is out of range.
    data = _data(25)
    kernel = data["kernel"].T.copy()
    labels = np.full((B, T), V - 1, "int32")
    value = kmask.fused_linear_crossentropy(
        data["hidden"], kernel, labels, transpose_kernel=True
    )
    expected = references.np_linear(
        data["hidden"], data["kernel"], None, labels, np.ones((B, T), bool), None,
        "token_mean",
    )  # fmt: skip
    _close(value, expected["value"])
    with pytest.raises(ValueError, match=rf"labels.*{V}"):
        kmask.fused_linear_crossentropy(
            data["hidden"], kernel, labels + 1, transpose_kernel=True
        )


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="the portable chunk loop's"
)
def test_an_eager_call_without_a_gradient_computes_none(monkeypatch):
    """Eager and not differentiated (an eager `evaluate`), the head's loop
    computes no gradient: only the logits' matmul per chunk. Under a
    gradient it does, in the forward pass, and the value is the same."""
    from kmask.ops import linear

    calls = []
    add = linear.add_chunk_grads

    def counted(*args, **kwargs):
        calls.append(1)
        return add(*args, **kwargs)

    monkeypatch.setattr(linear, "add_chunk_grads", counted)
    data = linear_data(np.random.default_rng(21), B, T, H, V)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)

    def loss(hidden):
        return kmask.fused_linear_crossentropy(
            hidden, data["kernel"], labels, mask_value=PAD, chunk_size=4
        )

    value = loss(ops.convert_to_tensor(data["hidden"]))
    assert calls == []
    differentiated, _ = value_and_grad(loss, data["hidden"])
    assert calls
    expected = np_linear(data["hidden"], data["kernel"], None, labels, valid)[0]
    _close(value, expected)
    _close(differentiated, expected)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "reduction", ["token_mean", "sequence_mean", "sum", "sum_over_batch_size"]
)
def test_linear_reductions_with_zero_weights_on_real_steps(reduction, jit):
    """Every linear reduction, its gradient computed in the forward pass,
    with a mask and weights that are 0 on some real steps (which
    `sum_over_batch_size` still counts, as Keras does)."""
    data = _data(22)
    valid = _valid()
    weight = np.linspace(0.5, 2.0, B * T).reshape(B, T).astype("float32")
    weight[0, 1] = weight[1, 0] = 0.0
    labels = np.where(valid, data["labels"], 3)
    _check_linear(
        data, labels, valid, weight, jit=jit, chunk_size=4, mask=valid,
        reduction=reduction, label_smoothing=0.1, z_loss=0.01,
    )  # fmt: skip


@pytest.mark.parametrize("jit", [False, True])
def test_linear_trainable_weights_and_hidden_differentiated_together(jit):
    """The weights' gradient flows through the value, next to the hidden
    states' computed in the forward pass: `d value / d w` is
    `m * (l - value) / sum(w * m)` for the token mean."""
    from tools.backends import value_and_grad as backend_value_and_grad

    data = _data(23)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)
    weight = np.linspace(0.5, 2.0, B * T).reshape(B, T).astype("float32")

    def loss(hidden, sample_weight):
        return kmask.fused_linear_crossentropy(
            hidden, data["kernel"], labels, data["bias"], mask_value=PAD,
            sample_weight=sample_weight, chunk_size=4,
        )  # fmt: skip

    step = backend_value_and_grad(loss, argnums=(0, 1), jit=jit)
    value, (d_hidden, d_weight) = step(
        ops.convert_to_tensor(data["hidden"]), ops.convert_to_tensor(weight)
    )
    found = references.np_linear(
        data["hidden"], data["kernel"], data["bias"], labels, valid, weight,
        "token_mean",
    )  # fmt: skip
    expected_d_weight = np.where(
        valid, (found["per_step"] - found["value"]) / (weight * valid).sum(), 0.0
    )
    _close(ops.convert_to_numpy(value), found["value"])
    _close(ops.convert_to_numpy(d_hidden), found["grad_hidden"])
    _close(ops.convert_to_numpy(d_weight), expected_d_weight)


@pytest.mark.parametrize("jit", [False, True])
def test_linear_divides_by_the_global_token_count(monkeypatch, jit):
    """Under data parallelism the token mean divides by every replica's
    tokens (`kmask.distribute.global_denominator`), in the gradient computed
    ahead as in the value: with a denominator twice this batch's, both
    halve."""
    monkeypatch.setattr(kmask.reduce, "global_denominator", lambda count: 2 * count)
    data = _data(24)
    valid = _valid()
    labels = np.where(valid, data["labels"], PAD)

    def loss(hidden):
        return kmask.fused_linear_crossentropy(
            hidden, data["kernel"], labels, mask_value=PAD, chunk_size=4
        )

    value, d_hidden = value_and_grad(loss, data["hidden"], jit=jit)
    expected = np_linear(data["hidden"], data["kernel"], None, labels, valid)
    _close(value, expected[0] / 2)
    _close(d_hidden, expected[1] / 2)
