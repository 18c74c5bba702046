"""Speed of kmask's masked losses, forward + backward, against Keras's built-in
losses and each backend's own masked loss.

    python benchmarks/masked_ce.py                       # every installed backend
    python benchmarks/masked_ce.py --quick               # small shapes: a smoke test
    python benchmarks/masked_ce.py --backends torch --json bench_masked_ce.json
    python -m nox -s bench                               # installs, runs both

Each backend runs in a child process of its own, one after another. In a child,
every case times three variants of the same masked loss and its gradient with
respect to the predictions, compiled the same way: `jax.jit(jax.value_and_grad)`
on JAX, `tf.function(jit_compile=True)` around a `GradientTape` on TensorFlow,
eager on PyTorch (`torch.autograd.grad`):

- `kmask`: `MaskedSparseCategoricalCrossentropy(mask_value=0, from_logits=True)`
  (one-hot: `MaskedCategoricalCrossentropy(from_logits=True)`, regression:
  `MaskedMeanSquaredError()`, both with the mask as `sample_weight`);
- `keras`: `SparseCategoricalCrossentropy(ignore_class=0, from_logits=True)`
  (one-hot and regression: the Keras loss with the mask as `sample_weight`);
- `native`: the backend's own, masked and divided by the token count:
  torch `F.cross_entropy(ignore_index=0)`, optax
  `softmax_cross_entropy_with_integer_labels(where=mask)`, TensorFlow
  `tf.nn.sparse_softmax_cross_entropy_with_logits` (one-hot: the
  probability-target forms; regression: `mean((x - y) ** 2, -1)`).

`floor` is the least a fused forward + backward must do: one elementwise
pass that reads the predictions and writes a new array of their size,
`keras.ops.exp(predictions)`, compiled as the steps are (eager on PyTorch),
timed in the same rounds; `kmask/floor` is kmask's time over it.

The compiled columns compare `kmask` with `native`, both compiled: on
PyTorch two more variants, `kmask compiled` and `native compiled`, the same
losses under `torch.compile(dynamic=False)` (autograd through the compiled
loss, as a compiled train step differentiates it), timed in the same
interleaved rounds; on JAX and TensorFlow the steps above are compiled
already (`jax.jit`, `jit_compile=True`), so those columns are theirs.

Sequence lengths are uniform in `[T/4, T]`; labels are 1..V-1 on real steps
and 0 on padding. The variants run in interleaved rounds (the order rotating),
and the table reports the median of the rounds after the warm-up and the
ratios of the medians. On JAX it also reports the compiled temporary memory
(`memory_analysis().temp_size_in_bytes`). Only one variant's outputs are alive
at a time. The JSON holds every time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    backend_info,
    installed_backends,
    interleaved_medians,
    machine,
    markdown_table,
    run_child,
    value_and_grad,
    write_json,
)

VARIANTS = ("kmask", "keras", "native")
# PyTorch only: the two variants again under `torch.compile`.
COMPILED = {"kmask compiled": "kmask", "native compiled": "native"}
# name: (loss, [batch, time, classes or features])
FULL_CASES = {
    "sparse_ce/16x256x4096": ("sparse", (16, 256, 4096)),
    "sparse_ce/8x1024x32768": ("sparse", (8, 1024, 32768)),
    "one_hot_ce/16x256x4096": ("one_hot", (16, 256, 4096)),
    "mse/64x512x128": ("mse", (64, 512, 128)),
}
QUICK_CASES = {
    "sparse_ce/4x64x512": ("sparse", (4, 64, 512)),
    "sparse_ce/2x128x2048": ("sparse", (2, 128, 2048)),
    "one_hot_ce/4x64x512": ("one_hot", (4, 64, 512)),
    "mse/4x64x16": ("mse", (4, 64, 16)),
}
SEED = 0


def make_inputs(loss: str, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """float32 predictions, the targets and the boolean mask of real steps."""
    rng = np.random.default_rng(SEED)
    batch, steps, width = shape
    lengths = rng.integers(steps // 4, steps + 1, batch)
    valid = np.arange(steps)[None, :] < lengths[:, None]
    predictions = rng.standard_normal(shape, dtype=np.float32)
    if loss == "mse":
        targets = rng.standard_normal(shape, dtype=np.float32)
    else:
        labels = np.where(valid, rng.integers(1, width, (batch, steps)), 0)
        targets = labels.astype("int32")
        if loss == "one_hot":
            targets = np.eye(width, dtype="float32")[labels]
    return {"predictions": predictions, "targets": targets, "valid": valid}


def _losses(loss: str):
    """`{variant: f(predictions, targets, valid) -> scalar}` for this backend."""
    import keras

    import kmask

    backend = keras.backend.backend()
    if loss == "sparse":
        masked = kmask.MaskedSparseCategoricalCrossentropy(
            mask_value=0, from_logits=True
        )
        builtin = keras.losses.SparseCategoricalCrossentropy(
            ignore_class=0, from_logits=True
        )
        return {
            "kmask": lambda x, y, valid: masked(y, x),
            "keras": lambda x, y, valid: builtin(y, x),
            "native": native_loss(backend, loss),
        }
    if loss == "one_hot":
        masked = kmask.MaskedCategoricalCrossentropy(from_logits=True)
        builtin = keras.losses.CategoricalCrossentropy(from_logits=True)
    else:
        masked = kmask.MaskedMeanSquaredError()
        builtin = keras.losses.MeanSquaredError()
    return {
        "kmask": lambda x, y, valid: masked(y, x, sample_weight=valid),
        "keras": lambda x, y, valid: builtin(y, x, sample_weight=valid),
        "native": native_loss(backend, loss),
    }


def native_loss(backend: str, loss: str):
    """The backend's own masked loss: its per-step loss, masked with `where`
    and divided by the number of real steps (torch's sparse cross-entropy
    does both itself, through `ignore_index`)."""
    if backend == "torch":
        import torch
        import torch.nn.functional as F

        def torch_loss(x, y, valid):
            classes = x.shape[-1]
            if loss == "sparse":
                flat = y.reshape(-1).long()
                return F.cross_entropy(x.reshape(-1, classes), flat, ignore_index=0)
            if loss == "one_hot":
                flat = (x.reshape(-1, classes), y.reshape(-1, classes))
                per_step = F.cross_entropy(*flat, reduction="none").reshape(valid.shape)
            else:
                per_step = ((x - y) ** 2).mean(-1)
            return torch.where(valid, per_step, 0.0).sum() / valid.sum()

        return torch_loss
    if backend == "jax":
        import jax.numpy as jnp
        import optax

        def jax_loss(x, y, valid):
            if loss == "sparse":
                per_step = optax.softmax_cross_entropy_with_integer_labels(
                    x, y, where=valid
                )
            elif loss == "one_hot":
                per_step = optax.softmax_cross_entropy(x, y, where=valid[..., None])
            else:
                per_step = jnp.mean((x - y) ** 2, axis=-1)
            return jnp.where(valid, per_step, 0.0).sum() / valid.sum()

        return jax_loss
    import tensorflow as tf

    def tf_loss(x, y, valid):
        if loss == "sparse":
            per_step = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.where(valid, y, 0), logits=x
            )
        elif loss == "one_hot":
            per_step = tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=x)
        else:
            per_step = tf.reduce_mean(tf.square(x - y), axis=-1)
        per_step = tf.where(valid, per_step, 0.0)
        return tf.reduce_sum(per_step) / tf.reduce_sum(tf.cast(valid, tf.float32))

    return tf_loss


def value_and_grad_step(loss_fn, backend: str, torch_compile: bool = False):
    """`step(x, y, valid) -> (loss, d loss / d x)`, compiled as the module
    docstring says, returning once both are computed; with `torch_compile`
    (PyTorch), the loss compiled by `torch.compile`."""
    if torch_compile:
        import torch

        loss_fn = torch.compile(loss_fn, dynamic=False)
    compiled = value_and_grad(loss_fn, jit=True, xla=True)

    def step(x, y, valid):
        loss, (grad,) = compiled(x, y, valid)
        if backend == "jax":
            import jax

            jax.block_until_ready((loss, grad))
        elif backend == "tensorflow":
            float(loss), float(grad[0, 0, 0])  # outputs ready
        return loss, grad

    step.compiled = compiled
    return step


def floor_step(backend: str):
    """`step(x, y, valid)`: `exp(x)`, a new array the size of `x`, compiled
    as the losses are, returning once it is computed."""
    from keras import ops

    if backend == "jax":
        import jax

        compiled = jax.jit(ops.exp)
        return lambda x, y, valid: jax.block_until_ready(compiled(x))
    if backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(ops.exp, jit_compile=True)
        return lambda x, y, valid: float(compiled(x)[0, 0, 0])  # ready
    return lambda x, y, valid: ops.exp(x)


def _child(out: Path, cases: dict, warmup: int, repeats: int) -> None:
    import keras
    from keras import ops

    backend = keras.backend.backend()
    floor = floor_step(backend)
    results = {}
    for name, (loss, shape) in cases.items():
        arrays = make_inputs(loss, shape)
        inputs = [ops.convert_to_tensor(arrays[key]) for key in arrays]
        losses = _losses(loss)
        steps = {
            variant: value_and_grad_step(fn, backend) for variant, fn in losses.items()
        }
        if backend == "torch":
            for variant, eager in COMPILED.items():
                steps[variant] = value_and_grad_step(losses[eager], backend, True)
        values = {}
        for variant, step in steps.items():
            loss_value, grad = step(*inputs)
            values[variant] = float(ops.convert_to_numpy(loss_value))
            del loss_value, grad
        timed = interleaved_medians(
            {
                **{
                    variant: (lambda s=step, i=inputs: s(*i))
                    for variant, step in steps.items()
                },
                "floor": lambda i=inputs: floor(*i),
            },
            warmup,
            repeats,
        )
        temp = {}
        if backend == "jax":
            for variant, step in steps.items():
                analysis = step.compiled.lower(*inputs).compile().memory_analysis()
                temp[variant] = analysis.temp_size_in_bytes
        results[name] = {
            "loss": loss,
            "shape": shape,
            "values": values,
            "timings": timed,
            "jax_temp_bytes": temp,
        }
        print(
            f"{backend} {name}: "
            + ", ".join(f"{v} {timed[v]['median_ms']:.1f} ms" for v in timed),
            flush=True,
        )
        del inputs, steps
    write_json(out, {**backend_info(), "results": results})


def _rows(reports: dict[str, dict]) -> list[list[str]]:
    rows = []
    for backend, report in reports.items():
        for name, result in report["results"].items():
            medians = {v: t["median_ms"] for v, t in result["timings"].items()}
            # On JAX and TensorFlow the steps are compiled already.
            compiled = [medians.get(v, medians[e]) for v, e in COMPILED.items()]
            temp = result["jax_temp_bytes"]
            rows.append(
                [
                    backend,
                    name,
                    *(f"{medians[v]:.1f}" for v in VARIANTS),
                    f"{medians['kmask'] / medians['native']:.2f}",
                    f"{medians['kmask'] / medians['keras']:.2f}",
                    f"{medians['floor']:.1f}",
                    f"{medians['kmask'] / medians['floor']:.2f}",
                    *(f"{value:.1f}" for value in compiled),
                    f"{compiled[0] / compiled[1]:.2f}",
                    (
                        f"{temp['kmask'] / 2**20:.1f} / {temp['native'] / 2**20:.1f}"
                        if temp
                        else "-"
                    ),
                ]
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=installed_backends())
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--cases", nargs="+", default=(), metavar="TEXT")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.cases:
        cases = {k: v for k, v in cases.items() if any(c in k for c in args.cases)}
    repeats = args.repeats or (3 if args.quick else 7)
    if args.child:
        _child(args.child, cases, args.warmup, repeats)
        return 0
    forwarded = ["--warmup", str(args.warmup), "--repeats", str(repeats)]
    forwarded += ["--quick"] if args.quick else []
    forwarded += ["--cases", *args.cases] if args.cases else []
    reports = {
        backend: run_child(Path(__file__), backend, forwarded)
        for backend in args.backends or installed_backends()
    }
    print()
    print(
        f"Masked loss, forward + backward, median of {repeats} rounds after "
        f"{args.warmup} warm-up ({machine()}; "
        + ", ".join(f"{b} {r['version']} on {r['device']}" for b, r in reports.items())
        + f"; Keras {next(iter(reports.values()))['keras']})"
    )
    print()
    headers = [
        "backend",
        "case",
        "kmask ms",
        "Keras ms",
        "native ms",
        "kmask/native",
        "kmask/Keras",
        "floor ms",
        "kmask/floor",
        "kmask compiled ms",
        "native compiled ms",
        "compiled kmask/native",
        "JAX temp MiB kmask / native",
    ]
    print(markdown_table(headers, _rows(reports)))
    write_json(
        args.json,
        {"machine": machine(), "argv": sys.argv, "repeats": repeats, **reports},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
