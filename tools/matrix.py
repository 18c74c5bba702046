"""The Keras x backend table of docs/measured.md, read from the log of the test command.

    python -m nox 2>&1 | tee nox.log
    python -m tools.matrix nox.log

Each `tests-*` session prints the Keras it runs (`Keras 3.15.1`), then
pytest's closing line, then nox's verdict; this turns them into one Markdown
row per session: Keras version, backend, passed, failed, skipped, pytest's
time and the session's time as nox reports it (installs included).
"""

from __future__ import annotations

import argparse
import re
import sys

SESSION = re.compile(r"nox > Running session (\S+)")
KERAS = re.compile(r"^Keras (\S+)$")
PYTEST = re.compile(r"=+ (.*) in ([\d.]+)s")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?)")
VERDICT = re.compile(r"nox > Session (tests-[\w-]+) (was successful|failed) in (.+)\.$")


def parse(lines: list[str]) -> list[dict]:
    rows, row = [], None
    for line in lines:
        line = line.rstrip()
        if match := SESSION.search(line):
            row = None
            if match.group(1).startswith("tests-"):
                row = {"session": match.group(1), "keras": "?", "counts": {}}
                rows.append(row)
        elif row is None:
            continue
        elif match := KERAS.match(line):
            row["keras"] = match.group(1)
        elif (match := PYTEST.search(line)) and COUNT.search(match.group(1)):
            row["counts"] = {
                kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                for n, kind in COUNT.findall(match.group(1))
            }
            row["pytest_s"] = float(match.group(2))
        elif match := VERDICT.search(line):
            row["ok"] = match.group(2) == "was successful"
            row["session_time"] = match.group(3)
    return rows


def table(rows: list[dict]) -> str:
    header = (
        "session",
        "Keras",
        "backend",
        "passed",
        "failed",
        "skipped",
        "pytest s",
        "session",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        counts = row["counts"]
        lines.append(
            "| "
            + " | ".join(
                [
                    row["session"],
                    row["keras"],
                    row["session"].rsplit("-", 1)[-1],
                    str(counts.get("passed", 0)),
                    str(counts.get("failed", 0) + counts.get("error", 0)),
                    str(counts.get("skipped", 0)),
                    f"{row.get('pytest_s', float('nan')):.0f}",
                    ("" if row.get("ok") else "FAILED, ")
                    + row.get("session_time", "?"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="the output of `python -m nox`")
    args = parser.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as log:
        rows = parse(log.readlines())
    print(table(rows))
    return 0 if rows and all(row.get("ok") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
