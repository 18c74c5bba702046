"""The token chunks of the large-vocabulary ops, written once: the real tokens
first, the rows cut into chunks, a chunk's logits, and what a chunk adds to
the gradients of the hidden states, the kernel and the bias.

`kmask.ops.linear.linear_crossentropy` (the head) and
`kmask.ops.linear_divergence` (the chunked distillation) both loop over these
chunks; `options` is either op's options, read for `softcap` (`None`: no cap)
and `transpose_kernel` (a `[vocabulary, width]` kernel, used as stored).
"""

from __future__ import annotations

from typing import Any

from keras import ops

from kmask.ops._rows import softcap, softcap_slope


def real_first(valid: Any) -> Any:
    """The order that puts the `valid` tokens (`[tokens]`) first, each group
    in its own order: the loops stop after the last chunk that holds one, so
    padding costs no matmul."""
    tokens = ops.shape(valid)[0]
    return ops.argsort(ops.where(valid, 0, tokens) + ops.arange(tokens, dtype="int32"))


def to_chunks(tokens: Any, valid: Any, chunk_size: int, *rows: Any):
    """`(chunks, active, chunked rows)`: `rows` (`[tokens, ...]`) padded to a
    whole number of chunks and reshaped to `[chunks, chunk, ...]`, and the
    number of chunks that hold a `valid` token (these come first). A batch
    smaller than a chunk is one chunk of its own size; an empty one has one
    chunk of padding, so the buffers have a shape."""
    chunk = min(chunk_size, max(tokens, 1)) if isinstance(tokens, int) else chunk_size
    chunks = (tokens + chunk - 1) // chunk
    chunks = max(chunks, 1) if isinstance(chunks, int) else ops.maximum(chunks, 1)
    active = (ops.sum(ops.cast(valid, "int32")) + chunk - 1) // chunk
    extra = chunks * chunk - tokens
    chunked = []
    for row in rows:
        padding = [[0, extra]] + [[0, 0]] * (len(row.shape) - 1)
        chunked.append(
            ops.reshape(ops.pad(row, padding), (chunks, chunk, *row.shape[1:]))
        )
    return chunks, active, chunked


def chunk_logits(hidden: Any, kernel: Any, bias: Any, options: Any) -> Any:
    """A chunk's logits, capped with `options.softcap`; a `[vocabulary,
    width]` kernel is contracted on its last axis (`einsum`), never
    transposed in memory."""
    if options.transpose_kernel:
        logits = ops.einsum("tw,vw->tv", hidden, kernel)
    else:
        logits = ops.matmul(hidden, kernel)
    if bias is not None:
        logits = logits + bias
    return softcap(logits, options.softcap)


def add_chunk_grads(
    grads: tuple[Any, Any, Any],
    index: Any,
    d_logits: Any,
    logits: Any,
    hidden: Any,
    kernel: Any,
    options: Any,
) -> tuple[Any, Any, Any]:
    """`(d_hidden, d_kernel, d_bias)` with chunk `index`'s share added, from
    the gradient of its capped `logits` (`d_logits`) and its `hidden` rows."""
    d_hidden, d_kernel, d_bias = grads
    if options.softcap is not None:
        d_logits = d_logits * softcap_slope(logits, options.softcap)
    if options.transpose_kernel:
        chunk_d_hidden = ops.matmul(d_logits, kernel)
        chunk_d_kernel = ops.einsum("tv,tw->vw", d_logits, hidden)
    else:
        chunk_d_hidden = ops.matmul(d_logits, ops.transpose(kernel))
        chunk_d_kernel = ops.matmul(ops.transpose(hidden), d_logits)
    return (
        ops.slice_update(d_hidden, [index, 0, 0], chunk_d_hidden[None]),
        d_kernel + chunk_d_kernel,
        d_bias + ops.sum(d_logits, axis=0),
    )
