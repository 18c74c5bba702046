"""The cross-entropy op, written once: its forward pass, its gradient, and
the chunked form over `hidden @ kernel + bias`.

`sparse_crossentropy_with_logits`, `categorical_crossentropy_with_logits` and
the chunk loop of `linear_crossentropy` share the cross-entropy of a row of
logits and its gradient (`kmask.ops._rows`). On PyTorch each op runs as its
kernel in `kmask.ops._torch`, picked by `kmask.ops._dispatch`; the
`*_portable` functions are the `keras.ops` forms whatever the backend.
`sparse_crossentropy` and `crossentropy` are the per-step functions of the
losses and of `Perplexity`: they route logits to these ops and handle
probabilities and a class axis other than the last.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
from keras import ops

from kmask._shapes import broadcast_to_steps, dense_inputs, where_valid
from kmask.ops._chunks import add_chunk_grads, chunk_logits, real_first, to_chunks
from kmask.ops._dispatch import KERNELS, keeps_exponentials
from kmask.ops._rows import (
    Rows,
    log_softmax,
    row_crossentropy,
    row_crossentropy_grad,
    row_statistics,
)
from kmask.typing import Tensor


def sparse_crossentropy_with_logits(
    labels: Any,
    logits: Any,
    valid: Any = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Tensor:
    """The per-step sparse cross-entropy from logits, with a fused gradient.

    Computed in float32 whatever the dtype of `logits`.

    Args:
        labels: Integer labels `[...]`; any value at a step that is not
            `valid` (e.g. `-100`).
        logits: `[..., classes]`.
        valid: Optional boolean mask of `labels`' shape, `True` on real steps.
        label_smoothing: Smoothing towards the uniform distribution over the
            classes, in `[0, 1]`.
        z_loss: Coefficient of `logsumexp(logits) ** 2` added per step.

    Returns:
        float32 per-step losses of `labels`' shape, 0 where not `valid`; their
        gradient is exactly 0 at those steps whatever `logits` holds there.

    Example:

    >>> import kmask
    >>> from keras import ops
    >>> logits = [[[0.0, 0.0, 0.0], [float("nan"), 1.0, 2.0]]]
    >>> per_step = kmask.sparse_crossentropy_with_logits(
    ...     [[2, -100]], logits, valid=[[True, False]]
    ... )
    >>> ops.convert_to_numpy(per_step).round(4)  # log(3), then padding
    array([[1.0986, 0.    ]], dtype=float32)
    """
    logits = ops.cast(ops.convert_to_tensor(logits), "float32")
    labels = ops.cast(ops.convert_to_tensor(labels), "int32")
    if valid is not None:
        valid = ops.cast(ops.convert_to_tensor(valid), "bool")
        labels = ops.where(valid, labels, ops.zeros_like(labels))
    kernel = KERNELS[keras.backend.backend(), "sparse_crossentropy_with_logits"]
    if kernel is not None:
        return kernel(labels, logits, valid, label_smoothing, z_loss)
    return sparse_crossentropy_portable(labels, logits, valid, label_smoothing, z_loss)


def sparse_crossentropy_portable(
    labels: Any, logits: Any, valid: Any, label_smoothing: float, z_loss: float
) -> Tensor:
    """`sparse_crossentropy_with_logits` in `keras.ops`, whatever the backend:
    int32 `labels` (0 where not `valid`), float32 `logits`, boolean `valid`
    or `None`."""

    @ops.custom_gradient
    def crossentropy(logits):
        rows = row_crossentropy(logits, labels, label_smoothing, z_loss)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return row_crossentropy_grad(
                logits, rows, labels, upstream, valid, label_smoothing, z_loss
            )

        # `where_valid`, written out (the forward pass's one `where`).
        if valid is None:
            return rows.per_step, grad
        return ops.where(valid, rows.per_step, ops.zeros_like(rows.per_step)), grad

    return crossentropy(logits)


def categorical_crossentropy_with_logits(
    targets: Any,
    logits: Any,
    valid: Any = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The per-step cross-entropy of probability targets from logits, fused.

    `-sum(t * log_softmax(logits))` over the last axis, with `t` the targets
    smoothed towards the uniform distribution; the gradient with respect to
    the logits is `sum(t) * softmax(logits) - t`, one expression (see
    `kmask.ops`). Computed in float32 (float64 stays float64).

    Args:
        targets: One-hot or soft targets, `logits`' shape; anything (NaN,
            inf) at a step that is not `valid`.
        logits: `[..., classes]`.
        valid: Optional boolean mask of the per-step shape (`logits`' shape
            without the last axis), `True` on real steps.
        label_smoothing: Smoothing towards the uniform distribution over the
            classes, in `[0, 1]`.

    Returns:
        Per-step losses, 0 where not `valid`; their gradients with respect to
        `logits` and `targets` are exactly 0 at those steps whatever the
        inputs hold there.

    Example:

    >>> from keras import ops
    >>> from kmask.ops import categorical_crossentropy_with_logits
    >>> targets = [[[0.0, 0.0, 1.0], [float("nan"), 0.0, 0.0]]]
    >>> logits = [[[0.0, 0.0, 0.0], [float("inf"), 1.0, 2.0]]]
    >>> per_step = categorical_crossentropy_with_logits(
    ...     targets, logits, valid=[[True, False]]
    ... )
    >>> ops.convert_to_numpy(per_step).round(4)  # log(3), then padding
    array([[1.0986, 0.    ]], dtype=float32)
    """
    targets, logits, valid = dense_inputs(targets, logits, valid)
    kernel = KERNELS[keras.backend.backend(), "categorical_crossentropy_with_logits"]
    if kernel is not None:
        return kernel(targets, logits, valid, label_smoothing)
    return categorical_crossentropy_portable(targets, logits, valid, label_smoothing)


