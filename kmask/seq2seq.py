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
the batch at hand along an axis (a per-sequence or per-step result); a scalar
result divides by the global count, exact across replicas, as every kmask
reduction does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from kmask._pipeline import fill_padding
from kmask._shapes import check_sequence_ranks
from kmask.losses import (
    MaskedCategoricalCrossentropy,
    MaskedLoss,
    MaskedSparseCategoricalCrossentropy,
)
from kmask.masks import keras_mask
from kmask.reduce import reduce_steps
from kmask.typing import Tensor, TensorLike

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
    logits: TensorLike,
    targets: TensorLike,
    weights: TensorLike | None,
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
    return _sequence_loss(
        ops.convert_to_tensor(logits),
        ops.convert_to_tensor(targets),
        None if weights is None else ops.convert_to_tensor(weights),
        propagated,
        (
            average_across_timesteps,
            average_across_batch,
            sum_over_timesteps,
            sum_over_batch,
        ),
        softmax_loss_function,
        name,
    )


def _sequence_loss(
    logits, targets, weights, propagated, flags, softmax_loss_function, name
):
    """`sequence_loss` on tensors, `flags` TFA's four in their order."""
    weights = _checked_weights(logits, targets, weights, propagated)
    with keras.name_scope(name or "sequence_loss"):
        # Unweighted, padding (a zero weight) neutralised: the weights are
        # the reduction's.
        per_step = _per_step_loss(targets, softmax_loss_function)(
            targets, logits, mask=ops.not_equal(weights, 0), reduction="none"
        )
        result = reduce_flags(per_step, weights, *flags)
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
        self,
        y_true: TensorLike,
        y_pred: TensorLike,
        sample_weight: TensorLike | None = None,
    ) -> Tensor:
        """`sequence_loss` with this loss's flags; a subclass's own `call()`
        gives the per-step losses instead (their weights and padding applied
        by the same reductions)."""
        if type(self).call is not SequenceLoss.call:
            return self._reduce_call(y_true, y_pred, sample_weight)
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

    def _reduce_call(self, y_true, y_pred, sample_weight):
        """The flags' reduction of an overridden `call()`'s `[batch, time]`
        losses: padding (a zero weight, the mask Keras propagated onto
        `y_pred`) is selected away before the weights apply."""
        propagated = keras_mask(y_pred)
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        if sample_weight is not None:
            sample_weight = ops.convert_to_tensor(sample_weight)
        weights = _checked_weights(y_pred, y_true, sample_weight, propagated)
        real = ops.not_equal(weights, 0)
        # The pipeline's fill: whatever a padded step holds reaches neither
        # the loss nor its gradient.
        y_true, y_pred = fill_padding(y_true, y_pred, real)
        per_step = ops.cast(self.call(y_true, y_pred), "float32")
        per_step = ops.where(real, per_step, 0.0)
        flags = (
            self.average_across_timesteps,
            self.average_across_batch,
            self.sum_over_timesteps,
            self.sum_over_batch,
        )
        return reduce_flags(per_step, weights, *flags)

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


def _checked_weights(logits, targets, weights, propagated):
    """TFA's `weights` as float32 `[batch, time]` (all ones when `None`), 0
    where the mask Keras propagated onto the logits pads; the ranks of all
    three checked first."""
    if weights is None:
        weights = ops.ones(ops.shape(logits)[:2], "float32")
    check_sequence_ranks(logits, targets, weights)
    weights = ops.cast(weights, "float32")
    if propagated is None:
        return weights
    return ops.where(propagated, weights, ops.zeros_like(weights))


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


def reduce_flags(
    per_step: Tensor,
    weights: Tensor,
    across_time: bool,
    across_batch: bool,
    over_time: bool,
    over_batch: bool,
) -> Tensor:
    """TFA's flags as reductions of the registry (`kmask.reduce`), applied to
    the unweighted per-step losses `per_step` (0 at padding) and the weights:
    `average_across_*` is `token_mean`, `sum_over_*` is
    `sum_over_batch_size` with the non-zero weights as the mask, over both
    axes or over the one named (`axis` 1 for time, 0 for batch)."""
    average, summed = across_time or across_batch, over_time or over_batch
    if not (average or summed):
        return reduce_steps(per_step, None, "none", weights)
    if (across_time and across_batch) or (over_time and over_batch):
        axis = None
    else:
        axis = 0 if across_batch or over_batch else 1
    if average:
        return reduce_steps(per_step, None, "token_mean", weights, axis=axis)
    real = ops.not_equal(weights, 0)
    return reduce_steps(per_step, real, "sum_over_batch_size", weights, axis=axis)
