"""Lazy package exports: a package `__init__` names what it exports without importing it.

The HTTP process imports light parts of packages (config checks, record formatting) whose heavy
siblings import torch; resolving a package's names on first use keeps torch out of that process.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` importing `package.<where[name]>` when `name` is first used."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
