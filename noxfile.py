"""Test matrix: a tests session per Keras line and backend, plus lint and the demo.

    python -m nox                 # every tests-* session, lint, parity, package, docs
    python -m nox -s tests-jax    # one backend, the pinned Keras (constraints.txt)
    python -m nox -s tests-nightly-jax   # the next Keras (its own constraints file)
    python -m nox -s tests-oldest-torch  # the oldest Keras pyproject.toml allows
    python -m nox -s rnn-table    # Keras 3.16's RNN change, per Keras line and backend
    python -m nox -s parity       # all three backends compared (tools.parity)
    python -m nox -s demo         # the seed demo on all three backends
    python -m nox -s fuzz         # the cross-backend fuzz, many cases (not default)
    python -m nox -s bench        # speed and memory benchmarks (not run by default)
    python -m nox -s bench -- --quick   # the same on small shapes, a smoke test
    python -m nox -s package      # build, twine check, the suite on the installed wheel
    python -m nox -s docs         # the site, `mkdocs build --strict` into site/
    python -m nox -s docs-browser # the site built, then every page in Chromium
    python -m nox -s figures      # the PNGs under docs/figures (not run by default)

Every install goes through constraints.txt, which pins the versions we test
(and keeps pip from resolving an unpinned, multi-GB CUDA torch).
"""

from __future__ import annotations

import shutil
import time
import zipfile
from pathlib import Path

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

nox.options.sessions = [
    *TEST_SESSIONS,
    "lint",
    "parity",
    "package",
    "docs",
    "docs-browser",
]
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


# The slowest files run on the pinned Keras only (tests-{backend}): the
# training-mode matrix, a model per public object and mode, and the
# quickstart programs, a process each. The other Keras lines and the
# installed wheel run everything else; the whole command stays within an
# hour on two cores.
PINNED_ONLY = ("tests/test_modes.py", "tests/test_quickstarts.py")


def _pinned_only_ignored() -> list[str]:
    return [f"--ignore={path}" for path in PINNED_ONLY]


def _tests(session: nox.Session, backend: str, line: str | None = None) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{backend},test]")
    if backend == "jax":
        # optax.ctc_loss: the independent CTC that tests/test_ctc.py checks against.
        session.install(*CONSTRAINTS, "optax")
    if line is None or KERAS_LINES[line][3]:
        session.install(*CONSTRAINTS, "--no-deps", *KERAS_HUB)
        # keras-hub's fit(strings): on TensorFlow it tokenizes with
        # tensorflow-text (which works beside tensorflow-cpu; its own
        # requirement is the full wheel), elsewhere it batches with Grain.
        if backend == "tensorflow":
            session.install(*CONSTRAINTS, "--no-deps", "tensorflow-text")
        else:
            session.install(*CONSTRAINTS, "grain")
    if line is not None:
        _use_keras_line(session, line)
    env = {**QUIET_ENV, "KERAS_BACKEND": backend}
    session.run(
        "python", "-c", "import keras; print('Keras', keras.__version__)", env=env
    )
    ignored = [] if line is None else _pinned_only_ignored()
    session.run("pytest", *ignored, *session.posargs, env=env)


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
    """ruff, and mypy on the package (`[tool.mypy]` in pyproject.toml): the
    backends and Keras ship no type information, so only NumPy is installed."""
    session.install(*CONSTRAINTS, "ruff", "mypy", "numpy")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "kmask")


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


# What the wheel may hold besides `kmask/`: its metadata folder.
WHEEL_METADATA = ".dist-info/"
# What the package session copies next to the tests: everything they read
# from the repository root, but not `kmask/`, so that the installed one runs.
TEST_TREE = ("tests", "tools", "examples")
TEST_FILES = (
    "conftest.py",
    "pyproject.toml",
    "constraints.txt",
    "constraints-keras-nightly.txt",
    "constraints-keras-oldest.txt",
)
PACKAGE_BACKEND = "torch"  # the fastest suite on CPU


def _check_wheel(session: nox.Session, wheel: Path) -> None:
    """The wheel holds the library only (no tests, tools, benchmarks or
    examples) and ships `kmask/py.typed`."""
    names = zipfile.ZipFile(wheel).namelist()
    strays = [
        name
        for name in names
        if not name.startswith("kmask/")
        and not name.split("/")[0].endswith(WHEEL_METADATA.rstrip("/"))
    ]
    if strays:
        session.error(f"{wheel.name} holds more than kmask/: {strays}")
    if "kmask/py.typed" not in names:
        session.error(f"{wheel.name} lacks kmask/py.typed")
    modules = sorted(name for name in names if name.startswith("kmask/"))
    session.log(f"{wheel.name}: {len(modules)} files, " + ", ".join(modules))


# A pip user's install, as README gives it: the wheel with one extra, in a
# fresh virtualenv, without our constraints file; only torch is pinned, to
# the CPU build constraints.txt names (unpinned, pip takes the CUDA build).
USER_EXTRAS = ("jax", "tensorflow", "torch")
# The quickstart each user install runs (docs/quickstart/pad-value.md).
USER_QUICKSTART = "pad_value.py"


def _torch_pin() -> str:
    (pin,) = (
        line.strip()
        for line in Path("constraints.txt").read_text().splitlines()
        if line.startswith("torch==")
    )
    return pin


