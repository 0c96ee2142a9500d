"""Names that moved to another module stay importable from the module they came from."""

from __future__ import annotations

import importlib


def moved(module: str, table: dict[str, str]):
    """A module-level ``__getattr__`` that serves each name of ``table[new_module]`` (names separated
    by spaces) from ``new_module``, imported on first use (so the two modules may import each other)."""
    where = {name: new for new, names in table.items() for name in names.split()}

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
