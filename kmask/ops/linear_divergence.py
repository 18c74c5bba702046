"""The divergence of `student_hidden @ student_kernel` from `teacher_hidden @
teacher_kernel`, in chunks of tokens: neither `[tokens, vocabulary]` logits
array is ever held.

Both passes loop over chunks of `chunk_size` tokens; the backward pass
recomputes each chunk's logits (the teacher's too) and takes the gradient
of the divergence from `kmask.ops.divergence.row_divergence_grad`. The real
tokens are put first, so the loops stop after the last chunk that holds one:
padded tokens cost no matmul (under `torch.compile`, which cannot trace a
loop bound held in a tensor, every chunk runs). The teacher gets no
gradient. The chunks, their logits (soft cap included) and their share of
the gradients are the head's (`kmask.ops._chunks`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from keras import ops

from kmask.ops._chunks import (
    add_chunk_grads,
    chunk_logits,
    columns_of,
    token_chunks,
)
from kmask.ops._dispatch import compiling
from kmask.ops.divergence import Divergence, row_divergence, row_divergence_grad


class Chunking(NamedTuple):
    """How the tokens are chunked: `chunk_size`, the soft cap applied to
    both models' logits (`None`: none), and whether both kernels are
    `[vocabulary, width]` (tied embeddings, used as stored)."""

    chunk_size: int = 256
    softcap: float | None = None
    transpose_kernel: bool = False


def linear_divergence(
    student: tuple[Any, Any, Any],
    teacher: tuple[Any, Any, Any],
    valid: Any,
    options: Divergence,
    chunking: Chunking,
) -> Any:
    """The per-token divergence of the two linear heads, in chunks.

    Args:
        student: `(hidden [tokens, width], kernel, bias or None)`, float32.
        teacher: The same for the teacher (its own width); no gradient.
        valid: Boolean `[tokens]`: the real tokens.
        options: The divergence and temperature.
        chunking: The `Chunking`.

    Returns:
        float32 `[tokens]`, 0 where not `valid`; its gradient reaches the
        student's hidden states, kernel and bias (0 at padded tokens).
    """
    (student_hidden, student_kernel, student_bias) = student
    teacher_hidden, teacher_kernel, teacher_bias = (
        None if part is None else ops.stop_gradient(part) for part in teacher
    )
    student_hidden = ops.where(valid[:, None], student_hidden, 0.0)
    teacher_hidden = ops.where(valid[:, None], teacher_hidden, 0.0)
    chunks = token_chunks(
        valid,
        chunking.chunk_size,
        student_hidden,
        teacher_hidden,
        ops.cast(valid, "int32"),
    )
    student_hidden, teacher_hidden, valid = chunks.rows
    valid = ops.cast(valid, "bool")
    # torch.compile cannot trace a loop whose bound is a tensor: there every
    # chunk runs, the padding's (last) ones on zeroed rows.
    active = chunks.chunks if compiling() else chunks.active
    per_chunk = ops.zeros(ops.shape(valid), "float32")

    def teacher_logits(index):
        hidden = ops.take(teacher_hidden, index, axis=0)
        return chunk_logits(hidden, teacher_kernel, teacher_bias, chunking)

    params = [student_hidden, student_kernel]
    params += [] if student_bias is None else [student_bias]

    @ops.custom_gradient
    def divergence(*params):
        hidden, kernel, bias = (*params, None)[:3]

        def forward(index, per_step):
            logits = chunk_logits(
                ops.take(hidden, index, axis=0), kernel, bias, chunking
            )
            value = row_divergence(teacher_logits(index), logits, options)
            return ops.slice_update(per_step, [index, 0], value[None])

        per_step = ops.fori_loop(0, active, forward, per_chunk)
        per_step = ops.where(valid, per_step, 0.0)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream = ops.where(valid, upstream, 0.0)

            def backward(index, grads):
                chunk_hidden = ops.take(hidden, index, axis=0)
                logits = chunk_logits(chunk_hidden, kernel, bias, chunking)
                d_logits = row_divergence_grad(
                    teacher_logits(index),
                    logits,
                    options,
                    ops.take(upstream, index, axis=0),
                )
                return add_chunk_grads(
                    grads,
                    index,
                    columns_of(d_logits),
                    logits,
                    chunk_hidden,
                    kernel,
                    chunking,
                )

            vocabulary = kernel.shape[0 if chunking.transpose_kernel else 1]
            zeros = (
                ops.zeros_like(hidden),
                ops.zeros_like(kernel),
                ops.zeros((vocabulary,), "float32"),
            )
            found = ops.fori_loop(0, active, backward, zeros)
            return found[: len(params)]

        return per_step, grad

    return chunks.unchunk(divergence(*params))
