"""The tasks of the training-mode matrix (tools/modes.py): the data, a tiny
model around each public object, and the NumPy reference of what `evaluate`
logs, computed in float64 from the model's own outputs (`predict`).

The per-step references are those of the parity harness
(`tools.parity.references`, `tools.parity.sequences`: no kmask, no Keras);
the reductions, the sequence metrics and TFA's `SequenceLoss` are here.
Keras logs a loss as the mean of its batch losses (equal batches); kmask's
metrics keep sums and counts, so their reference is one over all batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tools.parity.references import (
    np_binary,
    np_categorical,
    np_distillation,
    np_linear,
    np_sparse_categorical,
    np_sparse_ce,
    np_squared,
    np_token_mean,
)
from tools.parity.sequences import np_ctc_reduced

SAMPLES, BATCH, TIME, FEATURES = 8, 4, 5, 4
CLASSES, VOCABULARY, HIDDEN = 8, 16, 8
CTC_CLASSES, CTC_LABELS = 4, 2
PAD = -1
LENGTHS = np.array([5, 3, 2, 4, 2, 5, 4, 3])
SEED = 0
CHECKED = "checked"  # the name every metric of the matrix is compiled with


# ---------------------------------------------------------------- data


def valid_steps() -> np.ndarray:
    return np.arange(TIME)[None, :] < LENGTHS[:, None]


def _rng(salt: int) -> np.random.Generator:
    return np.random.default_rng([SEED, salt])


def features(pad: float = 0.0) -> np.ndarray:
    """`[SAMPLES, TIME, FEATURES]` inputs, `pad` at padded steps."""
    x = _rng(1).normal(size=(SAMPLES, TIME, FEATURES))
    return np.where(valid_steps()[..., None], x, pad).astype("float32")


def labels(classes: int = CLASSES) -> np.ndarray:
    """`[SAMPLES, TIME]` int32 labels, `PAD` at padded steps."""
    drawn = _rng(2).integers(0, classes, (SAMPLES, TIME))
    return np.where(valid_steps(), drawn, PAD).astype("int32")


def one_hot() -> np.ndarray:
    """One-hot targets, all zeros (the pad vector) at padded steps."""
    drawn = _rng(2).integers(0, CLASSES, (SAMPLES, TIME))
    return (np.eye(CLASSES)[drawn] * valid_steps()[..., None]).astype("float32")


def regression_targets(pad: float = float("nan")) -> np.ndarray:
    y = _rng(3).normal(size=(SAMPLES, TIME, FEATURES))
    return np.where(valid_steps()[..., None], y, pad).astype("float32")


def binary_targets() -> np.ndarray:
    y = _rng(4).integers(0, 2, (SAMPLES, TIME, FEATURES)).astype("float32")
    return np.where(valid_steps()[..., None], y, PAD).astype("float32")


def ctc_labels() -> np.ndarray:
    """`[SAMPLES, CTC_LABELS]` labels in `1..CTC_CLASSES-1` (0 is the blank),
    `PAD` after `length // 2` of them: always feasible in `length` frames."""
    drawn = _rng(5).integers(1, CTC_CLASSES, (SAMPLES, CTC_LABELS))
    real = np.arange(CTC_LABELS)[None, :] < (LENGTHS // 2)[:, None]
    return np.where(real, drawn, PAD).astype("int32")


# ---------------------------------------------------------------- NumPy


def batches(*arrays):
    """The `fit`/`evaluate` batches of `arrays` (no shuffle)."""
    for start in range(0, SAMPLES, BATCH):
        yield tuple(None if a is None else a[start : start + BATCH] for a in arrays)


def batch_mean(per_batch: Callable[..., float], *arrays) -> float:
    """Keras's logged loss: the mean of the batch losses (equal batches)."""
    return float(np.mean([per_batch(*batch) for batch in batches(*arrays)]))


def np_step_loss(reference: Callable, **options) -> Callable:
    """The token mean of a per-step reference of tools.parity.references."""

    def loss(y_true, y_pred, valid):
        per_step = np.zeros(valid.shape)
        per_step[valid] = reference(y_true[valid], y_pred[valid], **options)[0]
        return np_token_mean(per_step, valid)

    return loss


def np_sequence_loss(labels, logits, weights) -> float:
    """The TFA `SequenceLoss` default: the weighted sum of the per-step
    cross-entropy over the number of non-zero weights."""
    ce = np_sparse_ce(labels, logits)
    return float((ce * weights).sum() / (weights != 0).sum())


def np_accuracy(labels, scores, valid) -> float:
    return np_token_mean(scores.argmax(-1) == labels, valid)


