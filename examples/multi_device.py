"""Two devices, or accumulated micro-batches, give the same step as the whole batch.

A token mean must divide by the real tokens of the whole global batch. Here the
first half of every batch holds long sequences and the second half short ones,
so a per-device (or per-micro-batch) mean is visibly off. For each backend this
trains a masked linear model with SGD and prints the largest weight gap to a
single-device, full-batch run (after 1 and after 3 steps), with Keras's
built-in `mse` and with kmask:

- TensorFlow: `tf.distribute.MirroredStrategy` on 2 logical CPUs;
- JAX: `keras.distribution.DataParallel` on 2 CPU devices;
- PyTorch: `DistributedDataParallel` in 2 processes over `gloo`;
- every backend: the optimizer's `gradient_accumulation_steps` 2 and 4, with
  `kmask.accumulation_weights` and `reduction="sum"`.

It also checks the single-device step against a NumPy SGD step, and the loss
Keras logs against the NumPy global token mean.

    python examples/multi_device.py                 # every installed backend
    python examples/multi_device.py --backends torch --json gaps.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from functools import partial

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")
LENGTHS = np.array([6, 6, 5, 6, 1, 2, 1, 1])  # long first half, short second half
STEPS_TIME, FEATURES = 6, 3
LEARNING_RATE = 0.1
EPOCHS = (1, 3)
TOLERANCE = 1e-5


# ----------------------------------------------------------------------------
# Data, model and NumPy references (shared by every backend).


def make_data():
    rng = np.random.default_rng(0)
    valid = np.arange(STEPS_TIME)[None, :] < LENGTHS[:, None]
    x = (
        rng.uniform(0.5, 1.5, (len(LENGTHS), STEPS_TIME, FEATURES)) * valid[..., None]
    ).astype("float32")
    y = rng.normal(size=(len(LENGTHS), STEPS_TIME, 1)).astype("float32")
    y_nan = np.where(valid[..., None], y, np.nan).astype("float32")
    return x, y, y_nan, valid


def initial_weights():
    rng = np.random.default_rng(1)
    return [
        rng.normal(size=(FEATURES, 1)).astype("float32"),
        rng.normal(size=(1,)).astype("float32"),
    ]


def numpy_token_mean(weights, x, y, valid):
    kernel, bias = (np.asarray(w, "float64") for w in weights)
    error = (x.astype("float64") @ kernel + bias)[..., 0] - y[..., 0]
    return float((error**2)[valid].mean())


def numpy_sgd(weights, x, y, valid, steps):
    kernel, bias = (np.asarray(w, "float64") for w in weights)
    xs, count = x.astype("float64"), valid.sum()
    for _ in range(steps):
        error = np.where(valid, (xs @ kernel + bias)[..., 0] - y[..., 0], 0.0)
        kernel = (
            kernel
            - LEARNING_RATE * 2 * np.einsum("bt,btf->f", error, xs)[:, None] / count
        )
        bias = bias - LEARNING_RATE * 2 * error.sum(keepdims=True).reshape(1) / count
    return [kernel, bias]


def gap(a, b):
    return float(
        max(
            np.max(np.abs(np.asarray(u, "float64") - np.asarray(v, "float64")))
            for u, v in zip(a, b, strict=True)
        )
    )


def build_model(masking=True):
    import keras

    inputs = keras.Input((STEPS_TIME, FEATURES))
    hidden = keras.layers.Masking(0.0)(inputs) if masking else inputs
    outputs = keras.layers.Dense(1)(hidden)
    model = keras.Model(inputs, outputs)
    model.set_weights(initial_weights())
    return model


def fit(
    loss, x, y, epochs, batch_size, sample_weight=None, accumulation=None, masking=True
):
    import keras

    model = build_model(masking)
    optimizer = keras.optimizers.SGD(
        LEARNING_RATE, gradient_accumulation_steps=accumulation
    )
    model.compile(optimizer=optimizer, loss=loss)
    history = model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    )
    return model.get_weights(), history.history["loss"][0]


# ----------------------------------------------------------------------------
# Scenarios.


def losses():
    """(scenario, built-in loss or None, kmask loss, targets key, masking layer)."""
    import kmask

    return [
        ("propagated mask", "mse", kmask.MaskedMeanSquaredError(), "y", True),
        (
            "mask_value=NaN",
            None,
            kmask.MaskedMeanSquaredError(mask_value=float("nan")),
            "y_nan",
            False,
        ),
    ]


def accumulation_rows(backend):
    import kmask

    x, y, y_nan, valid = make_data()
    targets = {"y": y, "y_nan": y_nan}
    rows = []
    for steps in (2, 4):
        batch_size = len(x) // steps
        window_weights = kmask.accumulation_weights(valid, batch_size, steps)
        for scenario, builtin, masked, key, masking in losses():
            summed = type(masked).from_config(
                {**masked.get_config(), "reduction": "sum"}
            )
            options = dict(batch_size=batch_size, accumulation=steps, masking=masking)
            row = {
                "backend": backend,
                "setup": f"gradient_accumulation_steps={steps}",
                "mask source": scenario,
            }
            row.update(
                _compare(
                    builtin=builtin and partial(fit, builtin, x, y, **options),
                    kmask_run=partial(
                        fit,
                        summed,
                        x,
                        targets[key],
                        sample_weight=window_weights,
                        **options,
                    ),
                    x=x,
                    y=y,
                    valid=valid,
                )
            )
            rows.append(row)
    return rows


def _compare(builtin, kmask_run, x, y, valid):
    """Weight gaps to NumPy's full-batch SGD after each of EPOCHS, and the error
    of the first logged loss."""
    row = {"builtin gap": None}
    reference_loss = numpy_token_mean(initial_weights(), x, y, valid)
    kmask_gaps, builtin_gaps, logged_error = [], [], 0.0
    for epochs in EPOCHS:
        reference = numpy_sgd(initial_weights(), x, y, valid, epochs)
        weights, logged = kmask_run(epochs)
        kmask_gaps.append(gap(weights, reference))
        logged_error = max(logged_error, abs(logged - reference_loss) / reference_loss)
        if builtin is not None:
            builtin_gaps.append(gap(builtin(epochs)[0], reference))
    row["kmask gap"] = max(kmask_gaps)
    if builtin_gaps:
        row["builtin gap"] = max(builtin_gaps)
    row["logged loss rel. error"] = logged_error
    return row


def _device_rows(backend, setup, run_distributed):
    """Rows for one multi-device setup: `run_distributed(loss, targets,
    masking, epochs)` trains on the whole batch split over the devices."""
    x, y, y_nan, valid = make_data()
    targets = {"y": y, "y_nan": y_nan}
    rows = []
    for scenario, builtin, masked, key, masking in losses():
        row = {"backend": backend, "setup": setup, "mask source": scenario}
        row.update(
            _compare(
                builtin=builtin and partial(run_distributed, builtin, y, masking),
                kmask_run=partial(run_distributed, masked, targets[key], masking),
                x=x,
                y=y,
                valid=valid,
            )
        )
        rows.append(row)
    return rows + accumulation_rows(backend)


def tensorflow_rows():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    x = make_data()[0]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def run(loss, target, masking, epochs):
        with strategy.scope():
            model = build_model(masking)
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss=loss)
        history = model.fit(
            x, target, batch_size=len(x), epochs=epochs, shuffle=False, verbose=0
        )
        return model.get_weights(), history.history["loss"][0]

    return _device_rows("tensorflow", "MirroredStrategy, 2 CPUs", run)


def jax_rows():
    import keras

    x = make_data()[0]
    devices = keras.distribution.list_devices("cpu")
    if len(devices) < 2:
        raise RuntimeError(
            "JAX sees one CPU device: set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=2 before importing it"
        )
    data_parallel = keras.distribution.DataParallel(devices=devices[:2])

    def run(loss, target, masking, epochs):
        with data_parallel.scope():
            return fit(loss, x, target, epochs, len(x), masking=masking)

    return _device_rows("jax", "DataParallel, 2 CPUs", run)


def torch_rows():
    x, y, _, valid = make_data()
    rows = []
    for scenario, builtin, *_ in losses():
        row = {
            "backend": "torch",
            "setup": "DDP, 2 gloo processes",
            "mask source": scenario,
        }
        row.update(
            _compare(
                builtin=None
                if builtin is None
                else lambda e, s=scenario: _ddp(s, "builtin", e),
                kmask_run=lambda e, s=scenario: _ddp(s, "kmask", e),
                x=x,
                y=y,
                valid=valid,
            )
        )
        rows.append(row)
    return rows + accumulation_rows("torch")


def _ddp(scenario, which, epochs):
    """Runs 2 gloo processes; returns rank 0's weights and the mean first loss."""
    with tempfile.TemporaryDirectory() as folder:
        logs = [open(os.path.join(folder, f"rank{rank}.log"), "w") for rank in (0, 1)]  # noqa: SIM115
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--ddp-rank",
                    str(rank),
                    "--ddp-out",
                    folder,
                    "--ddp-case",
                    json.dumps([scenario, which, epochs]),
                ],
                env=dict(os.environ, KERAS_BACKEND="torch"),
                stdout=logs[rank],
                stderr=subprocess.STDOUT,
            )
            for rank in (0, 1)
        ]
        try:
            codes = [process.wait(timeout=120) for process in processes]
        except subprocess.TimeoutExpired:
            codes = ["timeout"]
        finally:
            for process in processes:
                process.kill()
            for log in logs:
                log.close()
        if codes != [0, 0]:
            output = "".join(_tail(log.name) for log in logs)
            raise RuntimeError(f"a DDP process failed ({codes}):\n{output}")
        result = np.load(os.path.join(folder, "rank0.npz"))
        first_losses = [
            float(np.load(os.path.join(folder, f"rank{rank}.npz"))["first_loss"])
            for rank in (0, 1)
        ]
        return [result["kernel"], result["bias"]], float(np.mean(first_losses))