def categorical_crossentropy_portable(
    targets: Any, logits: Any, valid: Any, label_smoothing: float
) -> Tensor:
    """`categorical_crossentropy_with_logits` in `keras.ops`, whatever the
    backend, on the outputs of `kmask._shapes.dense_inputs`."""
    keep_exponentials = keeps_exponentials()

    @ops.custom_gradient
    def crossentropy(logits, targets):
        rows = row_crossentropy(
            logits, targets, label_smoothing, elementwise=keep_exponentials
        )

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            d_logits = row_crossentropy_grad(
                logits,
                rows,
                targets,
                upstream,
                valid,
                label_smoothing,
                keep_exponentials=keep_exponentials,
            )
            # d per_step / d targets = -(1 - ls) * log_softmax(logits)
            coefficient = ops.expand_dims(where_valid(valid, upstream), -1)
            d_targets = coefficient * (
                (label_smoothing - 1.0) * log_softmax(logits, rows)
            )
            return d_logits, where_valid(valid, d_targets)

        return where_valid(valid, rows.per_step), grad

    return crossentropy(logits, targets)


def sparse_crossentropy(
    labels: Any,
    y_pred: Any,
    valid: Any = None,
    from_logits: bool = False,
    axis: int = -1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Tensor:
    """Per-step sparse cross-entropy, from logits or probabilities.

    Logits go to `sparse_crossentropy_with_logits` (the class axis moved
    last first); probabilities are clipped to `[epsilon, 1 - epsilon]` as
    Keras clips them.

    Args:
        labels: Integer labels, `y_pred`'s shape without `axis` (a trailing
            axis of 1 is dropped).
        y_pred: Logits or probabilities, `[..., classes]`.
        valid: Optional boolean mask of the per-step shape; with logits only
            (probabilities have their padding replaced before they come).
        from_logits: Whether `y_pred` holds logits.
        axis: The class axis of `y_pred`.
        label_smoothing: Smoothing towards the uniform distribution.
        z_loss: Coefficient of `logsumexp(logits) ** 2`; logits only.

    Returns:
        The per-step losses, `labels`' shape.
    """
    y_pred = ops.convert_to_tensor(y_pred)
    labels = ops.cast(ops.convert_to_tensor(labels), "int32")
    rank = len(y_pred.shape)
    if len(labels.shape) == rank and labels.shape[-1] == 1:
        labels = ops.squeeze(labels, axis=-1)
    if axis not in (-1, rank - 1):
        y_pred = ops.moveaxis(y_pred, axis, -1)
    if from_logits:
        return sparse_crossentropy_with_logits(
            labels, y_pred, valid, label_smoothing, z_loss
        )
    if valid is not None or z_loss:
        raise ValueError(
            "Arguments `valid` and `z_loss` need `from_logits=True`. "
            f"Received: z_loss={z_loss}, from_logits={from_logits}"
        )
    # Keras's formula, written once: Keras's TensorFlow backend renormalizes
    # the clipped probabilities (softmax of their log), the others do not,
    # which differs by up to `epsilon` between backends.
    epsilon = keras.backend.epsilon()
    probs = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
    log_probs = ops.log(ops.clip(probs, epsilon, 1.0 - epsilon))
    label_log_prob = ops.take_along_axis(
        log_probs, ops.expand_dims(labels, -1), axis=-1
    )
    per_step = -ops.squeeze(label_log_prob, axis=-1)
    if not label_smoothing:
        return per_step
    uniform = -ops.mean(log_probs, axis=-1)
    return (1.0 - label_smoothing) * per_step + label_smoothing * uniform


def crossentropy(y_true: Any, y_pred: Any, from_logits: bool = False) -> Tensor:
    """Per-step cross-entropy of one-hot targets (`y_pred`'s shape) or of
    sparse labels (without `y_pred`'s last axis, or with an axis of 1)."""
    y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
    one_hot = len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] != 1
    if not one_hot:
        return sparse_crossentropy(y_true, y_pred, from_logits=from_logits)
    if from_logits:
        return categorical_crossentropy_with_logits(y_true, y_pred)
    return keras.losses.categorical_crossentropy(y_true, y_pred)


