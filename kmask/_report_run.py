"""Runs a model once and records the masks Keras attaches at run time.

The private half of `kmask.report`: `run_model` calls the model eagerly on a
batch while `kmask._keras_compat.intercept_graph_calls` watches every layer
call of its functional graph (and of the models nested in it), reading the
mask each call receives before it runs and the mask on its outputs after.
`synthetic_batch` builds the batch `mask_report` uses when it is given none.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import keras
import numpy as np
from keras import ops

from kmask._keras_compat import get_keras_mask, intercept_graph_calls

# The synthetic batch: two sequences, the second padded over its last half.
SYNTHETIC_BATCH_SIZE = 2
SYNTHETIC_STEPS = 6


@dataclasses.dataclass
class Call:
    """One layer or op call seen at run time.

    Attributes:
        operation: The layer or op.
        depth: 0 in the model itself, 1 inside a model nested in it, ...
        parent: The call of the nested model this call ran in, or `None`.
        mask_in: The mask the call received, before it ran.
        strips_input_mask: Whether an input lost its mask during the call
            (`MultiHeadAttention` removes the masks from its inputs).
        mask_out: The mask on its outputs after it ran (the first one found).
        merges_masks: Whether two or more different input tensors carried a
            mask and the output mask is none of them, but made from them: it
            then depends on how their padding lines up (`Add` keeps a step
            that any of its inputs keeps).
    """

    operation: Any
    depth: int
    parent: Call | None
    mask_in: Any = None
    strips_input_mask: bool = False
    mask_out: Any = None
    merges_masks: bool = False


@dataclasses.dataclass
class Run:
    """What one eager call of the model showed.

    Attributes:
        input_masks: The mask on each (flattened) input, `None` for most.
        calls: Every layer call, in the order it ran; empty when the model
            has no functional graph (subclassed) or Keras hid it.
        output_masks: The mask on each (flattened) output.
    """

    input_masks: list
    calls: list[Call]
    output_masks: list


def run_model(model: keras.Model, inputs: Any) -> Run:
    """Calls `model(inputs, training=False)` once, recording each call's masks."""
    calls: list[Call] = []
    open_calls: list[Call] = []

    def wrap(operation, call):
        def recorded(*args, **kwargs):
            parent = open_calls[-1] if open_calls else None
            record = Call(operation, len(open_calls), parent)
            calls.append(record)
            tensors = _tensors((args, {k: v for k, v in kwargs.items() if k != "mask"}))
            masks_before = [get_keras_mask(x) for x in tensors]
            masked_ids = {
                id(x)
                for x, m in zip(tensors, masks_before, strict=True)
                if m is not None
            }
            explicit = [m for m in _flat(kwargs.get("mask")) if m is not None]
            record.mask_in = _first(explicit + masks_before)
            open_calls.append(record)
            try:
                outputs = call(*args, **kwargs)
            finally:
                open_calls.pop()
            record.strips_input_mask = any(
                before is not None and get_keras_mask(x) is None
                for before, x in zip(masks_before, tensors, strict=True)
            )
            record.mask_out = _first([get_keras_mask(x) for x in _tensors(outputs)])
            record.merges_masks = len(masked_ids) > 1 and not any(
                record.mask_out is before for before in masks_before + explicit
            )
            return outputs

        return recorded

    with warnings.catch_warnings():
        # Keras warns when a layer destroys a mask; the report says so itself.
        warnings.simplefilter("ignore", UserWarning)
        with intercept_graph_calls(model, wrap):
            outputs = model(inputs, training=False)
    return Run(
        input_masks=[get_keras_mask(x) for x in keras.tree.flatten(inputs)],
        calls=calls,
        output_masks=[get_keras_mask(x) for x in keras.tree.flatten(outputs)],
    )


def synthetic_batch(model: keras.Model) -> Any:
    """A batch for `model`'s declared inputs, in their structure.

    Two sequences: every input of rank 2 or more is 1 (or `True`) on real
    steps and 0 on padded ones, along axis 1; the first sequence is all real,
    the second is padded over the last half of its steps. A rank-1 integer
    input is read as sequence lengths (the real steps of each sequence), a
    rank-1 float input is 1. Unknown sizes are `SYNTHETIC_STEPS` steps.
    """
    structure = _input_structure(model)
    specs = keras.tree.flatten(structure)
    steps = next(
        (x.shape[1] for x in specs if len(x.shape) > 1 and x.shape[1] is not None),
        SYNTHETIC_STEPS,
    )
    return keras.tree.pack_sequence_as(
        structure, [_synthetic_input(x, steps) for x in specs]
    )


def _input_structure(model: keras.Model) -> Any:
    """The model's symbolic inputs, in the structure it is called with: a
    functional model's `input`; a `Sequential`'s one input (its `input` is
    only set once it has been called on symbolic tensors)."""
    try:
        return model.input
    except AttributeError:
        inputs = model.inputs
    if not inputs:
        raise ValueError(
            f"Model {model.name!r} declares no inputs: build it from keras.Input"
        )
    return inputs[0] if len(inputs) == 1 else inputs


def _synthetic_input(spec: Any, steps: int) -> Any:
    shape = [SYNTHETIC_STEPS if size is None else size for size in spec.shape]
    shape[0] = spec.shape[0] or SYNTHETIC_BATCH_SIZE
    is_integer = "int" in str(spec.dtype)
    if len(shape) == 1:
        values = np.full(shape, steps - steps // 2 if is_integer else 1)
        values[0] = steps if is_integer else 1
    else:
        values = np.ones(shape)
        values[1:, shape[1] - shape[1] // 2 :] = 0
    return ops.convert_to_tensor(values.astype(spec.dtype))


def marks_padding(mask: Any) -> bool:
    """Whether a mask leaves out at least one step."""
    return not bool(np.all(ops.convert_to_numpy(mask)))


def _tensors(structure: Any) -> list:
    return [x for x in keras.tree.flatten(structure) if hasattr(x, "shape")]


def _flat(value: Any) -> list:
    return keras.tree.flatten(value) if value is not None else []


def _first(masks: list) -> Any:
    return next((mask for mask in masks if mask is not None), None)
