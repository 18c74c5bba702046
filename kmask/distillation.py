"""Distillation over padded sequences: `masked_distillation`, and the way in
through Keras's own `keras.distillation.Distiller`.

The divergence between the teacher's and the student's logits is taken at
the real steps only, found as every kmask loss finds them (through the one
masking pipeline): the mask Keras propagated onto the student's logits, an
explicit `mask`, a pad label in `labels`
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

from kmask import _pipeline, _shapes
from kmask._chunking import check_chunk_size, resolve_chunk_size
from kmask._keras_compat import DISTILLATION_LOSS_BASE, DISTILLER_BASE
from kmask._resolve import plain
from kmask.ops.divergence import divergence_options, row_divergence
from kmask.ops.linear_divergence import Chunking, linear_divergence
from kmask.reduce import reduce_steps, standardize_reduction
from kmask.typing import Tensor

__all__ = [
    "MaskedDistiller",
    "MaskedLogitsDistillation",
    "fused_linear_distillation",
    "masked_distillation",
]


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
    steps = _pipeline.distillation_values(
        teacher_logits,
        student_logits,
        lambda teacher, student: row_divergence(teacher, student, options),
        labels=labels,
        mask_value=mask_value,
        mask=mask,
        sample_weight=sample_weight,
    )
    per_step = steps.values
    if scale_by_temperature_squared:
        per_step = ops.multiply(per_step, options.temperature**2)
    return reduce_steps(per_step, steps.masked, reduction, steps.sample_weight)


def fused_linear_distillation(
    student_hidden: Any,
    student_kernel: Any,
    teacher_hidden: Any,
    teacher_kernel: Any,
    mask: Any = None,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    labels: Any = None,
    mask_value: Any = None,
    sample_weight: Any = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    reduction: str | None = "token_mean",
    scale_by_temperature_squared: bool = True,
    chunk_size: int | str = "auto",
    transpose_kernel: bool = False,
    softcap: float | None = None,
) -> Tensor:
    """`masked_distillation` of two linear heads' logits, in chunks.

    Equals `masked_distillation(teacher_hidden @ teacher_kernel +
    teacher_bias, student_hidden @ student_kernel + student_bias, ...)`
    without ever holding either `[tokens, vocabulary]` logits array: tokens
    are processed `chunk_size` at a time, forward and backward (the backward
    pass recomputes both chunks' logits), so memory holds one `[chunk_size,
    vocabulary]` block of each. Padded tokens are left out of the chunks
    and cost no matmul. The teacher gets no gradient. Computed in float32.

    Args:
        student_hidden: `[batch, ..., student_width]`; a mask Keras
            propagated onto it marks padding.
        student_kernel: `[student_width, vocabulary]`, or `[vocabulary,
            student_width]` with `transpose_kernel`.
        teacher_hidden: `[batch, ..., teacher_width]`, the same steps.
        teacher_kernel: `[teacher_width, vocabulary]` (or transposed).
        mask: Optional boolean mask, `True` on real steps: `[batch]` or the
            steps' shape.
        student_bias: Optional `[vocabulary]` bias of the student.
        teacher_bias: Optional `[vocabulary]` bias of the teacher.
        labels: Optional integer labels of the steps' shape, read for their
            pad label `mask_value` (and checked against the vocabulary).
        mask_value: The pad label of `labels`, e.g. `-100`.
        sample_weight: Optional weights, `[batch]` or the steps' shape.
        temperature: As for `masked_distillation`.
        divergence: As for `masked_distillation`.
        beta: As for `masked_distillation`.
        reduction: As for `masked_distillation`.
        scale_by_temperature_squared: As for `masked_distillation`.
        chunk_size: Tokens per chunk, or `"auto"` (the default): the head's
            rule (`kmask.FusedLinearCrossentropy`) with both models' hidden
            sizes, so that a chunk's two rows of logits, their gradient and
            the hidden rows fit its byte budget.
        transpose_kernel: Whether both kernels are `[vocabulary, width]`
            (tied embedding matrices), used as stored.
        softcap: Optional positive `c`: both models' logits are
            `c * tanh(logits / c)` (before the temperature), as the head's.

    Returns:
        A float32 scalar, or per-step values with `reduction="none"`.

    Example:

    >>> import kmask
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> student, student_kernel = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5))
    >>> teacher, teacher_kernel = rng.normal(size=(2, 3, 8)), rng.normal(size=(8, 5))
    >>> mask = [[True, True, False], [True, False, False]]
    >>> fused = kmask.fused_linear_distillation(
    ...     student, student_kernel, teacher, teacher_kernel, mask, chunk_size=2
    ... )
    >>> whole = kmask.masked_distillation(
    ...     teacher @ teacher_kernel, student @ student_kernel, mask
    ... )
    >>> bool(abs(float(fused) - float(whole)) < 1e-5)
    True
    """
    options = divergence_options(divergence, beta, temperature)
    reduction = standardize_reduction(reduction)
    chunking = _chunking(chunk_size, softcap, transpose_kernel)
    if labels is None and mask_value is not None:
        raise ValueError(
            "Argument `mask_value` marks padding in `labels`, which were not "
            f"given. Received: mask_value={mask_value!r}, labels=None"
        )
    student = _as_tensors(student_hidden, student_kernel, student_bias)
    teacher = _as_tensors(teacher_hidden, teacher_kernel, teacher_bias)
    per_step_arguments = {
        name: None if tensor is None else ops.convert_to_tensor(tensor)
        for name, tensor in (
            ("labels", labels), ("mask", mask), ("sample_weight", sample_weight)
        )
    }  # fmt: skip
    _shapes.check_linear_distillation(
        student, teacher, chunking.transpose_kernel, **per_step_arguments
    )
    vocabulary = student[1].shape[0 if chunking.transpose_kernel else 1]
    hidden_sizes = student[0].shape[-1] + teacher[0].shape[-1]
    chunking = chunking._replace(
        chunk_size=resolve_chunk_size(chunking.chunk_size, hidden_sizes, vocabulary)
    )
    # The mask Keras propagated is read from the caller's own tensor.
    steps = _pipeline.prepare_hidden(
        student_hidden if hasattr(student_hidden, "shape") else student[0],
        classes=vocabulary,
        labels=per_step_arguments["labels"],
        mask_value=mask_value,
        mask=per_step_arguments["mask"],
        sample_weight=per_step_arguments["sample_weight"],
    )
    steps_shape = ops.shape(student[0])[:-1]
    valid = steps.valid
    if valid is None:
        valid = ops.ones(steps_shape, "bool")
    flat_valid = ops.reshape(_shapes.broadcast_to_steps(valid, steps_shape), (-1,))

    def flat(hidden):
        return ops.reshape(ops.cast(hidden, "float32"), (-1, hidden.shape[-1]))

    def as_float(part):
        return None if part is None else ops.cast(part, "float32")

    per_step = linear_divergence(
        (flat(student[0]), as_float(student[1]), as_float(student[2])),
        (flat(teacher[0]), as_float(teacher[1]), as_float(teacher[2])),
        flat_valid,
        options,
        chunking,
    )
    per_step = ops.reshape(per_step, steps_shape)
    if scale_by_temperature_squared:
        per_step = ops.multiply(per_step, options.temperature**2)
    value = reduce_steps(per_step, steps.masked, reduction, steps.sample_weight)
    if reduction == "none":
        return _pipeline.poison(value, steps.out_of_range)
    return ops.where(ops.any(steps.out_of_range), float("nan"), value)


def _as_tensors(hidden: Any, kernel: Any, bias: Any) -> tuple[Any, Any, Any]:
    """`(hidden, kernel, bias)` as tensors (`bias` may be `None`)."""
    return (
        ops.convert_to_tensor(hidden),
        ops.convert_to_tensor(kernel),
        None if bias is None else ops.convert_to_tensor(bias),
    )


def _chunking(chunk_size: Any, softcap: Any, transpose_kernel: bool) -> Chunking:
    """The checked `Chunking` (`chunk_size` may still be `"auto"`)."""
    check_chunk_size(chunk_size)
    cap = _shapes.positive_number("softcap", softcap, none=True)
    return Chunking(chunk_size, cap, bool(transpose_kernel))


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
