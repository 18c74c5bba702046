"""Test matrix: a tests session per Keras line and backend, plus lint and the demo.

    python -m nox                 # every tests-* session, lint, parity
    python -m nox -s tests-jax    # one backend, the pinned Keras (constraints.txt)
    python -m nox -s tests-nightly-jax   # the next Keras (its own constraints file)
    python -m nox -s tests-oldest-torch  # the oldest Keras pyproject.toml allows
    python -m nox -s rnn-table    # Keras 3.16's RNN change, per Keras line and backend
    python -m nox -s parity       # all three backends compared (tools.parity)
    python -m nox -s demo         # the seed demo on all three backends
    python -m nox -s fuzz         # the cross-backend fuzz, many cases (not default)
    python -m nox -s bench        # speed and memory benchmarks (not run by default)
    python -m nox -s bench -- --quick   # the same on small shapes, a smoke test

Every install goes through constraints.txt, which pins the versions we test
(and keeps pip from resolving an unpinned, multi-GB CUDA torch).
"""

from __future__ import annotations

import nox

# tools.backends.BACKENDS, spelt out: nox loads this file before any session
# exists, and only `python -m nox` (not the `nox` script) puts the repository
# root on sys.path.
BACKENDS = ("tensorflow", "jax", "torch")
CONSTRAINTS = ("-c", "constraints.txt")
# keras-hub for the mask report's zoo (tests/test_report_zoo.py), without its
# dependencies: they pull tensorflow-text, which wants the full tensorflow
# wheel beside tensorflow-cpu. Building a task model from a config needs only
# these two; the versions are pinned in constraints.txt.
KERAS_HUB = ("keras-hub", "regex", "tokenizers")
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}

# The Keras lines tested beside the pinned one: the distribution that provides
# the `keras` package, its own small constraints file, the backends run, and
# whether keras-hub (which requires keras>=3.15) is installed beside it.
KERAS_LINES = {
    "nightly": ("keras-nightly", "constraints-keras-nightly.txt", BACKENDS, True),
    "oldest": ("keras", "constraints-keras-oldest.txt", ("torch",), False),
}
TEST_SESSIONS = [
    *(f"tests-{backend}" for backend in BACKENDS),
    *(
        f"tests-{line}-{backend}"
        for line, (_, _, backends, _) in KERAS_LINES.items()
        for backend in backends
    ),
]

nox.options.sessions = [*TEST_SESSIONS, "lint", "parity"]
nox.options.reuse_existing_virtualenvs = True


def _use_keras_line(session: nox.Session, line: str) -> None:
    """Replaces the pinned Keras by the `line` one (same dependencies, so
    `--no-deps`). Both distributions own the `keras` package folder: remove
    both before installing one, also in a reused virtualenv."""
    distribution, constraints, _, _ = KERAS_LINES[line]
    session.run(
        "python", "-m", "pip", "uninstall", "-q", "-y", "keras", "keras-nightly"
    )
    session.install("--no-deps", "-c", constraints, distribution)


def _tests(session: nox.Session, backend: str, line: str | None = None) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{backend},test]")
    if line is None or KERAS_LINES[line][3]:
        session.install(*CONSTRAINTS, "--no-deps", *KERAS_HUB)
    if line is not None:
        _use_keras_line(session, line)
    env = {**QUIET_ENV, "KERAS_BACKEND": backend}
    session.run(
        "python", "-c", "import keras; print('Keras', keras.__version__)", env=env
    )
    session.run("pytest", *session.posargs, env=env)


for _backend in BACKENDS:

    @nox.session(name=f"tests-{_backend}")
    def _tests_session(session: nox.Session, backend: str = _backend) -> None:
        _tests(session, backend)


for _line, (_, _, _backends, _) in KERAS_LINES.items():
    for _backend in _backends:

        @nox.session(name=f"tests-{_line}-{_backend}")
        def _line_session(
            session: nox.Session, backend: str = _backend, line: str = _line
        ) -> None:
            _tests(session, backend, line)


@nox.session(name="rnn-table")
def rnn_table(session: nox.Session) -> None:
    """README's table of Keras 3.16's RNN change: `examples/rnn_masking.py` on
    every backend, on the pinned Keras and then on the nightly."""
    session.install(*CONSTRAINTS, "-e", ".[all]")
    session.run("python", "examples/rnn_masking.py", env=QUIET_ENV)
    _use_keras_line(session, "nightly")
    session.run("python", "examples/rnn_masking.py", env=QUIET_ENV)
    session.run("python", "-m", "pip", "uninstall", "-q", "-y", "keras-nightly")


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def parity(session: nox.Session) -> None:
    """Every backend against NumPy and each other; the table, then its tests."""
    session.install(*CONSTRAINTS, "-e", ".[all,test]")
    session.run("python", "-m", "tools.parity", "--json", "parity.json", env=QUIET_ENV)
    session.run("pytest", "tests/test_parity.py", *session.posargs, env=QUIET_ENV)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The cross-backend fuzz with many more cases than the tests run (not a
    default session); prints how many it ran. `-- --examples N --seed S`."""
    session.install(*CONSTRAINTS, "-e", ".[all,test]")
    arguments = session.posargs or ["--examples", "2000"]
    session.run("python", "-m", "tools.fuzz", *arguments, env=QUIET_ENV)


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
