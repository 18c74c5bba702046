"""Test matrix: one tests session per Keras backend, plus lint and the demo.

    python -m nox                 # tests-{tensorflow,jax,torch}, lint, parity
    python -m nox -s tests-jax    # one backend
    python -m nox -s parity       # all three backends compared (kmask.parity)
    python -m nox -s demo         # the seed demo on all three backends
    python -m nox -s bench        # speed and memory benchmarks (not run by default)
    python -m nox -s bench -- --quick   # the same on small shapes, a smoke test

Every install goes through constraints.txt, which pins the versions we test
(and keeps pip from resolving an unpinned, multi-GB CUDA torch).
"""

from __future__ import annotations

import nox

BACKENDS = ("tensorflow", "jax", "torch")
CONSTRAINTS = ("-c", "constraints.txt")
# keras-hub for the mask report's zoo (tests/test_report_zoo.py), without its
# dependencies: they pull tensorflow-text, which wants the full tensorflow
# wheel beside tensorflow-cpu. Building a task model from a config needs only
# these two; the versions are pinned in constraints.txt.
KERAS_HUB = ("keras-hub", "regex", "tokenizers")
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}

nox.options.sessions = [*(f"tests-{backend}" for backend in BACKENDS), "lint", "parity"]
nox.options.reuse_existing_virtualenvs = True


def _tests(session: nox.Session, backend: str) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{backend},test]")
    session.install(*CONSTRAINTS, "--no-deps", *KERAS_HUB)
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
def parity(session: nox.Session) -> None:
    """Every backend against NumPy and each other; the table, then its tests."""
    session.install(*CONSTRAINTS, "-e", ".[all,test]")
    session.run("python", "-m", "kmask.parity", "--json", "parity.json", env=QUIET_ENV)
    session.run("pytest", "tests/test_parity.py", *session.posargs, env=QUIET_ENV)


@nox.session
def demo(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "-e", ".[all]")
    session.run("python", "examples/seed_seq2seq.py", env=QUIET_ENV)


@nox.session
def bench(session: nox.Session) -> None:
    """Speed (`benchmarks/masked_ce.py`) and memory (`benchmarks/fused_linear.py`):
    Markdown tables on stdout, every number in `bench_*.json`. Arguments after
    `--` go to both scripts (`--quick`, `--backends jax`)."""
    session.install(*CONSTRAINTS, "-e", ".[all]", "optax")
    for name in ("masked_ce", "fused_linear"):
        session.run(
            "python",
            f"benchmarks/{name}.py",
            "--json",
            f"bench_{name}.json",
            *session.posargs,
            env=QUIET_ENV,
        )
