"""The training-mode matrix of one backend as a Markdown table.

    KERAS_BACKEND=jax python -m tools.modes_table           # runs the tests
    python -m tools.modes_table --junitxml modes.xml        # reads a run's

The table is what tests/test_modes.py found (run here with pytest's
`--junitxml` unless a file is given), so its warnings-are-errors settings
and its NumPy checks are the table's: a cell reads `pass`, `FAIL: <error>`
or `not supported by Keras: <reason>`. `--worker` runs cells in this
process and writes JSON: tests/test_modes.py runs every `model_parallel` cell
that way, in one child with 8 JAX CPU devices.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import re
import sys
import tempfile
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence

from tools.backends import REPOSITORY, backend_environment, run_in_own_session
from tools.modes import MESH, MODES, REGISTRY, unsupported

NOT_SUPPORTED = "not supported by Keras: "  # tests/test_modes.py's skip reason
TESTS_TIMEOUT = 3600  # seconds, for tests/test_modes.py on one backend


def environment(backend: str) -> dict[str, str]:
    """The child's environment: `KERAS_BACKEND`, and 8 CPU devices for JAX
    (set before JAX is imported, which only a new process guarantees)."""
    env = backend_environment(backend, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == "jax":
        devices = MESH[0] * MESH[1]
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def run_cells(
    objects: Sequence[str], modes: Sequence[str], filters: Sequence[str] = ()
) -> dict[str, dict]:
    """Runs the cells in this process, warnings filtered by `filters` (the
    test passes pytest's, so a cell fails here where it would there):
    `{"Object-mode": {"error": None or the error's first line, "traceback":
    ..., **measured}}`, unsupported cells with their reason and no error."""
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
                with warnings.catch_warnings():
                    apply_warning_filters(filters)
                    try:
                        found[cell] = {"error": None, **run_cell(entry, mode, folder)}
                    except Exception as error:  # reported, one cell at a time
                        last = f"{type(error).__name__}: {error}".strip()
                        found[cell] = {
                            "error": last.splitlines()[0][:300],
                            "traceback": traceback.format_exc()[-4000:],
                        }
    return found


def apply_warning_filters(filters: Sequence[str]) -> None:
    """pytest's `filterwarnings` lines (`action:message:category:module`),
    applied as pytest applies them, the last one first."""
    for line in filters:
        action, message, category, module = (line.split(":", 3) + [""] * 3)[:4]
        warnings.filterwarnings(
            action,
            message,
            getattr(builtins, category) if category else Warning,
            module,
        )


def run_tests(backend: str, junitxml: str, timeout: float) -> None:
    """tests/test_modes.py for `backend` in a child process, into `junitxml`."""
    command = [sys.executable, "-m", "pytest", "tests/test_modes.py", "-q"]
    command += ["-k", "test_mode", f"--junitxml={junitxml}"]
    env = backend_environment(backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")
    child = run_in_own_session(command, env, timeout, cwd=str(REPOSITORY))
    if not os.path.exists(junitxml):
        raise RuntimeError(
            f"pytest wrote no {junitxml} on {backend}:\n"
            + child.stdout[-2000:]
            + child.stderr[-4000:]
        )


def read_junitxml(path: str) -> dict[str, str]:
    """`{"Object-mode": "pass" | "FAIL: ..." | "not supported by Keras: ..."}`
    from pytest's JUnit XML."""
    cells = {}
    for case in ElementTree.parse(path).iter("testcase"):
        match = re.fullmatch(r"test_mode\[(.+)\]", case.get("name", ""))
        if not match:
            continue
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            cells[match.group(1)] = "FAIL: " + _first_line(failure.get("message", ""))
        elif skipped is not None:
            reason = skipped.get("message", "").removeprefix("Skipped: ")
            cells[match.group(1)] = reason
        else:
            cells[match.group(1)] = "pass"
    return cells


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return (lines[0] if lines else "?")[:110]


def markdown(backend: str, cells: dict[str, str], modes: Sequence[str]) -> str:
    """One row per object, one column per mode; Keras's reasons, numbered,
    under the table."""
    lines = [
        f"| {backend} | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    reasons: list[str] = []
    for entry in REGISTRY:
        row = []
        for mode in modes:
            cell = cells.get(f"{entry.name}-{mode}", "")
            if cell.startswith(NOT_SUPPORTED):
                reason = cell.removeprefix(NOT_SUPPORTED)
                if reason not in reasons:
                    reasons.append(reason)
                cell = f"not supported by Keras ({reasons.index(reason) + 1})"
            row.append(cell.replace("|", "\\|"))
        lines.append(f"| {entry.name} | " + " | ".join(row) + " |")
    lines += [""] + [f"({n}) {reason}" for n, reason in enumerate(reasons, 1)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the table; 1 if any cell failed."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.modes_table", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--junitxml", nargs="+", help="read these pytest results (a later one wins)"
    )
    parser.add_argument("--objects", nargs="+", default=[e.name for e in REGISTRY])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warning-filters", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # the caller judges the cells
        filters = json.loads(args.warning_filters)
        found = run_cells(args.objects, args.modes, filters)
        with open(args.json, "w") as handle:
            json.dump(found, handle)
        return 0
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if args.junitxml:
        cells = {}
        for path in args.junitxml:
            cells.update(read_junitxml(path))
    else:
        with tempfile.TemporaryDirectory(prefix="kmask-modes-") as folder:
            path = os.path.join(folder, "modes.xml")
            run_tests(backend, path, TESTS_TIMEOUT)
            cells = read_junitxml(path)
    print(markdown(backend, cells, args.modes))
    return 1 if any(cell.startswith("FAIL") for cell in cells.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
