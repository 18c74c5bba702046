"""The PyTorch kernel of CTC: PyTorch's own CTC behind an op that
`torch.compile` does not look into (see `ctc_loss`). Chosen by
`kmask.ops._dispatch` for `kmask.masked_ctc`, as `kmask.ops._torch`'s kernels
are for the cross-entropy.
"""

from __future__ import annotations

import torch


def ctc_loss(
    labels: torch.Tensor,
    logits: torch.Tensor,
    label_lengths: torch.Tensor,
    frame_lengths: torch.Tensor,
    mask_index: int = 0,
) -> torch.Tensor:
    """`keras.ops.ctc_loss` (the same call of `torch.nn.functional.ctc_loss`)
    as an opaque op, so that `torch.compile(fullgraph=True)` traces it.

    PyTorch's CTC allocates its `[batch, frames, 2 * labels + 1]` table from
    the largest label length, a value of the data, which its compiler refuses
    to trace. Behind `torch.library.custom_op` the compiler sees only the
    output shapes. When a gradient is wanted, the op computes it with the
    loss (the per-sequence losses are independent, so the gradient of their
    sum holds each sequence's own), and the backward pass scales it.
    """
    if logits.dtype != torch.float64:
        logits = logits.float()
    lengths = (label_lengths.long(), frame_lengths.long())
    args = (labels.long(), logits, *lengths, mask_index)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, _ = _ctc_with_grad(*args)
        return loss
    return _ctc(*args)


def _ctc_forward(labels, logits, label_lengths, frame_lengths, blank):
    log_probs = torch.log_softmax(logits.transpose(0, 1), dim=-1)
    return torch.nn.functional.ctc_loss(
        log_probs, labels, frame_lengths, label_lengths, blank=blank, reduction="none"
    )


@torch.library.custom_op("kmask::ctc", mutates_args=())
def _ctc(
    labels: torch.Tensor,
    logits: torch.Tensor,
    label_lengths: torch.Tensor,
    frame_lengths: torch.Tensor,
    blank: int,
) -> torch.Tensor:
    return _ctc_forward(labels, logits, label_lengths, frame_lengths, blank)


@_ctc.register_fake
def _(labels, logits, label_lengths, frame_lengths, blank):
    return logits.new_empty(logits.shape[:1])


@torch.library.custom_op("kmask::ctc_with_grad", mutates_args=())
def _ctc_with_grad(
    labels: torch.Tensor,
    logits: torch.Tensor,
    label_lengths: torch.Tensor,
    frame_lengths: torch.Tensor,
    blank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Autograd does not run inside a custom op: the gradient comes from
    # PyTorch's own CTC backward kernel, then through the log-softmax.
    log_probs = torch.log_softmax(logits.transpose(0, 1), dim=-1)
    loss, log_alpha = torch.ops.aten._ctc_loss(
        log_probs, labels, frame_lengths, label_lengths, blank, False
    )
    d_log_probs = torch.ops.aten._ctc_loss_backward(
        torch.ones_like(loss), log_probs, labels, frame_lengths, label_lengths,
        loss, log_alpha, blank, False,
    )  # fmt: skip
    d_log_probs = d_log_probs.transpose(0, 1)
    softmax = log_probs.transpose(0, 1).exp()
    grad = d_log_probs - softmax * d_log_probs.sum(dim=-1, keepdim=True)
    return loss, grad.contiguous()


@_ctc_with_grad.register_fake
def _(labels, logits, label_lengths, frame_lengths, blank):
    return logits.new_empty(logits.shape[:1]), torch.empty_like(logits)


def _ctc_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _ctc_backward(ctx, d_loss, d_grad):
    (grad,) = ctx.saved_tensors
    return None, grad * d_loss[:, None, None], None, None, None


_ctc_with_grad.register_autograd(_ctc_backward, setup_context=_ctc_setup)
