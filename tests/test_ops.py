"""The two implementations of the cross-entropy agree: the portable
`keras.ops` form (`kmask.ops._rows`, called here directly rather than through
the dispatch) and the PyTorch kernel (`kmask.ops._torch`), on the same inputs,
forward and gradient (and the chunked form's statistics `LINEAR_STATS`, at a
temperature too, and a class-weighted reduction), with label smoothing,
z-loss and the soft cap; both
against the float64 NumPy references of `tools.parity.references`.

The inputs hold NaN at padded steps (the labels 0 there, as the ops pass
them); the chunked linear form takes its padded rows of `hidden` zeroed, as
`kmask.ops.linear_crossentropy` passes them, with a bias so those rows have
logits of their own.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from tests._numeric import close
from tools.parity.references import (
    np_categorical,
    np_class_step_weight,
    np_linear,
    np_sparse_categorical,
)

if keras.backend.backend() != "torch":
    pytest.skip("the kernels are PyTorch's", allow_module_level=True)

import torch

import kmask
from kmask.ops import _torch
from kmask.ops.crossentropy import (
    categorical_crossentropy_portable,
    sparse_crossentropy_portable,
)
from kmask.ops.linear import LINEAR_STATS, LinearOptions, linear_crossentropy_portable

B, T, C = 3, 5, 7
VALID = np.arange(T)[None, :] < np.array([5, 3, 0])[:, None]
RNG = np.random.default_rng(0)
LABELS = np.where(VALID, RNG.integers(0, C, (B, T)), 0).astype("int32")
LOGITS = np.where(VALID[..., None], 3.0 * RNG.normal(size=(B, T, C)), np.nan).astype(
    "float32"
)
UPSTREAM = RNG.uniform(0.5, 2.0, (B, T)).astype("float32")
SMOOTHING_AND_Z = [(0.0, 0.0), (0.2, 0.0), (0.0, 0.01), (0.2, 0.01)]


def _both(per_step_fn, *inputs):
    """`per_step_fn` on fresh leaves of `inputs`: the per-step losses and the
    gradients of `sum(UPSTREAM * per_step)` (upstream that differs per step)
    with respect to every float input, all as float64 NumPy."""
    leaves = [torch.tensor(x, requires_grad=x.dtype == np.float32) for x in inputs]
    per_step = per_step_fn(*leaves)
    grads = torch.autograd.grad(
        (per_step * torch.from_numpy(UPSTREAM)).sum(),
        [x for x in leaves if x.requires_grad],
    )
    return [np.float64(per_step.detach().numpy())] + [
        np.float64(g.numpy()) for g in grads
    ]


def _agree(kernel_results, portable_results, references):
    for kernel, portable, expected in zip(
        kernel_results, portable_results, references, strict=True
    ):
        close(kernel, expected)
        close(portable, expected)
        close(kernel, portable, rtol=2e-6)


@pytest.mark.parametrize("label_smoothing,z_loss", SMOOTHING_AND_Z)
def test_sparse_kernel_and_portable_form_agree(label_smoothing, z_loss):
    valid = torch.from_numpy(VALID)

    def kernel(labels, logits):
        return _torch.sparse_crossentropy_with_logits(
            labels, logits, valid, label_smoothing, z_loss
        )

    def portable(labels, logits):
        return sparse_crossentropy_portable(
            labels, logits, valid, label_smoothing, z_loss
        )

    expected_loss, expected_grad = np.zeros((B, T)), np.zeros((B, T, C))
    expected_loss[VALID], expected_grad[VALID] = np_sparse_categorical(
        LABELS[VALID], np.float64(LOGITS[VALID]), True, label_smoothing, z_loss
    )
    expected_grad *= UPSTREAM[..., None]
    _agree(
        _both(kernel, LABELS, LOGITS),
        _both(portable, LABELS, LOGITS),
        [expected_loss, expected_grad],
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("soft", [False, True])
def test_dense_kernel_and_portable_form_agree(label_smoothing, soft):
    targets = np.eye(C)[LABELS]
    if soft:
        targets = RNG.dirichlet(np.ones(C), (B, T))
    targets = np.where(VALID[..., None], targets, np.nan).astype("float32")
    valid = torch.from_numpy(VALID)

    def kernel(targets, logits):
        return _torch.categorical_crossentropy_with_logits(
            targets, logits, valid, label_smoothing
        )

    def portable(targets, logits):
        return categorical_crossentropy_portable(
            targets, logits, valid, label_smoothing
        )

    expected = [np.zeros((B, T)), np.zeros((B, T, C)), np.zeros((B, T, C))]
    real_logits = np.float64(LOGITS[VALID])
    expected[0][VALID], expected[2][VALID] = np_categorical(
        np.float64(targets[VALID]), real_logits, True, label_smoothing
    )
    # d per_step / d targets = -(1 - ls) * log_softmax(logits)
    log_softmax = real_logits - real_logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected[1][VALID] = (label_smoothing - 1.0) * log_softmax
    expected[1] *= UPSTREAM[..., None]
    expected[2] *= UPSTREAM[..., None]
    _agree(
        _both(kernel, targets, LOGITS),
        _both(portable, targets, LOGITS),
        expected,
    )


@pytest.mark.parametrize("label_smoothing,z_loss", SMOOTHING_AND_Z)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_linear_kernel_and_portable_form_agree(
    label_smoothing, z_loss, softcap
):
    width, vocabulary = 4, C
    hidden = RNG.normal(size=(B, T, width))
    hidden = np.where(VALID[..., None], hidden, 0.0).astype("float32")
    weights = RNG.normal(size=(width, vocabulary)).astype("float32")
    bias = RNG.normal(size=vocabulary).astype("float32")
    options = LinearOptions(3, label_smoothing, z_loss, softcap, False)
    flat_valid = torch.from_numpy(VALID.reshape(-1))
    flat_labels = torch.from_numpy(LABELS.reshape(-1))
    stats = {}

    def kernel(hidden, weights, bias):
        per_step, _, stats["kernel"] = _torch.linear_crossentropy(
            hidden.reshape(-1, width), weights, bias, flat_labels, flat_valid,
            None, options, True,
        )  # fmt: skip
        return per_step.reshape(B, T)

    def portable(hidden, weights, bias):
        per_step, _, stats["portable"] = linear_crossentropy_portable(
            hidden.reshape(-1, width), weights, bias, flat_labels, flat_valid,
            None, options, True,
        )  # fmt: skip
        return per_step.reshape(B, T)

    found = np_linear(
        hidden, weights, bias, LABELS, VALID, UPSTREAM, "sum", softcap,
        label_smoothing=label_smoothing, z_loss=z_loss,
    )  # fmt: skip
    expected = [found["per_step"], found["grad_hidden"], found["grad_kernel"]]
    expected += [found["grad_bias"]]
    _agree(
        _both(kernel, hidden, weights, bias),
        _both(portable, hidden, weights, bias),
        expected,
    )
    for found_stats in stats.values():
        for name, stat in zip(LINEAR_STATS, found_stats, strict=True):
            close(ops.reshape(stat, (B, T)), found[name])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_linear_statistics_agree_at_a_temperature(temperature):
    """The statistics of `LINEAR_STATS` from both forms, with z-loss and
    the soft cap, against NumPy at `temperature`."""
    width = 4
    hidden = np.where(VALID[..., None], RNG.normal(size=(B, T, width)), 0.0)
    hidden = hidden.astype("float32")
    weights = RNG.normal(size=(width, C)).astype("float32")
    options = LinearOptions(2, 0.0, 0.01, 3.0, False, temperature)
    flat = [torch.from_numpy(x.reshape(-1)) for x in (LABELS, VALID)]
    inputs = (torch.from_numpy(hidden.reshape(-1, width)), torch.from_numpy(weights))
    _, _, from_kernel = _torch.linear_crossentropy(
        *inputs, None, *flat, None, options, True
    )
    _, _, from_portable = linear_crossentropy_portable(
        *inputs, None, *flat, None, options, True
    )
    found = np_linear(
        hidden, weights, None, LABELS, VALID, None, "sum", 3.0,
        temperature=temperature, z_loss=0.01,
    )  # fmt: skip
    for kernel_stat, portable_stat, name in zip(
        from_kernel, from_portable, LINEAR_STATS, strict=True
    ):
        close(ops.reshape(kernel_stat, (B, T)), found[name])
        close(ops.reshape(portable_stat, (B, T)), found[name])


def test_chunked_linear_class_weighted_reduction_agrees():
    """Class weights reach the op as step weights of the reduction: the
    kernel, which computes the value's gradient ahead from the reduction,
    and the portable form agree on it, value and gradients."""
    width = 4
    hidden = np.where(VALID[..., None], RNG.normal(size=(B, T, width)), 0.0)
    hidden = hidden.astype("float32")
    weights = RNG.normal(size=(width, C)).astype("float32")
    bias = RNG.normal(size=C).astype("float32")
    class_steps = np_class_step_weight([0.5, 2.0, 0.0, 1.0, 3.0, 1.5, 0.25], LABELS, C)
    step_weight = torch.tensor(np.where(VALID, class_steps, 0.0), dtype=torch.float32)
    options = LinearOptions(3, 0.1, 0.0, None, False)
    flat = [torch.from_numpy(x.reshape(-1)) for x in (LABELS, VALID)]

    mask = torch.from_numpy(VALID)
    gradient = kmask.reduce.value_gradient((B, T), mask, "token_mean", step_weight)
    gradient = gradient.reshape(-1)

    def kernel(hidden, weights, bias):
        _, value, _ = _torch.linear_crossentropy(
            hidden.reshape(-1, width), weights, bias, *flat, gradient, options
        )
        return value

    def portable(hidden, weights, bias):
        _, value, _ = linear_crossentropy_portable(
            hidden.reshape(-1, width), weights, bias, *flat, gradient, options
        )
        return value

    found = np_linear(
        hidden, weights, bias, LABELS, VALID, np.where(VALID, class_steps, 0.0),
        "token_mean", label_smoothing=0.1,
    )  # fmt: skip
    expected = [found["value"], found["grad_hidden"], found["grad_kernel"]]
    expected += [found["grad_bias"]]
    for form in (kernel, portable):
        leaves = [torch.tensor(x, requires_grad=True) for x in (hidden, weights, bias)]
        value = form(*leaves)
        grads = torch.autograd.grad(value, leaves)
        results = [value.detach().numpy()] + [g.numpy() for g in grads]
        for result, wanted in zip(results, expected, strict=True):
            close(np.float64(result), wanted)
