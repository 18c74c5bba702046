"""What the tests, the benchmarks and the parity harness share about backends.

The backend list, a process per backend, and the one value-and-grad
dispatcher (Keras has no portable gradient op). Nothing here imports a
backend until a function that needs one is called.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BACKENDS = ("tensorflow", "jax", "torch")
# The repository root: `python -m tools...` must find `tools` from any folder.
REPOSITORY = Path(__file__).resolve().parents[1]


def installed_backends() -> list[str]:
    """The backends of `BACKENDS` that are importable here, in that order."""
    return [backend for backend in BACKENDS if importlib.util.find_spec(backend)]


def backend_environment(backend: str, **variables: str) -> dict[str, str]:
    """This process's environment for a child that runs `backend`: with
    `KERAS_BACKEND` set, the repository root first on `PYTHONPATH`, and
    `variables` added."""
    path = os.pathsep.join(
        filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])
    )
    return {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": path, **variables}


def launch(
    command: Sequence[str],
    env: dict | None = None,
    cwd: str | None = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
) -> subprocess.Popen:
    """Starts `command` in a session of its own, so that `finish` can kill it
    with every process it starts (DDP ranks, TensorFlow workers). The one
    way tools/, tests/ and benchmarks/ start a child process; `env` defaults
    to this process's environment."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=os.environ.copy() if env is None else env,
        stdout=stdout,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def finish(processes: Sequence[subprocess.Popen], timeout: float) -> list[int | None]:
    """Waits for `processes` until one shared deadline, `timeout` seconds from
    now; kills the session of each still running then. Returns the exit
    codes, `None` for a process that was killed."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for process, code in zip(processes, codes, strict=True):
        if code is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return codes


def run_in_own_session(
    command: Sequence[str], env: dict, timeout: float, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """Runs `command` (see `launch`), its output captured. On a timeout the
    whole session is killed and stderr ends by saying so."""
    process = launch(command, env, cwd)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout} s)"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def value_and_grad(
    fn: Callable[..., Any],
    argnums: Sequence[int] = (0,),
    has_aux: bool = False,
    jit: bool = False,
    xla: bool = False,
) -> Callable[..., tuple[Any, tuple[Any, ...]]]:
    """`fn` and its gradient, with the current Keras backend's autodiff.

    Args:
        fn: Takes tensors, returns a scalar tensor, or `(scalar, aux)` when
            `has_aux`.
        argnums: The positions of the arguments to differentiate.
        has_aux: Whether `fn` returns auxiliary outputs next to the scalar.
        jit: Trace the step first (`jax.jit`, `tf.function`). PyTorch always
            runs eagerly: `torch.compile` needs a C++ toolchain and tens of
            seconds per graph.
        xla: With `jit` on TensorFlow, `tf.function(jit_compile=True)`.

    Returns:
        `step(*args) -> (out, grads)`: `out` is what `fn` returns (detached
        on PyTorch), `grads` a tuple, one backend tensor per `argnums`, zeros
        where `fn` does not depend on that argument. Under `jit` on JAX
        `step` is the `jax.jit` object itself (its `.lower()` works).
    """
    import keras

    argnums = tuple(argnums)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        step = jax.value_and_grad(fn, argnums=argnums, has_aux=has_aux)
        return jax.jit(step) if jit else step
    if backend == "tensorflow":
        import tensorflow as tf

        def tf_step(*args):
            wrt = [args[i] for i in argnums]
            with tf.GradientTape() as tape:
                tape.watch(wrt)
                out = fn(*args)
            grads = tape.gradient(out[0] if has_aux else out, wrt)
            return out, tuple(
                tf.zeros_like(x) if grad is None else grad
                for x, grad in zip(wrt, grads, strict=True)
            )

        return tf.function(tf_step, jit_compile=xla) if jit else tf_step
    if backend == "torch":
        import torch

        def torch_step(*args):
            args = [
                arg.detach().requires_grad_(True) if i in argnums else arg
                for i, arg in enumerate(args)
            ]
            wrt = [args[i] for i in argnums]
            out = fn(*args)
            scalar = out[0] if has_aux else out
            found = [None] * len(wrt)
            if scalar.requires_grad:
                found = torch.autograd.grad(scalar, wrt, allow_unused=True)
            grads = tuple(
                torch.zeros_like(x) if grad is None else grad
                for x, grad in zip(wrt, found, strict=True)
            )
            if has_aux:
                return (scalar.detach(), out[1]), grads
            return scalar.detach(), grads

        return torch_step
    raise ValueError(
        "value_and_grad supports the tensorflow, jax and torch backends. "
        f"Received: backend={backend!r}"
    )
