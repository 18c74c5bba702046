"""What a parity run shows: the table, the summary lines and the JSON."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import numpy as np
from rich.table import Table

from tools.parity.compare import ERROR_FLOOR, TOLERANCES, Finding
from tools.parity.sources import SEED


def _format(error: float, tolerance: float) -> str:
    text = "0" if error == 0 else f"{error:.1e}"
    return text if error <= tolerance else f"[red]{text}[/red]"


def table(results, backends, runs) -> Table:
    devices = ", ".join(
        f"{backend} on {runs[backend].meta.get('device', '?')}" for backend in backends
    )
    tolerances = ", ".join(f"{dtype} {tol:.0e}" for dtype, tol in TOLERANCES.items())
    table = Table(
        title=f"kmask parity: worst relative error vs NumPy float64 ({devices})",
        caption=f"gap: worst backend-to-backend; tolerance {tolerances}",
    )
    table.add_column("case")
    table.add_column("dtype")
    for backend in backends:
        table.add_column(backend, justify="right")
    table.add_column("gap", justify="right")
    table.add_column("")
    for result in results:
        tolerance = result["tolerance"]
        cells = []
        for backend in backends:
            finding = result["errors"].get(backend)
            if finding is None:
                cells.append("[red]no run[/red]")
            elif isinstance(finding, str):
                cells.append("[red]raised[/red]")
            else:
                cells.append(_format(finding.error, tolerance))
        gaps = [finding.error for finding in result["gaps"].values()]
        passed = not result["failures"] and len(result["errors"]) == len(backends)
        table.add_row(
            result["case"].name,
            result["case"].dtype,
            *cells,
            _format(max(gaps), tolerance) if gaps else "-",
            "ok" if passed else "[red]FAIL[/red]",
        )
    return table


def summary(results, backends) -> list[str]:
    """The worst error per backend and precision, and the worst gap per pair."""
    lines = []
    for precision in ("float32", "half"):
        chosen = [
            result
            for result in results
            if (result["case"].dtype == "float32") == (precision == "float32")
        ]
        worst = []
        for backend in backends:
            found = [
                (result["errors"][backend].error, result["case"].name)
                for result in chosen
                if isinstance(result["errors"].get(backend), Finding)
            ]
            if found:
                error, name = max(found)
                worst.append(f"{backend} {error:.1e} ({name})")
        if worst:
            lines.append(f"worst vs NumPy, {precision}: " + "; ".join(worst))
        gaps = []
        for pair in combinations(backends, 2):
            found = [
                (result["gaps"][pair].error, result["case"].name)
                for result in chosen
                if pair in result["gaps"]
            ]
            if found:
                error, name = max(found)
                gaps.append(f"{pair[0]}-{pair[1]} {error:.1e} ({name})")
        if gaps:
            lines.append(f"worst gap, {precision}: " + "; ".join(gaps))
    return lines


def _json_value(value: Any) -> Any:
    """Numbers for strict JSON: NaN and infinities become null."""
    array = np.asarray(value, "float64")
    return np.where(np.isfinite(array), array, None).tolist()


def _json_spec(value: Any) -> Any:
    """A spec for strict JSON: a NaN pad value becomes "nan"."""
    if isinstance(value, dict):
        return {key: _json_spec(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_spec(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def json_report(results, runs, failures, seconds) -> dict[str, Any]:
    def finding(found):
        if isinstance(found, str):
            return {"raised": found}
        return {
            "error": _json_value(found.error),
            "output": found.output,
            "index": list(found.index),
            "got": _json_value(found.got),
            "expected": _json_value(found.expected),
        }

    cases = []
    for result in results:
        case = result["case"]
        scalars = [
            name for name in case.expected if name not in ("grad", "output", "mask")
        ]
        values = {
            name: {
                "numpy": _json_value(case.expected[name]),
                **{
                    backend: _json_value(outputs[name])
                    for backend, outputs in result["outputs"].items()
                },
            }
            for name in scalars
        }
        cases.append(
            {
                "name": case.name,
                "runner": case.runner,
                "dtype": case.dtype,
                "tolerance": result["tolerance"],
                "spec": _json_spec(case.spec),
                "errors": {b: finding(f) for b, f in result["errors"].items()},
                "gaps": {
                    f"{a}-{b}": finding(f) for (a, b), f in result["gaps"].items()
                },
                "values": values,
            }
        )
    backends = {
        backend: {
            "returncode": run.returncode,
            "seconds": round(run.seconds, 2),
            **{key: run.meta.get(key) for key in ("version", "keras", "device")},
            **({} if run.returncode == 0 else {"log": run.log[-4000:]}),
        }
        for backend, run in runs.items()
    }
    return {
        "passed": not failures,
        "seed": SEED,
        "tolerances": TOLERANCES,
        "error_floor": ERROR_FLOOR,
        "error": "max_i |x_i - r_i| / max(max_i |r_i|, error_floor); the reference r "
        "rounded to the dtype of x; a gap uses another backend for r, scaled by "
        "the reference",
        "seconds": round(seconds, 2),
        "backends": backends,
        "failures": failures,
        "cases": cases,
    }
