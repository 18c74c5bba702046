"""The chunked cross-entropy of `hidden @ kernel + bias`: the op behind
`kmask.fused_linear_crossentropy`, never holding the `[tokens, vocabulary]`
logits.

Its chunks are `kmask.ops._chunks`' (real tokens first, one chunk's logits at
a time) and each chunk's cross-entropy and gradient are `kmask.ops._rows`',
the same rows as `kmask.ops.crossentropy`'s. On PyTorch the chunk loop runs
as the kernel in `kmask.ops._torch`, picked by `kmask.ops._dispatch`;
`linear_crossentropy_portable` is the `keras.ops` loop whatever the backend.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
from keras import ops

from kmask._shapes import broadcast_to_steps
from kmask.ops._chunks import (
    add_chunk_grads,
    chunk_logits,
    token_chunks,
    vocabulary_slices,
)
from kmask.ops._dispatch import KERNELS, backend_kernel
from kmask.ops._rows import (
    Rows,
    row_crossentropy,
    row_crossentropy_grad,
    row_statistics,
)
from kmask.typing import Tensor

LINEAR_STATS = ("correct", "nll", "z_loss", "predicted", "log_prob", "entropy")
"""The per-step statistics of `linear_crossentropy(return_stats=True)`, in
this order: 1 where the arg max of the (capped) logits is the label, the
label's negative log-likelihood (without label smoothing or z-loss), the
z-loss term `z_loss * logsumexp(logits) ** 2`, the arg max itself (a float32
class id, exact below 2 ** 24), and at `temperature` the label's
log-probability and the entropy of the softmax."""

HEAD_STATS = (
    "loss",
    "nll",
    "correct",
    "weight",
    "z_loss",
    "predicted",
    "log_prob",
    "entropy",
)
"""The per-step statistics `FusedLinearCrossentropy(..., return_stats=True)`
returns on its last axis, in this order, all computed inside the chunks: the
loss, the label's negative log-likelihood (without label smoothing or
z-loss), 1 where the argmax of the (capped) logits is the label, the step's
weight (0 on padding; `sample_weight` and `class_weight` in it), the z-loss
term `z_loss * logsumexp(logits) ** 2`, the argmax itself (a class id as a
float32, exact below 2 ** 24), and at the head's `temperature` the label's
log-probability and the entropy of the softmax. Every one is 0 on padding.
Read by `kmask.HeadAccuracy`, `kmask.HeadPerplexity`, `kmask.HeadZLoss` and
`kmask.HeadEntropy`."""


class LinearOptions(NamedTuple):
    """How `linear_crossentropy` computes: every argument after the arrays.

    Attributes:
        chunk_size: Tokens per chunk.
        label_smoothing: Smoothing towards the uniform distribution.
        z_loss: Coefficient of `logsumexp(logits) ** 2`.
        softcap: `c` to compute on `c * tanh(logits / c)`, or `None`.
        transpose_kernel: Whether the kernel is `[vocabulary, width]` (an
            embedding matrix), used as it is, never transposed in memory.
        temperature: The temperature of the statistics `log_prob` and
            `entropy` (`LINEAR_STATS`); the loss is at temperature 1.
    """

    chunk_size: int = 256
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    transpose_kernel: bool = False
    temperature: float = 1.0


def held_rows(width: int, vocabulary: int, return_stats: bool = False) -> int:
    """The float32 rows of the vocabulary that one token of a chunk holds in
    the current backend's implementation (`kmask._chunking` sizes the
    automatic chunk by it): 2 in the PyTorch kernel (the logits and their
    gradient) and in the `keras.ops` loop over whole rows (the logits before
    and after the bias, which XLA keeps both), as with `return_stats` (whose
    statistics read whole rows); 1 where that loop reads the rows in
    vocabulary slices (`kmask.ops._chunks.vocabulary_slices`): the logits
    before the bias, whatever made the rest fused into each slice's reads."""
    size, shards = vocabulary_slices(width, vocabulary)
    sliced = size * shards < vocabulary and not return_stats
    return 1 if sliced and backend_kernel("linear_crossentropy") is None else 2


