"""Every quickstart page's program runs under the current backend, prints its
numbers beside NumPy's and asserts they agree (`tools/quickstarts.py` reads
them from docs/quickstart/*.md)."""

from __future__ import annotations

import os
import sys

import keras
import pytest

from tools.backends import run_in_own_session
from tools.quickstarts import MAX_LINES, PAGES, programs

pytestmark = pytest.mark.skipif(
    not PAGES.is_dir(), reason="the docs are not beside an installed wheel's tests"
)
PROGRAMS = programs() if PAGES.is_dir() else {}
TIMEOUT_S = 180


def test_every_page_shows_a_short_program():
    assert len(PROGRAMS) == len(list(PAGES.glob("*.md"))) >= 4
    for name, source in PROGRAMS.items():
        lines = source.splitlines()
        assert len(lines) < MAX_LINES, f"{name}: {len(lines)} lines"
        for step in ("fit(", "evaluate(", "NumPy", "assert "):
            assert step in source, f"{name} lacks {step!r}"


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_quickstart_runs(name, tmp_path):
    script = tmp_path / name
    script.write_text(PROGRAMS[name])
    env = dict(
        os.environ, KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3"
    )

    completed = run_in_own_session(
        [sys.executable, str(script)], env, TIMEOUT_S, cwd=tmp_path
    )

    assert completed.returncode == 0, (
        f"{name} exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    assert "NumPy" in completed.stdout
