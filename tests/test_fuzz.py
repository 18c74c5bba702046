"""The cross-backend fuzz (`tools.fuzz`), bounded: a few dozen hypothesis
cases, each on all three backends in a child process of its own."""

from __future__ import annotations

import importlib.util

import keras
import pytest

from tools import fuzz
from tools.backends import BACKENDS

MISSING = [b for b in BACKENDS if importlib.util.find_spec(b) is None]


def test_cases_cover_every_kind_of_input():
    cases = fuzz.generate(200, seed=1)
    assert {case["loss"] for case in cases} == set(fuzz.LOSSES)
    assert {case["dtype"] for case in cases} == set(fuzz.DTYPES)
    assert {case["source"] for case in cases} == set(fuzz.SOURCES)
    assert {len(case["shape"]) for case in cases} == {1, 2, 3, 4}
    assert {case["bad"] for case in cases} == {None, *fuzz.BAD}
    assert any(0 in case["shape"] for case in cases)


def test_disagreements_name_the_case_and_both_outcomes():
    case = {"dtype": "float32"}
    same = {"jax": [{"value": 1.0}], "torch": [{"value": 1.0 + 1e-7}]}
    assert fuzz.disagreements([case], same) == []
    off = {"jax": [{"value": 1.0}], "torch": [{"value": 1.001}]}
    assert len(fuzz.disagreements([case], off)) == 1
    error = {"jax": [{"error": "ValueError"}], "torch": [{"value": 1.0}]}
    assert "torch" in fuzz.disagreements([case], error)[0]
    types = {"jax": [{"error": "ValueError"}], "torch": [{"error": "RuntimeError"}]}
    assert len(fuzz.disagreements([case], types)) == 1


@pytest.mark.skipif(
    bool(MISSING) or keras.backend.backend() != "jax",
    reason="one run covers all three backends: it runs in the jax session",
)
def test_bounded_fuzz_agrees_on_every_backend():
    ran, found, kinds = fuzz.run(40, seed=0)
    assert ran >= 30
    assert not found, "\n".join(found)
    assert kinds["value"] and kinds["ValueError"], kinds
