"""Distillation over padded sequences: `masked_distillation`, and the way in
through Keras's own `keras.distillation.Distiller`.

The divergence between the teacher's and the student's logits is taken at
the real steps only, found as every kmask loss finds them (the one pipeline,
`kmask._pipeline.prepare_distillation`): the mask Keras propagated onto the
student's logits, an explicit `mask`, a pad label in `labels`
(`mask_value`) and zero `sample_weight`. Padded steps are replaced with
`where` before the divergence is computed, so whatever they hold (NaN, inf)
reaches neither the value nor a gradient; the reduction is the registry's
(`kmask.reduce`), its token count global across replicas.

Keras's `LogitsDistillation` averages over every step, padding included,
and with its default `loss="kl_divergence"` (a string, which becomes the
function `keras.losses.kl_divergence`, not the class `KLDivergence`) never
takes the softmax: it computes the KL of the raw scaled logits clipped to
`[1e-7, 1]`. `docs/guides/distillation.md` measures both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from kmask import _pipeline
from kmask._keras_compat import DISTILLATION_LOSS_BASE, DISTILLER_BASE
from kmask._resolve import plain
from kmask.ops.divergence import divergence_options, row_divergence
from kmask.reduce import reduce_steps, standardize_reduction
from kmask.typing import Tensor

__all__ = ["MaskedDistiller", "MaskedLogitsDistillation", "masked_distillation"]


def masked_distillation(
    teacher_logits: Any,
    student_logits: Any,
    mask: Any = None,
    *,
    labels: Any = None,
    mask_value: Any = None,
    sample_weight: Any = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    reduction: str | None = "token_mean",
    scale_by_temperature_squared: bool = True,
) -> Tensor:
    """The divergence of the student's logits from the teacher's, at the real
    steps only.

    Per step, with `p = softmax(teacher_logits / T)` and
    `q = softmax(student_logits / T)`: `"kl"` is `KL(p || q)` (forward, the
    usual distillation loss), `"reverse_kl"` is `KL(q || p)` and `"jsd"` is
    the generalized Jensen-Shannon divergence `beta * KL(p || m) +
    (1 - beta) * KL(q || m)`, `m = beta * p + (1 - beta) * q`, as
    Liger-Kernel defines it (`beta=0` is the forward KL, `beta=1` the
    reverse). The per-step values are multiplied by `T ** 2` (so that their
    gradient keeps its size as `T` changes, as Hinton et al. do), then
    reduced over the real steps; see `kmask.reduce` for the reductions.

    Args:
        teacher_logits: `[batch, ..., classes]`; anything (NaN, inf) at
            padded steps.
        student_logits: The same shape. A mask Keras propagated onto them
            marks padding.
        mask: Optional boolean mask, `True` on real steps: `[batch]` or the
            per-step shape (the logits' without the class axis).
        labels: Optional labels of the per-step shape, read only for their
            pad label `mask_value`.
        mask_value: The pad label of `labels`, e.g. `-100`; needs `labels`.
        sample_weight: Optional weights, `[batch]` or the per-step shape; a
            weight of 0 marks padding.
        temperature: `T`, positive: both logits are divided by it.
        divergence: `"kl"`, `"reverse_kl"` or `"jsd"`.
        beta: The generalized JSD's weight of the teacher, in `[0, 1]`.
        reduction: A kmask reduction name (default `"token_mean"`).
        scale_by_temperature_squared: Whether to multiply by `T ** 2`.

    Returns:
        A float32 scalar (float64 for float64 logits), or per-step values
        with `reduction="none"` (0 at padding).

    Example:

    >>> import kmask
    >>> import numpy as np
    >>> teacher = np.array([[[2.0, 0.0], [1.0, 1.0], [np.nan, 0.0]]])
    >>> student = np.array([[[0.0, 0.0], [1.0, 1.0], [5.0, np.nan]]])
    >>> loss = kmask.masked_distillation(teacher, student, [[True, True, False]])
    >>> round(float(loss), 4)  # KL([0.88, 0.12] || [0.5, 0.5]) / 2 real steps
    0.1639
    """
    options = divergence_options(divergence, beta, temperature)
    reduction = standardize_reduction(reduction)
    if labels is None and mask_value is not None:
        raise ValueError(
            "Argument `mask_value` marks padding in `labels`, which were not "
            f"given. Received: mask_value={mask_value!r}, labels=None"
        )
    steps = _pipeline.prepare_distillation(
        teacher_logits,
        student_logits,
        labels=labels,
        mask_value=mask_value,
        mask=mask,
        sample_weight=sample_weight,
    )
    per_step = _pipeline.per_step_values(
        steps, lambda teacher, student: row_divergence(teacher, student, options)
    )
    if scale_by_temperature_squared:
        per_step = ops.multiply(per_step, options.temperature**2)
    return reduce_steps(per_step, steps.masked, reduction, steps.sample_weight)


@keras.saving.register_keras_serializable(package="kmask")
class MaskedLogitsDistillation(DISTILLATION_LOSS_BASE):
    """Keras's `LogitsDistillation`, over the real steps only.

    A `keras.distillation.DistillationLoss` for Keras's own `Distiller`: it
    computes `kmask.masked_distillation` of the teacher's and the student's
    logits, with the padding Keras propagated onto the student's output (an
    `Embedding(mask_zero=True)`, `Masking`, `kmask.LengthMask`, ...). Under
    `kmask.MaskedDistiller` it also reads the batch's labels (`mask_value`)
    and `sample_weight`.

    Args:
        temperature: `T`, positive (Keras's default, 3.0).
        divergence: `"kl"` (teacher || student), `"reverse_kl"` or `"jsd"`.
        beta: The generalized JSD's weight of the teacher, in `[0, 1]`.
        reduction: A kmask reduction other than `"none"`; see `kmask.reduce`.
        scale_by_temperature_squared: Whether to multiply by `T ** 2`.
        mask_value: Optional pad label of the batch's labels `y` (under
            `kmask.MaskedDistiller`), e.g. `-100`.

    Returns:
        `compute_loss(teacher_outputs, student_outputs)` returns a scalar.

    Example:

    >>> import keras
    >>> import kmask
    >>> import numpy as np
    >>> def lm(width):
    ...     tokens = keras.Input((4,), dtype="int32")
    ...     hidden = keras.layers.Embedding(6, width, mask_zero=True)(tokens)
    ...     return keras.Model(tokens, keras.layers.Dense(6)(hidden))
    >>> distiller = keras.distillation.Distiller(
    ...     teacher=lm(8),
    ...     student=lm(4),
    ...     distillation_losses=kmask.MaskedLogitsDistillation(temperature=2.0),
    ...     student_loss_weight=0.0,
    ... )
    >>> distiller.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    >>> x = np.array([[1, 2, 0, 0], [3, 4, 5, 0]])
    >>> loss = distiller.evaluate(x, x, verbose=0)[0]
    >>> bool(loss > 0)
    True
    """

    def __init__(
        self,
        temperature: float = 3.0,
        divergence: str = "kl",
        beta: float = 0.5,
        reduction: str = "token_mean",
        scale_by_temperature_squared: bool = True,
        mask_value: Any = None,
    ) -> None:
        divergence_options(divergence, beta, temperature)
        reduction = standardize_reduction(reduction)
        if reduction == "none":
            raise ValueError(
                "Invalid value for argument `reduction`: a distillation loss "
                "returns a scalar. Expected a reduction other than 'none'. "
                "Received: reduction='none'"
            )
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.reduction = reduction
        self.scale_by_temperature_squared = scale_by_temperature_squared
        self.mask_value = mask_value
        self._batch: tuple[Any, Any] = (None, None)

    def compute_loss(
        self,
        teacher_outputs: Any,
        student_outputs: Any,
        y: Any = None,
        sample_weight: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        """`kmask.masked_distillation` of the two outputs (single tensors).

        Args:
            teacher_outputs: The teacher's logits.
            student_outputs: The student's logits; their propagated mask
                marks padding.
            y: Optional labels, read for `mask_value`; under
                `kmask.MaskedDistiller`, the batch's.
            sample_weight: Optional weights; under `kmask.MaskedDistiller`,
                the batch's.
            **kwargs: Ignored, as Keras's.
        """
        batch_y, batch_weight = self._batch
        y = batch_y if y is None else y
        sample_weight = batch_weight if sample_weight is None else sample_weight
        if isinstance(student_outputs, (list, tuple, dict)):
            raise ValueError(
                "MaskedLogitsDistillation takes one output: the student's "
                "logits. Received: student_outputs of type "
                f"{type(student_outputs).__name__}"
            )
        labels = y if self.mask_value is not None else None
        return masked_distillation(
            teacher_outputs,
            student_outputs,
            labels=labels,
            mask_value=self.mask_value if labels is not None else None,
            sample_weight=sample_weight,
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            reduction=self.reduction,
            scale_by_temperature_squared=self.scale_by_temperature_squared,
        )

    @contextlib.contextmanager
    def batch(self, y: Any, sample_weight: Any) -> Iterator[None]:
        """While active, `compute_loss` reads these labels and weights when
        it is called without them (as Keras's `Distiller` calls it)."""
        self._batch = (y, sample_weight)
        try:
            yield
        finally:
            self._batch = (None, None)

    def get_config(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "divergence": self.divergence,
            "beta": self.beta,
            "reduction": self.reduction,
            "scale_by_temperature_squared": self.scale_by_temperature_squared,
            "mask_value": plain(self.mask_value),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MaskedLogitsDistillation:
        return cls(**config)


@keras.saving.register_keras_serializable(package="kmask")
class MaskedDistiller(DISTILLER_BASE):
    """Keras's `Distiller`, whose distillation losses see the batch's labels
    and `sample_weight`.

    Keras's `Distiller.compute_loss` calls each distillation loss with the
    two models' outputs alone. This subclass takes the same arguments and
    hands the batch's `y` and `sample_weight` to every
    `kmask.MaskedLogitsDistillation` among them, so that a pad label
    (`mask_value`) and zero weights mark padding as well as the mask Keras
    propagated onto the student's output. The student's own loss is called
    as Keras calls it.

    Args:
        teacher: The trained teacher, frozen.
        student: The model trained.
        distillation_losses: One distillation loss or a list of them.
        distillation_loss_weights: Their weights (1 each by default).
        student_loss_weight: The weight of the student's own loss, in
            `[0, 1]`; the distillation losses share the rest.
        name: The model's name.
        **kwargs: Passed to `keras.Model`.

    Returns:
        A `keras.Model`: compile it with the student's loss, then `fit()`.

    Example:

    >>> import keras
    >>> import kmask
    >>> import numpy as np
    >>> def lm(width):
    ...     tokens = keras.Input((4,), dtype="int32")
    ...     hidden = keras.layers.Embedding(6, width)(tokens)
    ...     return keras.Model(tokens, keras.layers.Dense(6)(hidden))
    >>> distiller = kmask.MaskedDistiller(
    ...     teacher=lm(8),
    ...     student=lm(4),
    ...     distillation_losses=kmask.MaskedLogitsDistillation(mask_value=-100),
    ...     student_loss_weight=0.0,
    ... )
    >>> distiller.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    >>> x = np.array([[1, 2, 0, 0], [3, 4, 5, 0]])
    >>> y = np.where(x == 0, -100, x)
    >>> loss = distiller.evaluate(x, y, verbose=0)[0]
    >>> bool(loss > 0)
    True
    """

    def __init__(
        self,
        teacher: Any,
        student: Any,
        distillation_losses: Any,
        distillation_loss_weights: Any = None,
        student_loss_weight: float = 0.5,
        name: str = "distiller",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            teacher=teacher,
            student=student,
            distillation_losses=distillation_losses,
            distillation_loss_weights=distillation_loss_weights,
            student_loss_weight=student_loss_weight,
            name=name,
            **kwargs,
        )

    def compile(
        self,
        optimizer: Any = "adam",
        loss: Any = None,
        metrics: Any = None,
        **kwargs: Any,
    ) -> None:
        """Keras's `Distiller.compile`; the student's `loss` is kept for
        `get_compile_config`, so that a reloaded `.keras` file comes back
        compiled (Keras's own `Distiller` comes back uncompiled)."""
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._student_loss_config = keras.saving.serialize_keras_object(loss)

    def get_compile_config(self) -> dict[str, Any] | None:
        config = super().get_compile_config()
        if config is not None:
            config["loss"] = self._student_loss_config
        return config

    def compile_from_config(self, config: dict[str, Any]) -> None:
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Tensor:
        with contextlib.ExitStack() as stack:
            for loss in self.distillation_losses:
                if isinstance(loss, MaskedLogitsDistillation):
                    stack.enter_context(loss.batch(y, sample_weight))
            return super().compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
            )