def np_sequence_accuracy(labels, scores, valid) -> float:
    right = (scores.argmax(-1) == labels) | ~valid
    counted = valid.any(1)
    return float(right.all(1)[counted].mean())


def np_crossentropy_mean(labels, logits, valid) -> float:
    return np_step_loss(np_sparse_categorical, from_logits=True)(labels, logits, valid)


def copy_argmax_to_half_the_rows(labels, scores, valid) -> np.ndarray:
    """Evaluation labels whose even rows are the model's argmax: an accuracy
    of neither 0 nor 1, so a metric stuck at either fails."""
    labels = labels.copy()
    labels[::2] = np.where(valid[::2], scores.argmax(-1)[::2], PAD)
    return labels


# ---------------------------------------------------------------- models


def _keras():
    import keras

    return keras


def dense_model(units: int, masking: bool = False):
    keras = _keras()
    inputs = keras.Input((TIME, FEATURES))
    hidden = keras.layers.Masking(0.0)(inputs) if masking else inputs
    return keras.Model(inputs, keras.layers.Dense(units, name="dense")(hidden))


def predict(model, x) -> np.ndarray:
    """The model's outputs, in its own dtype, then float64."""
    out = model.predict(x, batch_size=BATCH, verbose=0)
    return np.asarray(out).astype("float64")


@dataclass(frozen=True)
class Task:
    """A model around one object, its data and what `evaluate` must log.

    `expected(model) -> (evaluate inputs, {logged name: NumPy value})`: the
    inputs are `(x, y, sample_weight)`, the ones `fit` used unless a check
    needs others (the accuracies evaluate on labels half copied from the
    model's argmax)."""

    model: Any
    compile: dict[str, Any]
    data: tuple[Any, Any, Any]
    expected: Callable[[Any], tuple[tuple[Any, Any, Any], dict[str, float]]]


def loss_task(loss, units: int, y, reference: Callable, pad: bool = True) -> Task:
    """A Dense model trained with `loss` on targets `y` padded at the
    padded steps (`reference(y_true, y_pred, valid)` per batch)."""
    x = features()

    def expected(model):
        outputs = predict(model, x)
        value = batch_mean(reference, y, outputs, valid_steps())
        return (x, y, None), {"loss": value}

    return Task(dense_model(units), {"loss": loss}, (x, y, None), expected)


def sparse_loss(cls: str, **options) -> Callable[[], Task]:
    def build():
        import kmask

        loss = getattr(kmask, cls)(from_logits=True, mask_value=PAD, **options)
        reference = np_step_loss(np_sparse_categorical, from_logits=True)
        return loss_task(loss, CLASSES, labels(), reference)

    return build


def categorical_loss() -> Task:
    import kmask

    loss = kmask.MaskedCategoricalCrossentropy(
        from_logits=True, mask_value=[0] * CLASSES
    )
    reference = np_step_loss(np_categorical, from_logits=True)
    return loss_task(loss, CLASSES, one_hot(), reference)


def binary_loss() -> Task:
    import kmask

    loss = kmask.MaskedBinaryCrossentropy(from_logits=True, mask_value=PAD)
    reference = np_step_loss(np_binary, from_logits=True)
    return loss_task(loss, FEATURES, binary_targets(), reference)


def regression_loss(cls: str, reference: Callable, *args) -> Callable[[], Task]:
    def build():
        import kmask

        loss = getattr(kmask, cls)(*args, mask_value=float("nan"))
        return loss_task(loss, FEATURES, regression_targets(), np_step_loss(reference))

    return build


def ctc_loss() -> Task:
    import kmask

    x, y = features(), ctc_labels()

    def per_batch(y_true, logits, lengths):
        return np_ctc_reduced(y_true, logits, lengths, None, "token_mean", 0, False)[0]

    def expected(model):
        value = batch_mean(per_batch, y, predict(model, x), LENGTHS)
        return (x, y, None), {"loss": value}

    loss = kmask.MaskedCTC(blank_index=0, mask_value=PAD)
    model = dense_model(CTC_CLASSES, masking=True)
    return Task(model, {"loss": loss}, (x, y, None), expected)


def sequence_loss() -> Task:
    import kmask

    x = features()
    y = np.maximum(labels(), 0)  # TFA's labels have no pad value: weights do
    weights = valid_steps().astype("float32")

    def expected(model):
        value = batch_mean(np_sequence_loss, y, predict(model, x), weights)
        return (x, y, weights), {"loss": value}

    model = dense_model(CLASSES)
    return Task(model, {"loss": kmask.SequenceLoss()}, (x, y, weights), expected)


