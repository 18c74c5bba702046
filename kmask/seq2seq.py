"""TensorFlow Addons' sequence loss, for users of `tfa.seq2seq`.

`sequence_loss` and `SequenceLoss` take TFA's argument names and defaults
(which differ between the function and the class, in TFA as here) and give
TFA's numbers and output ranks on TensorFlow, JAX and PyTorch. With per-step
cross-entropies `l` and weights `w`, both `[batch, time]`:

| flags set (the others False)         | result                      | rank |
|---------------------------------------|-----------------------------|------|
| none                                  | `l*w`                       | 2    |
| `average_across_timesteps`            | `sum_t(l*w) / sum_t(w)`     | 1    |
| `average_across_batch`                | `sum_b(l*w) / sum_b(w)`     | 1    |
| both `average_across_*`               | `sum(l*w) / sum(w)`         | 0    |
| `sum_over_timesteps`                  | `sum_t(l*w) / nonzero_t(w)` | 1    |
| `sum_over_batch`                      | `sum_b(l*w) / nonzero_b(w)` | 1    |
| both `sum_over_*`                     | `sum(l*w) / nonzero(w)`     | 0    |

`nonzero` counts the steps whose weight is not 0; a division by 0 gives 0
(TFA's `divide_no_nan`). The other four flag pairs raise a `ValueError`, as
in TFA. Unlike TFA, a step whose weight is 0 is padding before the loss is
computed (kmask's pipeline), so NaN or inf there reaches neither the loss nor
its gradient, and `weights=None` means all ones. Denominators are those of
the batch at hand, as in TFA; for a token mean that is exact across replicas
use `kmask.MaskedSparseCategoricalCrossentropy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from kmask._shapes import invalid_shape
from kmask.losses import (
    MaskedCategoricalCrossentropy,
    MaskedLoss,
    MaskedSparseCategoricalCrossentropy,
    masked_loss,
)
from kmask.masks import keras_mask
from kmask.reduce import divide_or_zero
from kmask.typing import Tensor

# The flag pairs TFA rejects, in TFA's order, with why.
_EXCLUSIVE = (
    ("average_across_timesteps", "sum_over_timesteps", ""),
    ("average_across_batch", "sum_over_batch", ""),
    ("average_across_batch", "sum_over_timesteps", " because of ambiguous order"),
    ("sum_over_batch", "average_across_timesteps", " because of ambiguous order"),
)


def check_flags(**flags: bool) -> None:
    """Raises TFA's `ValueError` for a pair of flags it rejects."""
    for first, second, why in _EXCLUSIVE:
        if flags[first] and flags[second]:
            raise ValueError(
                f"Arguments `{first}` and `{second}` cannot be set to True at "
                f"same time{why}. Received: {first}={flags[first]}, "
                f"{second}={flags[second]}"
            )


