"""Packed sequences: several sequences share one row.

`segment_ids` (`[batch, time]` integers) number the sequences packed in each
row `1, 2, ...`; `0` is padding. `segment_weights` turns them into per-step
weights so that any kmask loss with its default `"token_mean"` counts every
packed sequence once; `shift_labels` builds next-token labels that never
cross from one packed sequence into the next.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from kmask import _shapes
from kmask.masks import segment_step_counts
from kmask.reduce import divide_or_zero
from kmask.typing import Tensor

__all__ = ["segment_weights", "shift_labels"]


def segment_weights(segment_ids: Any) -> Tensor:
    """Per-step weights that make every packed sequence count once.

    Each step of a packed sequence of `n` steps weighs `1/n`; padding
    (id 0) weighs 0. Passed as `sample_weight` to a kmask loss with
    `reduction="token_mean"`, the loss is the mean over packed sequences of
    each sequence's own mean: the weights sum to the number of sequences, and
    the denominator stays global across replicas and accumulation steps.

    Args:
        segment_ids: Integer tensor `[batch, time]`: `k > 0` at the steps of
            the k-th sequence packed in that row, `0` at padding. Each run of
            equal ids is one sequence.

    Returns:
        float32 weights `[batch, time]`.

    Example:

    >>> import kmask
    >>> from keras import ops
    >>> ops.convert_to_numpy(kmask.segment_weights([[1, 1, 2, 2, 2, 0]])).round(3)
    array([[0.5  , 0.5  , 0.333, 0.333, 0.333, 0.   ]], dtype=float32)
    """
    segment_ids = ops.convert_to_tensor(segment_ids)
    if len(segment_ids.shape) != 2:
        raise _shapes.invalid_shape(
            "segment_ids", "[batch, time]", segment_ids=segment_ids.shape
        )
    real = ops.cast(ops.not_equal(segment_ids, 0), "float32")
    return divide_or_zero(real, segment_step_counts(segment_ids, real))


def shift_labels(
    tokens: Any, segment_ids: Any = None, mask_value: int = -100
) -> Tensor:
    """Next-token labels that stop at every packing boundary.

    The label at step `t` is `tokens[:, t + 1]` when steps `t` and `t + 1`
    belong to the same packed sequence (equal, non-zero ids), else
    `mask_value`: the last step of every sequence and the padding are masked,
    and no label reaches across a boundary.

    Args:
        tokens: Integer tokens `[batch, time]`.
        segment_ids: Optional integer `[batch, time]` ids as in
            `segment_weights`; without them each row is one sequence and only
            its last step is masked.
        mask_value: The label given to masked steps.

    Returns:
        Labels of `tokens`' dtype and shape.

    Example:

    >>> import kmask
    >>> from keras import ops
    >>> tokens = [[5, 6, 7, 8, 9, 0]]
    >>> ids = [[1, 1, 1, 2, 2, 0]]
    >>> ops.convert_to_numpy(kmask.shift_labels(tokens, ids))
    array([[   6,    7, -100,    9, -100, -100]], dtype=int32)
    """
    tokens = ops.convert_to_tensor(tokens)
    if len(tokens.shape) != 2:
        raise _shapes.invalid_shape("tokens", "[batch, time]", tokens=tokens.shape)
    next_tokens = ops.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    if segment_ids is None:
        same = ops.ones_like(tokens[:, 1:], dtype="bool")
    else:
        segment_ids = ops.convert_to_tensor(segment_ids)
        if not _shapes.same_shape(tuple(segment_ids.shape), tuple(tokens.shape)):
            raise _shapes.invalid_shape(
                "segment_ids",
                "the shape of `tokens`",
                segment_ids=segment_ids.shape,
                tokens=tokens.shape,
            )
        current, following = segment_ids[:, :-1], segment_ids[:, 1:]
        same = ops.logical_and(ops.equal(current, following), ops.not_equal(current, 0))
    last = ops.zeros_like(tokens[:, :1], dtype="bool")
    has_next = ops.concatenate([same, last], axis=1)
    return ops.where(has_next, next_tokens, ops.cast(mask_value, tokens.dtype))
