"""`Case`: one check of the parity suite, and the builders that pair a call of
the public API with its NumPy reference (one builder per runner)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tools.parity.losses import Loss
from tools.parity.references import (
    np_distillation,
    np_linear,
    np_masked_loss,
    np_sequence_mask,
    np_sparse_categorical,
    np_step_weight,
)
from tools.parity.sources import (
    ALL_SOURCES,
    BATCH,
    NAN,
    ONE_HOT_PAD,
    STEPS,
    Padded,
    all_real,
    avoid,
    case_rng,
    clean,
    garbage,
    mark,
    random_lengths,
    round_to,
)


@dataclass
class Case:
    """One parity check: what a child process runs and what NumPy expects.

    Args:
        name: Unique, `/`-separated, e.g. `"mse/nan_targets/sum/bfloat16"`.
        runner: Which of `runner.RUNNERS` runs it: `"loss"`, `"metric"`,
            `"layer"`, `"fused"`, `"devices"`.
        spec: JSON-able description of the API call (class names, arguments).
        inputs: The arrays the child turns into tensors. Those named in
            `spec["half"]` hold values already rounded to `dtype`.
        expected: The float64 NumPy reference of each output of the runner.
        dtype: The precision of the inputs; it picks the tolerance.

    Example:

    >>> from tools.parity.suite import build_suite
    >>> cases = build_suite(["layer/length"])
    >>> [case.name for case in cases]
    ['layer/length_post/mse/token_mean',
     'layer/length_pre/scce_logits/sequence_mean',
     'layer/length_post/bce_logits_ls/sum/bfloat16']
    >>> sorted(cases[0].expected)
    ['grad', 'mask', 'output', 'value']
    """

    name: str
    runner: str
    spec: dict[str, Any]
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    dtype: str = "float32"


def loss_case(
    loss: Loss,
    source: str,
    reduction: str,
    dtype: str = "float32",
    compiled: bool = False,
) -> Case:
    """`loss` on a batch padded by `source`, reduced by `reduction`: the
    value and its gradient with respect to `y_pred`."""
    parts = [loss.name, source, reduction]
    parts += [dtype] if dtype != "float32" else []
    parts += ["jit"] if compiled else []
    name = "/".join(parts)
    rng = case_rng(name)
    y_true, y_pred = (round_to(array, dtype) for array in clean(rng, loss))
    padded = ALL_SOURCES[source].pad(rng, loss, y_true, y_pred)
    value, grad = np_masked_loss(
        loss, padded.y_true, padded.y_pred, padded.valid, padded.weight, reduction
    )
    spec = {
        **loss.spec(),
        "api": "call",
        "lengths_padding": None,
        "mask_value": None,
        "masking": None,
        **padded.call,
        "reduction": reduction,
        "compiled": compiled,
        "half": _half_inputs(dtype, padded.y_true),
    }
    inputs = {"y_true": padded.y_true, "y_pred": padded.y_pred, **padded.arrays}
    return Case(name, "loss", spec, inputs, {"value": value, "grad": grad}, dtype)


def _half_inputs(dtype: str, y_true: np.ndarray) -> list[str]:
    """The inputs a half-precision case gives in `dtype`: the predictions,
    and float targets too."""
    if dtype == "float32":
        return []
    return ["y_pred"] + (["y_true"] if y_true.dtype.kind == "f" else [])


def metric_case(
    name: str,
    spec: dict[str, Any],
    loss: Loss,
    per_step: Callable,
    source: str,
    dtype: str = "float32",
    perplexity: bool = False,
) -> Case:
    """A metric updated with two batches of different shapes, each padded by
    `source`: its result after each. `per_step(y_true_rows, y_pred_rows)` is
    the reference of the metric's per-step values; `perplexity` takes the
    exponential of the mean."""
    name = "/".join(["metric", name] + ([dtype] if dtype != "float32" else []))
    rng = case_rng(name)
    inputs, expected = {}, {}
    total = count = 0.0
    for batch, (size, steps) in enumerate([(BATCH, STEPS), (3, 5)]):
        y_true, y_pred = (round_to(a, dtype) for a in clean(rng, loss, size, steps))
        padded = _metric_padding(rng, source, loss, y_true, y_pred)
        inputs[f"y_true_{batch}"] = padded.y_true
        inputs[f"y_pred_{batch}"] = padded.y_pred
        if padded.weight is not None:
            inputs[f"sample_weight_{batch}"] = padded.weight
        weights = np_step_weight(padded.weight, padded.valid.shape)
        used = padded.valid & (weights != 0)
        if used.any():
            rows = per_step(padded.y_true[used], np.asarray(padded.y_pred[used], float))
            total += float((rows * weights[used]).sum())
            count += float(weights[used].sum())
        mean = total / count if count else 0.0
        if perplexity:
            # No real token yet: 0, as Keras's metrics and keras-hub give.
            mean = math.exp(mean) if count else 0.0
        expected[f"result_{batch + 1}"] = np.float64(mean)
    half = [
        key
        for key, array in inputs.items()
        if dtype != "float32" and key.startswith("y_") and array.dtype.kind == "f"
    ]
    spec = {"masking": None, **spec, "half": half}
    return Case(name, "metric", spec, inputs, expected, dtype)


def head_metric_case(metric: str, stat: str, weighted: bool = False) -> Case:
    """`kmask.HeadAccuracy` / `kmask.HeadPerplexity` (`stat`: the column they
    average) over two batches of the layer's per-step statistics
    (`LAYER_STATS`), NaN in every column but the weight at padding; with
    `weighted`, `sample_weight` per row too. Its result after each batch."""
    name = "/".join(["metric", "head", stat] + ["weights"] * weighted)
    rng = case_rng(name)
    inputs, expected = {}, {}
    total = count = 0.0
    for batch, (size, steps) in enumerate([(BATCH, STEPS), (3, 5)]):
        real = rng.random((size, steps)) > 0.3
        columns = {
            "loss": rng.uniform(0.0, 4.0, (size, steps)),
            "nll": rng.uniform(0.0, 4.0, (size, steps)),
            "correct": (rng.random((size, steps)) < 0.4) * 1.0,
        }
        stats = np.stack(
            [
                real * 1.0 if key == "weight" else np.where(real, columns[key], NAN)
                for key in LAYER_STATS
            ],
            -1,
        ).astype("float32")
        weight = real.astype("float64")
        if weighted:
            row = rng.uniform(0.5, 2.0, size).astype("float32")
            inputs[f"sample_weight_{batch}"] = row
            weight = weight * row[:, None]
        inputs[f"y_true_{batch}"] = np.zeros((size, steps), "int32")
        inputs[f"y_pred_{batch}"] = stats
        values = stats[..., LAYER_STATS.index(stat)].astype("float64")
        total += float((np.where(real, values, 0.0) * weight).sum())
        count += float(weight.sum())
        mean = total / count if count else 0.0
        if stat == "nll":
            mean = math.exp(mean) if count else 0.0
        expected[f"result_{batch + 1}"] = np.float64(mean)
    spec = {"masking": None, "metric": metric, "kwargs": {}, "half": []}
    return Case(name, "metric", spec, inputs, expected, "float32")


_METRIC_PADS = {"labels": -100, "one_hot": ONE_HOT_PAD, "regression": NAN}


def _metric_padding(rng, source: str, loss: Loss, y_true, y_pred) -> Padded:
    """Padding for a metric batch of any shape. `"pad"`: the target's pad
    value (-100, the one-hot pad vector, NaN) in the targets; `"weights"`:
    that and per-step weights with zeros; `"propagated"`: zero predictions
    for `Masking`; `"all_padding"`: every target a pad."""
    shape = y_true.shape[:2]
    padded = (
        np.ones(shape, bool) if source == "all_padding" else rng.random(shape) < 0.3
    )
    if source == "propagated":
        y_pred = np.where(padded[..., None], 0.0, y_pred).astype("float32")
        return Padded(y_true, y_pred, ~padded)
    mask_value = _METRIC_PADS[loss.target]
    y_true = mark(avoid(y_true, mask_value), padded, mask_value)
    weight = None
    if source == "weights":
        weight = (rng.uniform(0.5, 2.0, shape) * (rng.random(shape) > 0.2)).astype(
            "float32"
        )
        padded = padded | (weight == 0)
    y_pred = np.where(padded[..., None], NAN, y_pred).astype("float32")
    return Padded(y_true, y_pred, ~padded, weight)


def layer_case(
    label: str,
    layer: str,
    layer_kwargs: dict[str, Any],
    loss: Loss,
    reduction: str,
    dtype: str = "float32",
) -> Case:
    """A kmask layer between the predictions and a loss that has no mask of
    its own: the loss value and gradient, the layer's output and its mask.

    `LengthMask` gets `[y_pred, lengths]`, `AttachMask` `[y_pred,
    Masking(0.0)(carrier)]`, with NaN predictions on padding; `ValueMask`
    gets `y_pred` padded with its `mask_value`."""
    name = "/".join(["layer", label, loss.name, reduction])
    name += f"/{dtype}" if dtype != "float32" else ""
    rng = case_rng(name)
    y_true, y_pred = (round_to(array, dtype) for array in clean(rng, loss))
    lengths = random_lengths(rng)
    real = np_sequence_mask(lengths, STEPS, layer_kwargs.get("padding", "post"))
    y_true, y_pred = garbage(y_true, y_pred, ~real)
    output = y_pred.astype("float64")
    inputs = {"y_true": y_true, "y_pred": y_pred}
    if layer == "LengthMask":
        inputs["lengths"] = lengths
    elif layer == "AttachMask":
        carrier = rng.normal(size=(BATCH, STEPS, 2)) * real[..., None]
        inputs["carrier"] = carrier.astype("float32")
    else:
        pad = np.asarray(layer_kwargs["mask_value"], "float32")
        y_pred = np.where(real[..., None], y_pred, pad).astype("float32")
        inputs["y_pred"] = y_pred
        output = np.where(real[..., None], y_pred, 0.0)
    value, grad = np_masked_loss(loss, y_true, y_pred, real, None, reduction)
    spec = {
        **loss.spec(),
        "layer": layer,
        "layer_kwargs": layer_kwargs,
        "reduction": reduction,
        "half": _half_inputs(dtype, y_true),
    }
    expected = {"value": value, "grad": grad, "output": output, "mask": real * 1.0}
    return Case(name, "layer", spec, inputs, expected, dtype)


# The fused cross-entropy (`kmask.fused`): hidden states `[BATCH, STEPS,
# FUSED_WIDTH]` projected to `FUSED_VOCABULARY` classes, `FUSED_CHUNK` tokens
# at a time, so that the last of the chunks is partial.
FUSED_WIDTH, FUSED_VOCABULARY, FUSED_CHUNK = 6, 9, 5
# The layer's per-step statistics with `return_stats=True`, as documented
# (`kmask.fused.HEAD_STATS`), spelled out here so that a change of order fails.
LAYER_STATS = ("loss", "nll", "correct", "weight")


def fused_case(
    api: str,
    source: str,
    reduction: str = "token_mean",
    dtype: str = "float32",
    compiled: bool = False,
    use_bias: bool = True,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    transpose_kernel: bool = False,
    accuracy: bool = False,
) -> Case:
    """A case of the `"fused"` runner. `api`: `"crossentropy"`
    (`kmask.sparse_crossentropy_with_logits` with an explicit mask: the
    per-step losses and the gradient of their sum against a random
    cotangent), `"function"` (`kmask.fused_linear_crossentropy`: the value
    and the gradients of `hidden`, `kernel` and `bias`) or `"layer"`
    (`kmask.FusedLinearCrossentropy`: the loss it adds, its per-step output
    and the gradient of `hidden`). `source` pads the batch: `pad_negative`
    (labels -100, `mask_value`), `explicit_mask` (lengths as `mask=`),
    `step_weights` / `sequence_weights` (`sample_weight`), `propagated`
    (`Masking(0.0)` on the hidden states), `all_padding`. The function's
    options: `softcap`, `transpose_kernel` (the kernel given as `[vocabulary,
    width]`) and `accuracy` (`return_token_accuracy`, compared too; for the
    layer, `return_stats`: its per-step statistics are compared)."""
    options: dict[str, Any] = {"label_smoothing": label_smoothing, "z_loss": z_loss}
    if softcap is not None:
        options["softcap"] = softcap
    parts = ["fused", api, source, reduction]
    parts += ["smoothing"] * bool(label_smoothing) + ["z_loss"] * bool(z_loss)
    parts += ["softcap"] * (softcap is not None) + ["tied"] * transpose_kernel
    parts += ["accuracy"] * accuracy
    parts += ["no_bias"] * (not use_bias)
    parts += [dtype] if dtype != "float32" else []
    parts += ["jit"] if compiled else []
    name = "/".join(parts)
    rng = case_rng(name)
    hidden = round_to(rng.normal(size=(BATCH, STEPS, FUSED_WIDTH)), dtype)
    kernel = round_to(rng.normal(size=(FUSED_WIDTH, FUSED_VOCABULARY)) / 2, dtype)
    bias = round_to(rng.normal(size=FUSED_VOCABULARY) / 2, dtype)
    labels = rng.integers(0, FUSED_VOCABULARY, (BATCH, STEPS)).astype("int32")
    real = np_sequence_mask(random_lengths(rng), STEPS, "post")
    call: dict[str, Any] = {"mask_value": None}
    arrays: dict[str, np.ndarray] = {}
    valid, weight = real, None
    if source == "pad_negative":
        labels = np.where(real, labels, -100).astype("int32")
        call["mask_value"] = -100
    elif source == "explicit_mask":
        arrays["mask"] = real
    elif source == "step_weights":
        weight = (rng.uniform(0.5, 2.0, (BATCH, STEPS)) * real).astype("float32")
        valid = all_real()
    elif source == "sequence_weights":
        weight = rng.uniform(0.5, 2.0, BATCH).astype("float32")
        weight[rng.integers(BATCH)] = 0.0
        arrays["mask"] = real
    elif source == "all_padding":
        valid = ~all_real()
        labels = np.full_like(labels, -100)
        call["mask_value"] = -100
    if weight is not None:
        arrays["sample_weight"] = weight
    used = valid & (np_step_weight(weight, valid.shape) != 0)
    if call["mask_value"] is None:
        labels = np.where(used, labels, -1).astype("int32")
    pad = 0.0 if source == "propagated" else NAN
    hidden = np.where(used[..., None], hidden, pad).astype("float32")
    inputs = {"labels": labels, **arrays}
    if api == "crossentropy":
        logits = round_to(np.where(used[..., None], hidden @ kernel, NAN), dtype)
        cotangent = rng.normal(size=(BATCH, STEPS))
        per_step, step_grad = np.zeros(used.shape), np.zeros(logits.shape)
        if used.any():
            per_step[used], step_grad[used] = np_sparse_categorical(
                labels[used], logits[used], from_logits=True, **options
            )
        inputs.update(logits=logits.astype("float32"), mask=used)
        inputs["cotangent"] = cotangent.astype("float32")
        expected = {
            "output": per_step,
            "grad_logits": np.where(
                used[..., None], cotangent[..., None] * step_grad, 0.0
            ),
        }
        half = ["logits"]
    else:
        stored = kernel.T if transpose_kernel else kernel
        inputs.update(hidden=hidden, kernel=stored.astype("float32"))
        if use_bias:
            inputs["bias"] = bias.astype("float32")
        reference = np_linear(
            hidden,
            kernel,
            bias if use_bias else None,
            labels,
            valid,
            weight,
            reduction,
            **options,
        )
        names = ["value", "grad_hidden"]
        if api == "layer":
            names.append("per_step")
        else:
            names += ["grad_kernel"] + ["grad_bias"] * use_bias
        names += ["accuracy"] * (accuracy and api == "function")
        expected = {key: reference[key] for key in names}
        if accuracy and api == "layer":
            columns = {**reference, "loss": reference["per_step"], "weight": used}
            expected["stats"] = np.stack(
                [np.asarray(columns[stat], "float64") for stat in LAYER_STATS], -1
            )
        if transpose_kernel:
            expected["grad_kernel"] = expected["grad_kernel"].T
        half = ["hidden", "kernel", "bias"] if use_bias else ["hidden", "kernel"]
    spec = {
        "api": api,
        **call,
        "masking": 0.0 if source == "propagated" else None,
        "reduction": reduction,
        "chunk_size": FUSED_CHUNK,
        "options": options,
        "transpose_kernel": transpose_kernel,
        "accuracy": accuracy,
        "compiled": compiled,
        "half": half if dtype != "float32" else [],
    }
    return Case(name, "fused", spec, inputs, expected, dtype)


DISTILLATION_CLASSES = 7


def distillation_case(
    source: str,
    reduction: str = "token_mean",
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 2.0,
    compiled: bool = False,
    fused: bool = False,
) -> Case:
    """`kmask.masked_distillation` on teacher and student logits padded by
    `source` (NaN in both at padded steps): `explicit_mask` (`mask=`),
    `pad_negative` (labels -100, `mask_value`), `step_weights`
    (`sample_weight`), `propagated` (`kmask.LengthMask` on the student's
    logits) or `all_padding`; the value and its gradient with respect to
    the student's logits. With `fused`, `kmask.fused_linear_distillation`
    of two linear heads (widths 4 and 6, chunks of 3 tokens) and the
    gradient with respect to the student's hidden states."""
    parts = ["fused_distillation" if fused else "distillation", divergence]
    parts += [source, reduction, f"T{temperature:g}"]
    parts += [f"beta{beta:g}"] * (divergence == "jsd")
    parts += ["jit"] if compiled else []
    name = "/".join(parts)
    rng = case_rng(name)
    shape = (BATCH, STEPS, DISTILLATION_CLASSES)
    teacher, student = rng.normal(scale=2.0, size=shape), rng.normal(size=shape)
    lengths = random_lengths(rng)
    real = np_sequence_mask(lengths, STEPS, "post")
    if source == "all_padding":
        real = ~all_real()
    inputs: dict[str, np.ndarray] = {"lengths": lengths}
    valid, weight = real, None
    if source == "explicit_mask" or source == "all_padding":
        inputs["mask"] = real
    elif source == "pad_negative":
        inputs["labels"] = np.where(real, 1, -100).astype("int32")
    elif source == "step_weights":
        weight = (rng.uniform(0.5, 2.0, (BATCH, STEPS)) * real).astype("float32")
        inputs["sample_weight"] = weight
        valid = all_real()
    options = {"divergence": divergence, "beta": beta, "temperature": temperature}
    if fused:
        student_hidden = rng.normal(size=(BATCH, STEPS, 4))
        teacher_hidden = rng.normal(size=(BATCH, STEPS, 6))
        student_kernel = rng.normal(size=(4, DISTILLATION_CLASSES)).astype("float32")
        teacher_kernel = rng.normal(size=(6, DISTILLATION_CLASSES)).astype("float32")
        teacher = teacher_hidden.astype("float32").astype("float64") @ teacher_kernel
        student = student_hidden.astype("float32").astype("float64") @ student_kernel
        inputs.update(
            student_kernel=student_kernel,
            teacher_kernel=teacher_kernel,
            teacher_hidden=np.where(real[..., None], teacher_hidden, NAN),
        )
        inputs["student"] = np.where(real[..., None], student_hidden, NAN)
        inputs = {key: _float32(array) for key, array in inputs.items()}
    value, grad = np_distillation(teacher, student, valid, weight, reduction, **options)
    if fused:
        grad = grad @ student_kernel.T.astype("float64")
    else:
        teacher = np.where(real[..., None], teacher, NAN).astype("float32")
        student = np.where(real[..., None], student, NAN).astype("float32")
        inputs.update(teacher=teacher, student=student)
    spec = {
        "fused": fused,
        "source": source,
        "reduction": reduction,
        **options,
        "compiled": compiled,
        "half": [],
    }
    return Case(name, "distillation", spec, inputs, {"value": value, "grad": grad})


def _float32(array: np.ndarray) -> np.ndarray:
    """Float arrays in float32; integer and boolean ones as they are."""
    return array.astype("float32") if array.dtype.kind == "f" else array
