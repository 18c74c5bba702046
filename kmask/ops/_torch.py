"""The PyTorch kernels of `kmask.ops`: the sparse and the one-hot
cross-entropy from logits, the chunked linear cross-entropy and the mean
squared error. Each is the same op as its portable `keras.ops` form, chosen by
`kmask.ops._dispatch`.

Why PyTorch has its own: it runs op by op, and every `keras.ops` call
allocates a new `[tokens, classes]` array, whose first touch costs more than
the arithmetic on it. Each kernel allocates one such array (or, for the
linear cross-entropy, one reused `[chunk, vocabulary]` buffer) and turns it
into the gradient in place; backward twice through one graph raises PyTorch's
in-place modification error instead of giving a wrong gradient. `MaskedLoss`
casts to float32 first, so half-precision inputs compute in float32. The
one-hot cross-entropy is the sparse kernel with dense targets
(`_block_crossentropy` and `_softmax_grad_` take either). The
timings and profiles that asked for each kernel, with the commands that
produce them, are in docs/measured.md ("Why PyTorch has kernels of its own").
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def sparse_crossentropy_with_logits(
    labels: torch.Tensor,
    logits: torch.Tensor,
    valid: torch.Tensor | None,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """Per-step losses of `labels`' shape; see `kmask.ops`.

    Args:
        labels: int32 labels, 0 where not `valid`.
        logits: float32 `[..., classes]`.
        valid: Boolean mask of `labels`' shape, or `None`.
        label_smoothing: Smoothing towards the uniform distribution.
        z_loss: Coefficient of `logsumexp(logits) ** 2`.

    Returns:
        float32 per-step losses, 0 where not `valid`.
    """
    return _Crossentropy.apply(
        logits, labels.long()[..., None], valid, label_smoothing, z_loss
    )


class _Crossentropy(torch.autograd.Function):
    """The sparse and the dense cross-entropy: the targets are int64 labels
    `[..., 1]` or float targets of the logits' shape."""

    @staticmethod
    def forward(ctx, logits, targets, valid, label_smoothing, z_loss):
        classes = logits.shape[-1]
        flat_logits = logits.reshape(-1, classes)
        flat_targets = targets.reshape(flat_logits.shape[0], -1)
        per_step, block, _ = _block_crossentropy(
            flat_logits, flat_targets, label_smoothing, z_loss, in_place=False
        )
        flat_valid = None if valid is None else valid.reshape(-1)
        if flat_valid is not None:
            per_step = torch.where(flat_valid, per_step, 0.0)
        target_sum, dense = block.target_sum, isinstance(block.target_sum, torch.Tensor)
        kept, row_logsumexp = block.log_probs, None
        if torch.compiler.is_compiling():
            # The compiler keeps the logits (the input: nothing new) and each
            # row's logsumexp, not a `[rows, classes]` log_softmax; the
            # backward pass's `logits - logsumexp` fuses into its `exp`.
            kept = flat_logits
            row_logsumexp = block.log_normalizer
            if row_logsumexp is None:
                row_logsumexp = torch.logsumexp(flat_logits, dim=1)
        ctx.save_for_backward(
            kept,
            flat_targets,
            flat_valid,
            target_sum if dense else None,
            block.log_normalizer,
            row_logsumexp,
        )
        label_sum = None if dense else target_sum
        ctx.options = (logits.shape, label_smoothing, z_loss, label_sum)
        return per_step.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, upstream):
        kept, flat_targets, flat_valid, target_sum, log_normalizer, row_logsumexp = (
            ctx.saved_tensors
        )
        log_probs = kept
        if row_logsumexp is not None:
            log_probs = kept - row_logsumexp[:, None]
        shape, label_smoothing, z_loss, label_sum = ctx.options
        target_sum = label_sum if target_sum is None else target_sum
        coefficient = upstream.reshape(-1).to(log_probs.dtype)
        if flat_valid is not None:
            coefficient = torch.where(flat_valid, coefficient, 0.0)
        d_targets = None
        if ctx.needs_input_grad[1]:
            # d per_step / d targets = -(1 - ls) * log_softmax(logits), taken
            # before the logits' gradient is written over `log_probs`.
            d_targets = log_probs * (coefficient[:, None] * (label_smoothing - 1.0))
            d_targets = _zero_padding(d_targets, flat_valid).reshape(shape)
        d_logits = None
        if ctx.needs_input_grad[0]:
            block = _Block(log_probs, target_sum, log_normalizer)
            d_logits = _softmax_grad_(
                block, flat_targets, coefficient, flat_valid, label_smoothing,
                z_loss, in_place=_may_overwrite(),
            ).reshape(shape)  # fmt: skip
        return d_logits, d_targets, None, None, None


