"""The PyTorch kernel of `kmask.sparse_crossentropy_with_logits`.

Why PyTorch has its own: it runs op by op, and every `keras.ops` call
allocates a new `[tokens, classes]` array, whose first touch costs more than
the arithmetic on it (on CPU, a page fault per 4 KiB: about 25 ms for the
64 MiB of `[16, 256, 4096]` float32 logits). Forward + backward at that
shape, on a 2-core CPU, in one process with the variants interleaved:

| implementation                                      | full-size arrays | ms  |
|-----------------------------------------------------|------------------|-----|
| `F.cross_entropy(ignore_index=0)` (native)          | 3                | 143 |
| the portable `keras.ops.custom_gradient` of `fused` | 9                | 508 |
| this kernel                                         | 1                | 87  |

`torch.profiler` on the portable form: `sub` (4 arrays, 75 ms), `where` (2,
63 ms), `exp` (2, 44 ms), `mul`, `eq`: every step of the expression XLA fuses
is a fresh array here, and with no in-place operation in `keras.ops` it
cannot get below the native form. This kernel allocates one array,
`log_softmax(logits)` in the forward pass, which the backward pass turns into
the gradient in place (`exp`, scale, subtract at the label, zero the padded
rows). Backward twice through one graph (`retain_graph=True`)
raises PyTorch's in-place modification error instead of a wrong gradient.
`MaskedLoss` casts to float32 first, so half-precision inputs compute in
float32. `python benchmarks/masked_ce.py` times it against the native and the
Keras loss; `kmask.parity` checks its numbers against the other backends.
"""

from __future__ import annotations

import torch


def sparse_crossentropy_with_logits(
    labels: torch.Tensor,
    logits: torch.Tensor,
    valid: torch.Tensor | None,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """Per-step losses of `labels`' shape; see `kmask.fused`.

    Args:
        labels: int32 labels, 0 where not `valid`.
        logits: float32 `[..., classes]`.
        valid: Boolean mask of `labels`' shape, or `None`.
        label_smoothing: Smoothing towards the uniform distribution.
        z_loss: Coefficient of `logsumexp(logits) ** 2`.

    Returns:
        float32 per-step losses, 0 where not `valid`.
    """
    return _SparseCrossentropy.apply(
        logits, labels.long(), valid, label_smoothing, z_loss
    )


class _SparseCrossentropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, valid, label_smoothing, z_loss):
        classes = logits.shape[-1]
        flat_logits = logits.reshape(-1, classes)
        flat_labels = labels.reshape(-1, 1)
        log_probs = torch.log_softmax(flat_logits, dim=-1)
        per_step = log_probs.gather(1, flat_labels).squeeze(1)
        per_step = per_step.mul_(label_smoothing - 1.0)
        if label_smoothing:
            per_step.sub_(label_smoothing * log_probs.mean(dim=-1))
        log_normalizer = None
        if z_loss:
            log_normalizer = torch.logsumexp(flat_logits, dim=-1)
            per_step.add_(z_loss * log_normalizer.square())
        flat_valid = None if valid is None else valid.reshape(-1)
        if flat_valid is not None:
            per_step = torch.where(flat_valid, per_step, 0.0)
        ctx.save_for_backward(log_probs, flat_labels, flat_valid, log_normalizer)
        ctx.options = (logits.shape, label_smoothing, z_loss)
        return per_step.reshape(labels.shape)

    @staticmethod
    def backward(ctx, upstream):
        log_probs, flat_labels, flat_valid, log_normalizer = ctx.saved_tensors
        shape, label_smoothing, z_loss = ctx.options
        coefficient = upstream.reshape(-1).to(log_probs.dtype)
        if flat_valid is not None:
            coefficient = torch.where(flat_valid, coefficient, 0.0)
        scale = coefficient
        if z_loss:
            scale = coefficient * (1.0 + 2.0 * z_loss * log_normalizer)
        # In place unless a graph of the backward pass is being recorded.
        grad = log_probs.exp() if torch.is_grad_enabled() else log_probs.exp_()
        grad.mul_(scale[:, None])
        label_term = coefficient[:, None] * (label_smoothing - 1.0)
        grad.scatter_add_(1, flat_labels, label_term)
        if label_smoothing:
            grad.sub_(coefficient[:, None] * (label_smoothing / shape[-1]))
        if flat_valid is not None:
            grad.masked_fill_(~flat_valid[:, None], 0.0)
        return grad.reshape(shape), None, None, None, None
