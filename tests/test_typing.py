"""Every public function and method of kmask carries parameter and return
annotations (mypy, run by `nox -s lint`, checks that they are consistent)."""

from __future__ import annotations

import inspect
import types
import typing

import numpy as np
import pytest
from keras import ops

import kmask

PUBLIC_MODULES = (
    kmask.distribute,
    kmask.fused,
    kmask.layers,
    kmask.losses,
    kmask.masks,
    kmask.metrics,
    kmask.reduce,
    kmask.report,
    kmask.seq2seq,
    kmask.ctc,
    kmask.packing,
)


def _public_callables():
    """`(qualified name, function)` for every public function of the public
    modules and every public method (and `__init__`, `__call__`) of their
    public classes, defined in kmask itself."""
    seen = {}
    objects = [getattr(kmask, name) for name in kmask.__all__]
    for module in PUBLIC_MODULES:
        objects += [getattr(module, name) for name in dir(module)]
    for obj in objects:
        if not getattr(obj, "__module__", "").startswith("kmask"):
            continue
        if getattr(obj, "__name__", "_").startswith("_"):
            continue
        if isinstance(obj, types.FunctionType):
            seen[f"{obj.__module__}.{obj.__qualname__}"] = obj
        elif isinstance(obj, type):
            for name, member in vars(obj).items():
                if name.startswith("_") and name not in ("__init__", "__call__"):
                    continue
                function = getattr(member, "__func__", member)
                # Not `typing.Protocol`'s own `__init__`, which a protocol
                # class holds in its namespace.
                if isinstance(function, types.FunctionType) and (
                    function.__module__.startswith("kmask")
                ):
                    seen[f"{obj.__module__}.{function.__qualname__}"] = function
    return sorted(seen.items())


PUBLIC = _public_callables()


def test_the_public_api_is_found():
    names = {name for name, _ in PUBLIC}
    assert "kmask.losses.masked_loss" in names
    assert "kmask.seq2seq.SequenceLoss.__call__" in names
    assert len(PUBLIC) > 40


@pytest.mark.parametrize("name,function", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_callable_is_annotated(name, function):
    signature = inspect.signature(function)
    missing = [
        parameter.name
        for parameter in signature.parameters.values()
        if parameter.name not in ("self", "cls")
        and parameter.annotation is inspect.Parameter.empty
    ]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    assert not missing, f"{name} lacks annotations for {missing}"


def test_tensor_is_a_protocol_the_type_checker_can_use():
    """`kmask.typing.Tensor` is a `Protocol` (shape, dtype, indexing), not
    `Any`: mypy checks it (`nox -s lint`), and it holds at run time for a NumPy
    array and this backend's tensor, never for a scalar, a list or `None`
    (`isinstance` raises on `Any`)."""
    tensor = kmask.typing.Tensor
    assert tensor is not typing.Any
    assert getattr(tensor, "_is_protocol", False), tensor
    assert {"shape", "dtype", "__getitem__"} <= set(vars(tensor))
    for accepted in (np.zeros((2, 3)), ops.convert_to_tensor(np.zeros((2, 3)))):
        assert isinstance(accepted, tensor), type(accepted)
    for refused in (1.0, [[1.0, 2.0]], None):
        assert not isinstance(refused, tensor), type(refused)
