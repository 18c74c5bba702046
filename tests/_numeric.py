"""Helpers the numeric tests share: the comparison with a NumPy reference
and the inputs of a linear head."""

from __future__ import annotations

import numpy as np
from keras import ops


def close(actual, expected, rtol=1e-5):
    """`actual` (any backend's tensor) within `rtol` of the float64
    `expected`, relative to the largest magnitude of `expected`."""
    actual = np.asarray(ops.convert_to_numpy(actual), "float64")
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-6)
    assert np.abs(actual - expected).max(initial=0.0) <= rtol * scale, (
        actual,
        expected,
    )


def linear_data(rng, batch, steps, width, vocabulary):
    """Float32 `hidden [batch, steps, width]`, `kernel [width, vocabulary]`,
    `bias [vocabulary]` and int32 `labels [batch, steps]`, drawn in that
    order from `rng`."""
    return {
        "hidden": rng.normal(size=(batch, steps, width)).astype("float32"),
        "kernel": rng.normal(size=(width, vocabulary)).astype("float32"),
        "bias": rng.normal(size=vocabulary).astype("float32"),
        "labels": rng.integers(0, vocabulary, (batch, steps)).astype("int32"),
    }
