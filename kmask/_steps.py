"""Per-step helpers under the pipeline: dtypes, broadcasting a mask to the
steps, and the `where` that neutralises padded steps.

The per-step shape is the predictions' shape without their class axis; a mask
or a weight is `[batch]` or any leading part of it, and gains trailing axes,
never leading ones.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from kmask._shapes import check_same_shape
from kmask.typing import Tensor


def accumulation_dtype(dtype: Any) -> str:
    """float32 for half precision and integers, else the dtype itself."""
    # str() of a TensorFlow dtype is "<dtype: 'float64'>", of torch's "torch.float64".
    return "float64" if "float64" in str(dtype) else "float32"


def align_rank(mask: Any, rank: int):
    """Appends trailing axes to `mask` until it has `rank` dimensions."""
    while len(mask.shape) < rank:
        mask = ops.expand_dims(mask, -1)
    return mask


def squeeze_trailing(tensor: Any, rank: int) -> Tensor:
    """Drops trailing axes of size 1 beyond `rank` (Keras's `[batch, time, 1]`
    weights)."""
    while len(tensor.shape) > rank and tensor.shape[-1] == 1:
        tensor = ops.squeeze(tensor, axis=-1)
    return tensor


def broadcast_to_steps(mask: Any, steps: tuple) -> Tensor:
    """`mask` (`[batch]` or a leading part of `steps`) broadcast to `steps`."""
    mask = ops.convert_to_tensor(mask)
    return ops.broadcast_to(align_rank(mask, len(steps)), steps)


def step_weights(steps: tuple, valid: Any = None, sample_weight: Any = None) -> Tensor:
    """float32 weights of `steps`: 1 where `valid` (0 elsewhere), times
    `sample_weight` (`[batch]` or a leading part of `steps`, trailing axes of
    size 1 dropped)."""
    weight = ops.ones(steps, "float32")
    if valid is not None:
        weight = ops.cast(broadcast_to_steps(valid, steps), "float32")
    if sample_weight is not None:
        sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        sample_weight = squeeze_trailing(sample_weight, len(steps))
        weight = weight * broadcast_to_steps(sample_weight, steps)
    return weight


def where_valid(valid: Any, values: Any):
    """`values` (per-step, or with a trailing class axis) with the steps that
    are not `valid` selected to 0; `values` itself when `valid` is `None`."""
    if valid is None:
        return values
    if len(values.shape) > len(valid.shape):
        valid = ops.expand_dims(valid, -1)
    return ops.where(valid, values, ops.zeros_like(values))


def last_size(tensor: Any):
    """The size of the last axis: an int where it is static, else a tensor of
    `tensor`'s dtype (a `None` dimension under `tf.function`)."""
    size = tensor.shape[-1]
    if size is None:
        size = ops.cast(ops.shape(tensor)[-1], tensor.dtype)
    return size


def dense_inputs(targets: Any, predictions: Any, valid: Any):
    """`(targets, predictions, valid)` as tensors: both values in float32 (or
    float64), `valid` boolean (or `None`); raises unless the shapes match."""
    predictions = ops.convert_to_tensor(predictions)
    dtype = accumulation_dtype(predictions.dtype)
    predictions = ops.cast(predictions, dtype)
    targets = ops.cast(ops.convert_to_tensor(targets), dtype)
    check_same_shape(targets, predictions)
    if valid is not None:
        valid = ops.cast(ops.convert_to_tensor(valid), "bool")
    return targets, predictions, valid
