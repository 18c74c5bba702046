"""What the benchmarks share: one child process per backend, timing, memory,
Markdown tables.

Not a benchmark itself (the leading underscore); each benchmark imports it
from its own folder. The backend list, the child's environment and the
value-and-grad dispatcher come from `tools.backends`, shared with the tests
and the parity harness. Nothing here imports a backend until a child asks.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# A benchmark runs as a script, `python benchmarks/masked_ce.py`, which puts
# benchmarks/ on sys.path but not the repository root, where tools/ lives.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.backends import (
    backend_environment,
    finish,
    installed_backends,
    launch,
    value_and_grad,
)

# A child that runs longer than this is stuck, not slow (the largest one
# takes a few minutes on 2 cores).
CHILD_TIMEOUT = 3600

__all__ = [
    "backend_info",
    "discard_outputs",
    "installed_backends",
    "interleaved_medians",
    "machine",
    "markdown_table",
    "peak_rss_mib",
    "reset_peak_rss",
    "rss_mib",
    "run_child",
    "value_and_grad",
    "write_json",
]


def discard_outputs(path: str) -> None:
    """Deletes the outputs `measure_step` saved at `path`, and the temporary
    folder that holds them."""
    saved = Path(path)
    saved.unlink()
    saved.parent.rmdir()


def run_child(script: Path, backend: str, arguments: Sequence[str]) -> dict:
    """Runs `script --child ... arguments` with `KERAS_BACKEND=backend` and
    returns the JSON it writes; the children run one after another, so that
    they do not compete for the CPU."""
    with tempfile.TemporaryDirectory(prefix="kmask-bench-") as directory:
        out = Path(directory) / "result.json"
        command = [sys.executable, str(script), "--child", str(out), *arguments]
        environment = backend_environment(backend, TF_CPP_MIN_LOG_LEVEL="3")
        child = launch(command, environment, stdout=None, stderr=None)
        [code] = finish([child], CHILD_TIMEOUT)
        if code != 0 or not out.exists():
            raise SystemExit(
                f"{script.name}: the {backend} child exited with status {code}"
            )
        return json.loads(out.read_text())


def interleaved_medians(
    variants: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Times each variant `warmup + repeats` times, in rounds, rotating the
    order each round so that no variant always runs after the same one;
    the median of the rounds after the warm-up, and every time, in ms."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - started
            if round_index >= warmup:
                times[name].append(elapsed * 1e3)
    return {
        name: {"median_ms": statistics.median(values), "times_ms": values}
        for name, values in times.items()
    }


def rss_mib() -> float:
    """This process's resident memory now (`VmRSS`), in MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """This process's peak resident memory (`VmHWM`) since the last
    `reset_peak_rss()`, in MiB."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Resets the peak (Linux: writing 5 to `/proc/self/clear_refs`)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def machine() -> str:
    """The CPU and how many cores this process may use."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def backend_info() -> dict[str, str]:
    """The backend's version and the device it computes on (in a child)."""
    import keras

    backend = keras.backend.backend()
    module = __import__(backend)
    device = "cpu"
    if backend == "jax":
        device = module.devices()[0].platform
    elif backend == "torch" and module.cuda.is_available():
        device = f"cuda ({module.cuda.get_device_name()})"
    elif backend == "tensorflow" and module.config.list_logical_devices("GPU"):
        device = "gpu"
    return {
        "backend": backend,
        "version": module.__version__,
        "keras": keras.__version__,
        "device": device,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=1))
        print(f"results written to {path}")


def measure_step(
    step: Callable,
    inputs: Sequence[Any],
    variant: str,
    names: Sequence[str],
    repeats: int,
    jax_compiled: Callable | None = None,
) -> dict:
    """One variant's `step(*inputs) -> (loss, grads)` measured in this
    process: the resident memory its first call adds (its peak minus the
    RSS before it), its outputs saved under `names` to an `.npz` file (the
    parent compares the variants), JAX's compiled temporary memory (of
    `jax_compiled`, the jitted function) and the times of `repeats` calls
    after that first one. Returns the report, with `backend_info()`."""
    import numpy as np
    from keras import ops

    before = rss_mib()
    reset_peak_rss()
    loss, grads = step(*inputs)
    peak = peak_rss_mib()
    saved = Path(tempfile.mkdtemp(prefix="kmask-bench-")) / f"{variant}.npz"
    outputs = [loss, *grads]
    arrays = {n: ops.convert_to_numpy(x) for n, x in zip(names, outputs, strict=True)}
    np.savez(saved, **arrays)
    del loss, grads, outputs, arrays
    temp = None
    if jax_compiled is not None:
        analysis = jax_compiled.lower(*inputs).compile().memory_analysis()
        temp = analysis.temp_size_in_bytes
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        result = step(*inputs)
        ops.convert_to_numpy(result[0])
        times.append(time.perf_counter() - started)
        del result
    return {
        **backend_info(),
        "variant": variant,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "step_mib": peak - before,
        "jax_temp_bytes": temp,
        "times_s": times[1:],
        "median_s": statistics.median(times[1:]),
        "outputs": str(saved),
    }


def memory_row(backend: str, variant: str, report: dict) -> list[str]:
    """A `measure_step` report as a table row: backend, variant, peak RSS
    MiB, step MiB, JAX temp MiB (`-` elsewhere), median seconds."""
    temp = report["jax_temp_bytes"]
    return [
        backend,
        variant,
        f"{report['peak_rss_mib']:.0f}",
        f"{report['step_mib']:.0f}",
        "-" if temp is None else f"{temp / 2**20:.0f}",
        f"{report['median_s']:.2f}",
    ]
