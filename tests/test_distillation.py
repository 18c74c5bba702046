"""Distillation over padded sequences against the float64 NumPy references:
`masked_distillation`, `MaskedLogitsDistillation` inside Keras's `Distiller`,
`MaskedDistiller`, and what Keras's own `LogitsDistillation` computes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import kmask
import kmask.ops._chunks
from tests._grad import value_and_grad
from tools.backends import value_and_grad as backend_value_and_grad
from tools.parity.references import EPSILON, np_distillation

B, T, V = 3, 6, 11
LENGTHS = np.array([6, 3, 1])
REDUCTIONS = ("token_mean", "sequence_mean", "sum", "sum_over_batch_size")


def _valid(lengths=LENGTHS):
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


def _logits(seed=0, nan_padding=True):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(scale=2.0, size=(B, T, V))
    student = rng.normal(scale=2.0, size=(B, T, V))
    if nan_padding:
        padded = ~_valid()[..., None]
        teacher, student = (
            np.where(padded, np.nan, teacher),
            np.where(padded, np.nan, student),
        )
    return teacher.astype("float32"), student.astype("float32")


def _close(found, expected, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(
        np.asarray(found, "float64"), expected, rtol=rtol, atol=atol
    )


# ----------------------------------------------------------------------------
# masked_distillation against NumPy


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(
    ("divergence", "beta"),
    [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0)],
)
def test_matches_numpy(divergence, beta, temperature, reduction):
    teacher, student = _logits()
    valid = _valid()
    weight = np.random.default_rng(3).uniform(0.5, 2.0, size=(B, T)).astype("float32")
    options = dict(
        temperature=temperature, divergence=divergence, beta=beta, reduction=reduction
    )

    def objective(x):
        return kmask.masked_distillation(
            teacher, x, valid, sample_weight=weight, **options
        )

    value, grad = value_and_grad(objective, student)
    expected, expected_grad = np_distillation(
        teacher, student, valid, weight, reduction, divergence, beta, temperature
    )
    _close(value, expected)
    _close(grad, expected_grad)
    assert np.all(grad[~valid] == 0.0)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_compiled_and_per_step(divergence):
    teacher, student = _logits(1)
    valid = _valid()

    def objective(x):
        per_step = kmask.masked_distillation(
            teacher, x, valid, divergence=divergence, temperature=2.0, reduction="none"
        )
        return ops.sum(per_step)

    value, grad = value_and_grad(objective, student, jit=True)
    expected, expected_grad = np_distillation(
        teacher, student, valid, None, "sum", divergence, 0.5, 2.0
    )
    _close(value, expected)
    _close(grad, expected_grad)


def test_unscaled_and_unmasked():
    teacher, student = _logits(2, nan_padding=False)
    found = kmask.masked_distillation(
        teacher, student, temperature=3.0, scale_by_temperature_squared=False
    )
    expected, _ = np_distillation(
        teacher, student, np.ones((B, T), bool), temperature=3.0,
        scale_by_temperature_squared=False,
    )  # fmt: skip
    _close(found, expected)


def test_masked_equals_gathered():
    teacher, student = _logits(4)
    valid = _valid()
    masked = kmask.masked_distillation(teacher, student, valid, divergence="jsd")
    gathered = kmask.masked_distillation(
        teacher[valid][None], student[valid][None], divergence="jsd"
    )
    _close(masked, float(ops.convert_to_numpy(gathered)), rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, T), min_size=B, max_size=B),
    divergence=st.sampled_from(["kl", "reverse_kl", "jsd"]),
    reduction=st.sampled_from(REDUCTIONS),
    temperature=st.sampled_from([0.5, 1.0, 4.0]),
)
def test_random_lengths_match_numpy(lengths, divergence, reduction, temperature):
    """Any lengths (no padding, all padding, one token): the value over the
    real steps, NaN elsewhere never read."""
    valid = _valid(lengths)
    rng = np.random.default_rng(sum(lengths))
    teacher, student = (
        np.where(valid[..., None], rng.normal(size=(B, T, V)), np.nan).astype("float32")
        for _ in range(2)
    )
    found = kmask.masked_distillation(
        teacher, student, valid, temperature=temperature, divergence=divergence,
        reduction=reduction,
    )  # fmt: skip
    expected, _ = np_distillation(
        teacher, student, valid, None, reduction, divergence, 0.5, temperature
    )
    _close(float(ops.convert_to_numpy(found)), expected, rtol=1e-5, atol=1e-6)


def test_all_padding_is_zero_with_zero_gradient():
    teacher, student = _logits(5)
    nothing = np.zeros((B, T), bool)
    student = np.full_like(student, np.nan)

    value, grad = value_and_grad(
        lambda x: kmask.masked_distillation(teacher, x, nothing, temperature=2.0),
        student,
    )
    assert float(value) == 0.0
    assert np.all(grad == 0.0)


def test_every_padding_source_is_the_same_padding():
    teacher, student = _logits(6)
    valid = _valid()
    expected, _ = np_distillation(teacher, student, valid, temperature=2.0)
    labels = np.where(valid, 1, -100)
    found = {
        "mask": kmask.masked_distillation(teacher, student, valid, temperature=2.0),
        "labels": kmask.masked_distillation(
            teacher, student, labels=labels, mask_value=-100, temperature=2.0
        ),
        "labels [b, t, 1]": kmask.masked_distillation(
            teacher, student, labels=labels[..., None], mask_value=-100, temperature=2.0
        ),
        "sample_weight": kmask.masked_distillation(
            teacher, student, sample_weight=valid.astype("float32"), temperature=2.0
        ),
        "propagated": kmask.masked_distillation(
            teacher, _with_keras_mask(student), temperature=2.0
        ),
    }
    for source, value in found.items():
        assert np.isfinite(float(value)), source
        _close(value, expected)


def _with_keras_mask(student):
    """`student` as a layer returns it, `LENGTHS`' mask propagated onto it."""
    return kmask.LengthMask()(
        [ops.convert_to_tensor(student), ops.convert_to_tensor(LENGTHS)]
    )


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"divergence": "kld"}, "divergence"),
        ({"beta": 1.5}, "beta"),
        ({"temperature": 0.0}, "temperature"),
        ({"reduction": "mean_of_means"}, "reduction"),
        ({"mask": np.ones((B, T + 1), bool)}, "mask"),
        ({"labels": np.ones((B, T + 1)), "mask_value": 0}, "labels"),
        ({"mask_value": -100}, "mask_value"),
        ({"sample_weight": np.ones((B + 1,))}, "sample_weight"),
    ],
)
def test_bad_input_names_the_argument(kwargs, argument):
    teacher, student = _logits(nan_padding=False)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        kmask.masked_distillation(teacher, student, **kwargs)