def sequence_loss(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None,
    average_across_timesteps: bool = True,
    average_across_batch: bool = True,
    sum_over_timesteps: bool = False,
    sum_over_batch: bool = False,
    softmax_loss_function: Callable[..., Tensor] | None = None,
    name: str | None = None,
) -> Tensor:
    """Weighted cross-entropy of a sequence of logits, as `tfa.seq2seq.sequence_loss`.

    See the module docstring of `kmask.seq2seq` for what each flag computes.

    Args:
        logits: `[batch, time, num_classes]` logits.
        targets: `[batch, time]` integer labels, or `[batch, time,
            num_classes]` one-hot (or soft) targets.
        weights: `[batch, time]` weights; a weight of 0 is padding. `None`
            means all ones. A mask Keras propagated onto `logits` zeroes the
            weights of the steps it marks as padding.
        average_across_timesteps: Divide the sum over time by the sum of the
            weights over time.
        average_across_batch: Divide the sum over the batch by the sum of the
            weights over the batch.
        sum_over_timesteps: Divide the sum over time by the number of
            non-zero weights over time.
        sum_over_batch: Divide the sum over the batch by the number of
            non-zero weights over the batch.
        softmax_loss_function: Optional `fn(labels=..., logits=...)` taking
            the steps flattened (`[batch * time]` labels, `[batch * time,
            num_classes]` logits) and returning `[batch * time]` losses, used
            instead of the softmax cross-entropy.
        name: Optional name scope, `"sequence_loss"` by default.

    Returns:
        A float tensor of rank 0, 1 (`[batch]` or `[time]`) or 2
        (`[batch, time]`), in the dtype of `logits`.

    Example:

    >>> import kmask
    >>> logits = [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [9.0, float("nan")]]]
    >>> targets = [[0, 1], [1, 0]]
    >>> weights = [[1.0, 1.0], [1.0, 0.0]]  # the last step is padding
    >>> round(float(kmask.sequence_loss(logits, targets, weights)), 4)  # log(2)
    0.6931
    >>> per_sequence = kmask.sequence_loss(
    ...     logits, targets, weights, average_across_batch=False
    ... )
    >>> tuple(per_sequence.shape)  # rank 1: [batch]
    (2,)
    """
    check_flags(
        average_across_timesteps=average_across_timesteps,
        average_across_batch=average_across_batch,
        sum_over_timesteps=sum_over_timesteps,
        sum_over_batch=sum_over_batch,
    )
    propagated = keras_mask(logits)
    logits, targets = ops.convert_to_tensor(logits), ops.convert_to_tensor(targets)
    if weights is None:
        weights = ops.ones(ops.shape(logits)[:2], "float32")
    weights = ops.convert_to_tensor(weights)
    _check_ranks(logits, targets, weights)
    weights = ops.cast(weights, "float32")
    if propagated is not None:
        weights = ops.where(propagated, weights, ops.zeros_like(weights))
    with keras.name_scope(name or "sequence_loss"):
        per_step = masked_loss(
            targets,
            logits,
            _per_step_loss(targets, softmax_loss_function),
            sample_weight=weights,
            reduction="none",
        )
        result = _reduce(
            per_step,
            weights,
            average_across_timesteps,
            average_across_batch,
            sum_over_timesteps,
            sum_over_batch,
        )
    dtype = logits.dtype if "float" in str(logits.dtype) else "float32"
    return ops.cast(result, dtype)


