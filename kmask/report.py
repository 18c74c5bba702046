"""`mask_report(model, inputs=None)`: does the loss see the mask, and where is it lost?

The report runs the model once, eagerly, and reads the masks Keras really
attaches at run time: layer by layer in a functional or `Sequential` model
(and inside the models nested in it), only on the outputs of a subclassed
model. The masks Keras records on the symbolic graph when the model is
defined are not a safe guide: `MultiHeadAttention` removes the mask from its
inputs at run time, so a residual `Add` after it loses the mask that the
graph still shows.

Each output gets a verdict, comparing the mask on it with the padding the
inputs declare (any mask in the run that leaves out a step):

- "the loss sees the mask": Keras's loss leaves the padded steps out;
- "the loss sees NO mask": it averages over the padding;
- "the loss sees a mask that marks no padding": a mask is there, but all
  `True` (after a `Concatenate` with an unmasked branch), so the loss
  averages over the padding as well;
- unknown (`None`): the run declares no padding, so it cannot tell.

When the model was compiled with a kmask loss (or any loss whose config has
a `mask_value` or an `ignore_class`), that loss finds the padding in the
targets itself, and the verdict says so.

Without a batch, the report runs the model on a synthetic one built from the
input specs (two sequences of 1s, the second padded with 0s over its last
half; a rank-1 integer input is read as lengths). When that batch cannot be
run, or declares no padding the model understands, the verdict is `None` and
the text asks for a batch.

README's "Does the loss see the mask?" section has the table of what Keras's
own loss does on each model shape of the zoo (`tests/test_report_zoo.py`),
measured with `evaluate` on both Keras lines and all three backends.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from kmask._keras_compat import (
    KERAS_VERSION,
    functional_graphs,
    node_input_tensors,
    node_mask_argument,
    node_operation,
    producing_node,
)
from kmask._report_run import Call, Run, marks_padding, run_model, synthetic_batch

_NO_MASK = "-"
_DROP_MARK = "<- drops the mask"
_STRIP_MARK = "<- removes the mask from its inputs"
SEES = "the loss sees the mask"
SEES_NO_MASK = "the loss sees NO mask (it averages over padding)"
SEES_NO_PADDING = (
    "the loss sees a mask that marks no padding (it averages over padding)"
)
ASK_FOR_A_BATCH = "pass a batch with padding: mask_report(model, inputs)"


@dataclasses.dataclass(frozen=True)
class LayerMasks:
    """The masks around one call of one layer, as Keras attached them at run time.

    Attributes:
        name: The layer's name.
        class_name: The layer's class.
        mask_in: Shape of the mask reaching the layer, `None` when none does.
        mask_out: Shape of the mask on its output, `None` when there is none.
        depth: 0 for a layer of the model, 1 for a layer of a model nested in
            it, and so on.
        mask_in_marks_padding: Whether the mask reaching the layer leaves
            out a step (`False` for an all-`True` mask), `None` without one.
        mask_out_marks_padding: The same for the mask on its output.
        strips_input_mask: Whether the layer removed the mask from one of its
            inputs while it ran (as `MultiHeadAttention` does).
    """

    name: str
    class_name: str
    mask_in: tuple | None
    mask_out: tuple | None
    depth: int = 0
    mask_in_marks_padding: bool | None = None
    mask_out_marks_padding: bool | None = None
    strips_input_mask: bool = False

    @property
    def drops_mask(self) -> bool:
        """A mask goes in and none comes out."""
        return self.mask_in is not None and self.mask_out is None


@dataclasses.dataclass(frozen=True)
class OutputMasks:
    """The verdict for one output of the model.

    Attributes:
        name: The output's name, as in `model.output_names`.
        loss_sees_mask: `True` when the loss leaves the padded steps out,
            `False` when it averages over them, `None` when the report
            cannot tell (pass a batch).
        dropped_by: Names of the layers on the way to this output where a
            mask goes in and none comes out, in the order they ran.
        verdict: The verdict in words.
    """

    name: str
    loss_sees_mask: bool | None
    dropped_by: tuple[str, ...]
    verdict: str


@dataclasses.dataclass(frozen=True)
class MaskReport:
    """What `mask_report` found.

    Attributes:
        layers: One `LayerMasks` per layer call, in the order they ran;
            the layers of a nested model follow it, one level deeper.
        outputs: One `OutputMasks` per model output.
        ran_on: What the model ran on: "the given batch", "a synthetic
            batch", or why it did not run.
        keras_version: The Keras version the model ran under.
    """

    layers: tuple[LayerMasks, ...]
    outputs: tuple[OutputMasks, ...]
    ran_on: str = "the given batch"
    keras_version: str = KERAS_VERSION

    @property
    def loss_sees_mask(self) -> bool | None:
        """`True` when every output's loss sees a mask, `False` when one does
        not, `None` when the report cannot tell for some output."""
        verdicts = [output.loss_sees_mask for output in self.outputs]
        if False in verdicts:
            return False
        return None if None in verdicts else True

    @property
    def dropped_by(self) -> list[str]:
        """Names of the layers where a mask goes in and none comes out."""
        return [layer.name for layer in self.layers if layer.drops_mask]

    def __str__(self) -> str:
        lines = [f"mask report (Keras {self.keras_version}, ran on {self.ran_on})"]
        lines += [f"output {out.name}: {out.verdict}" for out in self.outputs]
        if not self.layers:
            return "\n".join(lines)
        rows = [("layer", "class", "mask in", "mask out")]
        rows += [
            (
                "  " * layer.depth + layer.name,
                layer.class_name,
                _describe(layer.mask_in, layer.mask_in_marks_padding),
                _describe(layer.mask_out, layer.mask_out_marks_padding),
            )
            for layer in self.layers
        ]
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        for index, row in enumerate(rows):
            cells = "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            )
            layer = self.layers[index - 1] if index else None
            if layer is not None and layer.drops_mask:
                cells += f"  {_DROP_MARK}"
            elif layer is not None and layer.strips_input_mask:
                cells += f"  {_STRIP_MARK}"
            lines.append(cells.rstrip())
        return "\n".join(lines)


def mask_report(model: keras.Model, inputs: Any = None) -> MaskReport:
    """Shows whether each output's loss sees the mask, and where it is lost.

    Args:
        model: A Keras model: functional, `Sequential` (the table shows each
            layer, and the layers of nested models indented under them) or
            subclassed (only the verdicts).
        inputs: Optional sample batch, in any structure the model accepts.
            The model runs on it once (`training=False`). Without it, the
            model runs on a synthetic batch built from its input specs; when
            there is none, the verdicts are `None`.

    Returns:
        A `MaskReport`, with `outputs` (one verdict per output), `loss_sees_mask`
        (`True` when every output sees a mask, `None` when unknown),
        `dropped_by`, and a `str()` with the verdicts and one line per layer.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from kmask.report import mask_report
    >>> model = keras.Sequential([
    ...     keras.Input((4, 2), name="steps"),
    ...     keras.layers.Masking(name="masking"),
    ...     keras.layers.LSTM(3, name="encoder"),
    ...     keras.layers.RepeatVector(4, name="repeat"),
    ... ])
    >>> batch = np.ones((2, 4, 2), "float32")
    >>> batch[1, 2:] = 0.0  # the second sequence is padded
    >>> report = mask_report(model, batch)
    >>> report.loss_sees_mask, report.dropped_by
    (False, ['encoder'])
    >>> print(report)  # doctest: +ELLIPSIS
    mask report (Keras ..., ran on the given batch)
    output repeat: the loss sees NO mask (it averages over padding); lost at: encoder
    layer    class         mask in  mask out
    steps    InputLayer    -        -
    masking  Masking       -        (2, 4)
    encoder  LSTM          (2, 4)   -         <- drops the mask
    repeat   RepeatVector  -        -
    """
    ran_on = "the given batch"
    inputs_given = inputs is not None
    if inputs is None:
        ran_on = "a synthetic batch (pass a batch for certainty)"
        try:
            inputs = synthetic_batch(model)
        except (AttributeError, ValueError, TypeError) as error:
            return _unknown(model, f"no batch: {_short(error)}")
    try:
        run = run_model(model, inputs)
    except Exception as error:
        if ran_on == "the given batch":
            raise
        return _unknown(model, f"a synthetic batch that failed: {_short(error)}")
    shown = _graph_operations(model)
    run.calls[:] = [call for call in run.calls if id(call.operation) in shown]
    layers = _input_rows(model, run) + [_layer_masks(call) for call in run.calls]
    return MaskReport(
        layers=tuple(layers),
        outputs=tuple(_verdicts(model, run, layers, synthetic=inputs_given is False)),
        ran_on=ran_on,
    )


def _graph_operations(model: keras.Model) -> set[int]:
    """The ids of the layers and ops in the graphs of `model` and of the
    models nested in it, leaving out the ops that only compute a `mask`
    argument (Keras replays a `Masking` layer's mask ops for the layer after
    it): those are part of the layer that made the mask."""
    return {
        id(node_operation(node))
        for graph in functional_graphs(model)
        for node in _calls_in_order(_symbolic_outputs(graph) or [])
    }


def _unknown(model: keras.Model, ran_on: str) -> MaskReport:
    names = _output_names(model, None)
    verdict = f"unknown: {ASK_FOR_A_BATCH}"
    outputs = tuple(OutputMasks(name, None, (), verdict) for name in names)
    return MaskReport(layers=(), outputs=outputs, ran_on=ran_on)


def _verdicts(
    model: keras.Model, run: Run, layers: list, synthetic: bool
) -> list[OutputMasks]:
    declares_padding = any(layer.mask_out_marks_padding for layer in layers) or any(
        _pads(mask) for mask in run.input_masks
    )
    names = _output_names(model, len(run.output_masks))
    losses = _compiled_losses(model, names)
    outputs = []
    for index, (name, mask) in enumerate(zip(names, run.output_masks, strict=True)):
        calls = _calls_on_path(model, index, run.calls)
        dropped = tuple(call.operation.name for call in calls if _drops(call, calls))
        stripped = [call.operation.name for call in calls if call.strips_input_mask]
        merged = [call.operation.name for call in calls if call.merges_masks]
        sees, verdict = _propagated_verdict(
            mask, declares_padding, merged if synthetic else []
        )
        if sees is not True and dropped:
            verdict += f"; lost at: {', '.join(dropped)}"
        if sees is not True and stripped:
            verdict += f" ({', '.join(stripped)} removed the mask from its inputs)"
        source = _loss_mask_source(losses[index])
        if source is not None and sees is not True:
            sees = True
            lost = f"lost at `{dropped[0]}`" if dropped else "not on this output"
            verdict = (
                f"{SEES}: the propagated mask is {lost}, but the compiled {source}"
            )
        outputs.append(OutputMasks(name, sees, dropped, verdict))
    return outputs


def _propagated_verdict(
    mask: Any, declares_padding: bool, merged: list[str]
) -> tuple[bool | None, str]:
    """Whether the mask Keras attached to an output leaves the padding out.

    `merged` names the layers on the way that made a mask from the masks of
    several inputs: on a synthetic batch, whose padding lines up across its
    inputs, such a mask says nothing about a real one.
    """
    if mask is None:
        return False, SEES_NO_MASK
    if merged:
        return None, (
            f"unknown: {', '.join(merged)} merges the masks of several inputs, "
            f"so it depends on how their padding lines up; {ASK_FOR_A_BATCH}"
        )
    if _pads(mask):
        return True, SEES
    if declares_padding:
        return False, SEES_NO_PADDING
    return None, f"unknown: the run marks no padding; {ASK_FOR_A_BATCH}"


def _input_rows(model: keras.Model, run: Run) -> list[LayerMasks]:
    """One row per model input, as the table showed `InputLayer`s before."""
    if not run.calls:
        return []
    rows = []
    for tensor, mask in zip(_symbolic_inputs(model), run.input_masks, strict=False):
        node = producing_node(tensor)
        name = node_operation(node).name if node is not None else tensor.name
        rows.append(
            LayerMasks(
                name,
                "InputLayer",
                None,
                _shape(mask),
                mask_out_marks_padding=_pads_or_none(mask),
            )
        )
    return rows


def _layer_masks(call: Call) -> LayerMasks:
    return LayerMasks(
        name=call.operation.name,
        class_name=type(call.operation).__name__,
        mask_in=_shape(call.mask_in),
        mask_out=_shape(call.mask_out),
        depth=call.depth,
        mask_in_marks_padding=_pads_or_none(call.mask_in),
        mask_out_marks_padding=_pads_or_none(call.mask_out),
        strips_input_mask=call.strips_input_mask,
    )


def _drops(call: Call, calls: list[Call]) -> bool:
    """A mask goes in and none comes out, and no layer inside it (for a
    nested model) is where that happened."""
    if call.mask_in is None or call.mask_out is not None:
        return False
    return not any(
        other.parent is call and other.mask_in is not None and other.mask_out is None
        for other in calls
    )


def _calls_on_path(model: keras.Model, index: int, calls: list[Call]) -> list[Call]:
    """The calls that feed output `index`: those of the layers on its path in
    the graph, with everything that ran inside them."""
    outputs = _symbolic_outputs(model)
    if outputs is None or len(outputs) <= index:
        return calls
    on_path = {id(node_operation(node)) for node in _calls_in_order([outputs[index]])}

    def top(call: Call) -> Call:
        while call.parent is not None:
            call = call.parent
        return call

    return [call for call in calls if id(top(call).operation) in on_path]


def _compiled_losses(model: keras.Model, names: list[str]) -> list:
    """The loss compiled for each output, `None` where there is none."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        return [loss.get(name) for name in names]
    if isinstance(loss, (list, tuple)):
        return [
            loss[index] if index < len(loss) else None for index in range(len(names))
        ]
    return [loss] * len(names)