def test_bad_shapes_name_the_logits():
    teacher, student = _logits(nan_padding=False)
    with pytest.raises(
        ValueError, match=r"`teacher_logits`.*teacher_logits.shape=.*student"
    ):
        kmask.masked_distillation(teacher[..., :-1], student)
    with pytest.raises(ValueError, match="`student_logits`"):
        kmask.masked_distillation(teacher[0, 0], student[0, 0])


# ----------------------------------------------------------------------------
# Keras's Distiller


def _lm(width, seed, mask_zero=True):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((T,), dtype="int32")
    hidden = keras.layers.Embedding(V, width, mask_zero=mask_zero)(tokens)
    init = keras.initializers.RandomNormal(stddev=1.0, seed=seed)
    return keras.Model(tokens, keras.layers.Dense(V, kernel_initializer=init)(hidden))


def _tokens(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, size=(B, T))
    return np.where(_valid(), tokens, 0).astype("int32")


def _predict(model, tokens):
    return np.asarray(ops.convert_to_numpy(model(tokens)), "float64")


def test_distiller_fit_gives_the_masked_numpy_value():
    teacher, student = _lm(8, 0), _lm(4, 1)
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=kmask.MaskedLogitsDistillation(temperature=2.0),
        student_loss_weight=0.0,
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    tokens = _tokens()
    expected, _ = np_distillation(
        _predict(teacher, tokens),
        _predict(student, tokens),
        tokens != 0,
        temperature=2.0,
    )
    history = distiller.fit(tokens, tokens, batch_size=B, epochs=2, verbose=0)
    _close(history.history["loss"][0], expected, rtol=1e-5)
    after, _ = np_distillation(
        _predict(teacher, tokens),
        _predict(student, tokens),
        tokens != 0,
        temperature=2.0,
    )
    assert after < expected  # the student learned
    _close(distiller.evaluate(tokens, tokens, verbose=0)[0], after, rtol=1e-5)


def test_masked_distiller_reads_labels_and_sample_weight():
    teacher, student = _lm(8, 2, mask_zero=False), _lm(4, 3, mask_zero=False)
    tokens = _tokens(1)
    labels = np.where(tokens != 0, tokens, -100)
    weight = np.random.default_rng(4).uniform(0.5, 2.0, size=(B, T)).astype("float32")
    distiller = kmask.MaskedDistiller(
        teacher=teacher,
        student=student,
        distillation_losses=kmask.MaskedLogitsDistillation(
            temperature=2.0, divergence="jsd", beta=0.3, mask_value=-100
        ),
        student_loss_weight=0.0,
    )
    distiller.compile(optimizer="sgd", loss="mse")
    expected, _ = np_distillation(
        _predict(teacher, tokens), _predict(student, tokens), tokens != 0, weight,
        divergence="jsd", beta=0.3, temperature=2.0,
    )  # fmt: skip
    found = distiller.evaluate(tokens, labels, sample_weight=weight, verbose=0)[0]
    _close(found, expected, rtol=1e-5)