def _tail(path):
    with open(path) as handle:
        return handle.read()[-3000:]


def ddp_worker(rank, out, case):
    """One DDP process: trains on its half of the batch with a custom loop."""
    import torch
    import torch.distributed as dist

    scenario, which, epochs = case
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=2,
        init_method=f"file://{out}/store",
        timeout=datetime.timedelta(seconds=60),
    )
    x, y, y_nan, _ = make_data()
    half = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
    candidates = {
        name: (builtin, masked, key, masking)
        for name, builtin, masked, key, masking in losses()
    }
    _, masked, key, masking = candidates[scenario]
    import keras

    loss_fn = keras.losses.MeanSquaredError() if which == "builtin" else masked
    model = build_model(masking)
    module = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    targets = torch.tensor({"y": y, "y_nan": y_nan}[key][half])
    inputs = torch.tensor(x[half])
    first_loss = None
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(targets, module(inputs))
        loss.backward()
        optimizer.step()
        first_loss = float(loss.detach()) if first_loss is None else first_loss
    kernel, bias = model.get_weights()
    np.savez(
        os.path.join(out, f"rank{rank}.npz"),
        kernel=kernel,
        bias=bias,
        first_loss=first_loss,
    )


# ----------------------------------------------------------------------------
# Driver.

ROWS = {"tensorflow": tensorflow_rows, "jax": jax_rows, "torch": torch_rows}
COLUMNS = (
    "backend",
    "setup",
    "mask source",
    "builtin gap",
    "kmask gap",
    "logged loss rel. error",
)


def run_backend_subprocess(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == "jax":
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        ).strip()
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", backend],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{backend} worker failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def format_cell(value):
    if value is None:
        return "n/a"
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-out", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_rank is not None:
        ddp_worker(args.ddp_rank, args.ddp_out, json.loads(args.ddp_case))
        # Skip interpreter teardown: with gloo's threads alive it can hang.
        os._exit(0)
    if args.worker:
        print(json.dumps(ROWS[args.worker]()))
        return 0

    rows = []
    for backend in args.backends:
        if importlib.util.find_spec(backend) is None:
            print(f"{backend}: not installed, skipped")
            continue
        rows += run_backend_subprocess(backend)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        print("| " + " | ".join(format_cell(row[column]) for column in COLUMNS) + " |")
    print(
        f"\ngap: largest |weight - NumPy full-batch SGD weight| after {EPOCHS} steps; "
        "logged loss: first logged loss vs the NumPy global token mean."
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    failures = [
        row
        for row in rows
        if row["kmask gap"] > TOLERANCE or row["logged loss rel. error"] > TOLERANCE
    ]
    for row in failures:
        print(f"FAILED: {row}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
