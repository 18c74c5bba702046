"""Every Keras internal kmask touches, each with a fallback.

Keras keeps these out of its public API, and moves them between releases
(keras-nightly 3.16 moved `get_keras_mask` out of `keras.src.backend`). Each
one is looked up here and nowhere else, by a list of known homes tried in
order, with a fallback that keeps kmask working (maybe with less detail) when
none of them is left. `tests/test_keras_compat.py` fails loudly, naming the
symbol and the Keras version, when an upgrade moves one, so the fallback is
never taken silently in CI.

Internals used:

- `get_keras_mask(x)`: the mask Keras propagated onto a tensor. On JAX it is
  not an attribute of the array (Keras keeps it in a table keyed by the
  array), so only Keras's own accessor finds it there.
- The functional graph, read by `kmask.report`: a symbolic tensor's
  `_keras_history` (the operation that produced it and which of its calls),
  the operation's `_inbound_nodes` (one `Node` per call), and a node's
  `operation`, `arguments` (`keras_tensors`, `kwargs`) and `outputs`.
- `Function._run_through_graph(inputs, operation_fn, call_fn)`: how a
  functional model runs its graph, one `operation_fn(operation)(*args,
  **kwargs)` per node. `kmask.report` wraps it on the model instance (never
  the class) for one call, to read the masks each layer really receives and
  attaches at run time.

And one TensorFlow internal: `tensorflow.python.eager.record.
could_possibly_record()`, whether a `GradientTape` is recording in eager
mode (TensorFlow has no public way to ask), read by
`kmask.ops._dispatch.may_differentiate`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import keras

KERAS_VERSION = keras.__version__


class DistillerMissing(keras.Model):
    """Stands for `keras.distillation.Distiller` on a Keras without it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "kmask.MaskedDistiller needs keras.distillation (Keras 3.12 or "
            f"newer). Received: Keras {KERAS_VERSION}"
        )


# `keras.distillation` (public since Keras 3.12): the bases of
# `kmask.MaskedLogitsDistillation` and `kmask.MaskedDistiller`, or stand-ins
# on an older Keras (the loss still works as a plain object).
_DISTILLATION = getattr(keras, "distillation", None)
DISTILLATION_LOSS_BASE: type = getattr(_DISTILLATION, "DistillationLoss", object)
DISTILLER_BASE: type = getattr(_DISTILLATION, "Distiller", DistillerMissing)

# Where `get_keras_mask` has lived, newest first.
GET_KERAS_MASK_HOMES = (
    "keras.src.backend.common.masking",
    "keras.src.backend",
)


def _find(name: str, homes: tuple[str, ...]) -> tuple[Callable | None, str | None]:
    """`name` from the first of `homes` that has it, and that home."""
    for home in homes:
        try:
            found = getattr(importlib.import_module(home), name)
        except (ImportError, AttributeError):
            continue
        return found, home
    return None, None


_get_keras_mask, GET_KERAS_MASK_HOME = _find("get_keras_mask", GET_KERAS_MASK_HOMES)


def get_keras_mask(x: Any) -> Any:
    """The mask Keras propagated onto `x`, or `None`.

    Falls back to the `_keras_mask` attribute, which is where TensorFlow and
    PyTorch tensors (and `KerasTensor`s) carry it, when Keras's accessor has
    moved out of every known home.
    """
    if _get_keras_mask is not None:
        return _get_keras_mask(x)
    return getattr(x, "_keras_mask", None)


# Where TensorFlow's "is a tape recording?" has lived, newest first.
TAPE_HOMES = ("tensorflow.python.eager.record",)


def find_tape_check() -> tuple[Callable | None, str | None]:
    """TensorFlow's `could_possibly_record` and its home, or `(None, None)`
    when it moved out of every known home. Looked up when asked (importing
    it imports TensorFlow)."""
    return _find("could_possibly_record", TAPE_HOMES)


def tape_recording() -> bool:
    """Whether a TensorFlow `GradientTape` may record the next op (eager
    mode); `True` when TensorFlow moved its accessor out of every known home,
    so that no gradient is ever left out, only time lost."""
    could_record, _ = find_tape_check()
    return True if could_record is None else bool(could_record())


