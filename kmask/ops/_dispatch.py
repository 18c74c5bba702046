"""The one place an op picks its backend implementation.

Every op of `kmask.ops` is written once in `keras.ops`. On PyTorch, which
runs op by op, a few have a kernel of their own in `kmask.ops._torch` that
computes the same function and gradient with in-place buffers (the profiles
that asked for each are in docs/measured.md); this module decides which one
runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops


class _Kernels(dict):
    """`{(backend, op name): kernel or None}`, filled on first use: an op
    looks its kernel up with one `dict` access per call, the backend read
    each time (`keras.config.set_backend` can change it)."""

    def __missing__(self, key: tuple[str, str]) -> Callable | None:
        backend, name = key
        kernel = None
        if backend == "torch":
            # Imported here: the modules import torch.
            from kmask.ops import _torch, _torch_ctc

            kernel = getattr(_torch, name, None) or getattr(_torch_ctc, name)
        self[key] = kernel
        return kernel


KERNELS: dict[tuple[str, str], Callable | None] = _Kernels()
"""The backends' own kernels: `KERNELS[keras.backend.backend(), name]` is
the kernel of the op `name`, or `None` where the portable `keras.ops` form
runs."""


def backend_kernel(name: str) -> Callable | None:
    """The current backend's own kernel of the op `name`, or `None` where
    the portable `keras.ops` form runs."""
    return KERNELS[keras.backend.backend(), name]


def compiling() -> bool:
    """Whether `torch.compile` is tracing the current call.

    A traced tensor has no value, so nothing can be checked against it. JAX
    and TensorFlow refuse to convert one to NumPy, which `concrete` catches;
    PyTorch's compiler instead breaks its graph there (and on a GPU every
    such break is a host synchronisation), so the kernels and the eager
    checks ask here first.
    """
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.compiler.is_compiling()


def may_differentiate(*tensors: Any) -> bool:
    """Whether a gradient with respect to `tensors` (`None`s ignored) may be
    being taken: `False` only where the eager frameworks can tell that none
    is (JAX: no tensor is a tracer; PyTorch: autograd does not record any of
    them; TensorFlow: eager, with no `GradientTape` recording). Compiled
    code always may, and its compiler drops what no output uses. Keras has
    no portable way to ask, so each backend is asked here."""
    backend = keras.backend.backend()
    tensors = tuple(
        tensor.value if isinstance(tensor, keras.Variable) else tensor
        for tensor in tensors
        if tensor is not None
    )
    if backend == "jax":
        import jax

        return any(isinstance(tensor, jax.core.Tracer) for tensor in tensors)
    if backend == "torch":
        import torch

        return torch.is_grad_enabled() and any(
            getattr(t, "requires_grad", False) for t in tensors
        )
    if backend == "tensorflow":
        import tensorflow as tf

        from kmask._keras_compat import tape_recording

        return not tf.executing_eagerly() or tape_recording()
    return True


def concrete(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array when it is concrete, `None` when symbolic.

    Inside a compiled function (tf.function, jax.jit, torch.compile) tensors
    have no value yet; JAX and TensorFlow refuse the conversion, each with its
    own exception type, and PyTorch's compiler is asked before trying.
    """
    if isinstance(value, keras.KerasTensor) or compiling():
        return None
    try:
        return np.asarray(ops.convert_to_numpy(value))
    except (TypeError, ValueError, NotImplementedError, RuntimeError, AttributeError):
        return None


def keeps_exponentials() -> bool:
    """Whether the portable one-hot cross-entropy keeps `exp(logits - top)`
    for its backward pass rather than recomputing it.

    Which costs least depends on the compiler: JAX's XLA fuses the
    exponential into the sum, so there the backward pass recomputes it;
    TensorFlow's XLA writes it out on CPU anyway, so there it is kept. The
    timings are in docs/measured.md ("Keeping the exponentials").
    """
    return keras.backend.backend() == "tensorflow"
