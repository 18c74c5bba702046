"""The token chunks of the large-vocabulary ops, written once: the real tokens
first, the rows cut into chunks, a chunk's logits, and what a chunk adds to
the gradients of the hidden states, the kernel and the bias.

`kmask.ops.linear.linear_crossentropy` (the head) and
`kmask.ops.linear_divergence` (the chunked distillation) both loop over these
chunks; `options` is either op's options, read for `softcap` (`None`: no cap)
and `transpose_kernel` (a `[vocabulary, width]` kernel, used as stored).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from kmask.ops._rows import column_slice, column_update, softcap, softcap_slope


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
    the gradient of its capped `logits` and its `hidden` rows.

    The share is computed one vocabulary slice at a time (`vocabulary_slices`):
    `d_logits(columns)` gives the gradient's columns `column_slice(...,
    *columns)`, so a chunk's whole `[chunk, vocabulary]` gradient never
    exists, and each slice is used by both matmuls while it is in the
    processor's cache. No compiler fuses the accumulation into the matmul (a
    GEMM with `beta=1`): a share of the `[width, vocabulary]` kernel gradient
    written whole and then added would read and write it from memory twice
    per chunk, which on a CPU costs more than the cut matmuls lose
    (docs/measured.md, "The gradient in vocabulary slices").
    """
    d_hidden, d_kernel, d_bias = grads
    tokens, vocabulary = logits.shape
    width = hidden.shape[1]
    size, shards = vocabulary_slices(width, vocabulary)
    steps = vocabulary // (size * shards)
    # The kernel's vocabulary axis.
    axis = 0 if options.transpose_kernel else 1

    def add_slice(step, found):
        """`found` (`(d_kernel, d_bias, chunk_d_hidden)`) with the share of
        the vocabulary's slice `step`."""
        d_kernel, d_bias, chunk_d_hidden = found
        columns = (step * size, size, shards)
        piece = d_logits(columns)
        if options.softcap is not None:
            capped = column_slice(logits, *columns)
            piece = piece * softcap_slope(capped, options.softcap)
        rows = column_slice(kernel, *columns, axis=axis)
        if options.transpose_kernel:
            chunk_d_hidden += ops.matmul(piece, rows)
            kernel_share = ops.einsum("tv,tw->vw", piece, hidden)
        else:
            chunk_d_hidden += ops.matmul(piece, ops.transpose(rows))
            kernel_share = ops.matmul(ops.transpose(hidden), piece)
        bias_share = column_slice(d_bias, *columns, axis=0) + ops.sum(piece, axis=0)
        if steps == 1:
            return d_kernel + kernel_share, bias_share, chunk_d_hidden
        # Updated in place: a compiler aliases the update's buffer.
        added = column_slice(d_kernel, *columns, axis=axis) + kernel_share
        d_kernel = column_update(d_kernel, columns[0], added, shards, axis)
        d_bias = column_update(d_bias, columns[0], bias_share, shards, 0)
        return d_kernel, d_bias, chunk_d_hidden

    found = (d_kernel, d_bias, ops.zeros((tokens, width), "float32"))
    if steps == 1:
        found = add_slice(0, found)
    else:
        # A loop, not a Python `for`: a compiler would schedule unrolled
        # slices side by side and hold them all.
        found = ops.fori_loop(0, steps, add_slice, found)
    d_kernel, d_bias, chunk_d_hidden = found
    d_hidden = ops.slice_update(d_hidden, [index, 0, 0], chunk_d_hidden[None])
    return d_hidden, d_kernel, d_bias


def columns_of(array: Any) -> Any:
    """`d_logits` for `add_chunk_grads` from a whole `[chunk, vocabulary]`
    gradient: its columns `column_slice(array, *columns)`."""
    return lambda columns: column_slice(array, *columns)


SLICE_BYTES = 4 * 2**20
"""The bytes of the kernel's gradient that `add_chunk_grads` adds a chunk's
share to at a time, per device: a slice small enough to stay in the
processor's cache between the matmul that writes it and the addition that
reads it."""

MAX_SLICES = 16
"""At most this many slices per chunk."""


def vocabulary_slices(width: int, vocabulary: int) -> tuple[int, int]:
    """`(size, shards)`: the slices of the vocabulary over which
    `add_chunk_grads` and the loss (`kmask.ops._rows.row_sums`) read a
    chunk, `size` columns of each of `shards` equal shards at a time
    (`kmask.ops._rows.column_slice`). Pure Python on the static shapes.

    `shards` is the number of devices a Keras `ModelParallel` distribution
    may cut the vocabulary over (`vocabulary_shards`; 1 without one). Per
    shard, `size` is about `SLICE_BYTES` of float32 kernel gradient, at most
    `MAX_SLICES` slices, and a divisor of the shard (the slices are a loop of
    equal steps). `(vocabulary, 1)`, one slice of everything, where no such
    divisor exists."""
    shards = vocabulary_shards()
    if vocabulary % shards:
        return vocabulary, 1
    shard = vocabulary // shards
    wanted = min(MAX_SLICES, max(1, 4 * width * shard // SLICE_BYTES))
    count = next(n for n in range(wanted, 0, -1) if shard % n == 0)
    if count == 1:
        return vocabulary, 1
    return shard // count, shards


def vocabulary_shards() -> int:
    """The devices a Keras `ModelParallel` distribution may shard the
    vocabulary over: its mesh's devices off the batch axis (a kernel
    sharded over the vocabulary is cut over them); 1 without one."""
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.ModelParallel):
        return 1
    mesh = distribution.device_mesh
    sizes = [
        size
        for size, name in zip(mesh.shape, mesh.axis_names, strict=True)
        if name != distribution.batch_dim_name
    ]
    return math.prod(sizes)
