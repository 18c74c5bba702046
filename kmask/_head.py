"""The head's one path, shared by `kmask.fused_linear_crossentropy` and
`kmask.FusedLinearCrossentropy`: its options checked once, then the
pipeline's real steps, the chunked op (`kmask.ops.linear`) and the reduction
(`kmask.reduce`).
"""

from __future__ import annotations

from typing import Any

from keras import ops

from kmask import _pipeline, _shapes
from kmask._chunking import check_chunk_size, resolve_chunk_size
from kmask.ops._dispatch import may_differentiate
from kmask.ops.linear import (
    LINEAR_STATS,
    LinearOptions,
    held_rows,
    linear_crossentropy,
)
from kmask.reduce import is_linear, reduce_steps, value_gradient


def head(
    hidden,
    kernel,
    labels,
    bias,
    options,
    mask=None,
    sample_weight=None,
    return_stats=False,
    class_weight=None,
):
    """`(per_step, value, stats)` of the head: the pipeline's real steps
    (pad label, mask, zero weights, class weights), then the chunked op,
    reduced by `kmask.reduce`; `stats` is `None` unless asked for, else a
    dict of per-step values by name: the op's `LINEAR_STATS` and the step's
    `weight` (0 on padding), all NaN at a real step whose label is out of
    range."""
    mask_value, reduction, op_options = options
    labels = ops.convert_to_tensor(labels)
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
    _shapes.check_linear(
        hidden, kernel, labels, bias, op_options.transpose_kernel,
        mask=mask, sample_weight=sample_weight,
    )  # fmt: skip
    vocabulary = kernel.shape[0 if op_options.transpose_kernel else 1]
    hidden_size = kernel.shape[1 if op_options.transpose_kernel else 0]
    chunk_size = resolve_chunk_size(
        op_options.chunk_size,
        hidden_size,
        vocabulary,
        held_rows(hidden_size, vocabulary, return_stats),
    )
    op_options = op_options._replace(chunk_size=chunk_size)
    steps = _pipeline.prepare_labels(
        labels,
        classes=vocabulary,
        target_mask=None if mask_value is None else _pipeline.label_padding(mask_value),
        mask=mask,
        sample_weight=sample_weight,
        class_weight=class_weight,
    )
    labels, valid, masked = steps.y_true, steps.valid, steps.masked
    sample_weight, out_of_range = steps.sample_weight, steps.out_of_range

    gradient = None
    if is_linear(reduction) and may_differentiate(hidden, kernel, bias):
        # The value's gradient, computed in the op's forward pass. The masks
        # without the zero weights: `sum_over_batch_size` counts zero
        # weights, as Keras does. Not when nothing is differentiated (an
        # eager evaluation): the op then computes no gradient at all.
        gradient = value_gradient(
            tuple(ops.shape(labels)), masked, reduction, sample_weight
        )
    per_step, value, stats = linear_crossentropy(
        hidden, kernel, labels, bias, valid, gradient, op_options, return_stats
    )
    if value is None:
        value = reduce_steps(per_step, masked, reduction, sample_weight)
    if reduction == "none":
        value = _pipeline.poison(value, out_of_range)
    else:
        value = ops.where(ops.any(out_of_range), float("nan"), value)
    named = None
    if stats is not None:
        weight = _shapes.step_weights(tuple(ops.shape(labels)), valid, sample_weight)
        by_name = dict(zip(LINEAR_STATS, stats, strict=True), weight=weight)
        named = {
            name: _pipeline.poison(stat, out_of_range) for name, stat in by_name.items()
        }
    return _pipeline.poison(per_step, out_of_range), value, named


def linear_options(
    chunk_size: Any,
    label_smoothing: float,
    z_loss: float,
    softcap: Any,
    transpose_kernel: bool,
    temperature: Any = 1.0,
) -> LinearOptions:
    """The checked `LinearOptions` of the head."""
    check_chunk_size(chunk_size)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            "Invalid value for argument `label_smoothing`. Expected a value in "
            f"[0, 1]. Received: label_smoothing={label_smoothing}"
        )
    _shapes.positive_number("temperature", temperature)
    return LinearOptions(
        chunk_size,
        float(label_smoothing),
        float(z_loss),
        _shapes.positive_number("softcap", softcap, none=True),
        bool(transpose_kernel),
        float(temperature),
    )