def categorical_crossentropy_with_logits(
    targets: torch.Tensor,
    logits: torch.Tensor,
    valid: torch.Tensor | None,
    label_smoothing: float,
) -> torch.Tensor:
    """`kmask.ops.categorical_crossentropy_with_logits` on float32 tensors."""
    return _Crossentropy.apply(logits, targets, valid, label_smoothing, 0.0)


def mean_squared_error(
    targets: torch.Tensor, predictions: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """`kmask.ops.mean_squared_error` on float32 tensors."""
    return _SquaredError.apply(predictions, targets, valid)


class _SquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, predictions, targets, valid):
        features = predictions.shape[-1]
        difference = (predictions - targets).reshape(-1, features)
        per_step = _row_dot(difference, difference).div_(features)
        flat_valid = None if valid is None else valid.reshape(-1)
        if flat_valid is not None:
            per_step = torch.where(flat_valid, per_step, 0.0)
        ctx.save_for_backward(difference, flat_valid)
        ctx.shape = predictions.shape
        return per_step.reshape(predictions.shape[:-1])

    @staticmethod
    def backward(ctx, upstream):
        difference, flat_valid = ctx.saved_tensors
        shape = ctx.shape
        coefficient = upstream.reshape(-1, 1).to(difference.dtype) * (2.0 / shape[-1])
        if flat_valid is not None:
            coefficient = torch.where(flat_valid[:, None], coefficient, 0.0)
        if _may_overwrite():
            grad = difference.mul_(coefficient)
        else:
            grad = difference * coefficient
        grad = _zero_padding(grad, flat_valid)
        d_targets = -grad if ctx.needs_input_grad[1] else None
        d_predictions = grad if ctx.needs_input_grad[0] else None
        d_targets = None if d_targets is None else d_targets.reshape(shape)
        d_predictions = None if d_predictions is None else d_predictions.reshape(shape)
        return d_predictions, d_targets, None


