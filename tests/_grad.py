"""`value_and_grad` for tests: the one place the tests differentiate.

Keras has no portable gradient op, so this picks the current backend's
autodiff (`jax.value_and_grad`, `tf.GradientTape`, torch autograd).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops


def value_and_grad(
    fn: Callable[[Any], Any], x: Any, jit: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluates `fn(x)` and its gradient with respect to `x`.

    Args:
        fn: Takes one tensor, returns a scalar tensor.
        x: The point, anything `keras.ops.convert_to_tensor` takes; a float
            dtype is kept.
        jit: Trace `fn` first (`jax.jit`, `tf.function`). PyTorch always runs
            eagerly: `torch.compile` needs a C++ toolchain and tens of seconds
            per graph.

    Returns:
        `(value, grad)` as NumPy arrays; `grad` has `x`'s shape and is zeros
        where `fn` does not depend on `x`.
    """
    x = ops.convert_to_tensor(x)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        step = jax.value_and_grad(fn)
        value, grad = (jax.jit(step) if jit else step)(x)
    elif backend == "tensorflow":
        import tensorflow as tf

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = fn(x)
            grad = tape.gradient(value, x)
            return value, tf.zeros_like(x) if grad is None else grad

        value, grad = (tf.function(step) if jit else step)(x)
    elif backend == "torch":
        import torch

        x = x.detach().clone().requires_grad_(True)
        value = fn(x)
        grad = None
        if value.requires_grad:
            (grad,) = torch.autograd.grad(value, x, allow_unused=True)
        value = value.detach()
        grad = torch.zeros_like(x) if grad is None else grad
    else:
        raise ValueError(
            "value_and_grad supports the tensorflow, jax and torch backends. "
            f"Received: backend={backend!r}"
        )
    return _to_numpy(value), _to_numpy(grad)


def _to_numpy(tensor) -> np.ndarray:
    """float32 or wider, since NumPy (and TF's conversion) lack bfloat16."""
    if keras.backend.standardize_dtype(tensor.dtype) != "float64":
        tensor = ops.cast(tensor, "float32")
    return np.asarray(ops.convert_to_numpy(tensor))
