"""Exact token means across devices and across gradient-accumulation steps."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

import keras
import numpy as np
import pytest

import kmask
from tools.backends import (
    REPOSITORY,
    backend_environment,
    finish,
    launch,
    run_in_own_session,
)
from tools.parity.devices import data as device_data
from tools.parity.devices.processes import reserve_ports, wait_for_each_other

BACKEND = keras.backend.backend()


def np_window_weights(weights, batch_size, steps):
    """NumPy reference: steps * w / sum(w) over each window of steps batches."""
    weights = np.asarray(weights, "float64")
    window = batch_size * steps
    out = np.zeros_like(weights)
    for start in range(0, len(weights), window):
        chunk = weights[start : start + window]
        out[start : start + window] = chunk * steps / chunk.sum() if chunk.sum() else 0
    return out


@pytest.mark.parametrize(("batch_size", "steps"), [(1, 2), (2, 2), (1, 4), (3, 2)])
def test_accumulation_weights_match_numpy(batch_size, steps):
    rng = np.random.default_rng(batch_size * 10 + steps)
    lengths = rng.integers(0, 7, size=batch_size * steps * 2)
    mask = np.arange(6)[None, :] < lengths[:, None]
    actual = kmask.accumulation_weights(mask, batch_size, steps)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(
        actual, np_window_weights(mask, batch_size, steps), rtol=1e-6
    )


def test_accumulated_window_sums_equal_the_window_token_mean():
    """Averaging the micro-batch losses (as the optimizer averages gradients)
    gives the token mean of the window, checked in NumPy."""
    rng = np.random.default_rng(0)
    per_step = rng.normal(size=(8, 5))
    mask = np.arange(5)[None, :] < np.array([5, 5, 5, 5, 1, 1, 2, 1])[:, None]
    weights = kmask.accumulation_weights(mask, 2, 4)
    micro_losses = [
        (per_step[i : i + 2] * weights[i : i + 2]).sum() for i in range(0, 8, 2)
    ]
    np.testing.assert_allclose(np.mean(micro_losses), per_step[mask].mean(), rtol=1e-6)


def test_accumulation_weights_need_complete_windows():
    with pytest.raises(ValueError, match=r"multiple of batch_size \* steps.*5 samples"):
        kmask.accumulation_weights(np.ones((5, 3)), 2, 2)


def test_accumulation_batches_rewrite_each_window():
    rng = np.random.default_rng(1)
    masks = [
        np.arange(4)[None, :] < rng.integers(0, 5, size=(3,))[:, None] for _ in range(4)
    ]
    batches = [(f"x{i}", f"y{i}", mask) for i, mask in enumerate(masks)]
    out = list(kmask.accumulation_batches(iter(batches), steps=2))
    assert [x for x, _, _ in out] == ["x0", "x1", "x2", "x3"]
    expected = np_window_weights(np.concatenate(masks), batch_size=3, steps=2)
    np.testing.assert_allclose(
        np.concatenate([w for _, _, w in out]), expected, rtol=1e-6
    )


def test_all_padding_window_gives_zero_weights():
    out = kmask.accumulation_weights(np.zeros((4, 3), bool), 2, 2)
    assert np.all(out == 0)


def test_single_process_denominator_is_local():
    values = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "float32")
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    expected = values[mask].mean()
    assert float(kmask.masked_reduce(values, mask)) == pytest.approx(expected)
    with kmask.distribute.local():
        assert float(kmask.masked_reduce(values, mask)) == pytest.approx(expected)


def test_local_divides_by_this_replicas_own_count(monkeypatch):
    """Two replicas, as a backend's all-reduce would show them: every reduction
    that divides uses the global denominator, except inside `local()`."""
    monkeypatch.setattr(kmask.distribute, "_replica_denominator", lambda d: d * 2.0)
    values = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "float32")
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    token_sum = values[mask].sum()
    per_sequence = (values * mask).sum(1) / mask.sum(1)
    expected = {
        "token_mean": token_sum / (2 * mask.sum()),
        "sequence_mean": per_sequence.sum() / (2 * 2),
        "sum_over_batch_size": token_sum / (2 * mask.sum()),
    }
    for reduction, global_mean in expected.items():
        found = float(kmask.masked_reduce(values, mask, reduction))
        assert found == pytest.approx(global_mean), reduction
        with kmask.distribute.local():
            found = float(kmask.masked_reduce(values, mask, reduction))
        assert found == pytest.approx(2 * global_mean), reduction
    assert float(kmask.masked_reduce(values, mask, "sum")) == pytest.approx(token_sum)


def test_reserved_ports_are_kept_for_the_workers_servers():
    """Between the parent picking the workers' ports and the workers binding
    them, no bind to port 0 and no plain bind may take them; a server that
    binds with SO_REUSEADDR, as gRPC's does, still can."""
    ports = reserve_ports(2)
    assert len(set(ports)) == 2
    for port in ports:
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("0.0.0.0", port))
            server.listen(1)


