"""The cross-entropy of rows of logits in `keras.ops`, written once: the
forward pass and its gradient, for integer labels and for dense (one-hot or
soft) targets, with label smoothing, z-loss and the soft cap.

`kmask.ops.crossentropy` builds its three ops on these (the sparse, the dense
and the chunked linear cross-entropy); `kmask.ops._torch` has the same maths
as one PyTorch kernel. The targets' kind is read from their rank: labels have
the per-step shape, dense targets the logits' shape.

Per row, with `t` the targets smoothed towards the uniform distribution
(`t = (1 - ls) * targets + ls / classes`), `top` the row's maximum and
`logsumexp(logits) = top + log_sum`:

    per_step = sum(t) * log_sum - sum(t * (logits - top)) + z * (top + log_sum) ** 2
    d per_step / d logits = softmax * (sum(t) + 2 z (top + log_sum)) - t

Differences are taken from the row's maximum, which is exact near it:
`logits - logsumexp(logits)` directly loses `ulp(logits)` (1e-6 relative for
logits of 8, as autodiff of `log_softmax` does not).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from keras import ops

from kmask._shapes import where_valid


class Rows(NamedTuple):
    """The forward pass of `row_crossentropy`, per row (the per-step shape).

    Attributes:
        top: The row's maximum (0 where it is not finite).
        log_sum: `log(sum(exp(logits - top)))`.
        target_sum: `sum(t)` of the smoothed targets; `1.0` for labels.
        per_step: The cross-entropy with label smoothing and z-loss.
        nll: The cross-entropy without label smoothing or z-loss.
        exponentials: `exp(logits - top)`, `[..., classes]`.
    """

    top: Any
    log_sum: Any
    target_sum: Any
    per_step: Any
    nll: Any
    exponentials: Any


def softcap(logits: Any, cap: float | None) -> Any:
    """`cap * tanh(logits / cap)`, or `logits` when `cap` is `None`."""
    if cap is None:
        return logits
    return cap * ops.tanh(logits / cap)


def softcap_slope(capped: Any, cap: float) -> Any:
    """`d softcap(z) / dz` from the capped logits: `1 - tanh(z / c) ** 2`."""
    return 1.0 - ops.square(capped / cap)


def row_crossentropy(
    logits: Any,
    targets: Any,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    elementwise: bool = False,
    slices: tuple[int, int] | None = None,
) -> Rows:
    """The cross-entropy of each row of `logits` (`[..., classes]`).

    Args:
        logits: `[..., classes]`.
        targets: int32 labels of the per-step shape, or dense targets of
            `logits`' shape.
        label_smoothing: Smoothing towards the uniform distribution.
        z_loss: Coefficient of `logsumexp(logits) ** 2`.
        elementwise: Take `sum(targets * logits)` as an elementwise product
            rather than a dot product (see
            `kmask.ops._dispatch.keeps_exponentials`).
        slices: For labels, `(size, shards)` to read the rows `size`
            columns of each of `shards` equal shards at a time (`row_sums`,
            `column_slice`); `None` for whole rows.

    Returns:
        The `Rows`; `exponentials` is `None` when the rows are read in
        slices.
    """
    classes = logits.shape[-1]
    labels = len(targets.shape) < len(logits.shape)
    exponentials = None
    if labels and slices is not None and slices[0] * slices[1] < classes:
        top, log_sum, label_logit, logit_mean = row_sums(
            logits, targets, slices, bool(label_smoothing)
        )
    else:
        # A row of -inf has no finite maximum; any shift works there.
        top = _finite(ops.max(logits, axis=-1))
        exponentials = ops.exp(logits - ops.expand_dims(top, -1))
        log_sum = ops.log(ops.sum(exponentials, axis=-1))
        logit_mean = ops.mean(logits, axis=-1) if label_smoothing else None
        if labels:
            label = ops.take_along_axis(logits, ops.expand_dims(targets, -1), axis=-1)
            label_logit = label[..., 0]
    if labels:
        raw_sum = target_sum = 1.0
        target_logit = label_logit - top
    else:
        raw_sum = target_sum = ops.sum(targets, axis=-1)
        if elementwise:
            target_logit = ops.sum(targets * logits, axis=-1)
        else:
            # A dot product: no `[..., classes]` product is held.
            target_logit = ops.einsum("...c,...c->...", targets, logits)
        # Exact for one-hot targets.
        target_logit = target_logit - target_sum * top
    nll = raw_sum * log_sum - target_logit
    if label_smoothing:
        target_sum = (1.0 - label_smoothing) * raw_sum + label_smoothing
        target_logit = (1.0 - label_smoothing) * target_logit + label_smoothing * (
            logit_mean - top
        )
    per_step = target_sum * log_sum - target_logit
    if z_loss:
        per_step = per_step + z_loss * ops.square(top + log_sum)
    return Rows(top, log_sum, target_sum, per_step, nll, exponentials)


LOWEST = -3.4028235e38
"""The lowest float32: the maximum of a row before any of its columns."""


def row_sums(logits: Any, labels: Any, slices: tuple, logit_mean: bool) -> tuple:
    """`(top, log_sum, label_logit, logit_mean)` of each row of `logits`,
    read in `slices` (`(size, shards)`: `size` columns of each shard at a
    time, `column_slice`): the row's maximum (0 where it is not finite),
    `log(sum(exp(logits - top)))`, the label's logit, and with `logit_mean`
    the row's mean (else `None`).

    The sum of exponentials is taken online, rescaled to each new maximum
    (`total * exp(top - new_top) + sum(exp(slice - new_top))`), in a loop
    over the slices: a row is read once, no `[..., classes]` array but
    `logits` is held, and a compiler fuses what made `logits` (a bias, a soft
    cap) into each slice's reads instead of keeping it whole.
    """
    size, shards = slices
    classes = logits.shape[-1]
    steps_shape = labels.shape
    # Where the label is: its shard, and its column within the shard.
    shard, column = labels // (classes // shards), labels % (classes // shards)

    def add(step, found):
        top, total, label_logit, *row_sum = found
        start = step * size
        piece = column_slice(logits, start, size, shards)
        new_top = ops.maximum(top, ops.max(piece, axis=-1))
        shifted = piece - ops.expand_dims(new_top, -1)
        total = total * ops.exp(top - new_top) + ops.sum(ops.exp(shifted), axis=-1)
        offset = column - start
        inside = ops.logical_and(offset >= 0, offset < size)
        index = shard * size + ops.clip(offset, 0, size - 1)
        picked = ops.take_along_axis(piece, ops.expand_dims(index, -1), axis=-1)
        label_logit = ops.where(inside, picked[..., 0], label_logit)
        row_sum = [found + ops.sum(piece, axis=-1) for found in row_sum]
        return (new_top, total, label_logit, *row_sum)

    zeros = ops.zeros(steps_shape, "float32")
    lowest = ops.full(steps_shape, LOWEST, "float32")
    found = (lowest, zeros, zeros) + ((zeros,) if logit_mean else ())
    steps = classes // (size * shards)
    top, total, label_logit, *row_sum = ops.fori_loop(0, steps, add, found)
    mean = row_sum[0] / classes if row_sum else None
    return _finite(top), ops.log(total), label_logit, mean


def _finite(top: Any) -> Any:
    """`top` where it is a finite maximum, else 0."""
    finite = ops.logical_and(ops.isfinite(top), top > LOWEST)
    return ops.where(finite, top, ops.zeros_like(top))


def row_statistics(logits: Any, labels: Any, temperature: float = 1.0) -> tuple:
    """What a head reports of each row of `logits` besides its loss, at
    `temperature` `T`: `(predicted, log_prob, entropy)`, the arg max (int32),
    the label's log-probability `log softmax(logits / T)[label]` and the
    entropy `-sum(p * log p)` of `p = softmax(logits / T)`.

    With `q = logits / T`, `top` its maximum and `s = sum(exp(q - top))`:
    `log_prob = q[label] - top - log s` and `entropy = log s - sum(exp(q -
    top) * (q - top)) / s`, differences from the maximum as in
    `row_crossentropy`.
    """
    predicted = ops.cast(ops.argmax(logits, axis=-1), "int32")
    scaled = logits if temperature == 1.0 else logits / temperature
    top = _finite(ops.max(scaled, axis=-1, keepdims=True))
    shifted = scaled - top
    exponentials = ops.exp(shifted)
    total = ops.sum(exponentials, axis=-1)
    log_total = ops.log(total)
    label_shifted = ops.take_along_axis(shifted, ops.expand_dims(labels, -1), axis=-1)
    log_prob = ops.squeeze(label_shifted, axis=-1) - log_total
    # exp(-inf) * -inf is NaN: a class of probability 0 adds 0.
    spread = ops.where(exponentials > 0, exponentials * shifted, 0.0)
    entropy = log_total - ops.sum(spread, axis=-1) / total
    return predicted, log_prob, entropy


def log_softmax(logits: Any, rows: Rows) -> Any:
    """`log_softmax(logits)` from the row's normalizer."""
    shifted = logits - ops.expand_dims(rows.top, -1)
    return shifted - ops.expand_dims(rows.log_sum, -1)


