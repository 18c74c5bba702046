"""The training-mode matrix (tools/modes.py): every public loss, metric, mask
layer and the head, in every mode Keras runs on this backend, checked
against NumPy. Ids read `Object-mode`."""

from __future__ import annotations

import json
import sys

import keras
import pytest

import kmask
from tools.backends import REPOSITORY, run_in_own_session
from tools.modes import EXCLUDED, MODES, REGISTRY, run_cell, unsupported
from tools.modes_table import NOT_SUPPORTED, environment

BACKEND = keras.backend.backend()
CELLS = [
    pytest.param(entry, mode, id=f"{entry.name}-{mode}")
    for entry in REGISTRY
    for mode in MODES
]
SHARDED_TIMEOUT = 600  # seconds, for every model_parallel cell at once


def test_every_public_loss_metric_and_layer_is_in_the_matrix():
    kinds = (keras.losses.Loss, keras.metrics.Metric, keras.layers.Layer)
    public = {
        name
        for name in kmask.__all__
        if isinstance(getattr(kmask, name), type)
        and issubclass(getattr(kmask, name), kinds)
    }
    # `Class[option]`: a row for an option of a public class.
    names = [entry.name for entry in REGISTRY]
    assert len(names) == len(set(names))
    registered = [name.split("[")[0] for name in names]
    assert public - set(registered) - set(EXCLUDED) == set()
    assert set(registered) | set(EXCLUDED) <= public  # no stale name


@pytest.fixture(scope="module")
def sharded_cells(tmp_path_factory, pytestconfig):
    """Every `model_parallel` cell, in one child process with 8 JAX CPU
    devices (the device count is fixed when JAX is imported), warnings
    filtered as here."""
    out = tmp_path_factory.mktemp("modes") / "cells.json"
    filters = json.dumps(pytestconfig.getini("filterwarnings"))
    command = [sys.executable, "-m", "tools.modes_table", "--worker"]
    command += ["--json", str(out), "--modes", "model_parallel"]
    command += ["--warning-filters", filters]
    child = run_in_own_session(
        command, environment(BACKEND), SHARDED_TIMEOUT, cwd=REPOSITORY
    )
    assert child.returncode == 0, child.stdout + child.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("entry", "mode"), CELLS)
def test_mode(entry, mode, tmp_path, request):
    reason = unsupported(BACKEND, mode)
    if reason:
        pytest.skip(NOT_SUPPORTED + reason)
    if mode != "model_parallel":
        run_cell(entry, mode, str(tmp_path))
        return
    cell = request.getfixturevalue("sharded_cells")[f"{entry.name}-model_parallel"]
    assert cell["error"] is None, cell["traceback"]
    # A scope that sharded nothing would pass the comparisons above.
    specs = cell["sharding"].values()
    assert any("'model'" in spec for spec in specs), cell["sharding"]