def _may_overwrite() -> bool:
    """Whether a backward pass may turn the tensor it saved into its
    gradient in place. Not while a graph of the backward pass is being
    recorded (double backward), and not under `torch.compile`: its traced
    graphs may read a saved tensor after the backward pass wrote over it
    (PyTorch's in-place modification error), and its compiler fuses the
    pass anyway, so an in-place write saves nothing there."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _zero_padding(grad: torch.Tensor, flat_valid: torch.Tensor | None) -> torch.Tensor:
    """`grad` (`[steps, classes]`) with the padded rows set to 0, in place."""
    if flat_valid is not None:
        grad.masked_fill_(~flat_valid[:, None], 0.0)
    return grad


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`sum(a * b, -1)` of two `[rows, width]` arrays, as a batched matrix
    product: no `[rows, width]` product is allocated (3x faster than
    `(a * b).sum(-1)` or `torch.linalg.vecdot` at `[4096, 4096]`)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


def linear_crossentropy(
    hidden: torch.Tensor,
    kernel: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    valid: torch.Tensor,
    value_gradient: torch.Tensor | None,
    options: tuple,
    return_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
    """The chunked linear cross-entropy; see `kmask.ops.linear_crossentropy`.

    Args:
        hidden: float32 `[tokens, width]`, rows that are not `valid` zeroed.
        kernel: float32 `[width, vocabulary]`, or `[vocabulary, width]` with
            `options.transpose_kernel` (used through a transposed view).
        bias: float32 `[vocabulary]`, or `None`.
        labels: int32 `[tokens]`, 0 where not `valid`.
        valid: Boolean `[tokens]`.
        value_gradient: float32 `d value / d per_step` `[tokens]` of a
            linear reduction, or `None` for per-step losses only.
        options: `kmask.ops.linear.LinearOptions`: chunk size, label
            smoothing, z-loss, soft cap, transposed kernel.
        return_stats: Whether to return, per token, the statistics
            `kmask.ops.linear.LINEAR_STATS`.

    Returns:
        `(per_step, value, stats)`: float32 per-step losses `[tokens]` (0
        where not `valid`), `sum(value_gradient * per_step)` or `None` where
        the value is left to the caller (no `value_gradient`, or under
        `torch.compile`), and the statistics, a tuple of float32 `[tokens]`
        (0 where not `valid`), or `None`.
        The first two are differentiable: the value's gradient is computed
        in the forward pass, the per-step losses' by recomputing the logits.
    """
    compiling = torch.compiler.is_compiling()
    # Under `torch.compile` the value's gradient is not computed ahead: the
    # traced backward pass gets zeros rather than `None` for an unused
    # per-step gradient, and would recompute every chunk besides (1.84x the
    # compiled `Dense` step against 1.10x; docs/measured.md). Autograd
    # differentiates the caller's reduction instead. Weights that need a
    # gradient of their own get it through the product below, as in the
    # portable loop.
    coefficient = None
    if value_gradient is not None and not compiling:
        coefficient = value_gradient.detach()
    # Only the real rows go through the chunks: padding costs no matmul. The
    # gathers and the scatter back are differentiable; a padded row's
    # gradient is 0. Not under `torch.compile`, where the number of real rows
    # would be a shape that depends on the data: padded rows are computed
    # there, and selected away like every padded step.
    tokens = labels.shape[0]
    real = None if compiling else torch.nonzero(valid).squeeze(1)
    gathered = real is not None and real.numel() < tokens
    if gathered:
        hidden, labels, valid = (
            x.index_select(0, real) for x in (hidden, labels, valid)
        )
        if coefficient is not None:
            coefficient = coefficient.index_select(0, real)
    stats = hidden.new_zeros((_STATS, *labels.shape)) if return_stats else None
    per_step, value = _LinearCrossentropy.apply(
        hidden, kernel, bias, labels.long(), valid, coefficient, stats, *options
    )
    if gathered:
        per_step = per_step.new_zeros(tokens).index_copy(0, real, per_step)
        if stats is not None:
            stats = stats.new_zeros((_STATS, tokens)).index_copy(1, real, stats)
    if coefficient is None or value_gradient is None:
        value = None
    elif value_gradient.requires_grad:
        # d value / d value_gradient = per_step; the value is unchanged.
        change = value_gradient - value_gradient.detach()
        value = value + torch.dot(change, per_step.detach())
    return per_step, value, (None if stats is None else tuple(stats))


class _LinearCrossentropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, kernel, bias, labels, valid, coefficient, stats, *options):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, kernel, bias, labels, valid)
        ctx.options = options
        needs = ctx.needs_input_grad[:3]
        grads, per_step = _linear_chunks(
            hidden,
            kernel,
            bias,
            labels,
            valid,
            coefficient if any(needs) else None,
            needs,
            stats,
            *options,
        )
        ctx.grads = grads
        if coefficient is None:
            value = per_step.new_zeros(())
            ctx.mark_non_differentiable(value)
        else:
            value = torch.dot(coefficient, per_step)
        return per_step, value

    @staticmethod
    def backward(ctx, d_per_step, d_value):
        hidden, kernel, bias, labels, valid = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = [None, None, None]
        if d_value is not None:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    "kmask.fused_linear_crossentropy computes its gradient in its "
                    "forward pass, which has no derivative of its own: for a "
                    "second derivative (`create_graph=True`), call it with "
                    "reduction='none' and reduce the per-step losses."
                )
            if ctx.grads is None:
                raise RuntimeError(
                    "The gradient of kmask.fused_linear_crossentropy, computed in "
                    "its forward pass, was already used: backward through its "
                    "graph runs once (call the function again instead of "
                    "`retain_graph=True`)."
                )
            grads = [None if g is None else g.mul_(d_value) for g in ctx.grads]
            ctx.grads = None
        if d_per_step is not None:
            coefficient = torch.where(valid, d_per_step.to(hidden.dtype), 0.0)
            more, _ = _linear_chunks(
                hidden, kernel, bias, labels, valid, coefficient, needs, None,
                *ctx.options,
            )  # fmt: skip
            grads = [
                b if a is None else a if b is None else a.add_(b)
                for a, b in zip(grads, more, strict=True)
            ]
        return (*grads, None, None, None, None, *(None for _ in ctx.options))


def _linear_chunks(
    hidden, kernel, bias, labels, valid, coefficient, needs, stats,
    chunk_size, ls, z_loss, softcap, transpose_kernel, temperature,
):  # fmt: skip
    """One pass over the chunks: `(grads, per_step)`, the gradients of
    `sum(coefficient * per_step)` with respect to `(hidden, kernel, bias)`
    (`None` where not `needs`, all `None` without `coefficient`) and the
    per-step losses, 0 where not `valid`; writes into `stats` (if given)
    the statistics `LINEAR_STATS` (`_chunk_statistics`), 0 where not
    `valid`.

    Each chunk's logits go into one preallocated `[chunk_size, vocabulary]`
    buffer, which turns into their gradient in place (with `softcap`, a
    second buffer holds the cap's slope for the backward pass)."""
    # `weight` is `[width, vocabulary]`: the kernel, or a transposed view.
    weight = kernel.t() if transpose_kernel else kernel
    tokens, vocabulary = hidden.shape[0], weight.shape[1]
    chunk_size = max(1, min(chunk_size, tokens))
    buffer = hidden.new_empty((chunk_size, vocabulary))
    slopes = None
    if softcap is not None and coefficient is not None:
        slopes = hidden.new_empty((chunk_size, vocabulary))
    per_step = hidden.new_empty((tokens,))
    stat_buffers = (buffer, buffer)
    if stats is not None and not torch.compiler.is_compiling():
        stat_buffers = tuple(
            hidden.new_empty((chunk_size, vocabulary)) for _ in range(2)
        )
    d_hidden = d_kernel = d_bias = None
    if coefficient is not None:
        if needs[0]:
            d_hidden = torch.empty_like(hidden)
        if needs[1]:
            d_kernel = torch.zeros_like(kernel)
        if needs[2] and bias is not None:
            d_bias = torch.zeros_like(bias)
    for start in range(0, tokens, chunk_size):
        stop = min(start + chunk_size, tokens)
        rows = slice(start, stop)
        chunk_hidden = hidden[rows]
        logits = buffer[: stop - start]
        if bias is None:
            torch.mm(chunk_hidden, weight, out=logits)
        else:
            torch.addmm(bias, chunk_hidden, weight, out=logits)
        slope = None
        if softcap is not None:
            logits.div_(softcap).tanh_()
            if slopes is not None:
                # d(c * tanh(z / c)) / dz = 1 - tanh(z / c) ** 2
                slope = torch.mul(logits, logits, out=slopes[: stop - start])
                slope.neg_().add_(1.0)
            logits.mul_(softcap)
        chunk_labels = labels[rows, None]
        chunk_valid = valid[rows]
        if stats is not None:
            # Before `_block_crossentropy` writes over the logits.
            _chunk_statistics(
                stats[:, rows], logits, chunk_labels, temperature, stat_buffers
            )
        loss, block, nll = _block_crossentropy(
            logits, chunk_labels, ls, z_loss, in_place=True, nll=stats is not None
        )
        if stats is not None:
            stats[1, rows] = nll
            if block.log_normalizer is not None:  # with z-loss
                stats[2, rows] = z_loss * block.log_normalizer.square()
            stats[:, rows] = torch.where(chunk_valid, stats[:, rows], 0.0)
        per_step[rows] = torch.where(chunk_valid, loss, 0.0)
        if coefficient is None:
            continue
        grad = _softmax_grad_(
            block, chunk_labels, coefficient[rows], chunk_valid, ls, z_loss,
            in_place=True,
        )  # fmt: skip
        if slope is not None:
            grad.mul_(slope)
        if d_hidden is not None:
            torch.mm(grad, weight.t(), out=d_hidden[rows])
        if d_kernel is not None:
            if transpose_kernel:
                d_kernel.addmm_(grad.t(), chunk_hidden)
            else:
                d_kernel.addmm_(chunk_hidden.t(), grad)
        if d_bias is not None:
            d_bias.add_(grad.sum(dim=0))
    return [d_hidden, d_kernel, d_bias], per_step


# The rows of `LINEAR_STATS`: correct, nll, z_loss, predicted, log_prob, entropy.
_STATS = 6


def _chunk_statistics(
    stats: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    buffers: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Writes into `stats` (`[_STATS, rows]`) what `kmask.ops._rows.
    row_statistics` computes: whether the arg max is the label, the arg max,
    and at `temperature` the label's log-probability and the entropy. The
    log-softmax of the logits over `temperature` and its exponential go
    into `buffers`, two `[chunk_size, classes]` arrays reused by every chunk
    (under `torch.compile`, which fuses anyway, new arrays)."""
    predicted = logits.argmax(dim=1)
    stats[0] = (predicted == labels[:, 0]).to(stats.dtype)
    stats[3] = predicted.to(stats.dtype)
    if torch.compiler.is_compiling():
        scaled = logits if temperature == 1.0 else logits / temperature
        log_probs = torch.log_softmax(scaled, dim=1)
        probs = log_probs.exp()
    else:
        log_probs, probs = (buffer[: logits.shape[0]] for buffer in buffers)
        if temperature == 1.0:
            torch.log_softmax(logits, dim=1, out=log_probs)
        else:
            torch.div(logits, temperature, out=log_probs)
            torch.log_softmax(log_probs, dim=1, out=log_probs)
        torch.exp(log_probs, out=probs)
    stats[4] = log_probs.gather(1, labels).squeeze(1)
    # exp(-inf) * -inf is NaN: a class of probability 0 adds 0.
    log_probs.masked_fill_(probs == 0, 0.0)
    stats[5] = -_row_dot(probs, log_probs)


# ----------------------------------------------------------------------------
# The cross-entropy of a block of rows, shared by every cross-entropy kernel.


class _Block(NamedTuple):
    """What the gradient of `_block_crossentropy` reads: the `[rows,
    classes]` `log_probs = log_softmax(logits)` and per row the smoothed
    targets' sum (`1.0` for labels) and, with z-loss, `logsumexp(logits)`."""

    log_probs: torch.Tensor
    target_sum: torch.Tensor | float
    log_normalizer: torch.Tensor | None


def _block_crossentropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
    in_place: bool,
    nll: bool = False,
) -> tuple[torch.Tensor, _Block, torch.Tensor | None]:
    """The cross-entropy of each row of `logits` (`[rows, classes]`) against
    `targets`: int64 labels `[rows, 1]` or float targets of `logits`' shape;
    the same maths as `kmask.ops._rows.row_crossentropy` (see there).

    One `[rows, classes]` array, `log_softmax(logits)` (PyTorch's kernel
    takes a row at a time through the cache: 6x faster than the maximum, the
    shift, `exp` and the sum as four passes), written over `logits` when
    `in_place`; the backward pass turns it into the gradient in place.
    Returns `(per_step, block, nll)`: the per-step losses, the `_Block` and,
    with `nll`, the cross-entropy without label smoothing or z-loss (else
    `None`)."""
    log_normalizer = torch.logsumexp(logits, dim=1) if z_loss else None
    # Under `torch.compile` no `out=` over an input: the compiler fuses anyway.
    if in_place and not torch.compiler.is_compiling():
        log_probs = torch.log_softmax(logits, dim=1, out=logits)
    else:
        log_probs = torch.log_softmax(logits, dim=1)
    raw_sum: torch.Tensor | float
    if targets.dtype.is_floating_point:
        raw_sum = targets.sum(dim=1)
        target_log_prob = _row_dot(targets, log_probs)
    else:
        raw_sum = 1.0
        target_log_prob = log_probs.gather(1, targets).squeeze(1)
    loss = target_log_prob * (label_smoothing - 1.0)
    if label_smoothing:
        loss.sub_(label_smoothing * log_probs.mean(dim=1))
    if log_normalizer is not None:
        loss.add_(z_loss * log_normalizer.square())
    target_sum = raw_sum * (1.0 - label_smoothing) + label_smoothing
    row_nll = -target_log_prob if nll else None
    return loss, _Block(log_probs, target_sum, log_normalizer), row_nll


def _softmax_grad_(
    block: _Block,
    targets: torch.Tensor,
    coefficient: torch.Tensor,
    valid: torch.Tensor | None,
    label_smoothing: float,
    z_loss: float,
    in_place: bool,
) -> torch.Tensor:
    """`coefficient * d per_step / d logits`, `softmax * scale - coefficient
    * smoothed targets`, the rows that are not `valid` set to 0; in place of
    `block.log_probs` when `in_place`, else (a graph of the backward pass
    being recorded, or `torch.compile`) as `_traced_softmax_grad`'s one
    out-of-place expression."""
    softmax_weight = block.target_sum
    if block.log_normalizer is not None:
        softmax_weight = softmax_weight + 2.0 * z_loss * block.log_normalizer
    scale = (coefficient * softmax_weight)[:, None]
    log_probs = block.log_probs
    if not in_place or torch.compiler.is_compiling():
        return _traced_softmax_grad(
            log_probs, targets, coefficient, scale, valid, label_smoothing
        )
    grad = log_probs.exp_().mul_(scale)
    if targets.dtype.is_floating_point:
        grad.addcmul_(targets, coefficient[:, None], value=label_smoothing - 1.0)
    else:
        grad.scatter_add_(1, targets, coefficient[:, None] * (label_smoothing - 1.0))
    if label_smoothing:
        grad.sub_(coefficient[:, None] * (label_smoothing / grad.shape[1]))
    if valid is None:
        return grad
    padded = torch.nonzero(~valid).squeeze(1)
    if padded.numel():
        grad.index_fill_(0, padded, 0.0)
    return grad


def _traced_softmax_grad(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    coefficient: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor | None,
    label_smoothing: float,
) -> torch.Tensor:
    """`_softmax_grad_` under `torch.compile`: the same gradient as one
    out-of-place expression (the label's term a `where` against the class
    index, not a `scatter_add_`; the padded rows a `where`, not `nonzero`,
    whose size depends on the data), which the compiler fuses into one pass
    over the logits, as it does PyTorch's own cross-entropy."""
    grad = log_probs.exp() * scale
    label_term = coefficient[:, None] * (label_smoothing - 1.0)
    if targets.dtype.is_floating_point:
        grad = grad + targets * label_term
    else:
        classes = torch.arange(log_probs.shape[1], device=log_probs.device)
        grad = torch.where(classes == targets, grad + label_term, grad)
    if label_smoothing:
        grad = grad - coefficient[:, None] * (label_smoothing / log_probs.shape[1])
    if valid is None:
        return grad
    return torch.where(valid[:, None], grad, 0.0)