@keras.saving.register_keras_serializable(package="kmask")
class SequenceLoss(keras.losses.Loss):
    """Weighted cross-entropy of a sequence of logits, as `tfa.seq2seq.SequenceLoss`.

    Called as `loss(y_true, y_pred, sample_weight=None)`, it returns
    `kmask.sequence_loss(y_pred, y_true, sample_weight, ...)` with this
    loss's flags; `sample_weight` plays TFA's `weights`, and `None` means all
    ones. The defaults differ from the function's, as in TFA: the class sums
    over both axes and divides by the number of non-zero weights.

    Args:
        average_across_timesteps: See `kmask.sequence_loss`.
        average_across_batch: See `kmask.sequence_loss`.
        sum_over_timesteps: See `kmask.sequence_loss`.
        sum_over_batch: See `kmask.sequence_loss`.
        softmax_loss_function: See `kmask.sequence_loss`; save it with the
            model by registering it (`keras.saving.register_keras_serializable`).
        name: Optional name of the loss, `"sequence_loss"` by default.

    Returns:
        A float tensor of rank 0, 1 or 2 (see `kmask.seq2seq`).

    Example:

    >>> import kmask
    >>> loss = kmask.SequenceLoss()
    >>> y_true = [[0, 1, 1]]
    >>> y_pred = [[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]
    >>> sample_weight = [[2.0, 2.0, 0.0]]
    >>> round(float(loss(y_true, y_pred, sample_weight)), 4)  # 2 * log(2)
    1.3863
    """

    def __init__(
        self,
        average_across_timesteps: bool = False,
        average_across_batch: bool = False,
        sum_over_timesteps: bool = True,
        sum_over_batch: bool = True,
        softmax_loss_function: Callable[..., Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        check_flags(
            average_across_timesteps=average_across_timesteps,
            average_across_batch=average_across_batch,
            sum_over_timesteps=sum_over_timesteps,
            sum_over_batch=sum_over_batch,
        )
        super().__init__(name=name or "sequence_loss", reduction=None)
        self.average_across_timesteps = average_across_timesteps
        self.average_across_batch = average_across_batch
        self.sum_over_timesteps = sum_over_timesteps
        self.sum_over_batch = sum_over_batch
        self.softmax_loss_function = softmax_loss_function

    def __call__(
        self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None
    ) -> Tensor:
        return sequence_loss(
            y_pred,
            y_true,
            sample_weight,
            average_across_timesteps=self.average_across_timesteps,
            average_across_batch=self.average_across_batch,
            sum_over_timesteps=self.sum_over_timesteps,
            sum_over_batch=self.sum_over_batch,
            softmax_loss_function=self.softmax_loss_function,
            name=self.name,
        )

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        """The per-step cross-entropy, `[batch, time]`, unweighted."""
        return sequence_loss(
            y_pred,
            y_true,
            None,
            average_across_timesteps=False,
            average_across_batch=False,
            softmax_loss_function=self.softmax_loss_function,
        )

    def get_config(self) -> dict[str, Any]:
        function = self.softmax_loss_function
        return {
            "average_across_timesteps": self.average_across_timesteps,
            "average_across_batch": self.average_across_batch,
            "sum_over_timesteps": self.sum_over_timesteps,
            "sum_over_batch": self.sum_over_batch,
            "softmax_loss_function": (
                None
                if function is None
                else keras.saving.serialize_keras_object(function)
            ),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SequenceLoss:
        config = dict(config)
        function = config.get("softmax_loss_function")
        if function is not None:
            config["softmax_loss_function"] = keras.saving.deserialize_keras_object(
                function
            )
        return cls(**config)


def _check_ranks(logits, targets, weights) -> None:
    """TFA's rank rules, in kmask's wording."""
    if len(logits.shape) != 3:
        raise invalid_shape(
            "logits", "[batch_size, sequence_length, num_classes]", logits=logits.shape
        )
    if len(targets.shape) not in (2, 3):
        raise invalid_shape(
            "targets",
            "[batch_size, sequence_length] labels or [batch_size, "
            "sequence_length, num_classes] one-hot targets",
            targets=targets.shape,
            logits=logits.shape,
        )
    if len(weights.shape) != 2:
        raise invalid_shape(
            "weights",
            "[batch_size, sequence_length]",
            weights=weights.shape,
            logits=logits.shape,
        )


def _per_step_loss(targets, softmax_loss_function) -> MaskedLoss:
    """The per-step loss: the softmax cross-entropy for labels or one-hot
    targets, or TFA's `softmax_loss_function` on the flattened steps."""
    sparse = len(targets.shape) == 2
    if softmax_loss_function is None:
        if sparse:
            return MaskedSparseCategoricalCrossentropy(from_logits=True)
        return MaskedCategoricalCrossentropy(from_logits=True)

    def flattened(y_true, y_pred):
        # The pipeline hands the targets over in the logits' float dtype.
        labels = ops.cast(y_true, "int32") if sparse else y_true
        losses = softmax_loss_function(
            labels=ops.reshape(labels, (-1, *labels.shape[2:])),
            logits=ops.reshape(y_pred, (-1, y_pred.shape[-1])),
        )
        return ops.reshape(losses, ops.shape(y_pred)[:2])

    return MaskedLoss(flattened, name="sequence_loss")


def _reduce(per_step, weights, across_time, across_batch, over_time, over_batch):
    """TFA's reductions of the weighted per-step losses `per_step` (`l*w`,
    0 at padding)."""
    if across_time and across_batch:
        return divide_or_zero(ops.sum(per_step), ops.sum(weights))
    if over_time and over_batch:
        return divide_or_zero(ops.sum(per_step), _nonzero(weights))
    if across_time or across_batch:
        axis = 0 if across_batch else 1
        return divide_or_zero(ops.sum(per_step, axis=axis), ops.sum(weights, axis=axis))
    if over_time or over_batch:
        axis = 0 if over_batch else 1
        return divide_or_zero(ops.sum(per_step, axis=axis), _nonzero(weights, axis))
    return per_step


def _nonzero(weights, axis: int | None = None):
    """The number of non-zero weights, as a float (`ops.count_nonzero` warns
    on PyTorch)."""
    return ops.sum(ops.cast(ops.not_equal(weights, 0), weights.dtype), axis=axis)
