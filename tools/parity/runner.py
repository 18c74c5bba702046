"""The child of the parity harness: one backend runs every case.

`python -m tools.parity --child DIR` (started by the parent, `KERAS_BACKEND`
set) reads the cases and their inputs from `DIR`, calls the public API as a
user does, one runner per way of calling it (`RUNNERS`), and writes each
output, its dtype and any error back to `DIR`. The few backend-specific
lines (the device's name) live here; autodiff is `tools.backends`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

import kmask
from kmask.fused import HEAD_STATS
from tools.backends import value_and_grad
from tools.parity.devices import data as device_data
from tools.parity.devices import rows as device_rows

# The line a child prints after each case, for the parent's progress bar.
PROGRESS = "kmask-parity-progress"


def run_cases(workdir: Path) -> None:
    """Runs every case of `workdir` on this process's backend."""
    import keras

    backend = keras.backend.backend()
    cases = json.loads((workdir / "cases.json").read_text())
    arrays = np.load(workdir / "inputs.npz")
    outputs, dtypes, errors, seconds = {}, {}, {}, {}
    for index, case in enumerate(cases):
        started = time.perf_counter()
        inputs = {name: arrays[f"{index}__{name}"] for name in case["inputs"]}
        try:
            results = RUNNERS[case["runner"]](case["spec"], _tensors(inputs, case))
        except Exception as error:  # a case that raises fails, the others run
            errors[case["name"]] = f"{type(error).__name__}: {error}"
        else:
            for output, (array, dtype) in results.items():
                outputs[f"{index}__{output}"] = array
                dtypes.setdefault(case["name"], {})[output] = dtype
        seconds[case["name"]] = time.perf_counter() - started
        print(PROGRESS, index + 1, len(cases), flush=True)
    np.savez(workdir / f"{backend}.npz", **outputs)
    meta = {
        "backend": backend,
        "version": sys.modules[backend].__version__,
        "keras": keras.__version__,
        "device": _device(),
        "errors": errors,
        "dtypes": dtypes,
        "seconds": seconds,
    }
    (workdir / f"{backend}.json").write_text(json.dumps(meta))


def _tensors(inputs: dict[str, np.ndarray], case: dict) -> dict[str, Any]:
    from keras import ops

    tensors = {}
    for name, array in inputs.items():
        tensor = ops.convert_to_tensor(array)
        if name in case["spec"]["half"]:
            tensor = ops.cast(tensor, case["dtype"])
        tensors[name] = tensor
    return tensors


def _build_loss(spec: dict[str, Any], **options: Any):
    if spec["cls"] == "MaskedLoss":
        return kmask.MaskedLoss(spec["keras_loss"], **spec["kwargs"], **options)
    return getattr(kmask, spec["cls"])(**spec["kwargs"], **options)


def _masking(spec: dict[str, Any], dtype: Any) -> Callable:
    import keras

    if spec.get("masking") is None:
        return lambda tensor: tensor
    return keras.layers.Masking(
        spec["masking"], dtype=keras.backend.standardize_dtype(dtype)
    )


