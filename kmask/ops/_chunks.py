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


class TokenChunks:
    """The tokens of a chunked op cut into chunks, the real ones first:
    made by `token_chunks`.

    A loop over the chunks reads chunk `index`'s rows of an array in one of
    two ways: cut whole into `rows` (a copy in the chunks' order, read with
    `ops.take(rows, index, axis=0)`), or `take`n from the `[tokens, ...]`
    array (a gather of `size` rows each time: no copy). The head `take`s its
    hidden states, whose copy and its gradient's were a third of its
    temporary memory; the chunked distillation cuts its two, which it reads
    twice per chunk (gathered, its backward pass took 1.08x the time).
    `unchunk` puts a per-chunk output `[chunks, size, ...]` back into the
    tokens' order.

    Attributes:
        chunks: The number of chunks.
        active: The number of chunks that hold a real token (these come
            first): the loops stop after them, so padding costs no matmul.
        size: The rows of a chunk.
        rows: The `rows` given to `token_chunks`, each `[chunks, size,
            ...]`, 0 in the last chunk's padding.
    """

    def __init__(self, valid: Any, chunk_size: int, rows: tuple) -> None:
        tokens = ops.shape(valid)[0]
        self.shards = shards = batch_shards(tokens)
        valid = ops.reshape(valid, (shards, -1))
        self.length = length = ops.shape(valid)[1]
        position = ops.arange(length, dtype="int32")
        order = ops.argsort(ops.where(valid, 0, length) + position, axis=-1)
        self.restore = ops.argsort(order, axis=-1)
        chunk = chunk_size
        if isinstance(length, int):
            chunk = min(chunk_size, max(length, 1))
        chunks = (length + chunk - 1) // chunk
        self.chunk, self.size = chunk, shards * chunk
        self.chunks = (
            max(chunks, 1) if isinstance(chunks, int) else ops.maximum(chunks, 1)
        )
        most = ops.amax(ops.sum(ops.cast(valid, "int32"), axis=1))
        self.active = (most + chunk - 1) // chunk
        # Each chunk's positions in each shard. The last chunk's padding
        # reads position 0 (whatever token it holds: the padding's `valid`
        # row is 0, so its loss and gradient are 0, and `unchunk` drops it).
        self.index = ops.reshape(self._cut(order), (self.chunks, shards, chunk))
        self.rows = [self._cut(along_shards(self._sharded(row), order)) for row in rows]

    def take(self, array: Any, index: Any) -> Any:
        """Chunk `index`'s rows of `array` (`[tokens, ...]`): `[size,
        ...]`."""
        if isinstance(self.length, int) and self.length == 0:
            # No token: the one chunk is padding.
            return ops.zeros((self.size, *array.shape[1:]), array.dtype)
        positions = ops.take(self.index, index, axis=0)
        rows = along_shards(self._sharded(array), positions)
        return ops.reshape(rows, (self.size, *array.shape[1:]))

    def unchunk(self, values: Any) -> Any:
        """`values` (`[chunks, size, ...]`, one row per chunk row) in the
        tokens' order: `[tokens, ...]`."""
        rest = values.shape[2:]
        values = ops.reshape(values, (self.chunks, self.shards, self.chunk, *rest))
        values = ops.reshape(ops.moveaxis(values, 1, 0), (self.shards, -1, *rest))[
            :, : self.length
        ]
        return ops.reshape(along_shards(values, self.restore), (-1, *rest))

    def _sharded(self, array: Any) -> Any:
        """`array` (`[tokens, ...]`) as `[shards, tokens / shards, ...]`."""
        return ops.reshape(array, (self.shards, -1, *array.shape[1:]))

    def _cut(self, rows: Any) -> Any:
        """`rows` (`[shards, length, ...]`) padded with 0 to whole chunks,
        as `[chunks, size, ...]`: chunk `i` is the `i`-th chunk of every
        shard, side by side."""
        chunks, chunk, rest = self.chunks, self.chunk, rows.shape[2:]
        padding = [[0, 0], [0, chunks * chunk - self.length]] + [[0, 0]] * len(rest)
        rows = ops.reshape(ops.pad(rows, padding), (self.shards, chunks, chunk, *rest))
        return ops.reshape(ops.moveaxis(rows, 0, 1), (chunks, self.size, *rest))


def token_chunks(valid: Any, chunk_size: int, *rows: Any) -> TokenChunks:
    """The tokens (`valid`, the boolean `[tokens]`: the real ones) in chunks
    of `chunk_size`, the real tokens first, with `rows` (`[tokens, ...]`)
    cut alike (`TokenChunks`).

    A batch smaller than a chunk is one chunk of its own size; an empty one
    has one chunk of padding, so the buffers have a shape.

    Under a Keras distribution that shards the batch over `shards` devices
    (`batch_shards`), the tokens are reordered within each device's shard,
    never across it. Chunk `i` is the `i`-th chunk of every shard, side by
    side: every index the loops take is on an axis that is not sharded, so
    a device holds only its own tokens (a global reorder would gather every
    device's hidden states, and their gradient, on each), and the loops run
    over the chunks of the shard with the most real tokens."""
    return TokenChunks(valid, chunk_size, rows)


def along_shards(rows: Any, order: Any) -> Any:
    """`rows` (`[shards, length, ...]`) taken in `order` (`[shards, n]`)
    along their second axis, each shard in its own order: `[shards, n,
    ...]`."""
    if order.shape[0] == 1:
        # One shard: the plain gather of an unsharded op.
        return ops.expand_dims(ops.take(rows[0], order[0], axis=0), 0)
    index = ops.reshape(order, (*order.shape, *[1] * (len(rows.shape) - 2)))
    return ops.take_along_axis(rows, index, axis=1)


def batch_shards(tokens: Any) -> int:
    """The devices a Keras distribution shards the batch over (its mesh's
    batch axis), when they divide the (static) number of `tokens`; else
    1."""
    distribution = keras.distribution.distribution()
    name = getattr(distribution, "batch_dim_name", None)
    if name is None or not isinstance(tokens, int):
        return 1
    mesh = distribution.device_mesh
    if name not in mesh.axis_names:
        return 1
    size = mesh.shape[list(mesh.axis_names).index(name)]
    return size if tokens % size == 0 else 1


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
    the gradient of its capped `logits` and its `hidden` rows (`d_hidden` is
    `[chunks, rows, width]`, in the chunks' order).

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
    vocabulary = logits.shape[1]
    size, shards = vocabulary_slices(hidden.shape[1], vocabulary)
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

    # Added to what the chunk's rows hold (a loop may start from a
    # gradient computed ahead).
    found = (d_kernel, d_bias, ops.take(d_hidden, index, axis=0))
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
