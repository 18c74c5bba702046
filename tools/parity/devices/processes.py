"""The device setups that need two processes: PyTorch DDP over gloo, and
TensorFlow `MultiWorkerMirroredStrategy` over 2 workers on localhost; each
rank is `python -m tools.parity.devices --process ... --rank R`."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from tools.backends import finish, launch
from tools.parity.devices.data import EPOCHS, LEARNING_RATE, flat, make_data
from tools.parity.devices.training import build_model, source_loss

MODULE = (sys.executable, "-m", "tools.parity.devices")
PAIR_TIMEOUT = 180  # seconds, for a pair of processes


def run_processes(setup: str, source: str, which: str):
    """Runs 2 processes of `python -m tools.parity.devices --process`; returns
    the weights (checked equal on both ranks), the mean of the ranks' first
    losses and the number of replicas they trained on."""
    with tempfile.TemporaryDirectory(prefix="kmask-devices-") as folder:
        logs = [open(os.path.join(folder, f"rank{rank}.log"), "w") for rank in (0, 1)]  # noqa: SIM115
        case = json.dumps([setup, source, which, folder, reserve_ports(2)])
        processes = [
            launch(
                [*MODULE, "--process", case, "--rank", str(rank)],
                stdout=logs[rank],
                stderr=subprocess.STDOUT,
            )
            for rank in (0, 1)
        ]
        codes = finish(processes, PAIR_TIMEOUT)
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


def reserve_ports(count: int) -> list[int]:
    """`count` distinct ports for the TensorFlow workers' gRPC servers, each
    left in TIME_WAIT by a connection closed from its own side. A port merely
    found free (bound to port 0, then closed) is free for anyone until a worker
    binds it: another bind to port 0 on this machine (gloo, a gRPC server, a
    second test run) could take it first. The kernel hands out no port in
    TIME_WAIT to a bind to port 0 or to an outgoing connection for about 60 s,
    while the gRPC server, which binds with SO_REUSEADDR, may take it."""
    with contextlib.ExitStack() as stack:
        listeners = [stack.enter_context(socket.socket()) for _ in range(count)]
        for listener in listeners:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname()):
                accepted, _ = listener.accept()
                # The side that closes first is left in TIME_WAIT: the
                # accepted socket, on the listener's port.
                accepted.close()
        return [listener.getsockname()[1] for listener in listeners]


def _tail(path: str) -> str:
    with open(path) as handle:
        return handle.read()[-3000:]


def run_rank(case: list, rank: int) -> None:
    """One of the 2 processes: trains on its half of the batch."""
    setup, source, which, folder, ports = case
    x, y, y_nan, _ = make_data()
    loss, key, masking = source_loss(source, which)
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
    wait_for_each_other(folder, rank)


def wait_for_each_other(folder: str, rank: int) -> None:
    """Returns once both ranks have got here (the parent's `PAIR_TIMEOUT`
    bounds the wait). A rank must not exit as soon as its own last collective
    is done: a TensorFlow worker's all-reduce can complete while its peer is
    still fetching the last buffer from it (`RecvBuf`), and a worker that
    exits then fails its peer ("Collective ops is aborted by: Socket closed",
    or "... recvmsg:Connection reset by peer")."""
    open(os.path.join(folder, f"rank{rank}.done"), "w").close()
    other = os.path.join(folder, f"rank{1 - rank}.done")
    while not os.path.exists(other):
        time.sleep(0.01)


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
        snapshots.append(flat(model.get_weights()))
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
        snapshots.append(flat(model.get_weights()))
    # The first loss is the replicas' sum: the global loss.
    return snapshots, losses[0], strategy.num_replicas_in_sync
