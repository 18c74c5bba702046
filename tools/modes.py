"""The training-mode matrix: one registry of kmask's public losses, metrics,
mask layers and head, each trained in every mode Keras offers on a backend.

A cell is an object of `REGISTRY` in one of `MODES`. It builds a tiny model
around the object (batch 4, time 5, at most 16 classes, hidden 8), fits it
for 2 steps, checks that the weights are finite, and checks `evaluate`
against an independent NumPy reference computed in float64 from the model's
own outputs (`predict`), never from kmask. `resume` also checks the weights
after a `.keras` save, reload and one more epoch against a run that never
stopped; `model_parallel` (JAX, 8 CPU devices) the weights against the same
run on one device. The NumPy references are `tools.parity.references` and
`tools.parity.sequences` (no kmask, no Keras) plus the reductions below.

A new public class joins the matrix by joining `REGISTRY` (or `EXCLUDED`,
with a reason): tests/test_modes.py fails for a public loss, metric or layer
of `kmask.__all__` in neither.

    python -m tools.modes_table --backend jax     # the Markdown table
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tools.parity.references import (
    np_absolute,
    np_binary,
    np_categorical,
    np_huber,
    np_linear,
    np_log_softmax,
    np_sparse_categorical,
    np_squared,
)
from tools.parity.sequences import np_ctc_reduced

MODES = (
    "eager",
    "jit_compile",
    "steps_per_execution",
    "mixed_float16",
    "mixed_bfloat16",
    "resume",
    "model_parallel",
)
# Keras's own limits, not kmask's: these cells are reported, never run.
UNSUPPORTED = {
    ("torch", "steps_per_execution"): (
        "Keras's torch trainer raises `steps_per_execution` must be 1 with "
        "the PyTorch backend"
    ),
    ("tensorflow", "model_parallel"): (
        "keras.distribution (ModelParallel) is implemented for JAX only"
    ),
    ("torch", "model_parallel"): (
        "keras.distribution (ModelParallel) is implemented for JAX only"
    ),
}
COMPILE_OPTIONS = {
    "eager": {"run_eagerly": True},
    "jit_compile": {"jit_compile": True},
    "steps_per_execution": {"steps_per_execution": 2},
}
POLICIES = {"mixed_float16": "mixed_float16", "mixed_bfloat16": "mixed_bfloat16"}
# float32 cells: the model's outputs are float32 and the reference float64.
# Half cells: the reference starts from the model's own half outputs (cast
# to float64), but kmask and Keras reduce them in float32 while an
# intermediate such as a softmax or the head's logits stays in float16 or
# bfloat16 (8 bits of mantissa): a relative 1e-2 covers that rounding.
TOLERANCE = {"float32": 1e-4, "half": 1e-2}
WEIGHT_TOLERANCE = 1e-5  # resume and model_parallel: the same steps, same order

SAMPLES, BATCH, TIME, FEATURES = 8, 4, 5, 4
CLASSES, VOCABULARY, HIDDEN = 8, 16, 8
CTC_CLASSES, CTC_LABELS = 4, 2
PAD = -1
LENGTHS = np.array([5, 3, 2, 4, 2, 5, 4, 3])
SEED = 0
MESH = (2, 4)  # (data, model) over 8 CPU devices
CHECKED = "checked"  # the name every metric of the matrix is compiled with


def unsupported(backend: str, mode: str) -> str | None:
    """Why Keras does not run `mode` on `backend`, or `None`."""
    return UNSUPPORTED.get((backend, mode))


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


def np_token_mean(per_step: np.ndarray, valid: np.ndarray) -> float:
    return float(per_step[valid].sum() / valid.sum())


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
    ce = -np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
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


@dataclass(frozen=True)
class Entry:
    """One public object of kmask and how to build its model."""

    name: str
    build: Callable[[], Task]


REGISTRY = (
    Entry("MaskedLoss", regression_loss("MaskedLoss", np_squared, "mse")),
    Entry(
        "MaskedSparseCategoricalCrossentropy",
        sparse_loss("MaskedSparseCategoricalCrossentropy"),
    ),
    Entry("MaskedCategoricalCrossentropy", categorical_loss),
    Entry("MaskedBinaryCrossentropy", binary_loss),
    *(
        Entry(name, regression_loss(name, reference))
        for name, reference in (
            ("MaskedMeanSquaredError", np_squared),
            ("MaskedMeanAbsoluteError", np_absolute),
            ("MaskedHuber", np_huber),
        )
    ),
    Entry("MaskedCTC", ctc_loss),
    Entry("SequenceLoss", sequence_loss),
    Entry(
        "MaskedSparseCategoricalAccuracy",
        sparse_metric("MaskedSparseCategoricalAccuracy", np_accuracy, copy_argmax=True),
    ),
    Entry("MaskedCategoricalAccuracy", categorical_metric),
    Entry(
        "MaskedSequenceAccuracy",
        sparse_metric("MaskedSequenceAccuracy", np_sequence_accuracy, copy_argmax=True),
    ),
    Entry("MaskedMeanMetricWrapper", wrapper_metric),
    Entry("Perplexity", perplexity_metric),
    Entry("HeadAccuracy", lambda: head_task("HeadAccuracy")),
    Entry("HeadPerplexity", lambda: head_task("HeadPerplexity")),
    Entry("AttachMask", lambda: mask_layer_task("AttachMask")),
    Entry("LengthMask", lambda: mask_layer_task("LengthMask")),
    Entry("ValueMask", lambda: mask_layer_task("ValueMask")),
    Entry("FusedLinearCrossentropy", lambda: head_task(None)),
)
# Public Keras objects of kmask.__all__ that the matrix leaves out, and why.
EXCLUDED: dict[str, str] = {}


# ---------------------------------------------------------------- cells


@contextlib.contextmanager
def dtype_policy(name: str | None):
    """The global dtype policy `name` inside, the previous one restored
    after, also when the cell fails."""
    keras = _keras()
    previous = keras.config.dtype_policy()
    if name is not None:
        keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _compiled(entry: Entry, mode: str):
    """A fresh task of `entry`, its model compiled for `mode`."""
    keras = _keras()
    keras.utils.set_random_seed(SEED)
    task = entry.build()
    task.model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        **task.compile,
        **COMPILE_OPTIONS.get(mode, {}),
    )
    return task


def _fit(task: Task, epochs: int = 1) -> None:
    x, y, weights = task.data
    task.model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    )


def _weights(model) -> list[np.ndarray]:
    return [np.asarray(w, "float64") for w in model.get_weights()]


def check_finite(model) -> None:
    for variable, value in zip(model.weights, _weights(model), strict=True):
        assert np.isfinite(value).all(), f"{variable.path} is not finite: {value}"


def check_evaluate(task: Task, half: bool) -> dict[str, float]:
    """`evaluate` against the NumPy reference: the logged values."""
    (x, y, weights), expected = task.expected(task.model)
    logged = task.model.evaluate(
        x, y, sample_weight=weights, batch_size=BATCH, verbose=0, return_dict=True
    )
    rtol = TOLERANCE["half" if half else "float32"]
    for name, value in expected.items():
        found = float(logged[name])
        assert abs(found - value) <= rtol * max(abs(value), 1e-6), (
            f"evaluate logged {name}={found!r}, NumPy expects {value!r} (rtol {rtol})"
        )
    return {name: float(logged[name]) for name in expected}


def check_same_weights(found, expected, what: str) -> float:
    gap = max(
        float(np.max(np.abs(a - b), initial=0.0))
        for a, b in zip(found, expected, strict=True)
    )
    assert gap <= WEIGHT_TOLERANCE, f"{what}: the weights differ by {gap}"
    return gap


def run_cell(entry: Entry, mode: str, folder: str) -> dict[str, Any]:
    """Runs one cell in this process; raises `AssertionError` where a check
    fails. Returns what it measured. `model_parallel` needs JAX with 8 CPU
    devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`)."""
    keras = _keras()
    reason = unsupported(keras.backend.backend(), mode)
    if reason:
        raise ValueError(f"{entry.name}-{mode} is not supported by Keras: {reason}")
    with dtype_policy(POLICIES.get(mode)):
        if mode == "resume":
            return _resume(entry, folder)
        if mode == "model_parallel":
            return _model_parallel(entry)
        task = _compiled(entry, mode)
        _fit(task)
        check_finite(task.model)
        return {"logged": check_evaluate(task, half=mode in POLICIES)}


def _resume(entry: Entry, folder: str) -> dict[str, Any]:
    """Fits 1 epoch, saves, then fits 1 more epoch twice: in the model that
    never stopped, and in the one loaded from the file (Adam's moments and
    step must come from it). Both must end with the same weights."""
    keras = _keras()
    task = _compiled(entry, "resume")
    _fit(task)
    path = os.path.join(folder, f"{entry.name}.keras")
    task.model.save(path)
    _fit(task)
    reloaded = keras.saving.load_model(path)
    resumed = Task(reloaded, task.compile, task.data, task.expected)
    _fit(resumed)
    check_finite(reloaded)
    gap = check_same_weights(
        _weights(reloaded), _weights(task.model), "resumed against uninterrupted"
    )
    return {"logged": check_evaluate(resumed, half=False), "weight gap": gap}


def model_parallel_scope():
    """`ModelParallel` on a (data 2, model 4) mesh: the vocabulary (or class)
    axis of every Dense kernel, of the embedding and of the head's kernel on
    the model axis, the batch on the data axis."""
    keras = _keras()
    devices = keras.distribution.list_devices("cpu")
    if len(devices) < MESH[0] * MESH[1]:
        raise RuntimeError(
            f"JAX sees {len(devices)} CPU devices: set XLA_FLAGS="
            "--xla_force_host_platform_device_count=8 before importing it"
        )
    mesh = keras.distribution.DeviceMesh(MESH, ("data", "model"), devices[:8])
    layout = keras.distribution.LayoutMap(mesh)
    layout["dense/kernel"] = (None, "model")
    layout["embedding/embeddings"] = ("model", None)
    layout["head/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="data")


def _model_parallel(entry: Entry) -> dict[str, Any]:
    """The same fit on one device and sharded; the weights must agree and
    the sharded `evaluate` must match NumPy."""
    one_device = _compiled(entry, "model_parallel")
    initial = one_device.model.get_weights()
    _fit(one_device)
    distribution = model_parallel_scope()
    with distribution.scope():
        sharded = _compiled(entry, "model_parallel")
        sharded.model.set_weights(initial)
        _fit(sharded)
        check_finite(sharded.model)
        logged = check_evaluate(sharded, half=False)
        specs = {
            variable.path: str(variable.value.sharding.spec)
            for variable in sharded.model.weights
        }
    gap = check_same_weights(
        _weights(sharded.model),
        _weights(one_device.model),
        "sharded against one device",
    )
    return {"logged": logged, "weight gap": gap, "sharding": specs}
