"""The cross-entropy op, written once: its forward pass and its gradient.

`sparse_crossentropy_with_logits`, `categorical_crossentropy_with_logits` and
the chunk loop of `kmask.ops.linear.linear_crossentropy` share the
cross-entropy of a row of logits and its gradient (`kmask.ops._rows`). On
PyTorch each op runs as its kernel in `kmask.ops._torch`, picked by
`kmask.ops._dispatch`; the `*_portable` functions are the `keras.ops` forms
whatever the backend.
`sparse_crossentropy` and `crossentropy` are the per-step functions of the
losses and of `Perplexity`: they route logits to these ops and handle
probabilities and a class axis other than the last.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kmask._shapes import dense_inputs, where_valid
from kmask.ops._dispatch import KERNELS, keeps_exponentials
from kmask.ops._rows import (
    log_softmax,
    row_crossentropy,
    row_crossentropy_grad,
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