def linear_crossentropy(
    hidden: Any,
    kernel: Any,
    labels: Any,
    bias: Any,
    valid: Any,
    value_gradient: Any,
    options: LinearOptions,
    return_stats: bool = False,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...] | None]:
    """The sparse cross-entropy of `hidden @ kernel + bias`, in chunks.

    The tokens are flattened; padded rows of `hidden` are zeroed (a `where`,
    so NaN there cannot reach `kernel`'s gradient through `0 * NaN`) and carry
    a zero coefficient. Both passes loop over chunks of `chunk_size` tokens,
    so memory holds one `[chunk_size, vocabulary]` block. The real tokens are
    put first (and put back after), so the loops stop after the last chunk
    that holds one: padding costs no matmul.

    With `value_gradient` (the gradient of a linear reduction with respect
    to the per-step losses, `kmask.reduce.value_gradient`), the value is
    `sum(value_gradient * per_step)` and its gradient with respect to
    `hidden`, `kernel` and `bias` is computed in the forward pass, in the same
    loop: one matmul for each chunk's logits and two for its gradients, and
    the backward pass scales them. The per-step losses stay differentiable:
    a nonzero upstream gradient of theirs recomputes each chunk's logits.
    The gradients computed ahead are constants to autodiff: no second
    derivative goes through them. The caller passes no `value_gradient`
    where nothing is differentiated (`kmask.ops._dispatch.may_differentiate`).

    Args:
        hidden: `[batch, ..., width]`.
        kernel: `[width, vocabulary]`, or `[vocabulary, width]` with
            `options.transpose_kernel`.
        labels: Integer labels, `hidden`'s shape without its last axis.
        bias: `[vocabulary]`, or `None`.
        valid: Boolean mask, `[batch]` or `labels`' shape, or `None`.
        value_gradient: float32 `d value / d per_step` of `labels`' shape, 0
            where not `valid`; `None` for per-step losses only.
        options: The `LinearOptions`.
        return_stats: Whether to return the per-step statistics
            `LINEAR_STATS`, computed inside the chunks.

    Returns:
        `(per_step, value, stats)`: float32 per-step losses of `labels`'
        shape (0 where not `valid`), the value (`None` without
        `value_gradient`, or where the kernel leaves it to the caller), and
        the statistics `LINEAR_STATS`, a tuple of float32 arrays of `labels`'
        shape (0 where not `valid`; `None` without `return_stats`), which
        have no gradient.
    """
    steps_shape = ops.shape(labels)
    hidden = ops.cast(hidden, "float32")
    kernel = ops.cast(ops.convert_to_tensor(kernel), "float32")
    width = kernel.shape[1 if options.transpose_kernel else 0]
    hidden = ops.reshape(hidden, (-1, width))
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    if valid is None:
        valid = ops.ones_like(labels, dtype="bool")
    else:
        valid = ops.reshape(broadcast_to_steps(valid, steps_shape), (-1,))
    labels = ops.where(valid, labels, ops.zeros_like(labels))
    hidden = ops.where(ops.expand_dims(valid, -1), hidden, ops.zeros_like(hidden))
    if bias is not None:
        bias = ops.cast(ops.convert_to_tensor(bias), "float32")
    if value_gradient is not None:
        value_gradient = ops.reshape(value_gradient, (-1,))
    kernel_op = KERNELS[keras.backend.backend(), "linear_crossentropy"]
    if kernel_op is None:
        kernel_op = linear_crossentropy_portable
    per_step, value, stats = kernel_op(
        hidden, kernel, bias, labels, valid, value_gradient, options, return_stats
    )
    per_step = ops.reshape(per_step, steps_shape)
    if stats is not None:
        stats = tuple(ops.reshape(stat, steps_shape) for stat in stats)
    return per_step, value, stats