def test_keras_logits_distillation_counts_the_padding():
    """What `docs/guides/distillation.md` says of Keras's own loss: its
    default `loss="kl_divergence"` is the function, so the softmax and `T**2`
    branch never runs; with `KLDivergence()` it is the KL with padding
    counted."""
    teacher, student = _logits(7, nan_padding=False)
    temperature = 2.0
    everything = np.ones((B, T), bool)
    default = keras.distillation.LogitsDistillation(temperature=temperature)
    clipped_t = np.clip(teacher.astype("float64") / temperature, EPSILON, 1.0)
    clipped_s = np.clip(student.astype("float64") / temperature, EPSILON, 1.0)
    raw_kl = (clipped_t * np.log(clipped_t / clipped_s)).sum(-1).mean()
    _close(default.compute_loss(teacher, student), raw_kl, rtol=1e-5)
    with_class = keras.distillation.LogitsDistillation(
        temperature=temperature, loss=keras.losses.KLDivergence()
    )
    padded_kl, _ = np_distillation(
        teacher, student, everything, temperature=temperature
    )
    _close(with_class.compute_loss(teacher, student), padded_kl, rtol=1e-5)
    masked_kl, _ = np_distillation(teacher, student, _valid(), temperature=temperature)
    assert abs(padded_kl - masked_kl) > 0.01


def test_serialization_round_trip(tmp_path):
    loss = kmask.MaskedLogitsDistillation(
        temperature=1.5, divergence="reverse_kl", reduction="sum", mask_value=-100
    )
    config = loss.get_config()
    assert kmask.MaskedLogitsDistillation.from_config(config).get_config() == config
    teacher, student = _lm(8, 4), _lm(4, 5)
    distiller = kmask.MaskedDistiller(
        teacher=teacher,
        student=student,
        distillation_losses=[kmask.MaskedLogitsDistillation(temperature=2.0), loss],
        distillation_loss_weights=[1.0, 0.5],
        student_loss_weight=0.0,
    )
    distiller.compile(optimizer="sgd", loss="mse")
    tokens = _tokens(2)
    labels = np.where(tokens != 0, tokens, -100)
    before = distiller.evaluate(tokens, labels, verbose=0)[0]
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded, kmask.MaskedDistiller)
    losses = reloaded.distillation_losses
    assert [type(item) for item in losses] == [kmask.MaskedLogitsDistillation] * 2
    assert losses[1].get_config() == config
    _close(reloaded.evaluate(tokens, labels, verbose=0)[0], before, rtol=1e-6)


# ----------------------------------------------------------------------------
# fused_linear_distillation


def _heads(seed=0, width=(4, 6), vocabulary=13):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(B, T, width[0])).astype("float32")
    teacher = rng.normal(size=(B, T, width[1])).astype("float32")
    kernels = [rng.normal(size=(w, vocabulary)).astype("float32") for w in width]
    biases = [rng.normal(size=(vocabulary,)).astype("float32") for _ in width]
    padded = ~_valid()[..., None]
    student, teacher = (
        np.where(padded, np.nan, student),
        np.where(padded, np.nan, teacher),
    )
    return student.astype("float32"), teacher.astype("float32"), kernels, biases


def _np_logits(hidden, kernel, bias, softcap):
    logits = np.nan_to_num(hidden.astype("float64")) @ kernel + bias
    return logits if softcap is None else softcap * np.tanh(logits / softcap)


