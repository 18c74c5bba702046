"""`mask_report(model)`: where in a model the Keras mask is lost.

The report reads the graph Keras built when the model was defined: every
layer call there ran `compute_mask` on symbolic tensors (`KerasTensor`s), and
each symbolic output carries the mask it would carry at run time. So the
report needs no data, runs no backend computation, and reads the same on
TensorFlow, JAX and PyTorch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from kmask._keras_compat import (
    node_input_tensors,
    node_mask_argument,
    node_operation,
    node_outputs,
    producing_node,
)
from kmask.masks import keras_mask

_NO_MASK = "-"
_DROP_MARK = "<- drops the mask"


@dataclasses.dataclass(frozen=True)
class LayerMasks:
    """The masks around one call of one layer.

    Attributes:
        name: The layer's name.
        class_name: The layer's class.
        mask_in: Shape of the mask reaching the layer, `None` when none does.
        mask_out: Shape of the mask on its output, `None` when there is none.
    """

    name: str
    class_name: str
    mask_in: tuple | None
    mask_out: tuple | None

    @property
    def drops_mask(self) -> bool:
        """A mask goes in and none comes out."""
        return self.mask_in is not None and self.mask_out is None


@dataclasses.dataclass(frozen=True)
class MaskReport:
    """What `mask_report` found.

    Attributes:
        layers: One `LayerMasks` per layer call, inputs first.
        loss_sees_mask: Whether every output of the model carries a mask, so
            a Keras loss (and a kmask loss reading the propagated mask)
            leaves the padded steps out.
        dropped_by: Names of the layers where a mask goes in and none comes
            out, in graph order.
    """

    layers: tuple[LayerMasks, ...]
    loss_sees_mask: bool

    @property
    def dropped_by(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.drops_mask]

    def __str__(self) -> str:
        if self.loss_sees_mask:
            verdict = "the loss sees the mask"
        else:
            verdict = "the loss sees NO mask (it averages over padding)"
        if self.dropped_by:
            verdict += f"; dropped by: {', '.join(self.dropped_by)}"
        rows = [("layer", "class", "mask in", "mask out")]
        rows += [
            (
                layer.name,
                layer.class_name,
                _describe(layer.mask_in),
                _describe(layer.mask_out),
            )
            for layer in self.layers
        ]
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        lines = [f"mask report: {verdict}"]
        for index, row in enumerate(rows):
            cells = "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            )
            if index and self.layers[index - 1].drops_mask:
                cells += f"  {_DROP_MARK}"
            lines.append(cells.rstrip())
        return "\n".join(lines)


def mask_report(model: keras.Model) -> MaskReport:
    """Shows where in a model the Keras mask is created, kept and lost.

    Args:
        model: A functional or `Sequential` model with known inputs (built
            from `keras.Input`, or called or built once).

    Returns:
        A `MaskReport`: `loss_sees_mask`, `dropped_by` (the names of the
        layers where a mask goes in and none comes out), and a `str()` with
        one line per layer: name, class, mask in, mask out.

    Example:

    >>> import keras
    >>> from kmask.report import mask_report
    >>> model = keras.Sequential([
    ...     keras.Input((4, 2), name="steps"),
    ...     keras.layers.Masking(name="masking"),
    ...     keras.layers.LSTM(3, name="encoder"),
    ...     keras.layers.RepeatVector(4, name="repeat"),
    ... ])
    >>> report = mask_report(model)
    >>> report.loss_sees_mask, report.dropped_by
    (False, ['encoder'])
    >>> print(report)
    mask report: the loss sees NO mask (it averages over padding); dropped by: encoder
    layer    class         mask in    mask out
    steps    InputLayer    -          -
    masking  Masking       -          (None, 4)
    encoder  LSTM          (None, 4)  -          <- drops the mask
    repeat   RepeatVector  -          -
    """
    outputs = _symbolic_outputs(model)
    layers = tuple(_layer_masks(node) for node in _calls_in_order(outputs))
    loss_sees_mask = all(keras_mask(output) is not None for output in outputs)
    return MaskReport(layers=layers, loss_sees_mask=loss_sees_mask)


def _symbolic_outputs(model: Any) -> list:
    """The model's output `KerasTensor`s, or a `ValueError` naming why not."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if not outputs or not all(isinstance(x, keras.KerasTensor) for x in outputs):
        raise ValueError(
            "Argument `model` must be a functional or Sequential keras.Model "
            "whose inputs are known (built from keras.Input, or built once). "
            f"Received: model={model!r} ({type(model).__name__})"
        )
    return list(outputs)


def _calls_in_order(outputs: list) -> list:
    """The calls (layers, and ops such as `x * 1`) that produce `outputs`,
    each after the calls that feed it.

    Keras records each call as a `Node` (an internal, read through
    `kmask._keras_compat`). The walk is iterative, so deep models do not hit
    the recursion limit.
    """
    ordered, visited = [], set()
    stack = [(node, False) for node in map(producing_node, reversed(outputs))]
    while stack:
        node, inputs_done = stack.pop()
        if node is None:
            continue
        if inputs_done:
            ordered.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        stack.extend((parent, False) for parent in reversed(_input_calls(node)))
    return ordered


def _input_calls(node) -> list:
    """The calls producing `node`'s inputs, leaving out those that only
    compute a `mask` argument (the ops inside a `compute_mask`)."""
    mask_arguments = {id(mask) for mask in _flat(node_mask_argument(node))}
    return [
        producing_node(tensor)
        for tensor in node_input_tensors(node)
        if id(tensor) not in mask_arguments
    ]


def _layer_masks(node) -> LayerMasks:
    layer = node_operation(node)
    incoming = [m for m in _flat(node_mask_argument(node)) if m is not None]
    incoming += [keras_mask(x) for x in node_input_tensors(node)]
    outgoing = [keras_mask(x) for x in node_outputs(node)]
    return LayerMasks(
        name=layer.name,
        class_name=type(layer).__name__,
        mask_in=_first_shape(incoming),
        mask_out=_first_shape(outgoing),
    )


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in _flat(element)]
    return [value]


def _first_shape(masks: list) -> tuple | None:
    return next((tuple(mask.shape) for mask in masks if mask is not None), None)


def _describe(shape: tuple | None) -> str:
    return _NO_MASK if shape is None else str(shape)
