"""The training-mode matrix of one backend as a Markdown table.

    python -m tools.modes_table --backend jax
    python -m tools.modes_table --backend torch --objects Perplexity --modes eager

Each backend runs in a child process of its own (JAX with 8 CPU devices, for
`model_parallel`); a cell reads `pass`, `FAIL: <error>`, or `not supported
by Keras: <reason>`. tests/test_modes.py runs the `model_parallel` cells
through `--worker` once per session.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence

from tools.backends import BACKENDS, backend_environment, run_in_own_session
from tools.modes import MESH, MODES, REGISTRY, unsupported

WORKER_TIMEOUT = 1800  # seconds, for every cell of one backend


def environment(backend: str) -> dict[str, str]:
    """The child's environment: `KERAS_BACKEND`, and 8 CPU devices for JAX
    (set before JAX is imported, which only a new process guarantees)."""
    env = backend_environment(backend, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == "jax":
        devices = MESH[0] * MESH[1]
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def run_cells(objects: Sequence[str], modes: Sequence[str]) -> dict[str, dict]:
    """Runs the cells in this process: `{"Object-mode": {"error": None or
    the error's last line, "traceback": ..., **measured}}`, unsupported
    cells with their reason and no error."""
    import keras

    from tools.modes import run_cell

    backend = keras.backend.backend()
    found: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kmask-modes-") as folder:
        for entry in REGISTRY:
            if entry.name not in objects:
                continue
            for mode in modes:
                cell = f"{entry.name}-{mode}"
                reason = unsupported(backend, mode)
                if reason:
                    found[cell] = {"error": None, "unsupported": reason}
                    continue
                try:
                    found[cell] = {"error": None, **run_cell(entry, mode, folder)}
                except Exception as error:  # reported, one cell at a time
                    last = f"{type(error).__name__}: {error}".strip().splitlines()
                    found[cell] = {
                        "error": last[0][:300] if last else type(error).__name__,
                        "traceback": traceback.format_exc()[-4000:],
                    }
    return found


def run_backend(
    backend: str, objects: Sequence[str], modes: Sequence[str], timeout: float
) -> dict[str, dict]:
    """`run_cells` in a child process for `backend`."""
    with tempfile.TemporaryDirectory(prefix="kmask-modes-") as folder:
        path = os.path.join(folder, "cells.json")
        command = [sys.executable, "-m", "tools.modes_table", "--worker"]
        command += ["--json", path, "--objects", *objects, "--modes", *modes]
        child = run_in_own_session(command, environment(backend), timeout)
        if child.returncode != 0:
            raise RuntimeError(
                f"python -m tools.modes_table --worker failed on {backend}:\n"
                + child.stdout[-2000:]
                + child.stderr[-4000:]
            )
        with open(path) as handle:
            return json.load(handle)


def markdown(backend: str, cells: dict[str, dict], modes: Sequence[str]) -> str:
    lines = [
        f"| {backend} | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for entry in REGISTRY:
        row = []
        for mode in modes:
            cell = cells.get(f"{entry.name}-{mode}")
            if cell is None:
                row.append("")
            elif cell.get("unsupported"):
                row.append(f"not supported by Keras: {cell['unsupported']}")
            elif cell["error"]:
                row.append("FAIL: " + cell["error"].replace("|", "\\|")[:120])
            else:
                row.append("pass")
        if any(row):
            lines.append(f"| {entry.name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints each backend's table; 1 if any cell failed."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.modes_table", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument("--objects", nargs="+", default=[e.name for e in REGISTRY])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--json", help="write the cells to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # the caller judges the cells
        found = run_cells(args.objects, args.modes)
        with open(args.json, "w") as handle:
            json.dump(found, handle)
        return 0
    failed = False
    everything = {}
    for backend in args.backend:
        cells = run_backend(backend, args.objects, args.modes, WORKER_TIMEOUT)
        everything[backend] = cells
        print(markdown(backend, cells, args.modes) + "\n")
        failed |= any(cell["error"] for cell in cells.values())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(everything, handle, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