def binary_crossentropy(
    targets: Any,
    predictions: Any,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
) -> Tensor:
    """The binary cross-entropy averaged over the last axis, as
    `keras.losses.binary_crossentropy` computes it, in `keras.ops` alone.

    Keras's own asks `torch.backends.mps.is_available()` on every call, which
    `torch.compile(fullgraph=True)` cannot trace. From logits it is
    `max(x, 0) - t * x + log1p(exp(-|x|))`; from probabilities, clipped to
    `[epsilon, 1 - epsilon]`, `-(t log p + (1 - t) log(1 - p))`; the targets
    are smoothed towards 0.5 first.

    Args:
        targets: `predictions`' shape.
        predictions: Probabilities, or logits with `from_logits`.
        from_logits: Whether `predictions` holds logits.
        label_smoothing: Smoothing of the targets towards 0.5.
        axis: The axis the mean is taken over.

    Returns:
        `predictions`' shape without `axis`.
    """
    predictions = ops.convert_to_tensor(predictions)
    targets = ops.cast(ops.convert_to_tensor(targets), predictions.dtype)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        per_feature = (
            ops.relu(predictions)
            - targets * predictions
            + ops.log1p(ops.exp(-ops.abs(predictions)))
        )
    else:
        epsilon = keras.config.epsilon()
        clipped = ops.clip(predictions, epsilon, 1.0 - epsilon)
        per_feature = -(
            targets * ops.log(clipped) + (1.0 - targets) * ops.log(1.0 - clipped)
        )
    return ops.mean(per_feature, axis=axis)


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
    tokens = ops.shape(labels)[0]
    order = real_first(valid)
    rows = [ops.take(x, order, axis=0) for x in (hidden, labels, valid)]
    rows[2] = ops.cast(rows[2], "int32")
    if value_gradient is not None:
        rows.append(ops.take(value_gradient, order, axis=0))
    chunks, active, chunked = to_chunks(tokens, rows[2], options.chunk_size, *rows)
    hidden, labels, valid, *gradient = chunked
    valid = ops.cast(valid, "bool")
    gradient = gradient[0] if gradient else None
    params = [hidden, kernel] if bias is None else [hidden, kernel, bias]
    per_step, stats, value = _chunked_crossentropy(
        labels, valid, gradient, options, return_stats, (chunks, active), *params
    )
    restore = ops.argsort(order)

    def unchunk(values):
        return ops.take(ops.reshape(values, (-1,))[:tokens], restore, axis=0)

    per_step = unchunk(per_step)
    if stats is not None:
        stats = tuple(ops.stop_gradient(unchunk(stat)) for stat in stats)
    return per_step, value, stats


