"""Test matrix: one tests session per Keras backend, plus lint and the demo.

    python -m nox                 # tests-tensorflow, tests-jax, tests-torch, lint
    python -m nox -s tests-jax    # one backend
    python -m nox -s demo         # the seed demo on all three backends

Every install goes through constraints.txt, which pins the versions we test
(and keeps pip from resolving an unpinned, multi-GB CUDA torch).
"""

from __future__ import annotations

import nox

BACKENDS = ("tensorflow", "jax", "torch")
CONSTRAINTS = ("-c", "constraints.txt")
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}

nox.options.sessions = [*(f"tests-{backend}" for backend in BACKENDS), "lint"]
nox.options.reuse_existing_virtualenvs = True


def _tests(session: nox.Session, backend: str) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{backend},test]")
    session.run(
        "pytest",
        *session.posargs,
        env={**QUIET_ENV, "KERAS_BACKEND": backend},
    )


for _backend in BACKENDS:

    @nox.session(name=f"tests-{_backend}")
    def _tests_session(session: nox.Session, backend: str = _backend) -> None:
        _tests(session, backend)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "-e", ".[all]")
    session.run("python", "examples/seed_seq2seq.py", env=QUIET_ENV)
