"""The independent NumPy references, in float64: the one copy that the parity
harness and the tests (`tests/`) both import.

Nothing here imports kmask or Keras. A per-step reference takes `y_true` and
`y_pred` (the real steps as rows, or whole `[..., classes]` batches) and
returns the per-step loss and its gradient with respect to `y_pred`;
`np_sparse_ce` is the per-step sparse cross-entropy from logits alone;
`np_reduce`, `np_token_mean` and `np_masked_loss` reduce per-step values as
`kmask.reduce` does; `np_linear` is the fused linear cross-entropy; `np_divergence` and
`np_distillation` the distillation divergences;
`numpy_sgd` the full-batch SGD of the device cases.
"""

from __future__ import annotations

from functools import partial

import numpy as np

# keras.backend.epsilon(): Keras clips probabilities to [EPSILON, 1 - EPSILON].
EPSILON = 1e-7


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
    """In the dtype of `logits` (the sources draw float32 probabilities with
    it); the references below call it on float64."""
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_categorical(y_true, y_pred, from_logits=False, label_smoothing=0.0):
    y_true, y_pred = np.asarray(y_true, "float64"), np.asarray(y_pred, "float64")
    target = y_true * (1 - label_smoothing) + label_smoothing / y_pred.shape[-1]
    if from_logits:
        log_probs = np_log_softmax(y_pred)
        grad = np.exp(log_probs) * target.sum(-1, keepdims=True) - target
        return -(target * log_probs).sum(-1), grad
    total = y_pred.sum(-1, keepdims=True)
    probs = y_pred / total
    clipped = np.clip(probs, EPSILON, 1 - EPSILON)
    d_probs = np.where(probs == clipped, -target / clipped, 0.0)
    grad = (d_probs - (d_probs * probs).sum(-1, keepdims=True)) / total
    return -(target * np.log(clipped)).sum(-1), grad


def np_sparse_categorical(
    labels, y_pred, from_logits=False, label_smoothing=0.0, z_loss=0.0
):
    y_pred = np.asarray(y_pred, "float64")
    one_hot = np.eye(y_pred.shape[-1])[np.asarray(labels).astype(int)]
    loss, grad = np_categorical(one_hot, y_pred, from_logits, label_smoothing)
    if z_loss:
        log_normalizer = (y_pred - np_log_softmax(y_pred))[..., 0]
        loss = loss + z_loss * log_normalizer**2
        grad = grad + 2 * z_loss * log_normalizer[..., None] * np.exp(
            np_log_softmax(y_pred)
        )
    return loss, grad


def np_sparse_ce(labels, logits, label_smoothing=0.0, z_loss=0.0) -> np.ndarray:
    """The per-step sparse cross-entropy from `logits [..., classes]`, without
    its gradient."""
    return np_sparse_categorical(labels, logits, True, label_smoothing, z_loss)[0]


def np_binary(y_true, y_pred, from_logits=False, label_smoothing=0.0):
    y_true, y_pred = np.asarray(y_true, "float64"), np.asarray(y_pred, "float64")
    target = y_true * (1 - label_smoothing) + 0.5 * label_smoothing
    features = y_pred.shape[-1]
    if from_logits:
        loss = np.logaddexp(0.0, y_pred) - target * y_pred
        grad = 1 / (1 + np.exp(-y_pred)) - target
        return loss.mean(-1), grad / features
    clipped = np.clip(y_pred, EPSILON, 1 - EPSILON)
    loss = -(target * np.log(clipped) + (1 - target) * np.log(1 - clipped))
    grad = np.where(
        y_pred == clipped, -target / clipped + (1 - target) / (1 - clipped), 0.0
    )
    return loss.mean(-1), grad / features


def np_squared(y_true, y_pred):
    y_true, y_pred = np.asarray(y_true, "float64"), np.asarray(y_pred, "float64")
    error = y_pred - y_true
    return (error**2).mean(-1), 2 * error / error.shape[-1]


def np_absolute(y_true, y_pred):
    y_true, y_pred = np.asarray(y_true, "float64"), np.asarray(y_pred, "float64")
    error = y_pred - y_true
    return np.abs(error).mean(-1), np.sign(error) / error.shape[-1]


def np_huber(y_true, y_pred, delta=1.0):
    y_true, y_pred = np.asarray(y_true, "float64"), np.asarray(y_pred, "float64")
    error = y_pred - y_true
    small = np.abs(error) <= delta
    loss = np.where(small, 0.5 * error**2, delta * np.abs(error) - 0.5 * delta**2)
    grad = np.where(small, error, delta * np.sign(error))
    return loss.mean(-1), grad / error.shape[-1]


