"""Every example runs as a script under the current KERAS_BACKEND and exits 0.

Examples that take `--backends` (they start one subprocess per backend) get
the current backend only. `KMASK_EXAMPLE_EPOCHS=1` keeps training short. Each
runs in a temporary folder, so a PNG it may save lands there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import keras
import pytest

from tools.backends import run_in_own_session

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 300


def test_the_examples_are_found():
    names = {script.name for script in SCRIPTS}
    assert {
        "seed_seq2seq.py",
        "tagging.py",
        "timeseries_nan.py",
        "lengths.py",
        "multi_device.py",
        "ctc.py",
        "packing.py",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[script.stem for script in SCRIPTS])
def test_example_runs(script, tmp_path):
    if "import keras_hub" in script.read_text():
        # keras-hub is installed on the pinned Keras line only (it needs
        # keras>=3.15, and 0.32 does not import on keras-nightly 3.16).
        pytest.importorskip("keras_hub", exc_type=ImportError)
    backend = keras.backend.backend()
    command = [sys.executable, str(script)]
    if '"--backends"' in script.read_text():
        command += ["--backends", backend]
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        KMASK_EXAMPLE_EPOCHS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        MPLBACKEND="Agg",
    )

    # Its own session, all of which a timeout kills: examples start
    # subprocesses of their own.
    completed = run_in_own_session(command, env, TIMEOUT_S, cwd=tmp_path)

    assert completed.returncode == 0, (
        f"{script.name} exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    assert "MISMATCH" not in completed.stdout
