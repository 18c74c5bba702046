"""`class_weight=` on the cross-entropy losses and the head, and
`kmask.class_weight_for`, against the float64 NumPy references of
`tools.parity.references` (and, on PyTorch, against
`torch.nn.functional.cross_entropy(weight=, ignore_index=)`).

A class weight is a step weight: the expectation is the reference loss
reduced with `sample_weight * w[label]` as its weights."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from keras import ops

import kmask
from tests._grad import value_and_grad
from tests._numeric import close, linear_data
from tools.parity import references
from tools.parity.references import (
    np_categorical,
    np_class_step_weight,
    np_class_weight_for,
    np_reduce,
    np_sparse_categorical,
)

BACKEND = keras.backend.backend()
B, T, C = 3, 6, 5
PAD = -100
VALID = np.arange(T)[None, :] < np.array([6, 2, 4])[:, None]
RNG = np.random.default_rng(27)
LABELS = np.where(VALID, RNG.integers(0, C, (B, T)), PAD).astype("int32")
LOGITS = (2.0 * RNG.normal(size=(B, T, C))).astype("float32")
POISONED = np.where(VALID[..., None], LOGITS, np.nan).astype("float32")
VECTOR = np.array([0.2, 3.0, 1.0, 0.0, 2.5], "float32")
AS_DICT = {0: 0.2, 1: 3.0, 3: 0.0, 4: 2.5}  # class 2 left out: weight 1
SAMPLE_WEIGHT = RNG.uniform(0.5, 2.0, (B, T)).astype("float32")


def _expected(per_step_ref, class_weight, weight, reduction, targets=None):
    """The reference value and gradient: the per-step reference reduced with
    `weight * class weight` as step weights."""
    safe = np.where(VALID, LABELS, 0)
    if targets is None:
        per_step, grad = per_step_ref(safe, LOGITS)
        class_steps = np_class_step_weight(class_weight, safe, C)
    else:
        per_step, grad = per_step_ref(targets, LOGITS)
        class_steps = np_class_step_weight(class_weight, targets, C)
    weights = class_steps * (1.0 if weight is None else weight)
    value, coefficient = np_reduce(per_step, VALID, weights, reduction)
    used = VALID & (weights != 0)
    return value, np.where(used[..., None], coefficient[..., None] * grad, 0.0)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("reduction", ["token_mean", "sum", "sequence_mean"])
@pytest.mark.parametrize("class_weight", [VECTOR, AS_DICT], ids=["vector", "dict"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_loss_matches_numpy(jit, reduction, class_weight, weighted):
    weight = SAMPLE_WEIGHT if weighted else None
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True,
        mask_value=PAD,
        reduction=reduction,
        label_smoothing=0.1,
        class_weight=class_weight,
    )
    value, grad = value_and_grad(
        lambda x: loss(LABELS, x, sample_weight=weight), POISONED, jit=jit
    )

    def reference(labels, logits):
        return np_sparse_categorical(labels, logits, True, label_smoothing=0.1)

    expected_value, expected_grad = _expected(
        reference, class_weight, weight, reduction
    )
    close(value, expected_value)
    close(grad, expected_grad)
    assert np.all(grad[~VALID] == 0.0)


def test_sparse_loss_from_probabilities_and_per_step_values():
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True)
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        mask_value=PAD, class_weight=VECTOR, reduction="none"
    )
    safe = np.where(VALID, LABELS, 0)
    per_step, _ = np_sparse_categorical(safe, probs)
    weights = np_class_step_weight(VECTOR, safe, C)
    close(loss(LABELS, probs), np.where(VALID, per_step * weights, 0.0))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("soft", [False, True])
def test_categorical_loss_weighs_sum_of_class_weights_times_targets(from_logits, soft):
    safe = np.where(VALID, LABELS, 0)
    targets = np.eye(C)[safe]
    if soft:
        targets = 0.7 * targets + 0.3 * RNG.dirichlet(np.ones(C), (B, T))
    targets = np.where(VALID[..., None], targets, np.nan).astype("float32")
    predictions = (
        LOGITS
        if from_logits
        else np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True)
    )
    loss = kmask.MaskedCategoricalCrossentropy(
        from_logits=from_logits, class_weight=AS_DICT
    )
    found = loss(targets, predictions, sample_weight=VALID.astype("float32"))
    real_targets = np.where(VALID[..., None], targets, 0.0).astype("float64")
    per_step, _ = np_categorical(real_targets, predictions, from_logits)
    weights = np_class_step_weight(AS_DICT, real_targets, C)
    expected, _ = np_reduce(per_step, VALID, weights, "token_mean")
    close(found, expected)


def test_masked_equals_gathered():
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD, class_weight=VECTOR, label_smoothing=0.2
    )
    masked = loss(LABELS, POISONED)
    gathered = loss(LABELS[VALID][None], LOGITS[VALID][None])
    close(masked, float(ops.convert_to_numpy(gathered)))


def test_all_padding_and_zero_class_weights_give_zero():
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD, class_weight=VECTOR
    )
    value, grad = value_and_grad(
        lambda x: loss(np.full((B, T), PAD), x), np.full((B, T, C), np.nan, "float32")
    )
    assert value == 0.0 and np.all(grad == 0.0)
    # Every real label has weight 0 (class 3): 0, not 0 / 0.
    value, grad = value_and_grad(lambda x: loss(np.full((B, T), 3), x), LOGITS)
    assert value == 0.0 and np.all(grad == 0.0)


def test_uniform_weights_change_nothing():
    plain = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=PAD)
    uniform = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD, class_weight=np.full(C, 4.0)
    )
    close(uniform(LABELS, POISONED), float(ops.convert_to_numpy(plain(LABELS, LOGITS))))


def test_label_smoothing_uniform_part_is_weighted_by_the_label_only():
    """kmask: `w[y] * ((1 - ls) * nll + ls * mean_c(-log p_c))`, the whole
    step weighed by its label's weight; the uniform part is not weighed
    class by class as PyTorch's is (`ls / C * sum_c w_c * -log p_c`)."""
    ls = 0.3
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD, class_weight=VECTOR, label_smoothing=ls
    )
    safe = np.where(VALID, LABELS, 0)
    log_probs = references.np_log_softmax(LOGITS.astype("float64"))
    nll = -np.take_along_axis(log_probs, safe[..., None], -1)[..., 0]
    uniform = -log_probs.mean(-1)
    w = np.where(VALID, VECTOR.astype("float64")[safe], 0.0)
    ours = ((1 - ls) * nll + ls * uniform)[VALID] @ w[VALID] / w.sum()
    torch_rule = ((1 - ls) * nll * w + ls * (-log_probs @ VECTOR) / C)[VALID].sum()
    torch_rule /= w.sum()
    close(loss(LABELS, POISONED), ours)
    assert abs(ours - torch_rule) > 1e-3  # the two rules differ here


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's own cross-entropy")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_torch_cross_entropy_with_weight_and_ignore_index(label_smoothing):
    import torch
    import torch.nn.functional as F

    logits = torch.tensor(LOGITS).reshape(-1, C)
    labels = torch.tensor(LABELS, dtype=torch.long).reshape(-1)
    weight = torch.tensor(VECTOR)
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True,
        mask_value=PAD,
        class_weight=VECTOR,
        label_smoothing=label_smoothing,
    )
    found = float(loss(LABELS, POISONED))
    nll_part = F.cross_entropy(logits, labels, weight=weight, ignore_index=PAD)
    if not label_smoothing:
        close(found, float(nll_part))
        return
    # PyTorch weighs the smoothing term class by class; kmask by the label:
    # (1 - ls) * PyTorch's weighted CE + ls * the label-weighted uniform term.
    real = labels != PAD
    log_probs = torch.log_softmax(logits, -1)
    label_weight = weight[labels.clamp(min=0)] * real
    uniform = (-log_probs.mean(-1) * label_weight).sum() / label_weight.sum()
    expected = (1 - label_smoothing) * nll_part + label_smoothing * uniform
    close(found, float(expected))
    theirs = F.cross_entropy(
        logits, labels, weight=weight, ignore_index=PAD, label_smoothing=label_smoothing
    )
    assert abs(found - float(theirs)) > 1e-4


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's own chunked form")
def test_head_equals_torch_linear_cross_entropy_with_weight():
    import torch
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch.nn.functional.linear_cross_entropy is PyTorch 2.13's")
    data = linear_data(np.random.default_rng(4), B, T, 4, C)
    labels = np.where(VALID, data["labels"], PAD)
    leaves = [torch.tensor(data[k], requires_grad=True) for k in ("hidden", "kernel")]
    ours = kmask.fused_linear_crossentropy(
        *leaves, labels, mask_value=PAD, class_weight=VECTOR, chunk_size=4
    )
    our_grads = torch.autograd.grad(ours, leaves)
    theirs = F.linear_cross_entropy(
        leaves[0].reshape(-1, 4),
        leaves[1].t(),
        torch.tensor(labels, dtype=torch.long).reshape(-1),
        weight=torch.tensor(VECTOR),
        ignore_index=PAD,
    )
    their_grads = torch.autograd.grad(theirs, leaves)
    close(ours.detach(), float(theirs.detach()))
    for mine, wanted in zip(our_grads, their_grads, strict=True):
        close(mine, np.float64(wanted.numpy()))


