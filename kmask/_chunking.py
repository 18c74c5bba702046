"""How many tokens the large-vocabulary head computes at a time.

`chunk_size="auto"` (the default of `kmask.fused_linear_crossentropy` and
`kmask.FusedLinearCrossentropy`) sizes a chunk from the head's static shapes
and a byte budget, as PyTorch's `LinearCrossEntropyOptions(chunking_method=
"aspect_ratio")` sizes its chunk from them: the largest power of two of
tokens whose float32 working set fits `CHUNK_BUDGET_BYTES`. Per token of a
chunk that working set is the rows of the vocabulary the implementation holds
(`kmask.ops.linear.held_rows`) and its row of `hidden` and of `hidden`'s
gradient (`2 * hidden_size` floats). Pure Python on the kernel's shape, so it
compiles whole and never depends on the data.
"""

from __future__ import annotations

from typing import Any

AUTO = "auto"

CHUNK_BUDGET_BYTES = 128 * 2**20
"""The bytes one chunk may hold under `chunk_size="auto"`: at a vocabulary of
32768 and a hidden size of 512 (the head measured in docs/measured.md), 256
tokens where two rows of the vocabulary are held per token, 512 where one is;
at Gemma's 262144, 32 or 64."""

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
    hidden_size: int,
    vocabulary: int,
    budget: int = CHUNK_BUDGET_BYTES,
    rows: int = 2,
) -> int:
    """The largest power of two of tokens whose `rows` float32 rows of the
    vocabulary and rows of `hidden` and its gradient fit `budget` bytes,
    between `MIN_CHUNK` and `MAX_CHUNK`.

    Args:
        hidden_size: The kernel's hidden size.
        vocabulary: The number of classes.
        budget: Bytes for one chunk.
        rows: Rows of the vocabulary held per token.

    Returns:
        The number of tokens per chunk.
    """
    per_token = 4 * (int(rows) * int(vocabulary) + 2 * int(hidden_size))
    fits = max(budget // per_token, 1)
    chunk = 1 << (fits.bit_length() - 1)
    return min(max(chunk, MIN_CHUNK), MAX_CHUNK)


def resolve_chunk_size(
    chunk_size: int | str, hidden_size: int, vocabulary: int, rows: int = 2
) -> int:
    """`chunk_size` itself, or with `"auto"` the `auto_chunk_size` of the
    budget `CHUNK_BUDGET_BYTES` holds now, at `rows` rows of the vocabulary
    per token."""
    if chunk_size == AUTO:
        return auto_chunk_size(hidden_size, vocabulary, CHUNK_BUDGET_BYTES, rows)
    return int(chunk_size)