def np_step_weight(weight, shape) -> np.ndarray:
    """A `[batch]` or `[batch, time, ...]` weight (ones when `None`) per step
    of `shape`."""
    if weight is None:
        return np.ones(shape)
    weight = np.asarray(weight, "float64")
    return np.broadcast_to(
        weight.reshape(weight.shape + (1,) * (len(shape) - weight.ndim)), shape
    )


def np_reduce(per_step, valid, weight, reduction):
    """The reduction of `kmask.reduce` and `d result / d per_step`; for
    `"none"` the derivative is that of the sum of the per-step results."""
    weight = np_step_weight(weight, per_step.shape)
    used = valid & (weight != 0)
    used_weight = np.where(used, weight, 0.0)
    if reduction == "none":
        return np.where(used, per_step * weight, 0.0), used_weight
    if reduction == "sum":
        coefficient = used_weight
    elif reduction == "sum_over_batch_size":
        # Keras: the real steps of the mask, zero weights included.
        count = np.broadcast_to(valid, per_step.shape).sum()
        coefficient = used_weight / count if count else np.zeros(per_step.shape)
    elif reduction == "token_mean":
        coefficient = np_normalized(used_weight)
    else:
        steps = used.sum(1, keepdims=True)
        per_sequence = np.where(steps > 0, 1.0 / np.maximum(steps, 1), 0.0)
        coefficient = np_normalized(used_weight * per_sequence)
    return np.where(used, coefficient * per_step, 0.0).sum(), coefficient


def np_token_mean(per_step, valid, weight=None) -> float:
    """The weighted mean of `per_step` over the real steps with a nonzero
    weight (0 when there is none); padded steps are never read, so NaN or
    inf there is ignored."""
    per_step = np.asarray(per_step, "float64")
    weight = np_step_weight(weight, per_step.shape)
    used = np.asarray(valid, bool) & (weight != 0)
    if not used.any():
        return 0.0
    return float((per_step[used] * weight[used]).sum() / weight[used].sum())


def np_normalized(weight):
    total = weight.sum()
    return weight / total if total else np.zeros_like(weight)


def np_sequence_mask(lengths, steps: int, padding: str) -> np.ndarray:
    positions = np.arange(steps)[None, :]
    lengths = np.asarray(lengths)[:, None]
    return positions < lengths if padding == "post" else positions >= steps - lengths


def np_masked_loss(loss, y_true, y_pred, valid, weight, reduction):
    """The value and gradient of a masked loss, from the real steps only."""
    as_float = partial(np.asarray, dtype="float64")
    y_pred = as_float(y_pred)
    used = valid & (np_step_weight(weight, valid.shape) != 0)
    per_step = np.zeros(valid.shape)
    step_grad = np.zeros(y_pred.shape)
    if used.any():
        target_rows = (
            y_true[used] if loss.target == "labels" else as_float(y_true[used])
        )
        per_step[used], step_grad[used] = loss.reference(target_rows, y_pred[used])
    value, coefficient = np_reduce(per_step, valid, weight, reduction)
    grad = np.where(used[..., None], coefficient[..., None] * step_grad, 0.0)
    return value, grad


def np_linear(
    hidden, kernel, bias, labels, valid, weight, reduction, softcap=None, **options
):
    """The linear cross-entropy's value, its per-step losses (0 on padding),
    the gradients with respect to `hidden`, `kernel` (`[hidden, vocabulary]`)
    and `bias`, and the token accuracy of the argmax; with `softcap`, all of
    the logits `softcap * tanh(logits / softcap)`."""
    used = valid & (np_step_weight(weight, valid.shape) != 0)
    hidden = np.where(used[..., None], np.asarray(hidden, "float64"), 0.0)
    kernel = np.asarray(kernel, "float64")
    logits = hidden @ kernel
    if bias is not None:
        logits = logits + np.asarray(bias, "float64")
    slope = np.ones_like(logits)
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
        slope = 1.0 - (logits / softcap) ** 2
    per_step, step_grad = np.zeros(valid.shape), np.zeros(logits.shape)
    if used.any():
        per_step[used], step_grad[used] = np_sparse_categorical(
            labels[used], logits[used], from_logits=True, **options
        )
    value, coefficient = np_reduce(per_step, valid, weight, reduction)
    d_logits = np.where(used[..., None], coefficient[..., None] * step_grad, 0.0)
    d_logits = d_logits * slope
    correct = (logits.argmax(-1) == labels) & used
    accuracy, _ = np_reduce(correct.astype("float64"), valid, weight, "token_mean")
    nll = np.zeros(valid.shape)
    if used.any():
        top = logits[used].max(-1, keepdims=True)
        log_sum = np.log(np.exp(logits[used] - top).sum(-1)) + top[:, 0]
        label_logit = np.take_along_axis(logits[used], labels[used][:, None], -1)
        nll[used] = log_sum - label_logit[:, 0]
    return {
        "nll": nll,
        "correct": correct.astype("float64"),
        "value": value,
        "per_step": per_step,
        "grad_hidden": d_logits @ kernel.T,
        "grad_kernel": np.einsum("bth,btv->hv", hidden, d_logits),
        "grad_bias": d_logits.sum((0, 1)),
        "accuracy": accuracy,
    }


