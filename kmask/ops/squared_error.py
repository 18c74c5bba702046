"""The per-step mean squared error with a gradient that selects padding away
inside itself; on PyTorch its kernel in `kmask.ops._torch`."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kmask._shapes import dense_inputs, last_size, where_valid
from kmask.ops._dispatch import KERNELS
from kmask.typing import Tensor


def mean_squared_error(targets: Any, predictions: Any, valid: Any = None) -> Tensor:
    """The per-step mean squared error over the last axis, fused.

    `mean((predictions - targets) ** 2)`, whose gradient is one expression,
    `where(valid, 2 * (predictions - targets) * upstream / features, 0)`: no
    `where` over the inputs, and XLA fuses the backward pass into one loop.
    Computed in float32 (float64 stays float64).

    Args:
        targets: `predictions`' shape; anything (NaN, inf) at a step that is
            not `valid`.
        predictions: `[..., features]`.
        valid: Optional boolean mask of the per-step shape (`predictions`'
            shape without the last axis), `True` on real steps.

    Returns:
        Per-step losses, 0 where not `valid`, with gradients (for both
        inputs) exactly 0 there whatever the inputs hold.

    Example:

    >>> from keras import ops
    >>> from kmask.ops import mean_squared_error
    >>> targets = [[[1.0, 3.0], [float("nan"), 0.0]]]
    >>> predictions = [[[0.0, 0.0], [1.0, float("inf")]]]
    >>> per_step = mean_squared_error(targets, predictions, valid=[[True, False]])
    >>> ops.convert_to_numpy(per_step)  # (1 + 9) / 2, then padding
    array([[5., 0.]], dtype=float32)
    """
    targets, predictions, valid = dense_inputs(targets, predictions, valid)
    kernel = KERNELS[keras.backend.backend(), "mean_squared_error"]
    if kernel is not None:
        return kernel(targets, predictions, valid)
    features = last_size(predictions)

    @ops.custom_gradient
    def squared_error(predictions, targets):
        per_step = ops.mean(ops.square(predictions - targets), axis=-1)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            coefficient = where_valid(valid, upstream) * (2.0 / features)
            d_predictions = where_valid(
                valid, ops.expand_dims(coefficient, -1) * (predictions - targets)
            )
            return d_predictions, -d_predictions

        return where_valid(valid, per_step), grad

    return squared_error(predictions, targets)