def _chunked_crossentropy(
    labels, valid, gradient, options, return_stats, chunks, *params
):
    """The custom gradient over `(hidden [chunks, chunk, width], kernel[,
    bias])`: `(per_step, stats, value)`, the per-step losses `[chunks,
    chunk]`, with `return_stats` the statistics `LINEAR_STATS` (stacked on
    the losses as one output, of which only the losses have a gradient), and
    with `gradient` (`d value / d per_step`, `[chunks, chunk]`) the value,
    whose gradient the forward loop computes (else `None`). The backward
    pass recomputes each chunk's logits only for a nonzero upstream gradient
    of the per-step losses. `chunks` is `(all, active)`: the loops run over
    the first `active` chunks (the others are padding: 0, with a 0
    gradient)."""
    label_smoothing, z_loss = options.label_smoothing, options.z_loss
    chunks, active = chunks
    empty = ops.zeros((chunks, params[0].shape[1]), "float32")
    # tops, log sums, losses; then correct, nll, predicted, log_prob, entropy.
    buffers = (empty,) * (8 if return_stats else 3)
    ahead = gradient is not None

    def zero_grads(hidden, kernel):
        vocabulary = kernel.shape[0 if options.transpose_kernel else 1]
        return (
            ops.zeros_like(hidden),
            ops.zeros_like(kernel),
            ops.zeros((vocabulary,), "float32"),
        )

    @ops.custom_gradient
    def crossentropy(*params):
        hidden, kernel, bias = (*params, None)[:3]

        def chunk_rows(index, rows, upstream, grads):
            """Chunk `index`'s logits; with `upstream` (the gradient of its
            per-step losses), `grads` with its share added."""
            chunk_hidden = ops.take(hidden, index, axis=0)
            logits = chunk_logits(chunk_hidden, kernel, bias, options)
            chunk_labels = ops.take(labels, index, axis=0)
            if rows is None:
                rows = row_crossentropy(logits, chunk_labels, label_smoothing, z_loss)
            if upstream is not None:
                d_logits = row_crossentropy_grad(
                    logits,
                    rows,
                    chunk_labels,
                    ops.take(upstream, index, axis=0),
                    ops.take(valid, index, axis=0),
                    label_smoothing,
                    z_loss,
                    keep_exponentials=rows.exponentials is not None,
                )
                grads = add_chunk_grads(
                    grads, index, d_logits, logits, chunk_hidden, kernel, options
                )
            return logits, chunk_labels, rows, grads

        def forward_chunk(index, carry):
            split = len(carry) - 3 if ahead else len(carry)
            buffers, grads = carry[:split], tuple(carry[split:])
            logits, chunk_labels, rows, grads = chunk_rows(index, None, gradient, grads)
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
            found = ops.fori_loop(0, trips, backward_chunk, zero_grads(hidden, kernel))
            if ahead_grads is not None:
                # The anchor is summed: its upstream is the value's, everywhere.
                d_value = upstream[-1][0, 0]
                found = tuple(
                    a + b * d_value for a, b in zip(found, ahead_grads, strict=True)
                )
            return found[: len(params)]

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
