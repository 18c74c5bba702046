"""`python -m tools.edges_table`: the table of docs/edges.md, measured.

Each row is a call a new user would try with unusual or bad input. Every
backend runs every row in a child process of its own, twice: eagerly, and
compiled (`jax.jit`, `tf.function(jit_compile=True)`, and on PyTorch
`torch.compile(backend="aot_eager")`, which traces with TorchDynamo without a
C++ toolchain). A cell is the value, or the exception's type and the argument
its message names.

    python -m tools.edges_table            # Markdown on stdout
    python -m tools.edges_table --backends jax
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tools.backends import (
    BACKENDS,
    backend_environment,
    installed_backends,
    run_in_own_session,
)

B, T, C = 2, 4, 5
NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}


def _rows() -> list[tuple[str, Callable]]:
    """`(input, build)`: `build()` returns `(fn, inputs)`, `fn(*inputs)` the
    scalar a user would look at. The targets are arguments, as in training
    (a constant would be known while tracing). Imported lazily: the child's
    backend."""
    import keras
    import numpy as np
    from keras import ops

    import kmask

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, T, C)).astype("float32")
    labels = rng.integers(1, C, size=(B, T)).astype("int32")
    valid = np.arange(T)[None, :] < np.array([[4], [2]])

    def sparse(bad_label, position=(1, 1), **options):
        def build():
            bad = labels.copy()
            bad[position] = bad_label
            loss = kmask.MaskedSparseCategoricalCrossentropy(
                from_logits=True, **options
            )
            return (lambda y_pred, y_true: loss(y_true, y_pred)), (logits, bad)

        return build

    def metric_with_label(bad_label):
        def build():
            bad = labels.copy()
            bad[1, 1] = bad_label
            metric = kmask.MaskedSparseCategoricalAccuracy()

            def fn(y_pred, y_true):
                metric.update_state(y_true, y_pred)
                return metric.result()

            return fn, (logits, bad)

        return build

    def empty():
        loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True)
        inputs = (np.zeros((0, T, C), "float32"), np.zeros((0, T), "int32"))
        return (lambda y_pred, y_true: loss(y_true, y_pred)), inputs

    def lengths():
        def fn(lengths):
            return ops.sum(ops.cast(kmask.sequence_mask(lengths, 5), "float32"))

        return fn, (np.array([3.5, 2.0], "float32"),)

    def string_pad():
        def fn(y_pred):
            return kmask.MaskedLoss("mse", mask_value="pad")(y_pred, y_pred)

        return fn, (logits,)

    def unit_axis():
        loss = kmask.MaskedSparseCategoricalCrossentropy(
            from_logits=True, ignore_class=0
        )
        column = np.where(valid, labels, 0)[..., None]
        return (lambda y_pred, y_true: loss(y_true, y_pred)), (logits, column)

    def class_axis_first():
        loss = kmask.MaskedSparseCategoricalCrossentropy(from_logits=True, axis=0)
        moved = np.moveaxis(logits, -1, 0).copy()
        return (lambda y_pred, y_true: loss(y_true, y_pred)), (moved, labels)

    def saved_and_reloaded():
        pad = np.array([0, 0, 1])
        loss = kmask.MaskedCategoricalCrossentropy(from_logits=True, mask_value=pad)
        inputs = keras.Input((T, 3))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        model.compile(loss=loss)
        model.optimizer.build(model.trainable_variables)
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.keras"
            model.save(path)
            loaded = keras.models.load_model(path)
        classes = np.random.default_rng(1).integers(0, 3, size=(B, T))
        targets = np.eye(3, dtype="float32")[classes]
        return (lambda y_pred, y_true: loaded.loss(y_true, y_pred)), (
            logits[..., :3].copy(),
            targets,
        )

    def keras_name(keras_loss):
        def build():
            if keras_loss:
                loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            else:
                loss = kmask.MaskedSparseCategoricalCrossentropy(
                    from_logits=True, reduction="sum_over_batch_size"
                )
            padded = np.where(valid[..., None], logits, -9.0).astype("float32")
            masking = keras.layers.Masking(mask_value=-9.0)

            def fn(y_pred, y_true):
                return loss(y_true, masking(y_pred))

            return fn, (padded, labels)

        return build

    def perplexity():
        metric = kmask.Perplexity(from_logits=True)
        return (lambda y_pred: metric.result() + ops.sum(y_pred) * 0.0), (logits,)

    return [
        ("sparse CE, label 7 with 5 classes at a real step", sparse(7)),
        ("label -5 (not the pad value) at a real step", sparse(-5)),
        (
            "label -100 at a padded step (`mask_value=-100`)",
            sparse(-100, (1, 3), mask_value=-100),
        ),
        ("sparse accuracy, label 7 at a real step", metric_with_label(7)),
        ("empty batch (0 sequences), sparse CE from logits", empty),
        ("`sequence_mask([3.5, 2.0], 5)`", lengths),
        ('`MaskedLoss("mse", mask_value="pad")`', string_pad),
        ("sparse labels `[batch, time, 1]` with `ignore_class`", unit_axis),
        (
            "`MaskedSparseCategoricalCrossentropy(axis=0)`, class axis first",
            class_axis_first,
        ),
        (
            "`MaskedCategoricalCrossentropy(mask_value=np.array([0, 0, 1]))` "
            "saved to `.keras` and reloaded",
            saved_and_reloaded,
        ),
        (
            '`reduction="sum_over_batch_size"`, propagated mask: kmask',
            keras_name(False),
        ),
        ("the same with Keras's own loss", keras_name(True)),
        ("`Perplexity` before any update", perplexity),
    ]


def _compiled(fn: Callable, backend: str) -> Callable:
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    import torch

    return torch.compile(fn, backend="aot_eager", fullgraph=False)


def _outcome(build: Callable, compiled: bool, backend: str) -> str:
    from keras import ops

    try:
        fn, inputs = build()
        if compiled:
            fn = _compiled(fn, backend)
        value = fn(*(ops.convert_to_tensor(x) for x in inputs))
        value = float(ops.convert_to_numpy(value))
    # Every kind of failure is a row of the table.
    except Exception as error:
        return _describe(error)
    return "NaN" if math.isnan(value) else f"{value + 0.0:.4g}"  # no "-0"


def _describe(error: Exception) -> str:
    message = str(error)
    argument = re.search(r"argument `(\w+)`", message)
    if isinstance(error, ValueError) and argument:
        return f"`ValueError` naming `{argument.group(1)}`"
    first = message.strip().splitlines()[0] if message.strip() else ""
    return f"raw `{type(error).__name__}`: {first[:50]}"


def child(backend: str) -> None:
    """Runs every row, eager then compiled; prints a JSON list of cells."""
    import os

    os.environ.setdefault("TORCHDYNAMO_VERBOSE", "0")
    rows = []
    for name, build in _rows():
        rows.append(
            [name, _outcome(build, False, backend), _outcome(build, True, backend)]
        )
    print(json.dumps(rows))


def table(results: dict[str, list]) -> str:
    backends = list(results)
    header = ["input"]
    for backend in backends:
        header += [f"{NAMES[backend]} eager", f"{NAMES[backend]} compiled"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, (name, *_) in enumerate(results[backends[0]]):
        cells = [name]
        for backend in backends:
            cells += results[backend][index][1:]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    results = {}
    for backend in [b for b in args.backends if b in installed_backends()]:
        command = [sys.executable, "-m", "tools.edges_table", "--child", backend]
        env = backend_environment(backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = run_in_own_session(command, env, timeout=900)
        if done.returncode != 0:
            sys.exit(f"{backend} failed:\n{done.stderr[-3000:]}")
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    print(table(results))


if __name__ == "__main__":
    main()