def _run_loss(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """A kmask loss called as Keras calls it, or `kmask.masked_loss`; the
    padding reaches it as `spec` says: `lengths_padding` builds
    `kmask.sequence_mask(lengths)`, given as `sample_weight` (times the
    weights, when there are some) or as `mask=`; `mask_value` goes to the
    loss; `masking` puts `keras.layers.Masking` on `y_pred`."""
    from keras import ops

    y_true, y_pred = inputs["y_true"], inputs["y_pred"]
    weights = inputs.get("sample_weight")
    mask = None
    if spec["lengths_padding"] is not None:
        steps = y_pred.shape[1]
        mask = kmask.sequence_mask(
            inputs["lengths"], steps, padding=spec["lengths_padding"]
        )
    masking = _masking(spec, y_pred.dtype)
    if spec["api"] == "function":

        def loss_value(predictions):
            return kmask.masked_loss(
                y_true,
                masking(predictions),
                spec["keras_loss"],
                mask=mask,
                mask_value=spec["mask_value"],
                sample_weight=weights,
                reduction=spec["reduction"],
                **spec["kwargs"],
            )

    else:
        loss = _build_loss(
            spec, mask_value=spec["mask_value"], reduction=spec["reduction"]
        )
        sample_weight = weights if mask is None else mask
        if mask is not None and weights is not None:
            if len(weights.shape) == 1:
                weights = ops.expand_dims(weights, -1)
            sample_weight = weights * ops.cast(mask, weights.dtype)

        def loss_value(predictions):
            return loss(y_true, masking(predictions), sample_weight)

    def objective(predictions):
        value = loss_value(predictions)
        return ops.sum(value), {"value": value}

    return _value_and_grad(objective, y_pred, spec["compiled"])


def _run_metric(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """`update_state` with two batches, `result()` after each."""
    from kmask import metrics

    kwargs = dict(spec["kwargs"])
    if "fn_loss" in spec:
        kwargs["fn"] = _build_loss(spec["fn_loss"])
    metric = getattr(metrics, spec["metric"])(**kwargs)
    results = {}
    for batch in (0, 1):
        y_pred = inputs[f"y_pred_{batch}"]
        metric.update_state(
            inputs[f"y_true_{batch}"],
            _masking(spec, y_pred.dtype)(y_pred),
            sample_weight=inputs.get(f"sample_weight_{batch}"),
        )
        results[f"result_{batch + 1}"] = _to_numpy(metric.result())
    return results


def _run_layer(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """The layer between `y_pred` and a loss: the loss's value and gradient,
    the layer's output and its mask."""
    import keras
    from keras import ops

    from kmask import layers

    layer = getattr(layers, spec["layer"])(**spec["layer_kwargs"])
    loss = _build_loss(spec, reduction=spec["reduction"])
    carrier = inputs.get("carrier")
    masked = None if carrier is None else keras.layers.Masking(0.0)(carrier)

    def objective(predictions):
        if spec["layer"] == "LengthMask":
            output = layer([predictions, inputs["lengths"]])
        elif spec["layer"] == "AttachMask":
            output = layer([predictions, masked])
        else:
            output = layer(predictions)
        mask = kmask.keras_mask(output)
        value = loss(inputs["y_true"], output)
        return ops.sum(value), {"value": value, "output": output, "mask": mask}

    return _value_and_grad(objective, inputs["y_pred"], compiled=False)


def _run_fused(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """The fused cross-entropy, the chunked linear one or its layer; see
    `fused_case`."""
    from keras import ops

    options = spec["options"]
    if spec["api"] == "crossentropy":

        def crossentropy(xs):
            per_step = kmask.sparse_crossentropy_with_logits(
                inputs["labels"], xs["logits"], inputs["mask"], **options
            )
            return ops.sum(per_step * inputs["cotangent"]), {"output": per_step}

        return _value_and_grads(
            crossentropy, {"logits": inputs["logits"]}, spec["compiled"]
        )
    if spec["api"] == "layer":
        layer = kmask.FusedLinearCrossentropy(
            inputs["kernel"].shape[1],
            mask_value=spec["mask_value"],
            reduction=spec["reduction"],
            chunk_size=spec["chunk_size"],
            return_stats=spec.get("accuracy", False),
            **options,
        )
        layer.build([tuple(inputs["hidden"].shape), tuple(inputs["labels"].shape)])
        layer.set_weights([ops.convert_to_numpy(inputs[k]) for k in ("kernel", "bias")])
        masking = _masking(spec, inputs["hidden"].dtype)

        def through_layer(xs):
            output = layer([masking(xs["hidden"]), inputs["labels"]])
            value = layer.losses[-1]
            if not layer.return_stats:
                return value, {"value": value, "per_step": output}
            per_step = output[..., HEAD_STATS.index("loss")]
            return value, {"value": value, "per_step": per_step, "stats": output}

        return _value_and_grads(
            through_layer, {"hidden": inputs["hidden"]}, spec["compiled"]
        )

    def linear(xs):
        value = kmask.fused_linear_crossentropy(
            xs["hidden"],
            xs["kernel"],
            inputs["labels"],
            xs.get("bias"),
            mask_value=spec["mask_value"],
            mask=inputs.get("mask"),
            sample_weight=inputs.get("sample_weight"),
            reduction=spec["reduction"],
            chunk_size=spec["chunk_size"],
            transpose_kernel=spec.get("transpose_kernel", False),
            return_token_accuracy=spec.get("accuracy", False),
            **options,
        )
        outputs = {}
        if spec.get("accuracy"):
            value, outputs["accuracy"] = value
        return ops.sum(value), {"value": value, **outputs}

    params = {key: inputs[key] for key in ("hidden", "kernel", "bias") if key in inputs}
    return _value_and_grads(linear, params, spec["compiled"])


def _run_distillation(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """`kmask.masked_distillation` (or `kmask.fused_linear_distillation`)
    with the padding `spec["source"]` names; see `cases.distillation_case`."""
    options = {
        key: spec[key] for key in ("reduction", "divergence", "beta", "temperature")
    }
    padding: dict[str, Any] = {
        key: inputs[key] for key in ("mask", "sample_weight") if key in inputs
    }
    if "labels" in inputs:
        padding.update(labels=inputs["labels"], mask_value=-100)

    def objective(student):
        from keras import ops

        if spec["source"] == "propagated":
            student = kmask.LengthMask()([student, inputs["lengths"]])
        if spec["fused"]:
            value = kmask.fused_linear_distillation(
                student, inputs["student_kernel"],
                inputs["teacher_hidden"], inputs["teacher_kernel"],
                chunk_size=3, **padding, **options,
            )  # fmt: skip
        else:
            value = kmask.masked_distillation(
                inputs["teacher"], student, **padding, **options
            )
        return ops.sum(value), {"value": value}

    return _value_and_grad(objective, inputs["student"], spec["compiled"])


def _run_ctc(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """`kmask.masked_ctc` with the frame mask from the lengths, or
    `kmask.MaskedCTC` behind `kmask.LengthMask`: the value and its gradient."""
    from keras import ops

    lengths = inputs["lengths"]
    options = {
        "blank_index": spec["blank_index"],
        "mask_value": spec["mask_value"],
        "reduction": spec["reduction"],
        "zero_infinity": spec["zero_infinity"],
    }
    weights = inputs.get("sample_weight")

    def objective(logits):
        if spec["api"] == "class":
            masked = kmask.LengthMask()([logits, lengths])
            value = kmask.MaskedCTC(**options)(inputs["y_true"], masked, weights)
        else:
            mask = kmask.sequence_mask(lengths, logits.shape[1])
            value = kmask.masked_ctc(
                inputs["y_true"], logits, mask, sample_weight=weights, **options
            )
        return ops.sum(value), {"value": value}

    return _value_and_grad(objective, inputs["y_pred"], spec["compiled"])


def _run_packed(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """Next-token labels from `kmask.shift_labels`, each packed sequence
    counted once by `segment_ids=` or by `kmask.segment_weights`; see
    `sequences.packed_case`."""
    from keras import ops

    ids = inputs["ids"]
    labels = kmask.shift_labels(inputs["tokens"], ids)
    loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, mask_value=-100)
    labelled = ops.where(ops.not_equal(labels, -100), ids, ops.zeros_like(ids))
    weights = kmask.segment_weights(labelled)

    def objective(logits):
        if spec["api"] == "segment_ids":
            value = kmask.masked_loss(
                labels, logits, loss, reduction="sequence_mean", segment_ids=ids
            )
        else:
            value = loss(labels, logits, sample_weight=weights)
        return value, {"value": value}

    results = _value_and_grad(objective, inputs["y_pred"], spec["compiled"])
    results["labels"] = _to_numpy(labels)
    if spec["api"] == "segment_weights":
        results["weights"] = _to_numpy(weights)
    return results


@cache
def _device_rows() -> dict[tuple[str, str], dict[str, Any]] | Exception:
    """Every device setup of this backend, run once in a process of its own
    (or the error it failed with, reported by each device case)."""
    import keras

    try:
        rows = device_rows.run_backend(
            keras.backend.backend(), device_data.COMMON_SETUPS, builtin=False
        )
    except RuntimeError as error:
        return error
    return {(row["setup"], row["mask source"]): row for row in rows}


def _run_devices(spec: dict[str, Any], inputs: dict[str, Any]) -> dict:
    """The weights and first logged loss of one device setup; see `_devices`."""
    del inputs
    rows = _device_rows()
    if isinstance(rows, Exception):
        raise rows
    row = rows[spec["setup"], spec["source"]]
    return {
        "weights": (np.asarray(row["weights"], "float64"), "float32"),
        "loss": (np.asarray(row["logged loss"], "float64"), "float32"),
        "replicas": (np.asarray(row["replicas"], "float64"), "float64"),
    }


RUNNERS: dict[str, Callable[[dict, dict], dict]] = {
    "loss": _run_loss,
    "metric": _run_metric,
    "layer": _run_layer,
    "fused": _run_fused,
    "distillation": _run_distillation,
    "ctc": _run_ctc,
    "packed": _run_packed,
    "devices": _run_devices,
}


def _value_and_grad(objective: Callable, x: Any, compiled: bool) -> dict:
    """Runs `objective(x) -> (scalar, outputs)` and differentiates the
    scalar with respect to `x`: the outputs and `"grad"`."""
    results = _value_and_grads(lambda xs: objective(xs["x"]), {"x": x}, compiled)
    results["grad"] = results.pop("grad_x")
    return results


def _value_and_grads(objective: Callable, xs: dict[str, Any], compiled: bool) -> dict:
    """Runs `objective(xs) -> (scalar, outputs)` and differentiates the
    scalar with the backend's autodiff with respect to each tensor of `xs`
    (`"grad_<name>"`); `compiled` traces it first (torch stays eager)."""
    names = list(xs)

    def positional(*tensors):
        return objective(dict(zip(names, tensors, strict=True)))

    step = value_and_grad(
        positional, argnums=range(len(names)), has_aux=True, jit=compiled
    )
    (_, outputs), grads = step(*xs.values())
    results = {name: _to_numpy(tensor) for name, tensor in outputs.items()}
    results.update(
        {
            f"grad_{name}": _to_numpy(grad)
            for name, grad in zip(names, grads, strict=True)
        }
    )
    return results


def _to_numpy(tensor) -> tuple[np.ndarray, str]:
    """float64 values (exact from any float or bool) and the tensor's dtype."""
    import keras
    from keras import ops

    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if dtype != "float64":
        tensor = ops.cast(tensor, "float32")
    return np.asarray(ops.convert_to_numpy(tensor), "float64"), dtype


def _device() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.device_kind == device.platform:
            return device.platform
        return f"{device.platform} ({device.device_kind})"
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"
