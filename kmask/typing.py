"""Type aliases used in kmask's public signatures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias, runtime_checkable


@runtime_checkable
class Tensor(Protocol):
    """A tensor of the current Keras backend or a NumPy array: what kmask
    reads of one is its shape, its dtype and its steps by indexing.

    `tf.Tensor`, `jax.Array`, `torch.Tensor`, `keras.KerasTensor` and
    `np.ndarray` have all three; a Python scalar, a nested list or `None`
    has none, so pass those through `keras.ops.convert_to_tensor` (or
    `np.asarray`) first. Keras, TensorFlow, JAX and PyTorch ship no types that
    mypy reads here (`ignore_missing_imports`), so what their ops return is
    `Any`: mypy checks this protocol where kmask declares a `Tensor` and
    returns or hands over something else (a `float`, a `list`, `None`), where
    it reads an attribute a tensor is not promised to have, and where it does
    arithmetic on a dimension that may be `None`.
    """

    @property
    def shape(self) -> Sequence[int | None]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, index: Any, /) -> Any: ...


TensorLike: TypeAlias = Tensor | Sequence[Any] | float
"""What kmask's inputs accept: a `Tensor` (or NumPy array), nested lists of
numbers, or a number; each is converted with `keras.ops.convert_to_tensor`."""
