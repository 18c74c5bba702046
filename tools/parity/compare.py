"""How far each output is from NumPy and from the other backends.

`relative_error` is the one measure; `compare` applies it to every output of
every case, `one_device_gaps` to the device setups against one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from tools.parity.cases import Case
from tools.parity.devices import data as device_data
from tools.parity.sources import NAN, round_to

# The one place the tolerances live: the largest `relative_error` an output
# may show, against NumPy and between backends, by the precision of the
# case's inputs.
TOLERANCES = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-3}
ERROR_FLOOR = 1e-6


@dataclass
class BackendRun:
    """What one backend's child left: its outputs by `"<case index>__<output>"`,
    its meta data (versions, device, errors, dtypes) and its log."""

    backend: str
    outputs: dict[str, np.ndarray]
    meta: dict[str, Any]
    returncode: int | None  # None: killed at its timeout
    log: str
    seconds: float


def relative_error(actual: Any, reference: Any, scale: Any = None) -> float:
    """How far `actual` is from `reference`, the measure every check uses.

    Args:
        actual: A scalar or an array.
        reference: The same shape. NaN in it must meet NaN in `actual`.
        scale: What the deviation is measured against; defaults to
            `reference` (the gap between two backends passes the reference).

    Returns:
        `max_i |actual_i - reference_i| / max(max_i |scale_i|, ERROR_FLOOR)`
        over the non-NaN entries; `inf` when shapes or NaNs disagree or
        `actual` is infinite where `reference` is not.

    Example:

    >>> from tools.parity.compare import relative_error
    >>> round(relative_error([1.0, 2.002], [1.0, 2.0]), 6)
    0.001
    >>> round(relative_error(1e-9, 0.0), 6)  # near 0, against the 1e-6 floor
    0.001
    >>> relative_error([float("nan"), 1.0], [float("nan"), 1.0])
    0.0
    """
    return deviation(actual, reference, scale)[0]


def deviation(actual, reference, scale=None) -> tuple[float, tuple]:
    """`relative_error`, and the index of the worst entry."""
    actual = np.asarray(actual, "float64")
    reference = np.asarray(reference, "float64")
    scale = reference if scale is None else np.asarray(scale, "float64")
    if actual.shape != reference.shape:
        return math.inf, ()
    nan_reference = np.isnan(reference)
    disagree = (np.isnan(actual) != nan_reference) | (
        ~nan_reference & ~np.isfinite(actual) & np.isfinite(reference)
    )
    if disagree.any():
        return math.inf, tuple(int(i) for i in np.argwhere(disagree)[0])
    with np.errstate(invalid="ignore"):  # inf - inf, replaced just below
        deviation = np.where(nan_reference, 0.0, np.abs(actual - reference))
    deviation = np.where(actual == reference, 0.0, deviation)  # inf meets inf
    magnitude = np.abs(scale[~np.isnan(scale) & np.isfinite(scale)])
    floor = max(float(magnitude.max(initial=0.0)), ERROR_FLOOR)
    worst = (
        np.unravel_index(int(deviation.argmax()), deviation.shape)
        if deviation.size
        else ()
    )
    return float(deviation.max(initial=0.0) / floor), tuple(int(i) for i in worst)


def _rounded(reference: np.ndarray, dtype: str) -> np.ndarray:
    """The reference as the backend could at best return it in `dtype`."""
    if dtype in ("float32", "float16", "bfloat16"):
        return round_to(np.asarray(reference, "float64"), dtype).astype("float64")
    return np.asarray(reference, "float64")


@dataclass
class Finding:
    """The worst deviation of one output: from NumPy or between backends."""

    error: float
    output: str
    index: tuple
    got: float
    expected: float


def compare(cases: list[Case], runs: dict[str, BackendRun]) -> list[dict[str, Any]]:
    """Per case: each backend's worst deviation from NumPy, each pair's worst
    gap, and a message for each one off tolerance."""
    results = []
    for index, case in enumerate(cases):
        tolerance = TOLERANCES[case.dtype]
        errors: dict[str, Finding | str] = {}
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for backend, run in runs.items():
            if run.returncode != 0:
                continue  # reported once, not once per case
            raised = run.meta["errors"].get(case.name)
            if raised:
                errors[backend] = raised
                continue
            dtypes = run.meta["dtypes"][case.name]
            outputs[backend] = {
                name: run.outputs[f"{index}__{name}"] for name in case.expected
            }
            errors[backend] = _worst(
                {
                    name: (outputs[backend][name], _rounded(reference, dtypes[name]))
                    for name, reference in case.expected.items()
                },
                case.expected,
            )
        gaps = {
            (first, second): _worst(
                {
                    name: (outputs[first][name], outputs[second][name])
                    for name in case.expected
                },
                case.expected,
            )
            for first, second in combinations(outputs, 2)
        }
        results.append(
            {
                "case": case,
                "tolerance": tolerance,
                "errors": errors,
                "gaps": gaps,
                "outputs": outputs,
                "failures": _case_failures(case.name, tolerance, errors, gaps),
            }
        )
    return results


def _worst(pairs: dict[str, tuple], references: dict[str, np.ndarray]) -> Finding:
    """The output whose deviation is the largest, scaled by the reference."""
    worst = Finding(0.0, "", (), 0.0, 0.0)
    for name, (actual, other) in pairs.items():
        error, where = deviation(actual, other, references[name])
        if error > worst.error or not worst.output:
            worst = Finding(error, name, where, _at(actual, where), _at(other, where))
    return worst


def _at(array, index: tuple) -> float:
    array = np.asarray(array, "float64")
    return float(array[index]) if array.ndim == len(index) else NAN


def _case_failures(name, tolerance, errors, gaps) -> list[str]:
    messages = []
    for backend, finding in errors.items():
        if isinstance(finding, str):
            messages.append(f"{name}: {backend} raised {finding}")
        elif not finding.error <= tolerance:
            messages.append(
                f"{name}: {backend} {_where(finding)} = {finding.got!r}, NumPy "
                f"float64 reference = {finding.expected!r} (relative error "
                f"{finding.error:.2e} > tolerance {tolerance:.0e})"
            )
    for (first, second), finding in gaps.items():
        if not finding.error <= tolerance:
            messages.append(
                f"{name}: {first} {_where(finding)} = {finding.got!r}, {second} "
                f"= {finding.expected!r} (gap {finding.error:.2e} > tolerance "
                f"{tolerance:.0e})"
            )
    return messages


def _where(finding: Finding) -> str:
    index = "".join(f"[{i}]" for i in finding.index)
    return f"{finding.output}{index}"


def one_device_gaps(results) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per backend, each `devices/` setup's weights against the same
    backend's one-device weights (relative to NumPy's), and a message for
    each gap off tolerance."""
    by_name = {result["case"].name: result for result in results}
    gaps: dict[str, dict[str, float]] = {}
    messages = []
    for result in results:
        case = result["case"]
        if case.runner != "devices" or case.spec["setup"] == "one_device":
            continue
        one = by_name.get(f"devices/one_device/{case.spec['source']}")
        for backend, outputs in result["outputs"].items():
            if one is None or backend not in one["outputs"]:
                continue
            error = deviation(
                outputs["weights"],
                one["outputs"][backend]["weights"],
                case.expected["weights"],
            )[0]
            setup = device_data.label(backend, case.spec["setup"])
            gaps.setdefault(backend, {})
            gaps[backend][setup] = max(gaps[backend].get(setup, 0.0), error)
            if not error <= result["tolerance"]:
                messages.append(
                    f"{case.name}: {backend} ({setup}) weights differ from its "
                    f"one-device run by {error:.2e} > tolerance "
                    f"{result['tolerance']:.0e}"
                )
    return gaps, messages
