"""Names a module once held or imported and no longer defines: still
importable from it, so that code written against them keeps working, but
neither in its namespace nor in its documentation."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def moved(module: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that finds each name of `homes` in the module
    named there."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