def metric_task(metric, target: Callable, loss, reference, copy_argmax=False):
    """A Dense model compiled with a Keras loss (not kmask's) and `metric`,
    whose result over the 2 batches is `reference(labels, outputs, valid)`
    on all of them at once (the metric's state is exact across batches)."""
    x, y = features(), target()

    def expected(model):
        outputs = predict(model, x)
        sparse = y if y.ndim == 2 else np.where(valid_steps(), y.argmax(-1), PAD)
        if copy_argmax:
            sparse = copy_argmax_to_half_the_rows(sparse, outputs, valid_steps())
        y_eval = sparse if y.ndim == 2 else _one_hot_of(sparse)
        return (x, y_eval, None), {CHECKED: reference(sparse, outputs, valid_steps())}

    compiled = {"loss": loss, "metrics": [metric]}
    return Task(dense_model(CLASSES), compiled, (x, y, None), expected)


def _one_hot_of(sparse: np.ndarray) -> np.ndarray:
    return (np.eye(CLASSES)[np.maximum(sparse, 0)] * (sparse != PAD)[..., None]).astype(
        "float32"
    )


def _keras_sparse_loss():
    keras = _keras()
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=PAD
    )


def sparse_metric(cls: str, reference: Callable, copy_argmax=False, **options):
    def build():
        import kmask

        metric = getattr(kmask, cls)(mask_value=PAD, name=CHECKED, **options)
        return metric_task(metric, labels, _keras_sparse_loss(), reference, copy_argmax)

    return build


def categorical_metric() -> Task:
    import kmask

    keras = _keras()
    metric = kmask.MaskedCategoricalAccuracy(mask_value=[0] * CLASSES, name=CHECKED)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    return metric_task(metric, one_hot, loss, np_accuracy, copy_argmax=True)


def wrapper_metric() -> Task:
    import kmask

    metric = kmask.MaskedMeanMetricWrapper(
        "sparse_categorical_crossentropy",
        mask_value=PAD,
        name=CHECKED,
        from_logits=True,
    )
    return metric_task(metric, labels, _keras_sparse_loss(), np_crossentropy_mean)


def perplexity_metric() -> Task:
    import kmask

    metric = kmask.Perplexity(from_logits=True, mask_value=PAD, name=CHECKED)

    def reference(y, outputs, valid):
        return float(np.exp(np_crossentropy_mean(y, outputs, valid)))

    return metric_task(metric, labels, _keras_sparse_loss(), reference)


def mask_layer_task(layer_name: str) -> Task:
    """A Dense model behind the mask layer, trained with kmask's MSE, which
    finds the padding only in the mask the layer propagates: a layer that
    lost it would average over the padded steps and miss the reference."""
    import kmask

    keras = _keras()
    y = regression_targets(pad=0.0)  # the padding is in the mask only
    lengths = LENGTHS.astype("int32")
    if layer_name == "AttachMask":
        x = features()
        inputs = keras.Input((TIME, FEATURES))
        masked = keras.layers.Masking(0.0)(inputs)
        # The Dense sees the unmasked inputs: only AttachMask gives the mask.
        dense = keras.layers.Dense(FEATURES, name="dense")(inputs)
        outputs = kmask.AttachMask()([dense, masked])
        model_inputs: Any = inputs
    elif layer_name == "LengthMask":
        x = [features(pad=1.0), lengths]  # no pad value to find in x
        inputs = keras.Input((TIME, FEATURES))
        length_input = keras.Input((), dtype="int32")
        masked = kmask.LengthMask()([inputs, length_input])
        outputs = keras.layers.Dense(FEATURES, name="dense")(masked)
        model_inputs = [inputs, length_input]
    else:
        x = features(pad=float("nan"))
        inputs = keras.Input((TIME, FEATURES))
        masked = kmask.ValueMask(mask_value=float("nan"))(inputs)
        outputs = keras.layers.Dense(FEATURES, name="dense")(masked)
        model_inputs = inputs
    model = keras.Model(model_inputs, outputs)
    reference = np_step_loss(np_squared)

    def expected(model):
        value = batch_mean(reference, y, predict(model, x), valid_steps())
        return (x, y, None), {"loss": value}

    loss = kmask.MaskedMeanSquaredError()
    return Task(model, {"loss": loss}, (x, y, None), expected)


