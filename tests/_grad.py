"""`value_and_grad` for tests: NumPy in, NumPy out, over the one backend
dispatcher of `tools.backends`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from tools import backends


def value_and_grad(
    fn: Callable[[Any], Any], x: Any, jit: bool = False, has_aux: bool = False
) -> tuple[Any, np.ndarray]:
    """Evaluates `fn(x)` and its gradient with respect to `x`.

    Args:
        fn: Takes one tensor, returns a scalar tensor.
        x: The point, anything `keras.ops.convert_to_tensor` takes; a float
            dtype is kept.
        jit: Trace `fn` first (`jax.jit`, `tf.function`; PyTorch runs eagerly).
        has_aux: `fn` returns `(scalar, aux)`, `aux` one tensor.

    Returns:
        `(value, grad)` as NumPy arrays (`value` is `(scalar, aux)` with
        `has_aux`); `grad` has `x`'s shape and is zeros where `fn` does not
        depend on `x`.
    """
    step = backends.value_and_grad(fn, jit=jit, has_aux=has_aux)
    value, (grad,) = step(ops.convert_to_tensor(x))
    if has_aux:
        return (_to_numpy(value[0]), _to_numpy(value[1])), _to_numpy(grad)
    return _to_numpy(value), _to_numpy(grad)


def _to_numpy(tensor) -> np.ndarray:
    """float32 or wider, since NumPy (and TF's conversion) lack bfloat16."""
    if keras.backend.standardize_dtype(tensor.dtype) != "float64":
        tensor = ops.cast(tensor, "float32")
    return np.asarray(ops.convert_to_numpy(tensor))
