"""Masked CTC: `masked_ctc` and the `MaskedCTC` loss.

Speech and handwriting pad both the frames and the labels. The frames of
each sequence are counted from its mask (the mask Keras propagated onto
`y_pred` AND an explicit `mask`), the labels from `mask_value`, so padding is
never aligned as if it were real. The CTC itself is `keras.ops.ctc_loss`
(TensorFlow's `tf.nn.ctc_loss`, PyTorch's `ctc_loss`, a forward algorithm
under JAX), called only on inputs made safe first:

- padded frames are replaced by zeros with `where`, so NaN or inf there
  reaches neither the loss nor its gradient (exactly 0 at padded frames);
- a sequence without a real frame is given one harmless frame and no label,
  then contributes 0;
- an infeasible sequence (its labels need more frames than it has: one per
  label, plus one blank between each pair of equal neighbours) is computed
  without labels, then set to inf (`zero_infinity=False`, as PyTorch does)
  or to 0 with a zero gradient (`zero_infinity=True`).

The per-sequence losses are reduced by `kmask.reduce` over the
sequences with at least one real frame: `"token_mean"` is
`sum(loss_i) / sum(label_length_i)` (the denominator global across replicas),
`"sequence_mean"` the mean over sequences, `"sum"`, `"sum_over_batch_size"`
(Keras's `CTC` when nothing is padded) and `"none"` (`[batch]`).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kmask import _pipeline
from kmask.ops._dispatch import backend_kernel
from kmask.reduce import reduce_steps, standardize_reduction
from kmask.typing import Tensor

__all__ = ["MaskedCTC", "masked_ctc"]


def masked_ctc(
    y_true: Any,
    y_pred: Any,
    mask: Any = None,
    blank_index: int = 0,
    mask_value: int = -1,
    reduction: str | None = "token_mean",
    sample_weight: Any = None,
    zero_infinity: bool = False,
) -> Tensor:
    """CTC over the real frames and labels of each sequence.

    Args:
        y_true: Integer labels `[batch, max_label_length]`, padded at the end
            with `mask_value`.
        y_pred: Logits `[batch, frames, classes]`; a mask Keras propagated
            onto them (`Masking`, `LengthMask`, ...) marks the real frames.
        mask: Optional boolean `[batch, frames]`, `True` on real frames. The
            real frames must come first (padding `'post'`).
        blank_index: The class of the CTC blank.
        mask_value: The label that pads `y_true`.
        reduction: `"token_mean"` (default), `"sequence_mean"`, `"sum"`,
            `"sum_over_batch_size"` or `"none"`; see the module docstring.
        sample_weight: Optional `[batch]` weights of the sequences.
        zero_infinity: Whether an infeasible sequence gives 0 (and a zero
            gradient) rather than inf.

    Returns:
        A scalar, or `[batch]` losses with `reduction="none"`.

    Example:

    >>> import kmask
    >>> y_true = [[1, 2, -1]]
    >>> y_pred = [[[0.0, 0.0, 0.0]] * 3 + [[float("nan")] * 3]]
    >>> mask = [[True, True, True, False]]
    >>> loss = kmask.masked_ctc(y_true, y_pred, mask, reduction="sum")
    >>> round(float(loss), 4)  # -log(5 alignments / 3**3)
    1.6864
    """
    reduction = standardize_reduction(reduction)
    frames = _pipeline.prepare_frames(
        y_true,
        y_pred,
        mask=mask,
        mask_value=mask_value,
        blank_index=blank_index,
        sample_weight=sample_weight,
    )
    labels, y_pred, real_frames = frames.labels, frames.logits, frames.real_frames
    frame_lengths, label_lengths = frames.frame_lengths, frames.label_lengths
    has_frames, real_labels = frames.has_frames, frames.real_labels
    feasible = ops.less_equal(
        label_lengths + _repeats(labels, real_labels), frame_lengths
    )
    computed = ops.logical_and(has_frames, feasible)
    # The op only ever sees sequences it can align: padded frames zeroed, at
    # least one frame, and no labels where they cannot fit.
    logits = ops.where(real_frames[..., None], y_pred, ops.zeros_like(y_pred))
    per_sequence = (backend_kernel("ctc_loss") or ops.ctc_loss)(
        labels,
        logits,
        ops.where(computed, label_lengths, ops.zeros_like(label_lengths)),
        ops.where(has_frames, frame_lengths, ops.ones_like(frame_lengths)),
        mask_index=blank_index,
    )
    per_sequence = ops.cast(per_sequence, y_pred.dtype)
    infeasible_loss = 0.0 if zero_infinity else float("inf")
    per_sequence = ops.where(
        ops.logical_or(computed, ops.logical_not(has_frames)),
        per_sequence,
        ops.cast(infeasible_loss, per_sequence.dtype),
    )
    return reduce_steps(
        per_sequence,
        has_frames,
        reduction,
        frames.sample_weight,
        token_counts=label_lengths,
    )


@keras.saving.register_keras_serializable(package="kmask")
class MaskedCTC(keras.losses.Loss):
    """CTC loss over the real frames and labels: `masked_ctc` as a Keras loss.

    The real frames come from the mask Keras propagated onto `y_pred` (put
    one there with `Masking`, `kmask.LengthMask` or `kmask.AttachMask`); the
    labels are padded with `mask_value`. See `kmask.ctc` for the reductions
    and what happens to padding and infeasible sequences.

    Args:
        blank_index: The class of the CTC blank.
        mask_value: The label that pads `y_true`.
        reduction: `"token_mean"` (default), `"sequence_mean"`, `"sum"`,
            `"sum_over_batch_size"` or `"none"`.
        zero_infinity: Whether an infeasible sequence gives 0 rather than inf.
        name: Name of the loss.
        dtype: The loss's dtype; it is computed in float32 (or wider).

    Returns:
        Called as `loss(y_true, y_pred, sample_weight=None)` with labels
        `[batch, max_label_length]` and logits `[batch, frames, classes]`: a
        scalar, or `[batch]` losses with `reduction="none"`.

    Example:

    >>> import kmask
    >>> from keras import ops
    >>> loss = kmask.MaskedCTC(reduction="none")
    >>> y_true = [[1, -1], [1, 1]]  # "1 1" needs 3 frames, the 2nd row has 2
    >>> y_pred = [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
    >>> ops.convert_to_numpy(loss(y_true, y_pred)).round(4)  # -log(3/4), inf
    array([0.2877,    inf], dtype=float32)
    """

    def __init__(
        self,
        blank_index: int = 0,
        mask_value: int = -1,
        reduction: str | None = "token_mean",
        zero_infinity: bool = False,
        name: str = "masked_ctc",
        dtype: Any = None,
    ) -> None:
        reduction = standardize_reduction(reduction)
        super().__init__(name=name, reduction=None, dtype=dtype)
        self.reduction = reduction
        self.blank_index = blank_index
        self.mask_value = mask_value
        self.zero_infinity = zero_infinity
        self.dtype_arg = dtype

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Tensor:
        """`masked_ctc` with this loss's options; a subclass's own `call()`
        gives the per-sequence losses instead, reduced the same way."""
        with keras.name_scope(self.name):
            if type(self).call is MaskedCTC.call:
                loss = self._ctc(y_true, y_pred, self.reduction, sample_weight)
            else:
                loss = self._reduce_call(y_true, y_pred, sample_weight)
            return ops.cast(loss, self.dtype)

    def call(self, y_true: Any, y_pred: Any) -> Tensor:
        """The loss of each sequence, `[batch]` (0 where it has no real frame)."""
        return self._ctc(y_true, y_pred, "none", None)

    def _reduce_call(self, y_true, y_pred, sample_weight):
        """An overridden `call()`'s `[batch]` losses, reduced over the
        sequences with real frames, a sequence's tokens its real labels."""
        frames = _pipeline.prepare_frames(
            y_true,
            y_pred,
            mask_value=self.mask_value,
            blank_index=self.blank_index,
            sample_weight=sample_weight,
        )
        per_sequence = ops.cast(self.call(y_true, y_pred), frames.logits.dtype)
        per_sequence = ops.where(frames.has_frames, per_sequence, 0.0)
        return reduce_steps(
            per_sequence,
            frames.has_frames,
            self.reduction,
            frames.sample_weight,
            token_counts=frames.label_lengths,
        )

    def _ctc(self, y_true, y_pred, reduction, sample_weight):
        return masked_ctc(
            y_true,
            y_pred,
            blank_index=self.blank_index,
            mask_value=self.mask_value,
            reduction=reduction,
            sample_weight=sample_weight,
            zero_infinity=self.zero_infinity,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            "blank_index": self.blank_index,
            "mask_value": self.mask_value,
            "reduction": self.reduction,
            "zero_infinity": self.zero_infinity,
            "name": self.name,
            "dtype": self.dtype_arg,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MaskedCTC:
        return cls(**config)


def _repeats(labels, real_labels):
    """How many neighbouring real labels are equal: each needs a blank frame
    between them."""
    equal = ops.logical_and(
        ops.equal(labels[:, 1:], labels[:, :-1]), real_labels[:, 1:]
    )
    return ops.sum(ops.cast(equal, "int32"), axis=-1)