def np_divergence(teacher, student, divergence="kl", beta=0.5, temperature=1.0):
    """The per-step divergence of the student's logits from the teacher's
    (both divided by `temperature`) and its gradient with respect to the
    student's logits. `"kl"` is KL(p || q) with `p` the teacher's softmax,
    `"reverse_kl"` KL(q || p), `"jsd"` Liger-Kernel's generalized JSD
    `beta KL(p || m) + (1 - beta) KL(q || m)`, `m = beta p + (1 - beta) q`,
    whose ends `beta` 0 and 1 are the forward and reverse KL."""
    if divergence == "jsd" and beta in (0, 1):
        divergence = "kl" if beta == 0 else "reverse_kl"
    log_p = np_log_softmax(np.asarray(teacher, "float64") / temperature)
    log_q = np_log_softmax(np.asarray(student, "float64") / temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    # The loss, and its derivative with respect to q (then through softmax).
    if divergence == "kl":
        loss, d_q = (p * (log_p - log_q)).sum(-1), -p / q
    elif divergence == "reverse_kl":
        loss, d_q = (q * (log_q - log_p)).sum(-1), log_q - log_p + 1.0
    else:
        log_m = np.log(beta * p + (1 - beta) * q)
        loss = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (
            q * (log_q - log_m)
        ).sum(-1)
        d_q = (1 - beta) * (log_q - log_m)
    d_logits = q * (d_q - (q * d_q).sum(-1, keepdims=True)) / temperature
    return loss, d_logits


def np_distillation(
    teacher,
    student,
    valid,
    weight=None,
    reduction="token_mean",
    divergence="kl",
    beta=0.5,
    temperature=1.0,
    scale_by_temperature_squared=True,
):
    """`kmask.masked_distillation`'s value and gradient with respect to the
    student's logits, from the real steps only (padding is never read)."""
    student = np.asarray(student, "float64")
    valid = np.broadcast_to(
        np.asarray(valid, bool).reshape(
            np.shape(valid) + (1,) * (student.ndim - 1 - np.ndim(valid))
        ),
        student.shape[:-1],
    )
    used = valid & (np_step_weight(weight, valid.shape) != 0)
    per_step, step_grad = np.zeros(valid.shape), np.zeros(student.shape)
    if used.any():
        per_step[used], step_grad[used] = np_divergence(
            np.asarray(teacher, "float64")[used],
            student[used],
            divergence,
            beta,
            temperature,
        )
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    value, coefficient = np_reduce(per_step * scale, valid, weight, reduction)
    grad = np.where(used[..., None], scale * coefficient[..., None] * step_grad, 0.0)
    return value, grad


def numpy_token_mean(weights, x, y, valid) -> float:
    """A linear model's squared error averaged over the real steps of the
    whole batch. `weights`: `[kernel [features, 1], bias [1]]`."""
    kernel, bias = (np.asarray(w, "float64") for w in weights)
    error = (x.astype("float64") @ kernel + bias)[..., 0] - y[..., 0]
    return float((error**2)[valid].mean())


def numpy_sgd(weights, x, y, valid, steps: int, learning_rate: float):
    """`steps` SGD steps of a linear model on the whole batch's token-mean
    squared error: the new `[kernel, bias]`, float64."""
    kernel, bias = (np.asarray(w, "float64") for w in weights)
    xs, count = x.astype("float64"), valid.sum()
    for _ in range(steps):
        error = np.where(valid, (xs @ kernel + bias)[..., 0] - y[..., 0], 0.0)
        d_kernel = np.einsum("bt,btf->f", error, xs)[:, None]
        kernel = kernel - learning_rate * 2 * d_kernel / count
        bias = bias - learning_rate * 2 * error.sum(keepdims=True).reshape(1) / count
    return [kernel, bias]
