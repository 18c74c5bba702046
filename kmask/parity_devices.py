"""Device cases of the parity suite: one device against two, on every backend.

A token mean must divide by the real tokens of the whole global batch. Here the
first half of every batch holds long sequences and the second half short ones,
so a per-device (or per-micro-batch) mean is visibly off. For one backend
(`KERAS_BACKEND`) this trains a masked linear model with SGD in each setup,
with kmask's `MaskedMeanSquaredError` and, for comparison, Keras's built-in
`mse`, and measures the weights after 1 and after 3 steps against a NumPy
SGD run on the whole batch, and against the same kmask run on one device:

- `one_device`: `fit()` on one device, the whole batch at once;
- `two_devices`: TensorFlow `tf.distribute.MirroredStrategy` on 2 logical
  CPUs and JAX `keras.distribution.DataParallel` on 2 CPU devices, both with
  `fit()`; PyTorch `DistributedDataParallel` in 2 `gloo` processes with a
  custom loop (Keras's torch `fit()` runs on one device);
- `accumulation_2`, `accumulation_4`: the optimizer's
  `gradient_accumulation_steps`, with `kmask.accumulation_weights` and
  `reduction="sum"`;
- `two_workers` (TensorFlow only): `tf.distribute.MultiWorkerMirroredStrategy`
  over 2 worker processes on localhost, with a custom loop (`strategy.run`):
  Keras 3.15.1's `fit()` itself fails under that strategy (keras-team/keras
  issue 20585) before any loss runs;
- `data_and_model_axes` (JAX only): `keras.distribution.ModelParallel` on a
  `(batch 2, model 1)` mesh.

The mask comes from each of two sources: a propagated mask
(`keras.layers.Masking`) and `mask_value=NaN` in the targets. The loss Keras
logs is checked against the NumPy global token mean.

The training code of each setup is what a user writes; no kmask call in it
knows how many devices there are.

    python -m kmask.parity_devices                   # every installed backend
    python -m kmask.parity_devices --backends torch --json gaps.json

`python -m kmask.parity` runs the first four setups as its `devices/` cases,
and `examples/multi_device.py` prints the README's table from these rows.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")
LENGTHS = np.array([6, 6, 5, 6, 1, 2, 1, 1])  # long first half, short second half
STEPS_TIME, FEATURES = 6, 3
LEARNING_RATE = 0.1
EPOCHS = (1, 3)
TOLERANCE = 1e-5
SOURCES = ("propagated_mask", "mask_value_nan")
# The setups every backend runs: `python -m kmask.parity` checks these.
COMMON_SETUPS = ("one_device", "two_devices", "accumulation_2", "accumulation_4")
EXTRA_SETUPS = {"tensorflow": ("two_workers",), "jax": ("data_and_model_axes",)}
LABELS = {
    "one_device": "one device",
    "accumulation_2": "gradient_accumulation_steps=2",
    "accumulation_4": "gradient_accumulation_steps=4",
    "two_workers": "MultiWorkerMirroredStrategy, 2 processes",
    "data_and_model_axes": "ModelParallel, batch 2 x model 1",
}
TWO_DEVICES = {
    "tensorflow": "MirroredStrategy, 2 CPUs",
    "jax": "DataParallel, 2 CPUs",
    "torch": "DDP, 2 gloo processes",
}
_TIMEOUT = 180  # seconds, for a pair of processes
_WORKER_TIMEOUT = 900  # seconds, for every setup of one backend
_MODULE = (sys.executable, "-m", "kmask.parity_devices")


# ----------------------------------------------------------------------------
# Data, model and NumPy references (the same for every backend).


def make_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs (zero at padding), targets, targets with NaN at padding, mask."""
    rng = np.random.default_rng(0)
    valid = np.arange(STEPS_TIME)[None, :] < LENGTHS[:, None]
    x = (
        rng.uniform(0.5, 1.5, (len(LENGTHS), STEPS_TIME, FEATURES)) * valid[..., None]
    ).astype("float32")
    y = rng.normal(size=(len(LENGTHS), STEPS_TIME, 1)).astype("float32")
    y_nan = np.where(valid[..., None], y, np.nan).astype("float32")
    return x, y, y_nan, valid


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.normal(size=(FEATURES, 1)).astype("float32"),
        rng.normal(size=(1,)).astype("float32"),
    ]


