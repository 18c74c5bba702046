"""Rows: every setup of one backend, trained and compared with NumPy and with
one device; the worker process that trains them; the Markdown table."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from tools.backends import backend_environment, run_in_own_session
from tools.parity.devices.data import (
    SOURCES,
    TOLERANCE,
    expected_loss,
    expected_weights,
    gap,
    label,
    make_data,
    setups_for,
)
from tools.parity.devices.processes import MODULE, run_processes
from tools.parity.devices.training import (
    data_and_model_axes_scope,
    fit,
    source_loss,
    two_devices_scope,
)

WORKER_TIMEOUT = 900  # seconds, for every setup of one backend


def run_setup(backend: str, setup: str, source: str, which: str):
    """Trains one setup in this process (or in processes it starts): weights
    after each of `EPOCHS`, `[len(EPOCHS), 4]`, and the first logged loss."""
    loss, key, masking = source_loss(source, which)
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
        return fit(loss, targets, masking, scope=data_and_model_axes_scope())
    if setup == "two_devices" and backend != "torch":
        return fit(loss, targets, masking, scope=two_devices_scope(backend))
    return run_processes(setup, source, which)


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
    env = backend_environment(backend, TF_CPP_MIN_LOG_LEVEL="3")
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
        command = [*MODULE, "--worker", backend]
        command += ["--json", path, *(["--no-builtin"] if not builtin else [])]
        if setups:
            command += ["--setups", *setups]
        worker = run_in_own_session(command, _environment(backend), WORKER_TIMEOUT)
        if worker.returncode != 0:
            raise RuntimeError(
                f"{backend} device worker failed:\n{worker.stderr[-4000:]}"
            )
        with open(path) as handle:
            return json.load(handle)


def setup_before_import(backend: str) -> None:
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