def _loss_mask_source(loss: Any) -> str | None:
    """How a compiled loss finds the padding in the targets itself, read
    from its public config: "kmask loss finds the padding through
    mask_value=[0, 0, 1]", or `None`."""
    if not isinstance(loss, keras.losses.Loss):
        return None
    try:
        config = loss.get_config()
    except NotImplementedError:
        return None
    sources = [
        f"{key}={config[key]!r}"
        for key in ("mask_value", "ignore_class")
        if config.get(key) is not None
    ]
    if not sources:
        return None
    registered = keras.saving.get_registered_name(type(loss))
    kind = "kmask loss" if registered.startswith("kmask>") else "loss"
    return f"{kind} finds the padding through {' and '.join(sources)}"


def _output_names(model: keras.Model, count: int | None) -> list[str]:
    """`model.output_names`; for a `Sequential`, which has none, the names of
    the layers making its outputs."""
    names = getattr(model, "output_names", None)
    if not names:
        outputs = _symbolic_outputs(model) or []
        nodes = [producing_node(x) for x in outputs]
        names = [node_operation(n).name for n in nodes if n is not None]
    if count is None:
        count = len(names) or 1
    if len(names) != count:
        return ["output" if count == 1 else f"output_{i}" for i in range(count)]
    return list(names)


def _symbolic_inputs(model: keras.Model) -> list:
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):
        return []


def _symbolic_outputs(model: keras.Model) -> list | None:
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs or not all(isinstance(x, keras.KerasTensor) for x in outputs):
        return None
    return list(outputs)


def _calls_in_order(outputs: list) -> list:
    """The graph calls (layers, and ops such as `x * 2`) that produce
    `outputs`, each after the calls that feed it.

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


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in _flat(element)]
    return [value]


def _shape(mask: Any) -> tuple | None:
    return None if mask is None else tuple(mask.shape)


def _pads(mask: Any) -> bool:
    return mask is not None and marks_padding(mask)


def _pads_or_none(mask: Any) -> bool | None:
    return None if mask is None else marks_padding(mask)


def _describe(shape: tuple | None, marks_padding: bool | None = None) -> str:
    if shape is None:
        return _NO_MASK
    return f"{shape}" + (" all True" if marks_padding is False else "")


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