def numpy_token_mean(weights, x, y, valid) -> float:
    """The squared error averaged over the real steps of the whole batch."""
    kernel, bias = (np.asarray(w, "float64") for w in weights)
    error = (x.astype("float64") @ kernel + bias)[..., 0] - y[..., 0]
    return float((error**2)[valid].mean())


def numpy_sgd(weights, x, y, valid, steps: int) -> list[np.ndarray]:
    """`steps` SGD steps on the whole batch's token-mean squared error."""
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


def expected_weights() -> np.ndarray:
    """NumPy's weights after each of `EPOCHS` steps, flattened: `[epochs, 4]`."""
    x, y, _, valid = make_data()
    return np.stack(
        [_flat(numpy_sgd(initial_weights(), x, y, valid, n)) for n in EPOCHS]
    )


def expected_loss() -> float:
    x, y, _, valid = make_data()
    return numpy_token_mean(initial_weights(), x, y, valid)


def gap(a, b) -> float:
    """The largest absolute difference between two sets of weights."""
    return float(np.max(np.abs(np.asarray(a, "float64") - np.asarray(b, "float64"))))


def _flat(weights) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(w, "float64")) for w in weights])


# ----------------------------------------------------------------------------
# Training, as a user writes it.


def build_model(masking: bool = True):
    import keras

    inputs = keras.Input((STEPS_TIME, FEATURES))
    hidden = keras.layers.Masking(0.0)(inputs) if masking else inputs
    outputs = keras.layers.Dense(1)(hidden)
    model = keras.Model(inputs, outputs)
    model.set_weights(initial_weights())
    return model


def _source(source: str, which: str):
    """(loss, targets key, masking layer) of a mask source, for `which` loss."""
    import keras

    import kmask

    if source == "propagated_mask":
        if which == "kmask":
            return kmask.MaskedMeanSquaredError(), "y", True
        return keras.losses.MeanSquaredError(), "y", True
    if which == "builtin":
        raise ValueError("Keras's built-in mse has no mask_value")
    return kmask.MaskedMeanSquaredError(mask_value=float("nan")), "y_nan", False


def fit(
    loss,
    targets,
    masking: bool,
    batch_size: int | None = None,
    sample_weight=None,
    accumulation: int | None = None,
    scope: Any = None,
) -> tuple[np.ndarray, float, int]:
    """`model.fit` for `max(EPOCHS)` epochs, all of it inside `scope`: the
    weights after each of `EPOCHS` (flattened, `[len(EPOCHS), 4]`), the first
    logged loss, and the number of replicas `fit` ran on."""
    import keras

    x = make_data()[0]
    snapshots, replicas = [], []
    with scope or contextlib.nullcontext():
        model = build_model(masking)
        optimizer = keras.optimizers.SGD(
            LEARNING_RATE, gradient_accumulation_steps=accumulation
        )
        model.compile(optimizer=optimizer, loss=loss)
        record = keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs: replicas.append(_replicas(model)),
            on_epoch_end=lambda epoch, logs: snapshots.append(
                _flat(model.get_weights())
            ),
        )
        history = model.fit(
            x,
            targets,
            sample_weight=sample_weight,
            batch_size=batch_size or len(x),
            epochs=max(EPOCHS),
            shuffle=False,
            verbose=0,
            callbacks=[record],
        )
    weights = np.stack([snapshots[epochs - 1] for epochs in EPOCHS])
    return weights, float(history.history["loss"][0]), replicas[0]