def producing_node(tensor: Any) -> Any:
    """The `Node` (one call of a layer or op) that produced a symbolic
    tensor, or `None` for a model input or a tensor with no history."""
    history = getattr(tensor, "_keras_history", None)
    operation = getattr(history, "operation", None)
    if operation is None:
        return None
    nodes = getattr(operation, "_inbound_nodes", None)
    index = getattr(history, "node_index", 0)
    if not nodes or index >= len(nodes):
        return None
    return nodes[index]


def node_operation(node: Any) -> Any:
    """The layer or op a `Node` called."""
    return node.operation


def node_input_tensors(node: Any) -> list:
    """The symbolic tensors a `Node` was called with, in order."""
    arguments = getattr(node, "arguments", None)
    return list(getattr(arguments, "keras_tensors", None) or [])


def node_mask_argument(node: Any) -> Any:
    """The explicit `mask=` a `Node` was called with, or `None`."""
    arguments = getattr(node, "arguments", None)
    kwargs = getattr(arguments, "kwargs", None) or {}
    return kwargs.get("mask")


def node_outputs(node: Any) -> list:
    """The symbolic tensors a `Node` produced."""
    return list(getattr(node, "outputs", None) or [])


def upstream_layer(tensor: Any, name: str) -> Any:
    """The layer named `name` among those that produced the symbolic
    `tensor`, directly or through earlier layers, or inside a model that
    did (keras-hub's backbones hold their embedding), or `None`."""
    seen: set[int] = set()
    pending = [tensor]
    while pending:
        node = producing_node(pending.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        operation = node_operation(node)
        if getattr(operation, "name", None) == name:
            return operation
        nested = _nested_layer(operation, name)
        if nested is not None:
            return nested
        pending.extend(node_input_tensors(node))
    return None


def _nested_layer(operation: Any, name: str) -> Any:
    """The layer named `name` anywhere inside `operation`, or `None`.
    Keras's `_flatten_layers` finds layers held in attributes too; without
    it, the public `layers` of nested models are searched."""
    flatten = getattr(operation, "_flatten_layers", None)
    if flatten is not None:
        layers = flatten(include_self=False)
    else:
        layers, pending = [], list(getattr(operation, "layers", []))
        while pending:
            layer = pending.pop()
            layers.append(layer)
            pending.extend(getattr(layer, "layers", []))
    return next((layer for layer in layers if layer.name == name), None)


# The method a functional model (and the functional model inside a
# `Sequential`) runs its graph with, one call per node.
RUN_THROUGH_GRAPH = "_run_through_graph"


def functional_graphs(model: Any) -> list:
    """`model` and every model nested in it that runs a functional graph
    (a `Sequential` runs the one it keeps in `_functional`)."""
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        for candidate in (layer, getattr(layer, "_functional", None)):
            if candidate is not None and hasattr(candidate, RUN_THROUGH_GRAPH):
                found.append(candidate)
        if isinstance(layer, keras.Model):
            stack.extend(reversed(layer.layers))
    return found


@contextlib.contextmanager
def intercept_graph_calls(
    model: Any, wrap: Callable[[Any, Callable], Callable]
) -> Iterator[bool]:
    """While active, each layer or op call in the graph of `model`, and of
    the models nested in it, runs `wrap(operation, call)(*args, **kwargs)`
    instead of `call(*args, **kwargs)`.

    Yields whether there was a graph to intercept: when Keras no longer runs
    its graphs through `_run_through_graph`, nothing is intercepted and the
    caller sees only the model's outputs.
    """
    patched = []
    try:
        for graph in functional_graphs(model):
            patched.append(graph)
            setattr(graph, RUN_THROUGH_GRAPH, _intercepted(graph, wrap))
    except (AttributeError, TypeError):
        _restore(patched)
        patched = []
    try:
        yield bool(patched)
    finally:
        _restore(patched)


def _intercepted(graph: Any, wrap: Callable) -> Callable:
    original = getattr(graph, RUN_THROUGH_GRAPH)

    def run(inputs, operation_fn=lambda op: op, call_fn=None):
        return original(
            inputs,
            operation_fn=lambda op: wrap(op, operation_fn(op)),
            call_fn=call_fn,
        )

    return run


def _restore(patched: list) -> None:
    for graph in patched:
        if RUN_THROUGH_GRAPH in vars(graph):
            delattr(graph, RUN_THROUGH_GRAPH)