def linear_crossentropy_portable(
    hidden: Any,
    kernel: Any,
    bias: Any,
    labels: Any,
    valid: Any,
    value_gradient: Any,
    options: LinearOptions,
    return_stats: bool = False,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...] | None]:
    """The chunk loop of `linear_crossentropy` in `keras.ops`, whatever the
    backend, on the flat inputs its PyTorch kernel takes: float32 `hidden`
    `[tokens, width]` (rows that are not `valid` zeroed), float32 `kernel`
    and `bias` (or `None`), int32 `labels` `[tokens]` (0 where not `valid`),
    boolean `valid` `[tokens]`, float32 `value_gradient` `[tokens]` or
    `None`; the per-step outputs are `[tokens]`."""
    rows = [labels, ops.cast(valid, "int32")]
    if value_gradient is not None:
        rows.append(value_gradient)
    chunks = token_chunks(valid, options.chunk_size, *rows)
    labels, valid, *given = chunks.rows
    valid = ops.cast(valid, "bool")
    gradient = given[0] if given else None
    params = [hidden, kernel] if bias is None else [hidden, kernel, bias]
    per_step, stats, value = _chunked_crossentropy(
        labels, valid, gradient, options, return_stats, chunks, *params
    )
    per_step = chunks.unchunk(per_step)
    if stats is not None:
        stats = tuple(ops.stop_gradient(chunks.unchunk(stat)) for stat in stats)
    return per_step, value, stats