def _user_installs(session: nox.Session, wheel: Path, tmp: Path) -> None:
    """For each extra: a fresh virtualenv, `pip install "<wheel>[extra]"` with
    no constraints file (pip's cache reused), then a quickstart program run
    under that backend from a folder outside the source tree."""
    programs = tmp / "quickstarts"
    session.run("python", "-m", "tools.quickstarts", str(programs))
    for extra in USER_EXTRAS:
        started = time.monotonic()
        venv = tmp / f"user-{extra}"
        shutil.rmtree(venv, ignore_errors=True)
        session.run("python", "-m", "venv", str(venv))
        python = str(venv / "bin" / "python")
        pins = [_torch_pin()] if extra == "torch" else []
        session.run(
            python,
            "-m",
            "pip",
            "install",
            "-q",
            f"{wheel}[{extra}]",
            *pins,
            external=True,
        )
        env = {**QUIET_ENV, "KERAS_BACKEND": extra}
        with session.chdir(programs):
            session.run(
                python,
                "-c",
                "import kmask, keras; print('kmask', kmask.__version__, "
                "'from', kmask.__file__, 'Keras', keras.__version__)",
                env=env,
                external=True,
            )
            session.run(python, USER_QUICKSTART, env=env, external=True)
        session.log(
            f"pip user, [{extra}]: installed and ran {USER_QUICKSTART} in "
            f"{time.monotonic() - started:.0f} s"
        )


@nox.session(reuse_venv=False)
def package(session: nox.Session) -> None:
    """Builds the sdist and the wheel, checks them, installs the wheel into
    this fresh virtualenv and runs the test suite (and the doctests) against
    the installed package, from a folder where the source tree is not
    importable. Then installs the wheel as a pip user would, once per extra,
    and runs a quickstart with each (`_user_installs`)."""
    session.install(*CONSTRAINTS, "build", "twine")
    tmp = Path(session.create_tmp()).resolve()
    dist = tmp / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    # The build backend's isolated environment installs through the same pins.
    build_env = {"PIP_CONSTRAINT": str(Path("constraints.txt").resolve())}
    session.run("python", "-m", "build", "--outdir", str(dist), env=build_env)
    artifacts = sorted(str(path) for path in dist.iterdir())
    session.run("twine", "check", "--strict", *artifacts)
    (wheel,) = dist.glob("kmask-*.whl")
    _check_wheel(session, wheel)

    session.install(*CONSTRAINTS, f"{wheel}[{PACKAGE_BACKEND},test]")
    session.install(*CONSTRAINTS, "--no-deps", *KERAS_HUB)
    checkout = tmp / "checkout"
    shutil.rmtree(checkout, ignore_errors=True)
    checkout.mkdir()
    for folder in TEST_TREE:
        shutil.copytree(
            folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in TEST_FILES:
        shutil.copy(name, checkout / name)
    env = {**QUIET_ENV, "KERAS_BACKEND": PACKAGE_BACKEND}
    with session.chdir(checkout):
        session.run(
            "python",
            "-c",
            "import kmask, sysconfig; from pathlib import Path; "
            "site = Path(sysconfig.get_paths()['purelib']); "
            "where = Path(kmask.__file__).resolve(); "
            "print('kmask', kmask.__version__, 'from', where); "
            "assert where.is_relative_to(site), (where, site)",
            env=env,
        )
        session.run("pytest", *_pinned_only_ignored(), *session.posargs, env=env)
        session.run("pytest", "--pyargs", "kmask", env=env)
    _user_installs(session, wheel, tmp)


DOCS_TOOLS = ("mkdocs", "mkdocs-material", "mkdocstrings[python]", "ruff")
# Debian's browser and its driver, for `docs-browser` (CI's machine is fresh).
BROWSER_BINARIES = ("/usr/bin/chromium", "/usr/bin/chromedriver")
BROWSER_DEBIAN_PACKAGES = ("chromium", "chromium-driver")


def _build_site(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, *DOCS_TOOLS)
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "site",
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """The site (`mkdocs.yml`, `docs/`) built with `--strict` into `site/`. The
    API pages are read from the source by mkdocstrings (griffe), so neither
    Keras nor a backend is installed."""
    _build_site(session)


@nox.session(name="docs-browser")
def docs_browser(session: nox.Session) -> None:
    """The built site opened page by page in headless Chromium
    (`tools/browse_site.py`): links, images, examples as code, no private
    module, no console error, nothing wider than its column. Installs Debian's
    `chromium` and `chromium-driver` when they are missing (as root, as CI
    runs); screenshots of three pages go to this session's tmp folder."""
    if not all(Path(path).is_file() for path in BROWSER_BINARIES):
        session.run("apt-get", "update", "-q", external=True)
        session.run(
            "apt-get",
            "install",
            "-y",
            "-q",
            *BROWSER_DEBIAN_PACKAGES,
            env={"DEBIAN_FRONTEND": "noninteractive"},
            external=True,
        )
    _build_site(session)
    session.install(*CONSTRAINTS, "selenium")
    screenshots = Path(session.create_tmp()).resolve() / "screenshots"
    session.run(
        "python", "-m", "tools.browse_site", "site", "--screenshots", str(screenshots)
    )
    session.log(f"screenshots: {screenshots}")


@nox.session
def figures(session: nox.Session) -> None:
    """The PNGs under `docs/figures/` (`tools/figures.py`), under JAX. Reads the
    JSON `nox -s bench` writes; other paths after `--`: the masked-CE JSON,
    then the fused-linear one."""
    session.install(*CONSTRAINTS, "-e", ".[jax]", "matplotlib")
    paths = session.posargs or ["bench_masked_ce.json", "bench_fused_linear.json"]
    session.run(
        "python",
        "tools/figures.py",
        "--bench-ce",
        paths[0],
        *(["--bench-fused", paths[1]] if len(paths) > 1 else []),
        env=QUIET_ENV,
    )