def head_task(stats: str | None) -> Task:
    """A token model whose last layer is the fused head: tied to the
    embedding for the head itself, with a kernel of its own (and its
    statistics) for the head metrics. The reference takes the hidden states
    the head receives (`predict` of the model up to it) and the head's
    weights, and computes the logits and the loss in NumPy."""
    import kmask

    keras = _keras()
    tokens = _rng(6).integers(0, VOCABULARY, (SAMPLES, TIME)).astype("int32")
    y = labels(VOCABULARY)
    token_input = keras.Input((TIME,), dtype="int32")
    label_input = keras.Input((TIME,), dtype="int32")
    embedding = keras.layers.Embedding(VOCABULARY, HIDDEN, name="embedding")
    hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="dense")(
        embedding(token_input)
    )
    tied = stats is None
    head = kmask.FusedLinearCrossentropy(
        VOCABULARY,
        embedding=embedding if tied else None,
        use_bias=not tied,
        mask_value=PAD,
        chunk_size=8,
        return_stats=not tied,
        name="head",
    )
    model = keras.Model([token_input, label_input], head([hidden, label_input]))
    compiled: dict[str, Any] = {"loss": None}
    if stats is not None:
        compiled["metrics"] = [getattr(kmask, stats)(name=CHECKED)]

    def expected(model):
        to_hidden = keras.Model(model.inputs, model.get_layer("dense").output)
        states = predict(to_hidden, [tokens, y])
        head = model.get_layer("head")
        if tied:
            kernel = _numpy(model.get_layer("embedding").embeddings).T
            bias = None
        else:
            kernel, bias = _numpy(head.kernel), _numpy(head.bias)
        y_eval = y
        if stats == "HeadAccuracy":
            logits = states @ kernel + bias
            y_eval = copy_argmax_to_half_the_rows(y, logits, valid_steps())

        def reference(states, labels):
            valid = labels != PAD
            return np_linear(states, kernel, bias, labels, valid, None, "token_mean")

        inputs = ([tokens, y_eval], None, None)
        if stats is None:
            loss = batch_mean(lambda s, t: reference(s, t)["value"], states, y_eval)
            return inputs, {"loss": loss}
        whole = reference(states, y_eval)
        valid = y_eval != PAD
        if stats == "HeadAccuracy":
            return inputs, {CHECKED: whole["accuracy"]}
        return inputs, {CHECKED: float(np.exp(np_token_mean(whole["nll"], valid)))}

    return Task(model, compiled, ([tokens, y], None, None), expected)


def _numpy(variable) -> np.ndarray:
    keras = _keras()
    return np.asarray(keras.ops.convert_to_numpy(variable), "float64")


def distiller_task() -> Task:
    """`kmask.MaskedDistiller` with `kmask.MaskedLogitsDistillation`: a
    token teacher and a smaller student, both masking the pad token 0
    (`mask_zero`: the mask Keras propagates onto the student's logits), the
    labels padded with `PAD` (`mask_value`, read from `y`); the whole loss is
    the distillation (`student_loss_weight=0`), checked against the NumPy
    masked KL of the two models' outputs."""
    import kmask

    keras = _keras()
    drawn = _rng(7).integers(1, VOCABULARY, (SAMPLES, TIME))
    # The tokens mark the first half of the padding, the labels the rest.
    short = np.arange(TIME)[None, :] < (LENGTHS + (TIME - LENGTHS) // 2)[:, None]
    tokens = np.where(short, drawn, 0).astype("int32")
    y = labels(VOCABULARY)

    def language_model(width: int, name: str):
        token_input = keras.Input((TIME,), dtype="int32")
        embedding = keras.layers.Embedding(
            VOCABULARY, width, keras.initializers.RandomNormal(stddev=1.0),
            mask_zero=True, name="embedding",
        )  # fmt: skip
        # Logits of order 1, so the KL is not a rounding error of float32.
        dense = keras.layers.Dense(
            VOCABULARY, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="dense",
        )  # fmt: skip
        logits = dense(embedding(token_input))
        return keras.Model(token_input, logits, name=name)

    teacher = language_model(HIDDEN, "teacher")
    distiller = kmask.MaskedDistiller(
        teacher=teacher,
        student=language_model(HIDDEN // 2, "student"),
        distillation_losses=kmask.MaskedLogitsDistillation(
            temperature=2.0, mask_value=PAD
        ),
        student_loss_weight=0.0,
    )

    def expected(model):
        teacher_logits = predict(model.teacher, tokens)
        student_logits = predict(model.student, tokens)

        def per_batch(teacher_logits, student_logits, y):
            value, _ = np_distillation(
                teacher_logits, student_logits, y != PAD, temperature=2.0
            )
            return value

        loss = batch_mean(per_batch, teacher_logits, student_logits, y)
        return (tokens, y, None), {"loss": loss}

    return Task(distiller, {"loss": "mse"}, (tokens, y, None), expected)
