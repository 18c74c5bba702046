"""`torch.compile(fullgraph=True)`: every public loss compiles whole.

A graph break is where PyTorch's compiler hands back to Python, and on a GPU
each one is a host synchronisation on every step: a data-dependent branch
(an eager label check, `nonzero`, a NumPy value), or a call the compiler
cannot trace. `fullgraph=True` turns any of them into an error, so every form
below compiles as one graph and gives eager's value and gradient, which the
NumPy references of the other test files check. The compiler backend is
`aot_eager`: the same graph capture and autograd tracing as the default
inductor (where PyTorch's in-place modification errors show), without its
C++ code generation, which takes seconds per graph on a CPU; the
training-mode matrix (`tests/test_modes.py`) runs Keras's own
`jit_compile=True`.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kmask
from tools.parity.references import np_log_softmax

if keras.backend.backend() != "torch":
    pytest.skip("torch.compile is PyTorch's", allow_module_level=True)
if tuple(int(part) for part in keras.__version__.split(".")[:2]) < (3, 15):
    # Seen on Keras 3.12 (the oldest line): its `keras.ops.convert_to_tensor`
    # flattens its argument through torch's pytree, which TorchDynamo cannot
    # trace (`is_not` on two tuples), so no keras.ops code compiles whole
    # there; and its `Dense` fails under `jit_compile=True`. 3.15 and 3.16 do.
    pytest.skip(
        "Keras before 3.15 cannot be traced whole by torch.compile",
        allow_module_level=True,
    )

import torch

B, T, C, H = 3, 5, 7, 4
LENGTHS = np.array([5, 3, 0])
VALID = np.arange(T)[None, :] < LENGTHS[:, None]
RNG = np.random.default_rng(0)
LABELS = np.where(VALID, RNG.integers(1, C, (B, T)), 0).astype("int32")
LOGITS = RNG.normal(size=(B, T, C)).astype("float32")
ONE_HOT = np.eye(C, dtype="float32")[LABELS]
DENSE = RNG.normal(size=(B, T, 2)).astype("float32")
KERNEL = RNG.normal(size=(H, C)).astype("float32")
CTC_LABELS = np.array([[1, 2, -1], [3, -1, -1], [-1, -1, -1]], "int32")
WEIGHTS = VALID.astype("float32")


# Tensors made here, outside the compiled functions: inside, the compiler
# would trace NumPy arrays as tensors of its own.
_TENSORS: dict[int, torch.Tensor] = {}


def _t(array):
    """`array` as a tensor made once, before any compilation."""
    return _TENSORS[id(array)]


BINARY = (DENSE > 0).astype("float32")
KERNEL_T = KERNEL.T.copy()
NAN_PADDED = np.where(VALID[..., None], DENSE, np.nan).astype("float32")
_TEACHER = np.random.default_rng(1)
TEACHER = _TEACHER.normal(size=(B, T, C)).astype("float32")
TEACHER_HIDDEN = _TEACHER.normal(size=(B, T, 6)).astype("float32")
TEACHER_KERNEL = _TEACHER.normal(size=(6, C)).astype("float32")
for _array in (LABELS, ONE_HOT, DENSE, KERNEL, KERNEL_T, CTC_LABELS, WEIGHTS, VALID,
               BINARY, NAN_PADDED, TEACHER, TEACHER_HIDDEN,
               TEACHER_KERNEL):  # fmt: skip
    _TENSORS[id(_array)] = torch.tensor(_array)

FORMS = {
    "MaskedSparseCategoricalCrossentropy": lambda x: (
        kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=0)(
            _t(LABELS), x
        )
    ),
    "MaskedSparseCategoricalCrossentropy_smoothing_zloss": lambda x: (
        kmask.MaskedSparseCategoricalCrossentropy(
            from_logits=True, mask_value=0, label_smoothing=0.1, z_loss=1e-3
        )(_t(LABELS), x)
    ),
    "MaskedSparseCategoricalCrossentropy_probabilities": lambda x: (
        kmask.MaskedSparseCategoricalCrossentropy(mask_value=0)(
            _t(LABELS), torch.softmax(x, -1)
        )
    ),
    "MaskedCategoricalCrossentropy": lambda x: kmask.MaskedCategoricalCrossentropy(
        from_logits=True
    )(_t(ONE_HOT), x, sample_weight=_t(WEIGHTS)),
    "MaskedBinaryCrossentropy": lambda x: kmask.MaskedBinaryCrossentropy(
        from_logits=True, label_smoothing=0.1
    )(_t(BINARY), x[..., :2], sample_weight=_t(WEIGHTS)),
    "MaskedBinaryCrossentropy_probabilities": lambda x: (
        kmask.MaskedBinaryCrossentropy()(
            _t(BINARY),
            torch.sigmoid(x[..., :2]),
            sample_weight=_t(WEIGHTS),
        )
    ),
    "MaskedMeanSquaredError": lambda x: kmask.MaskedMeanSquaredError()(
        _t(DENSE), x[..., :2], _t(WEIGHTS)
    ),
    "MaskedMeanAbsoluteError": lambda x: kmask.MaskedMeanAbsoluteError()(
        _t(DENSE), x[..., :2], _t(WEIGHTS)
    ),
    "MaskedHuber": lambda x: kmask.MaskedHuber()(_t(DENSE), x[..., :2], _t(WEIGHTS)),
    "MaskedLoss": lambda x: kmask.MaskedLoss(
        "mae", mask_value=float("nan"), reduction="sequence_mean"
    )(
        _t(NAN_PADDED),
        x[..., :2],
    ),
    "masked_loss": lambda x: kmask.masked_loss(
        _t(LABELS),
        x,
        "sparse_categorical_crossentropy",
        mask=_t(VALID),
        from_logits=True,
    ),
    "sparse_crossentropy_with_logits": lambda x: kmask.sparse_crossentropy_with_logits(
        _t(LABELS), x, _t(VALID)
    ).sum(),
    "fused_linear_crossentropy": lambda x: kmask.fused_linear_crossentropy(
        x[..., :H], _t(KERNEL), _t(LABELS), mask_value=0, chunk_size=4
    ),
    "fused_linear_crossentropy_tied_softcap": lambda x: kmask.fused_linear_crossentropy(
        x[..., :H],
        _t(KERNEL_T),
        _t(LABELS),
        mask_value=0,
        chunk_size=4,
        transpose_kernel=True,
        softcap=3.0,
    ),
    "masked_distillation": lambda x: kmask.masked_distillation(
        _t(TEACHER), x, _t(VALID), divergence="jsd", temperature=2.0
    ),
    "fused_linear_distillation": lambda x: kmask.fused_linear_distillation(
        x[..., :H],
        _t(KERNEL),
        _t(TEACHER_HIDDEN),
        _t(TEACHER_KERNEL),
        labels=_t(LABELS),
        mask_value=0,
        chunk_size=4,
        softcap=3.0,
    ),
    "masked_ctc": lambda x: kmask.masked_ctc(_t(CTC_LABELS), x, _t(VALID)),
    "MaskedCTC": lambda x: kmask.MaskedCTC(reduction="sequence_mean")(
        _t(CTC_LABELS), x
    ),
    "sequence_loss": lambda x: kmask.sequence_loss(x, _t(LABELS), _t(WEIGHTS)),
    "SequenceLoss": lambda x: kmask.SequenceLoss()(_t(LABELS), x, _t(WEIGHTS)),
}


def _value_and_grad(fn, compiled: bool):
    logits = torch.tensor(LOGITS, requires_grad=True)
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    value = fn(logits)
    value.backward()
    return value.detach().numpy(), logits.grad.numpy()


@pytest.mark.parametrize("name", sorted(FORMS))
def test_compiles_as_one_graph_with_eagers_value_and_gradient(name):
    eager_value, eager_grad = _value_and_grad(FORMS[name], compiled=False)
    value, grad = _value_and_grad(FORMS[name], compiled=True)
    np.testing.assert_allclose(value, eager_value, rtol=1e-5)
    np.testing.assert_allclose(grad, eager_grad, rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(grad))
    if name != "MaskedCTC":  # every frame of it is real
        assert np.all(grad[~VALID] == 0.0)


def test_compiled_sparse_crossentropy_is_numpys_token_mean():
    value, grad = _value_and_grad(FORMS["MaskedSparseCategoricalCrossentropy"], True)
    log_probs = np_log_softmax(LOGITS.astype("float64"))
    per_step = -np.take_along_axis(log_probs, LABELS[..., None], -1)[..., 0]
    np.testing.assert_allclose(value, per_step[VALID].mean(), rtol=1e-6)
    expected = np.exp(log_probs) - np.eye(C)[LABELS]
    expected = np.where(VALID[..., None], expected, 0.0) / VALID.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_a_bad_label_is_nan_when_compiled_and_an_error_when_eager():
    """Nothing can be raised inside a graph: the loss is NaN there, as under
    `jax.jit` and `tf.function` (docs/edges.md)."""
    labels = LABELS.copy()
    labels[0, 1] = C + 2
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=0)
    logits = torch.tensor(LOGITS)
    labels = torch.tensor(labels)
    with pytest.raises(ValueError, match=r"y_true\[0, 1\]=9"):
        loss(labels, logits)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda y, x: loss(y, x), fullgraph=True, backend="aot_eager"
    )
    assert np.isnan(compiled(labels, logits).numpy())


def test_compiled_keras_training_with_the_sparse_loss(tmp_path):
    """`model.compile(jit_compile=True)` on PyTorch, the loss users pick
    most: it failed with PyTorch's in-place modification error in the
    kernel's backward pass. The loss `fit` logs is NumPy's token mean of the
    model's own outputs before the step."""
    keras.utils.set_random_seed(0)
    x = RNG.normal(size=(4, T, 3)).astype("float32")
    real = np.arange(T)[None] < np.array([5, 2, 4, 1])[:, None]
    y = np.where(real, 1 + np.arange(T) % (C - 1), 0)
    model = keras.Sequential([keras.Input((T, 3)), keras.layers.Dense(C)])
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=0)
    model.compile("sgd", loss=loss, jit_compile=True)
    logits = model.predict(x, verbose=0).astype("float64")
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    log_probs = np_log_softmax(logits)
    per_step = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        history.history["loss"][0], per_step[y != 0].mean(), rtol=1e-5
    )