def _replicas(model) -> int:
    """How many devices `fit` spreads a batch over, as training starts: the
    `tf.distribute` strategy's replicas, or the batch axis of the active
    `keras.distribution` (1 when neither is set)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        return model.distribute_strategy.num_replicas_in_sync
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def _two_devices_scope(backend: str):
    """The scope that spreads `fit` over 2 devices (TensorFlow and JAX)."""
    if backend == "tensorflow":
        return _mirrored_strategy().scope()
    import keras

    devices = keras.distribution.list_devices("cpu")
    if len(devices) < 2:
        raise RuntimeError(
            "JAX sees one CPU device: set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=2 before importing it"
        )
    return keras.distribution.DataParallel(devices=devices[:2]).scope()


@functools.cache
def _mirrored_strategy():
    """One strategy per process: a second one's collectives would clash."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def _data_and_model_axes_scope():
    import keras

    devices = keras.distribution.list_devices("cpu")[:2]
    mesh = keras.distribution.DeviceMesh((2, 1), ("batch", "model"), devices)
    layout = keras.distribution.LayoutMap(mesh)
    layout[".*dense.*kernel"] = (None, "model")
    return keras.distribution.ModelParallel(
        layout_map=layout, batch_dim_name="batch"
    ).scope()


def run_setup(backend: str, setup: str, source: str, which: str):
    """Trains one setup in this process (or in processes it starts): weights
    after each of `EPOCHS`, `[len(EPOCHS), 4]`, and the first logged loss."""
    loss, key, masking = _source(source, which)
    x, y, y_nan, valid = make_data()
    targets = {"y": y, "y_nan": y_nan}[key]
    if setup == "one_device":
        return fit(loss, targets, masking)
    if setup.startswith("accumulation_"):
        import kmask

        steps = int(setup.rsplit("_", 1)[1])
        batch_size = len(x) // steps
        weights = None
        if which == "kmask":
            weights = kmask.accumulation_weights(valid, batch_size, steps)
            config = {**loss.get_config(), "reduction": "sum"}
            loss = type(loss).from_config(config)
        return fit(loss, targets, masking, batch_size, weights, accumulation=steps)
    if setup == "data_and_model_axes":
        return fit(loss, targets, masking, scope=_data_and_model_axes_scope())
    if setup == "two_devices" and backend != "torch":
        return fit(loss, targets, masking, scope=_two_devices_scope(backend))
    return _processes(setup, source, which)


# ----------------------------------------------------------------------------
# Two processes: PyTorch DDP over gloo, TensorFlow MultiWorkerMirroredStrategy.


def _processes(setup: str, source: str, which: str):
    """Runs 2 processes of `python -m kmask.parity_devices --process`; returns
    the weights (checked equal on both ranks), the mean of the ranks' first
    losses and the number of replicas they trained on. A TensorFlow
    worker that finds its port taken (picked free, then grabbed by someone
    else before the worker bound it) is run again, once."""
    try:
        return _two_processes(setup, source, which)
    except RuntimeError as error:
        if "already in use" not in str(error):
            raise
    return _two_processes(setup, source, which)


def _two_processes(setup: str, source: str, which: str):
    with tempfile.TemporaryDirectory(prefix="kmask-devices-") as folder:
        logs = [open(os.path.join(folder, f"rank{rank}.log"), "w") for rank in (0, 1)]  # noqa: SIM115
        case = json.dumps([setup, source, which, folder, _free_ports(2)])
        processes = [
            subprocess.Popen(
                [*_MODULE, "--process", case, "--rank", str(rank)],
                env=os.environ.copy(),
                stdout=logs[rank],
                stderr=subprocess.STDOUT,
            )
            for rank in (0, 1)
        ]
        deadline = time.monotonic() + _TIMEOUT
        try:
            codes = [
                process.wait(timeout=max(deadline - time.monotonic(), 1))
                for process in processes
            ]
        except subprocess.TimeoutExpired:
            codes = ["timeout"]
        finally:
            for process in processes:
                process.kill()
                process.wait()
            for log in logs:
                log.close()
        if codes != [0, 0]:
            output = "".join(_tail(log.name) for log in logs)
            raise RuntimeError(f"a {setup} process failed ({codes}):\n{output}")
        results = [np.load(os.path.join(folder, f"rank{r}.npz")) for r in (0, 1)]
        weights = [result["weights"] for result in results]
        if not np.array_equal(weights[0], weights[1]):
            raise RuntimeError(
                f"{setup}: the two ranks ended with different weights: "
                f"{weights[0].tolist()} and {weights[1].tolist()}"
            )
        first_loss = float(np.mean([result["first_loss"] for result in results]))
        return weights[0], first_loss, int(results[0]["replicas"])


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free now (all held until all are found)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("localhost", 0))
        return [probe.getsockname()[1] for probe in probes]