@pytest.mark.parametrize(
    ("divergence", "softcap", "transpose_kernel", "reduction"),
    [
        ("kl", None, False, "token_mean"),
        ("reverse_kl", 3.0, True, "sequence_mean"),
        ("jsd", 3.0, False, "sum"),
        ("jsd", None, True, "token_mean"),
    ],
)
@pytest.mark.parametrize("sliced", [False, True])
def test_fused_matches_numpy(
    divergence, softcap, transpose_kernel, reduction, sliced, monkeypatch
):
    vocabulary = 13
    if sliced:
        # Each chunk's gradient in 4 vocabulary slices of 3 classes.
        monkeypatch.setattr(kmask.ops._chunks, "SLICE_BYTES", 1)
        monkeypatch.setattr(kmask.ops._chunks, "MAX_SLICES", 4)
        vocabulary = 12
    student, teacher, (student_kernel, teacher_kernel), (student_bias, teacher_bias) = (
        _heads(vocabulary=vocabulary)
    )
    valid = _valid()
    weight = np.random.default_rng(8).uniform(0.5, 2.0, size=(B, T)).astype("float32")
    stored = student_kernel.T.copy() if transpose_kernel else student_kernel
    teacher_stored = teacher_kernel.T.copy() if transpose_kernel else teacher_kernel

    def objective(params):
        hidden, kernel, bias = params
        return kmask.fused_linear_distillation(
            hidden, kernel, teacher, teacher_stored, valid,
            student_bias=bias, teacher_bias=teacher_bias, sample_weight=weight,
            temperature=2.0, divergence=divergence, beta=0.3, reduction=reduction,
            chunk_size=4, transpose_kernel=transpose_kernel, softcap=softcap,
        )  # fmt: skip

    step = backend_value_and_grad(lambda *p: objective(p), argnums=range(3))
    value, grads = step(
        *(ops.convert_to_tensor(x) for x in (student, stored, student_bias))
    )
    grads = [np.asarray(ops.convert_to_numpy(g), "float64") for g in grads]
    student_logits = _np_logits(student, student_kernel, student_bias, softcap)
    teacher_logits = _np_logits(teacher, teacher_kernel, teacher_bias, softcap)
    expected, d_logits = np_distillation(
        teacher_logits, student_logits, valid, weight, reduction, divergence, 0.3, 2.0
    )
    if softcap is not None:
        d_logits = d_logits * (1.0 - (student_logits / softcap) ** 2)
    d_kernel = np.einsum("btw,btv->wv", np.nan_to_num(student), d_logits)
    _close(float(ops.convert_to_numpy(value)), expected, rtol=1e-5)
    _close(grads[0], d_logits @ student_kernel.T, rtol=1e-4, atol=1e-6)
    _close(grads[1], d_kernel.T if transpose_kernel else d_kernel, rtol=1e-4, atol=1e-6)
    _close(grads[2], d_logits.sum((0, 1)), rtol=1e-4, atol=1e-6)
    assert np.all(grads[0][~valid] == 0.0)


def test_fused_equals_unfused_with_every_padding_source():
    student, teacher, (student_kernel, teacher_kernel), _ = _heads(1)
    valid = _valid()
    labels = np.where(valid, 2, -100)
    lengths = ops.convert_to_tensor(LENGTHS)
    masked_student = kmask.LengthMask()([ops.convert_to_tensor(student), lengths])
    fused = kmask.fused_linear_distillation(
        masked_student, student_kernel, teacher, teacher_kernel,
        labels=labels, mask_value=-100, sample_weight=np.ones((B,), "float32"),
        divergence="jsd", chunk_size=2,
    )  # fmt: skip
    clean_student, clean_teacher = np.nan_to_num(student), np.nan_to_num(teacher)
    unfused = kmask.masked_distillation(
        clean_teacher @ teacher_kernel, clean_student @ student_kernel, valid,
        divergence="jsd",
    )  # fmt: skip
    _close(float(ops.convert_to_numpy(fused)), float(ops.convert_to_numpy(unfused)))


def test_fused_teacher_gets_no_gradient_and_all_padding_is_zero():
    student, teacher, (student_kernel, teacher_kernel), _ = _heads(2)

    def objective(x):
        return kmask.fused_linear_distillation(
            student, student_kernel, x, teacher_kernel
        )

    _, grad = value_and_grad(objective, np.nan_to_num(teacher))
    assert np.all(grad == 0.0)

    def padded(x):
        return kmask.fused_linear_distillation(
            x, student_kernel, teacher, teacher_kernel, np.zeros((B,), bool)
        )

    value, grad = value_and_grad(padded, student)
    assert float(value) == 0.0
    assert np.all(grad == 0.0)


def test_fused_bad_input_names_the_argument():
    student, teacher, (student_kernel, teacher_kernel), _ = _heads(3)
    with pytest.raises(ValueError, match="`student_kernel`"):
        kmask.fused_linear_distillation(
            student, teacher_kernel, teacher, teacher_kernel
        )
    with pytest.raises(ValueError, match="`teacher_kernel`"):
        kmask.fused_linear_distillation(
            student, student_kernel, teacher, teacher_kernel[:, :-1]
        )
    with pytest.raises(ValueError, match="`teacher_hidden`"):
        kmask.fused_linear_distillation(
            student, student_kernel, teacher[:, :-1], teacher_kernel
        )
    with pytest.raises(ValueError, match="`chunk_size`"):
        kmask.fused_linear_distillation(
            student, student_kernel, teacher, teacher_kernel, chunk_size=0
        )
    with pytest.raises(ValueError, match="`softcap`"):
        kmask.fused_linear_distillation(
            student, student_kernel, teacher, teacher_kernel, softcap=-1.0
        )