def row_crossentropy_grad(
    logits: Any,
    rows: Rows,
    targets: Any,
    upstream: Any,
    valid: Any = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    keep_exponentials: bool = False,
    columns: tuple[int, int] | None = None,
) -> Any:
    """`upstream * d per_step / d logits`, exactly 0 where not `valid`:
    `softmax * scale - coefficient * t`, one expression, so that XLA fuses it
    into one loop over the logits.

    Args:
        logits: The logits `rows` came from.
        rows: Their `Rows` (of which `exponentials` is read only with
            `keep_exponentials`).
        targets: As for `row_crossentropy`.
        upstream: The gradient of the per-step losses.
        valid: Optional boolean mask of the per-step shape.
        label_smoothing: As for `row_crossentropy`.
        z_loss: As for `row_crossentropy`.
        keep_exponentials: Whether the softmax comes from `rows.exponentials`
            rather than being recomputed from `logits`.
        columns: `(start, size, shards)`: only the gradient's classes of
            `column_slice(logits, start, size, shards)`, from those columns
            of `logits` (and of the exponentials and of dense targets);
            `None` for all of them.

    Returns:
        The gradient, `logits`' shape (with `columns`, its `size * shards`
        columns).
    """
    classes = logits.shape[-1]
    if columns is not None:
        logits = column_slice(logits, *columns)
        if keep_exponentials:
            rows = rows._replace(exponentials=column_slice(rows.exponentials, *columns))
        if len(targets.shape) == len(logits.shape):
            targets = column_slice(targets, *columns)
    coefficient = where_valid(valid, upstream)
    softmax_weight = rows.target_sum
    if z_loss:
        softmax_weight = softmax_weight + 2.0 * z_loss * (rows.top + rows.log_sum)
    scale = coefficient * softmax_weight
    if keep_exponentials:
        probs = rows.exponentials * ops.expand_dims(scale / ops.exp(rows.log_sum), -1)
    else:
        probs = ops.exp(log_softmax(logits, rows)) * ops.expand_dims(scale, -1)
    if len(targets.shape) < len(logits.shape):
        if columns is None:
            ids = ops.arange(classes, dtype="int32")
        else:
            ids = column_ids(classes, *columns)
        is_label = ops.equal(ids, ops.expand_dims(targets, -1))
        label_term = ops.expand_dims((1.0 - label_smoothing) * coefficient, -1)
        grad = ops.where(is_label, probs - label_term, probs)
    else:
        grad = probs - ops.expand_dims(coefficient, -1) * (
            (1.0 - label_smoothing) * targets
        )
    if label_smoothing:
        grad = grad - ops.expand_dims(coefficient * (label_smoothing / classes), -1)
    return where_valid(valid, grad)