def test_head_matches_numpy_and_the_loss_on_its_logits():
    rng = np.random.default_rng(3)
    data = linear_data(rng, B, T, 4, C)
    labels = np.where(VALID, data["labels"], PAD)
    hidden = np.where(VALID[..., None], data["hidden"], np.nan).astype("float32")
    safe = np.where(VALID, labels, 0)
    weights = np_class_step_weight(AS_DICT, safe, C) * SAMPLE_WEIGHT
    expected = references.np_linear(
        data["hidden"], data["kernel"], data["bias"], labels, VALID, weights,
        "token_mean", label_smoothing=0.1,
    )  # fmt: skip

    def loss(x):
        return kmask.fused_linear_crossentropy(
            x, data["kernel"], labels, data["bias"], mask_value=PAD,
            sample_weight=SAMPLE_WEIGHT, label_smoothing=0.1, class_weight=AS_DICT,
            chunk_size=4,
        )  # fmt: skip

    for jit in (False, True):
        value, grad = value_and_grad(loss, hidden, jit=jit)
        close(value, expected["value"])
        close(grad, expected["grad_hidden"])
        assert np.all(grad[~VALID] == 0.0)
    _, accuracy = kmask.fused_linear_crossentropy(
        data["hidden"], data["kernel"], labels, data["bias"], mask_value=PAD,
        sample_weight=SAMPLE_WEIGHT, class_weight=AS_DICT, return_token_accuracy=True,
    )  # fmt: skip
    close(accuracy, expected["accuracy"])