def _tail(path: str) -> str:
    with open(path) as handle:
        return handle.read()[-3000:]


def _process(case: list, rank: int) -> None:
    """One of the 2 processes: trains on its half of the batch."""
    setup, source, which, folder, ports = case
    x, y, y_nan, _ = make_data()
    loss, key, masking = _source(source, which)
    half = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
    targets = {"y": y, "y_nan": y_nan}[key][half]
    train = _torch_ddp if setup == "two_devices" else _tensorflow_workers
    snapshots, first_loss, replicas = train(
        rank, folder, ports, loss, masking, x[half], targets
    )
    np.savez(
        os.path.join(folder, f"rank{rank}.npz"),
        weights=np.stack([snapshots[epochs - 1] for epochs in EPOCHS]),
        first_loss=first_loss,
        replicas=replicas,
    )


def _torch_ddp(rank, folder, ports, loss, masking, x, y):
    """The custom loop of the Keras multi-GPU torch guide, over gloo."""
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=2,
        init_method=f"file://{folder}/store",
        timeout=datetime.timedelta(seconds=60),
    )
    model = build_model(masking)
    module = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    inputs, targets = torch.tensor(x), torch.tensor(y)
    snapshots, losses = [], []
    for _ in range(max(EPOCHS)):
        optimizer.zero_grad()
        value = loss(targets, module(inputs))
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
        snapshots.append(_flat(model.get_weights()))
    return snapshots, losses[0], dist.get_world_size()


def _tensorflow_workers(rank, folder, ports, loss, masking, x, y):
    """`MultiWorkerMirroredStrategy` with a custom loop; each worker feeds its
    own half. Both losses are called as they are: Keras's divides its
    per-replica mean by the number of replicas itself."""
    del folder
    cluster = [f"localhost:{port}" for port in ports]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": rank}}
    )
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model(masking)
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        optimizer.build(model.trainable_variables)

    def replica_step(inputs, targets):
        with tf.GradientTape() as tape:
            value = loss(targets, model(inputs, training=True))
        gradients = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(
            zip(gradients, model.trainable_variables, strict=True)
        )
        return value

    @tf.function
    def step(inputs, targets):
        values = strategy.run(replica_step, args=(inputs, targets))
        return strategy.reduce("SUM", values, axis=None)

    snapshots, losses = [], []
    for _ in range(max(EPOCHS)):
        losses.append(float(step(tf.constant(x), tf.constant(y))))
        snapshots.append(_flat(model.get_weights()))
    # The first loss is the replicas' sum: the global loss.
    return snapshots, losses[0], strategy.num_replicas_in_sync


# ----------------------------------------------------------------------------
# Rows: every setup of one backend, compared with NumPy and one device.


def setups_for(backend: str) -> tuple[str, ...]:
    return COMMON_SETUPS + EXTRA_SETUPS.get(backend, ())


def label(backend: str, setup: str) -> str:
    return TWO_DEVICES[backend] if setup == "two_devices" else LABELS[setup]


def rows(
    backend: str, setups: Sequence[str] | None = None, builtin: bool = True
) -> list[dict[str, Any]]:
    """Trains every setup with each mask source in this process (the backend
    set up for 2 devices); one row each, with the kmask weights."""
    setups = list(setups or setups_for(backend))
    unknown = sorted(set(setups) - set(setups_for(backend)))
    if unknown:
        raise ValueError(
            f"Invalid value for argument `setups`: {unknown} are not setups of "
            f"{backend}; its setups are {list(setups_for(backend))}"
        )
    reference, reference_loss = expected_weights(), expected_loss()
    out, one_device = [], {}
    for setup in ["one_device", *(s for s in setups if s != "one_device")]:
        for source in SOURCES:
            weights, logged, replicas = run_setup(backend, setup, source, "kmask")
            one_device.setdefault(source, weights)
            row = {
                "backend": backend,
                "setup": setup,
                "label": label(backend, setup),
                "mask source": source,
                "weights": weights.tolist(),
                "logged loss": logged,
                "replicas": replicas,
                "kmask gap": gap(weights, reference),
                "one-device gap": gap(weights, one_device[source]),
                "logged loss rel. error": abs(logged - reference_loss) / reference_loss,
                "builtin gap": None,
            }
            if builtin and source == "propagated_mask" and setup != "one_device":
                builtin_weights = run_setup(backend, setup, source, "builtin")[0]
                row["builtin gap"] = gap(builtin_weights, reference)
            if setup in setups:
                out.append(row)
    return out