def test_a_rank_waits_for_the_other_before_it_exits(tmp_path):
    """A TensorFlow worker that exits as soon as its own last step is done
    fails its peer, still fetching that step's last buffer from it."""
    waiting = threading.Thread(
        target=wait_for_each_other, args=(str(tmp_path), 0), daemon=True
    )
    waiting.start()
    waiting.join(timeout=0.5)
    assert waiting.is_alive(), "rank 0 went on before rank 1 got there"
    wait_for_each_other(str(tmp_path), 1)
    waiting.join(timeout=10)
    assert not waiting.is_alive()


# ----------------------------------------------------------------------------
# The global count itself, fast: two replicas in child processes, no fit().

# Two replicas whose real-token counts differ (3 and 1): a replica that divides
# by its own count (7/3 and 8 against 7/4 and 8/4), or on PyTorch by the summed
# count without DDP's / world size (half the value), gives other numbers.
REPLICA_VALUES = [
    [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
    [[7.0, 8.0, 9.0], [1.0, 1.0, 1.0]],
]
REPLICA_MASKS = [[[1, 1, 0], [1, 0, 0]], [[0, 1, 0], [0, 0, 0]]]

TORCH_REPLICA = """
import json, sys
import numpy as np
import torch.distributed as dist
import kmask

rank, store, values, masks = int(sys.argv[1]), sys.argv[2], *json.loads(sys.argv[3])
dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
try:
    value = kmask.masked_reduce(np.float32(values[rank]), np.bool_(masks[rank]))
    print(json.dumps(float(value)))
finally:
    dist.destroy_process_group()
"""

TENSORFLOW_REPLICAS = """
import json, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
import kmask

values, masks = json.loads(sys.argv[1])
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
per_replica = [
    strategy.experimental_distribute_values_from_function(
        lambda context, rows=rows, dtype=dtype: tf.cast(
            rows[context.replica_id_in_sync_group], dtype
        )
    )
    for rows, dtype in ((values, tf.float32), (masks, tf.bool))
]
found = strategy.run(tf.function(kmask.masked_reduce), args=per_replica)
print(json.dumps([float(v) for v in strategy.experimental_local_results(found)]))
"""


def np_replica_token_means(world_divides: bool) -> list[float]:
    """NumPy: each replica's sum over the global count (times the world size
    where the gradients are averaged, as DDP does, rather than summed)."""
    values, masks = np.asarray(REPLICA_VALUES), np.asarray(REPLICA_MASKS, bool)
    global_count = masks.sum()
    scale = len(values) if world_divides else 1
    return [
        scale * replica_values[replica_mask].sum() / global_count
        for replica_values, replica_mask in zip(values, masks, strict=True)
    ]


def _replica_payload() -> str:
    return json.dumps([REPLICA_VALUES, REPLICA_MASKS])


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed")
def test_torch_processes_divide_by_the_global_count_over_world_size(tmp_path):
    """Two gloo processes on this machine (a file store, no network): each
    divides by the all-reduced count / 2, so DDP's mean of the two equals the
    token mean of the whole batch."""
    store = f"file://{tmp_path / 'store'}"
    command = [sys.executable, "-c", TORCH_REPLICA]
    env = backend_environment("torch")
    ranks = [
        launch([*command, str(rank), store, _replica_payload()], env, REPOSITORY)
        for rank in range(2)
    ]
    codes = finish(ranks, timeout=120)
    outputs = [rank.communicate() for rank in ranks]
    assert codes == [0, 0], outputs
    found = [json.loads(stdout) for stdout, _ in outputs]
    expected = np_replica_token_means(world_divides=True)
    np.testing.assert_allclose(found, expected, rtol=1e-6)
    global_mean = np.asarray(REPLICA_VALUES)[np.asarray(REPLICA_MASKS, bool)].mean()
    assert np.mean(found) == pytest.approx(global_mean)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_tensorflow_replicas_divide_by_the_summed_count():
    """`MirroredStrategy` over two logical CPUs (set before TensorFlow starts,
    so in a process of its own): each replica divides by the count summed
    over both, so Keras's sum of the two equals the whole batch's token mean."""
    command = [sys.executable, "-c", TENSORFLOW_REPLICAS, _replica_payload()]
    env = backend_environment("tensorflow")
    completed = run_in_own_session(command, env, 120, cwd=REPOSITORY)
    assert completed.returncode == 0, completed.stderr[-4000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = np_replica_token_means(world_divides=False)
    np.testing.assert_allclose(found, expected, rtol=1e-6)
    global_mean = np.asarray(REPLICA_VALUES)[np.asarray(REPLICA_MASKS, bool)].mean()
    assert sum(found) == pytest.approx(global_mean)


@pytest.fixture(scope="module")
def multi_device_rows(tmp_path_factory):
    """Runs `python -m tools.parity.devices` for this backend: every setup, 2
    devices or 2 processes each, in child processes of its own."""
    out = tmp_path_factory.mktemp("multi_device") / "rows.json"
    command = [sys.executable, "-m", "tools.parity.devices", "--backends", BACKEND]
    command += ["--json", str(out)]
    completed = run_in_own_session(command, dict(os.environ), 900, cwd=REPOSITORY)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_setup_is_measured(multi_device_rows):
    extra = {
        "tensorflow": {"two_workers"},
        "jax": {"data_and_model_axes"},
        "torch": set(),
    }[BACKEND]
    found = {(row["setup"], row["mask source"]) for row in multi_device_rows}
    setups = {"one_device", "two_devices", "accumulation_2", "accumulation_4"}
    assert found == {
        (setup, source)
        for setup in setups | extra
        for source in ("propagated_mask", "mask_value_nan")
    }


def test_each_setup_trains_on_the_devices_it_names(multi_device_rows):
    """A scope that `fit` left before training would run on one device and
    pass every gap below without testing anything."""
    for row in multi_device_rows:
        expected = 1 if row["setup"].startswith(("one_", "accumulation_")) else 2
        assert row["replicas"] == expected, row


def test_rows_hold_the_numpy_full_batch_weights(multi_device_rows):
    """The gaps are recomputed here from the raw weights and a NumPy SGD of
    this test's own, so a wrong gap in the harness cannot pass."""
    x, y, _, valid = device_data.make_data()
    kernel = device_data.initial_weights()[0].astype("float64")
    bias = device_data.initial_weights()[1].astype("float64")
    expected = []
    for step in range(1, max(device_data.EPOCHS) + 1):
        error = np.where(valid, (x @ kernel + bias)[..., 0] - y[..., 0], 0.0)
        kernel = kernel - 0.1 * 2 * np.einsum("bt,btf->f", error, x)[:, None] / 28
        bias = bias - 0.1 * 2 * error.sum(keepdims=True).reshape(1) / 28
        if step in device_data.EPOCHS:
            expected.append(np.concatenate([kernel.ravel(), bias]))
    assert valid.sum() == 28
    for row in multi_device_rows:
        np.testing.assert_allclose(row["weights"], expected, rtol=0, atol=1e-5)
        assert row["kmask gap"] <= 1e-5, row


def test_kmask_matches_one_device_and_logs_the_global_mean(multi_device_rows):
    one_device = {
        row["mask source"]: np.asarray(row["weights"])
        for row in multi_device_rows
        if row["setup"] == "one_device"
    }
    x, y, _, valid = device_data.make_data()
    kernel, bias = device_data.initial_weights()
    reference_loss = ((x @ kernel + bias)[..., 0] - y[..., 0])[valid] ** 2
    for row in multi_device_rows:
        gap = np.abs(np.asarray(row["weights"]) - one_device[row["mask source"]])
        assert gap.max() <= 1e-5, row
        assert row["logged loss"] == pytest.approx(reference_loss.mean(), rel=1e-5)


def test_the_setups_are_sharp_enough_to_catch_a_per_replica_mean(multi_device_rows):
    """Keras's built-in loss is visibly off where it divides per replica or per
    micro-batch, so a kmask that did the same would fail the tests above."""
    exact_builtin = {"DataParallel, 2 CPUs", "ModelParallel, batch 2 x model 1"}
    measured = [row for row in multi_device_rows if row["builtin gap"] is not None]
    assert len(measured) == len(multi_device_rows) // 2 - 1
    for row in measured:
        if row["label"] in exact_builtin:
            assert row["builtin gap"] <= 1e-5, row  # the loss sees the global array
        else:
            assert row["builtin gap"] > 1e-2, row
