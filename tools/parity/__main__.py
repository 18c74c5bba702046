"""`python -m tools.parity`: the command line, and the parent that runs one
child process per backend, compares their outputs and reports (see
`tools/parity/__init__.py`)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from tools.backends import (
    BACKENDS,
    backend_environment,
    finish,
    installed_backends,
    launch,
)
from tools.parity.cases import Case
from tools.parity.compare import BackendRun, compare, one_device_gaps
from tools.parity.report import json_report, summary, table
from tools.parity.runner import PROGRESS, run_cases
from tools.parity.suite import build_suite

# A backend's child that runs longer than this is stuck (it takes 1-2 minutes).
CHILD_TIMEOUT = 1800


def _write_inputs(workdir: Path, cases: list[Case]) -> None:
    arrays = {
        f"{index}__{name}": array
        for index, case in enumerate(cases)
        for name, array in case.inputs.items()
    }
    np.savez(workdir / "inputs.npz", **arrays)
    manifest = [
        {
            "name": case.name,
            "runner": case.runner,
            "spec": case.spec,
            "dtype": case.dtype,
            "inputs": list(case.inputs),
        }
        for case in cases
    ]
    (workdir / "cases.json").write_text(json.dumps(manifest))


def _run_children(
    cases: list[Case], backends: Sequence[str], console: Console
) -> dict[str, BackendRun]:
    """Runs every backend's child at once, with a progress bar each."""
    runs: dict[str, BackendRun] = {}
    with tempfile.TemporaryDirectory(prefix="kmask-parity-") as directory:
        workdir = Path(directory)
        _write_inputs(workdir, cases)
        columns = (
            "{task.description:>10}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            threads = [
                threading.Thread(
                    target=_run_child,
                    args=(workdir, backend, len(cases), progress, runs),
                )
                for backend in backends
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    return {backend: runs[backend] for backend in backends}  # not finishing order


def _run_child(workdir, backend, total, progress, runs) -> None:
    task = progress.add_task(backend, total=total)
    environment = backend_environment(backend)
    command = [sys.executable, "-m", "tools.parity", "--child", str(workdir)]
    started = time.perf_counter()
    log_path = workdir / f"{backend}.log"
    with open(log_path, "w") as log:
        child = launch(command, environment, stderr=log)
        for line in child.stdout:
            if line.startswith(PROGRESS):
                progress.update(task, completed=int(line.split()[1]))
            else:
                log.write(line)
        [returncode] = finish([child], CHILD_TIMEOUT)
    seconds = time.perf_counter() - started
    outputs, meta = {}, {}
    if returncode == 0:
        with np.load(workdir / f"{backend}.npz") as stored:
            outputs = dict(stored)
        meta = json.loads((workdir / f"{backend}.json").read_text())
    runs[backend] = BackendRun(
        backend, outputs, meta, returncode, log_path.read_text(), seconds
    )
    status = "done" if returncode == 0 else f"exited with status {returncode}"
    if returncode is None:
        status = f"killed after {CHILD_TIMEOUT} s"
    progress.console.print(f"{backend}: {status} in {seconds:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the parity suite; the command line of `python -m tools.parity`.

    Args:
        argv: Command-line arguments; `sys.argv[1:]` when `None`.

    Returns:
        0 when every output of every backend is within tolerance, 1 when one
        is not (or a backend failed), 2 on a bad command line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tools.parity",
        description="Compare kmask's losses, metrics and layers across Keras "
        "backends and against float64 NumPy.",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        help="the backends to run (default: every one installed)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=(),
        metavar="TEXT",
        help="run only the cases whose name contains one of these",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the results here"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_cases(args.child)
        return 0
    console = Console(width=None if sys.stdout.isatty() else 140)
    cases = build_suite(args.cases)
    if args.list:
        for case in cases:
            console.print(case.name, case.dtype, highlight=False)
        console.print(f"{len(cases)} cases")
        return 0
    if not cases:
        parser.error(f"no case name contains any of {list(args.cases)}")
    backends = args.backends or installed_backends()
    missing = [backend for backend in backends if not importlib.util.find_spec(backend)]
    if missing or not backends:
        parser.error(f"backends not installed: {missing or list(BACKENDS)}")
    started = time.perf_counter()
    console.print(f"{len(cases)} cases on {', '.join(backends)}, one process each")
    runs = _run_children(cases, backends, console)
    seconds = time.perf_counter() - started
    results = compare(cases, runs)
    failures = [message for result in results for message in result["failures"]]
    device_gaps, device_failures = one_device_gaps(results)
    failures += device_failures
    for backend, run in runs.items():
        if run.returncode != 0:
            failures.insert(
                0, f"{backend}: the child exited with status {run.returncode}"
            )
            console.print(
                f"[red]{backend} log:[/red]\n{run.log[-4000:]}", highlight=False
            )
    console.print(table(results, backends, runs))
    for line in summary(results, backends):
        console.print(line, highlight=False)
    for backend, gaps in device_gaps.items():
        console.print(
            f"{backend}, one device vs "
            + "; ".join(f"{setup}: {gap:.1e}" for setup, gap in gaps.items()),
            highlight=False,
        )
    if args.json:
        report = json_report(results, runs, failures, seconds)
        report["one_device_gaps"] = device_gaps
        args.json.write_text(json.dumps(report, indent=1, allow_nan=False))
        console.print(f"results written to {args.json}")
    console.print(
        f"{len(cases)} cases x {len(backends)} backends in {seconds:.1f} s: "
        + ("all within tolerance" if not failures else f"{len(failures)} failures"),
        highlight=False,
    )
    for message in failures[:20]:
        console.print(f"[red]FAIL[/red] {message}", highlight=False, soft_wrap=True)
    if len(failures) > 20:
        console.print(f"... and {len(failures) - 20} more", highlight=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