def column_slice(
    array: Any, start: Any, size: int, shards: int = 1, axis: int = -1
) -> Any:
    """The columns `[start, start + size)` of each of `shards` equal shards
    of `array`'s `axis`, in the shards' order (`size * shards` columns):
    with one shard `array[..., start:start + size]`. `size` and `shards`
    static, `start` an int or a traced index; `array` itself when that is
    every column.

    With `shards` the devices a Keras `ModelParallel` distribution cuts the
    axis over, each device's slice stays its own: the axis is read as
    `[shards, columns / shards]` and sliced within (a slice at a traced
    offset of the sharded axis itself would make XLA gather the whole
    array on every device)."""
    axis %= len(array.shape)
    if size * shards == array.shape[axis]:
        return array
    if shards == 1:
        corner, extent = [0] * len(array.shape), list(array.shape)
        corner[axis], extent[axis] = start, size
        return ops.slice(array, corner, extent)
    split = _split(array, shards, axis)
    corner = [0] * len(split.shape)
    corner[axis + 1] = start
    extent = list(split.shape)
    extent[axis + 1] = size
    piece = ops.slice(split, corner, extent)
    return _merge(piece, shards, axis)


def column_update(
    array: Any, start: Any, update: Any, shards: int = 1, axis: int = -1
) -> Any:
    """`array` with `column_slice(array, start, size, shards, axis)`
    replaced by `update` (`size * shards` columns on `axis`), in place where
    a compiler aliases the buffer."""
    axis %= len(array.shape)
    if shards == 1:
        corner = [0] * len(array.shape)
        corner[axis] = start
        return ops.slice_update(array, corner, update)
    corner = [0] * (len(array.shape) + 1)
    corner[axis + 1] = start
    split = _split(array, shards, axis)
    updated = ops.slice_update(split, corner, _split(update, shards, axis))
    return _merge(updated, shards, axis)


def _split(array: Any, shards: int, axis: int) -> Any:
    """`array` with its `axis` read as `[shards, columns / shards]`."""
    shape = list(array.shape)
    return ops.reshape(
        array, [*shape[:axis], shards, shape[axis] // shards, *shape[axis + 1 :]]
    )


def _merge(array: Any, shards: int, axis: int) -> Any:
    """`_split` undone: axes `axis` and `axis + 1` made one."""
    shape = list(array.shape)
    merged = shards * shape[axis + 1]
    return ops.reshape(array, [*shape[:axis], merged, *shape[axis + 2 :]])


def column_ids(classes: int, start: Any, size: int, shards: int = 1) -> Any:
    """The class ids (int32) of `column_slice(..., start, size, shards)`'s
    columns of a `classes`-wide axis."""
    ids = ops.arange(size, dtype="int32") + start
    if shards == 1:
        return ids
    offsets = ops.arange(shards, dtype="int32") * (classes // shards)
    return ops.reshape(ops.expand_dims(offsets, -1) + ids, (-1,))
