"""Type aliases used in kmask's public signatures."""

from __future__ import annotations

from typing import Any, TypeAlias

Tensor: TypeAlias = Any
"""A tensor of the current Keras backend, or anything `keras.ops.convert_to_tensor`
takes: a NumPy array, nested lists, a scalar. Keras has no tensor type common
to its backends, so this alias documents intent and checks nothing."""