def _tagger(loss):
    inputs = keras.Input((T, C))
    model = keras.Model(inputs, keras.layers.Dense(C)(inputs))
    model.compile(optimizer="sgd", loss=loss)
    return model


@pytest.mark.parametrize("class_weight", [VECTOR, AS_DICT], ids=["vector", "dict"])
def test_keras_file_round_trip(tmp_path, class_weight):
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD, class_weight=class_weight
    )
    config = json.loads(json.dumps(loss.get_config()))  # int keys -> strings
    again = kmask.MaskedSparseCategoricalCrossentropy.from_config(config)
    assert again.get_config() == loss.get_config()
    model = _tagger(loss)
    path = tmp_path / "tagger.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.loss.get_config() == loss.get_config()
    x = RNG.normal(size=(B, T, C)).astype("float32")
    close(restored.evaluate(x, LABELS, verbose=0), model.evaluate(x, LABELS, verbose=0))
    head = kmask.FusedLinearCrossentropy(C, class_weight=class_weight)
    config = json.loads(json.dumps(head.get_config()))
    assert kmask.FusedLinearCrossentropy.from_config(config).get_config() == (
        head.get_config()
    )
    categorical = kmask.MaskedCategoricalCrossentropy(class_weight=class_weight)
    config = json.loads(json.dumps(categorical.get_config()))
    assert kmask.MaskedCategoricalCrossentropy.from_config(config).class_weight == (
        categorical.class_weight
    )


