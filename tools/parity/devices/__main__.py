"""`python -m tools.parity.devices`: the table in docs/concepts/distributed.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

from tools.backends import BACKENDS, installed_backends
from tools.parity import devices
from tools.parity.devices.data import EPOCHS
from tools.parity.devices.processes import run_rank
from tools.parity.devices.rows import (
    failures,
    markdown,
    rows,
    run_backend,
    setup_before_import,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the table of every installed backend's setups; 1 if any kmask
    gap is above `TOLERANCE`."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.parity.devices",
        description=devices.__doc__.splitlines()[0],
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
            run_rank(json.loads(args.process), args.rank)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)
    if args.worker:  # the caller judges the rows
        setup_before_import(args.worker)
        found = rows(args.worker, args.setups, builtin=not args.no_builtin)
        with open(args.json, "w") as handle:
            json.dump(found, handle)
        return 0
    backends = args.backends or installed_backends()
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