def _environment(backend: str) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == "jax":
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        ).strip()
    return env


def run_backend(
    backend: str, setups: Sequence[str] | None = None, builtin: bool = True
) -> list[dict[str, Any]]:
    """`rows(backend, ...)` in a child process with 2 devices set up."""
    with tempfile.TemporaryDirectory(prefix="kmask-devices-") as folder:
        path = os.path.join(folder, "rows.json")
        command = [*_MODULE, "--worker", backend]
        command += ["--json", path, *(["--no-builtin"] if not builtin else [])]
        if setups:
            command += ["--setups", *setups]
        worker = run_in_own_session(command, _environment(backend), _WORKER_TIMEOUT)
        if worker.returncode != 0:
            raise RuntimeError(
                f"{backend} device worker failed:\n{worker.stderr[-4000:]}"
            )
        with open(path) as handle:
            return json.load(handle)


def run_in_own_session(
    command: Sequence[str], env: dict, timeout: float, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """Runs `command` in a session of its own, its output captured. On a
    timeout the whole session is killed, with the processes it started (DDP
    ranks, TensorFlow workers), and stderr ends by saying so."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout} s)"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _setup_before_import(backend: str) -> None:
    """TensorFlow's 2 logical CPUs must exist before anything touches it."""
    if backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )


def format_cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1e}" if isinstance(value, float) else str(value)


COLUMNS = (
    "backend",
    "label",
    "mask source",
    "builtin gap",
    "kmask gap",
    "one-device gap",
    "logged loss rel. error",
)


def markdown(table_rows: list[dict[str, Any]]) -> str:
    """The table of every setup but the one-device baseline."""
    lines = ["| " + " | ".join(COLUMNS).replace("label", "setup") + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in table_rows:
        if row["setup"] == "one_device":
            continue
        lines.append("| " + " | ".join(format_cell(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def failures(table_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checked = ("kmask gap", "one-device gap", "logged loss rel. error")
    return [
        row
        for row in table_rows
        if not all(row[column] <= TOLERANCE for column in checked)  # NaN fails
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the table of every installed backend's setups; 1 if any kmask
    gap is above `TOLERANCE`."""
    parser = argparse.ArgumentParser(
        prog="python -m kmask.parity_devices", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS)
    parser.add_argument("--setups", nargs="+", help="default: every one")
    parser.add_argument("--no-builtin", action="store_true", help="kmask only")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--process", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.process:
        # Skip interpreter teardown: with gloo's threads alive it can hang.
        try:
            _process(json.loads(args.process), args.rank)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)
    if args.worker:  # the caller judges the rows
        _setup_before_import(args.worker)
        found = rows(args.worker, args.setups, builtin=not args.no_builtin)
        with open(args.json, "w") as handle:
            json.dump(found, handle)
        return 0
    backends = args.backends or [
        b for b in BACKENDS if importlib.util.find_spec(b) is not None
    ]
    found = []
    for backend in backends:
        found += run_backend(backend, args.setups, builtin=not args.no_builtin)
    print(markdown(found))
    print(
        f"\ngap: largest |weight - NumPy full-batch SGD weight| after {EPOCHS} "
        "steps; one-device gap: the same against kmask on one device; logged "
        "loss: the first loss fit() logs against the NumPy global token mean."
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(found, handle, indent=1)
    for row in failures(found):
        print(f"FAILED: {row}")
    return 1 if failures(found) else 0


if __name__ == "__main__":
    sys.exit(main())