def test_fit_takes_class_weights_on_sequence_labels():
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD, class_weight=VECTOR
    )
    model = _tagger(loss)
    x = RNG.normal(size=(B, T, C)).astype("float32")
    history = model.fit(x, LABELS, epochs=2, batch_size=B, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize(
    ("class_weight", "match"),
    [
        ({0: -1.0}, r"`class_weight`.*non-negative.*-1.0"),
        ([1.0, float("nan")], r"`class_weight`.*finite"),
        ({"a": 1.0}, r"`class_weight`.*class ids.*'a'"),
        ({-2: 1.0}, r"`class_weight`.*class ids.*-2"),
        ([[1.0, 2.0]], r"`class_weight`.*\[classes\] vector"),
    ],
)
def test_bad_class_weights_are_refused(class_weight, match):
    with pytest.raises(ValueError, match=match):
        kmask.MaskedSparseCategoricalCrossentropy(class_weight=class_weight)
    with pytest.raises(ValueError, match=match):
        kmask.fused_linear_crossentropy(
            LOGITS, np.ones((C, C), "float32"), LABELS, class_weight=class_weight
        )


def test_class_weights_that_do_not_fit_the_classes_are_refused():
    too_short = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, class_weight=[1.0, 2.0]
    )
    with pytest.raises(ValueError, match=r"`class_weight`.*\(5,\).*\(2,\)"):
        too_short(np.zeros((B, T), "int32"), LOGITS)
    beyond = kmask.MaskedCategoricalCrossentropy(class_weight={7: 2.0})
    with pytest.raises(ValueError, match=r"`class_weight`.*below.*5.*\[7\]"):
        beyond(np.eye(C)[np.zeros((B, T), int)], LOGITS)
    with pytest.raises(ValueError, match=r"`class_weight`.*below.*5.*\[7\]"):
        kmask.FusedLinearCrossentropy(C, class_weight={7: 2.0})


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_class_weight_for_matches_numpy(power):
    labels = np.array([[0, 0, 0, 0, 2, PAD], [0, 0, 2, 1, PAD, PAD]])
    found = kmask.class_weight_for(labels, mask_value=PAD, power=power)
    expected = np_class_weight_for(labels, PAD, power)
    assert found.keys() == expected.keys()
    np.testing.assert_allclose(list(found.values()), list(expected.values()))
    with_absent = kmask.class_weight_for(labels, PAD, power, num_classes=4)
    assert with_absent[3] == 0.0
    with pytest.raises(ValueError, match=r"`labels`.*>= 0.*-100"):
        kmask.class_weight_for(labels)
    with pytest.raises(ValueError, match=r"`power`"):
        kmask.class_weight_for(labels, PAD, power=-1)


def test_accuracy_with_inverse_frequencies_is_the_mean_recall():
    predictions = np.eye(C)[RNG.integers(0, C, (B, T))].astype("float32")
    weights = kmask.class_weight_for(LABELS, mask_value=PAD)
    metric = kmask.MaskedSparseCategoricalAccuracy(mask_value=PAD, class_weight=weights)
    metric.update_state(LABELS[:1], predictions[:1])
    metric.update_state(LABELS[1:], predictions[1:])
    right = predictions.argmax(-1) == LABELS
    recalls = [right[c == LABELS].mean() for c in np.unique(LABELS[VALID])]
    close(metric.result(), np.mean(recalls))
    one_hot = np.eye(C)[np.where(VALID, LABELS, 0)].astype("float32")
    dense = kmask.MaskedCategoricalAccuracy(class_weight=weights)
    dense.update_state(one_hot, predictions, sample_weight=VALID.astype("float32"))
    close(dense.result(), np.mean(recalls))
    config = json.loads(json.dumps(metric.get_config()))
    again = kmask.MaskedSparseCategoricalAccuracy.from_config(config)
    assert again.get_config() == metric.get_config()