def _chunked_crossentropy(
    labels, valid, gradient, options, return_stats, chunks, *params
):
    """The custom gradient over `(hidden [tokens, width], kernel[, bias])`:
    `(per_step, stats, value)`, the per-step losses `[chunks, size]` of the
    `TokenChunks` `chunks`, with `return_stats` the statistics
    `LINEAR_STATS` (stacked on the losses as one output, of which only the
    losses have a gradient), and with `gradient` (`d value / d per_step`,
    `[chunks, size]`) the value, whose gradient the forward loop computes
    (else `None`). The backward pass recomputes each chunk's logits only for
    a nonzero upstream gradient of the per-step losses. The loops run over
    the first `chunks.active` chunks (the others are padding: 0, with a 0
    gradient)."""
    label_smoothing, z_loss = options.label_smoothing, options.z_loss
    active = chunks.active
    # Inside the custom gradient a constant (JAX refuses a differentiated
    # value captured there); its own gradient flows through the product
    # that makes the value, below.
    coefficient = None if gradient is None else ops.stop_gradient(gradient)
    empty = ops.zeros((chunks.chunks, chunks.size), "float32")
    # tops, log sums, losses; then correct, nll, predicted, log_prob, entropy.
    buffers = (empty,) * (8 if return_stats else 3)
    ahead = gradient is not None

    def zero_grads(hidden, kernel):
        vocabulary = kernel.shape[0 if options.transpose_kernel else 1]
        return (
            # Chunk by chunk, in the chunks' order (`chunks.unchunk`).
            ops.zeros((chunks.chunks, chunks.size, hidden.shape[1]), "float32"),
            ops.zeros_like(kernel),
            ops.zeros((vocabulary,), "float32"),
        )

    @ops.custom_gradient
    def crossentropy(*params):
        hidden, kernel, bias = (*params, None)[:3]

        def chunk_rows(index, rows, upstream, grads):
            """Chunk `index`'s logits; with `upstream` (the gradient of its
            per-step losses), `grads` with its share added."""
            chunk_hidden = chunks.take(hidden, index)
            logits = chunk_logits(chunk_hidden, kernel, bias, options)
            chunk_labels = ops.take(labels, index, axis=0)
            if rows is None:
                # Read in the gradient's vocabulary slices: the biased (or
                # capped) logits are never held whole.
                rows = row_crossentropy(
                    logits,
                    chunk_labels,
                    label_smoothing,
                    z_loss,
                    slices=vocabulary_slices(chunk_hidden.shape[1], logits.shape[1]),
                )
            if upstream is not None:
                chunk_upstream = ops.take(upstream, index, axis=0)
                chunk_valid = ops.take(valid, index, axis=0)

                def d_logits(columns):
                    # Recomputed from the logits, slice by slice: a whole
                    # chunk of exponentials is never held.
                    return row_crossentropy_grad(
                        logits,
                        rows,
                        chunk_labels,
                        chunk_upstream,
                        chunk_valid,
                        label_smoothing,
                        z_loss,
                        columns=columns,
                    )

                grads = add_chunk_grads(
                    grads, index, d_logits, logits, chunk_hidden, kernel, options
                )
            return logits, chunk_labels, rows, grads

        def forward_chunk(index, carry):
            split = len(carry) - 3 if ahead else len(carry)
            buffers, grads = carry[:split], tuple(carry[split:])
            logits, chunk_labels, rows, grads = chunk_rows(
                index, None, coefficient, grads
            )
            values = [rows.top, rows.log_sum, rows.per_step]
            if return_stats:
                predicted, log_prob, entropy = row_statistics(
                    logits, chunk_labels, options.temperature
                )
                values += [
                    ops.cast(ops.equal(predicted, chunk_labels), "float32"),
                    rows.nll,
                    ops.cast(predicted, "float32"),
                    log_prob,
                    entropy,
                ]
            buffers = tuple(
                ops.slice_update(buffer, [index, 0], ops.expand_dims(value, 0))
                for buffer, value in zip(buffers, values, strict=True)
            )
            return buffers + tuple(grads)

        carry = buffers + (zero_grads(hidden, kernel) if ahead else ())
        tops, log_sums, *outputs = ops.fori_loop(0, active, forward_chunk, carry)
        ahead_grads = outputs[len(outputs) - 3 :] if ahead else None
        outputs = outputs[: len(outputs) - 3] if ahead else outputs
        if return_stats:
            z_term = z_loss * ops.square(tops + log_sums)
            outputs = [*outputs[:3], z_term, *outputs[3:]]
        outputs = [ops.where(valid, found, ops.zeros_like(found)) for found in outputs]
        if ahead:
            # The anchor: zeros whose sum the value adds, so that the value's
            # upstream gradient reaches `grad` (one output: Keras's PyTorch
            # custom gradient takes no tuple).
            outputs.append(ops.zeros_like(outputs[0]))
        output = ops.stack(outputs) if len(outputs) > 1 else outputs[0]

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            d_per_step = upstream[0] if len(outputs) > 1 else upstream

            def backward_chunk(index, grads):
                rows = Rows(
                    ops.take(tops, index, axis=0),
                    ops.take(log_sums, index, axis=0),
                    1.0,
                    None,
                    None,
                    None,
                )
                return chunk_rows(index, rows, d_per_step, grads)[3]

            # The per-step losses' own gradient, only when something uses
            # them: the loop then recomputes the logits of every chunk.
            used = ops.any(ops.not_equal(d_per_step, 0.0))
            trips = ops.where(used, active, ops.zeros_like(active))
            start = zero_grads(hidden, kernel)
            if ahead_grads is not None:
                # The anchor is summed: its upstream is the value's,
                # everywhere. The loop adds to the gradients computed
                # ahead, in their buffers.
                d_value = upstream[-1][0, 0]
                start = tuple(found * d_value for found in ahead_grads)
            d_hidden, *found = ops.fori_loop(0, trips, backward_chunk, start)
            return (chunks.unchunk(d_hidden), *found)[: len(params)]

        return output, grad

    output = crossentropy(*params)
    value = None
    if ahead:
        # The value's gradient with respect to the parameters flows through
        # the anchor (its gradient computed ahead), with respect to
        # `gradient` (weights that are trainable) through the product.
        per_step = ops.stop_gradient(output[0])
        value = ops.sum(output[-1]) + ops.sum(gradient * per_step)
    if return_stats:
        # Indexed one by one: a traced TensorFlow tensor cannot be iterated.
        stats = tuple(output[row] for row in range(1, len(LINEAR_STATS) + 1))
        return output[0], stats, value
    return (output[0] if ahead else output), None, value
