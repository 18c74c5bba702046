"""How many tokens the large-vocabulary head computes at a time.

`chunk_size="auto"` (the default of `kmask.fused_linear_crossentropy` and
`kmask.FusedLinearCrossentropy`) sizes a chunk from the head's static shapes
and a byte budget, as PyTorch's `LinearCrossEntropyOptions(chunking_method=
"aspect_ratio")` sizes its chunk from them: the largest power of two of
tokens whose float32 working set fits `CHUNK_BUDGET_BYTES`. Per token of a
chunk that working set is two rows of the vocabulary (`2 * vocabulary`
floats) and its row of `hidden` and of `hidden`'s gradient (`2 * hidden_size`
floats). The two rows: in the PyTorch kernel, the logits and their gradient;
in the `keras.ops` loop, which holds the gradient only one vocabulary slice at
a time (`kmask.ops._chunks.slice_size`), the logits before and after the bias,
which XLA keeps both. Pure Python on the kernel's shape, so it compiles whole
and never depends on the data.
"""

from __future__ import annotations

from typing import Any

AUTO = "auto"

CHUNK_BUDGET_BYTES = 128 * 2**20
"""The bytes one chunk may hold under `chunk_size="auto"`: 256 tokens at a
vocabulary of 32768 and a hidden size of 512 (the chunk measured in
docs/measured.md), 32 at Gemma's 262144."""

MIN_CHUNK = 16
"""The smallest automatic chunk: below it the matmuls are too thin to run
near the machine's speed, whatever the vocabulary."""

MAX_CHUNK = 8192
"""The largest automatic chunk: past it a small vocabulary gains nothing."""


def check_chunk_size(chunk_size: Any) -> None:
    """Raises the head's `ValueError` unless `chunk_size` is a positive
    integer or `"auto"`."""
    if chunk_size == AUTO and isinstance(chunk_size, str):
        return
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
        raise ValueError(
            "Invalid value for argument `chunk_size`. Expected a positive "
            f"integer or 'auto'. Received: chunk_size={chunk_size!r}"
        )


def auto_chunk_size(
    hidden_size: int, vocabulary: int, budget: int = CHUNK_BUDGET_BYTES
) -> int:
    """The largest power of two of tokens whose float32 logits, their
    gradient, and their rows of `hidden` and its gradient fit `budget`
    bytes, between `MIN_CHUNK` and `MAX_CHUNK`.

    Args:
        hidden_size: The kernel's hidden size.
        vocabulary: The number of classes.
        budget: Bytes for one chunk.

    Returns:
        The number of tokens per chunk.
    """
    per_token = 4 * 2 * (int(vocabulary) + int(hidden_size))
    fits = max(budget // per_token, 1)
    chunk = 1 << (fits.bit_length() - 1)
    return min(max(chunk, MIN_CHUNK), MAX_CHUNK)


def resolve_chunk_size(chunk_size: int | str, hidden_size: int, vocabulary: int) -> int:
    """`chunk_size` itself, or with `"auto"` the `auto_chunk_size` of the
    budget `CHUNK_BUDGET_BYTES` holds now."""
    if chunk_size == AUTO:
        return auto_chunk_size(hidden_size, vocabulary, CHUNK_BUDGET_BYTES)
    return int(chunk_size)
