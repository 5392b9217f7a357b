"""SGLang-compatible serving engine. `import sglang` stays light: heavy names load on first use."""

from __future__ import annotations

from typing import Any

__version__ = "0.5.0.dev0"

_LAZY = {
    "Engine": "sglang.srt.entrypoints.engine",
    "Runtime": "sglang.srt.entrypoints.runtime",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sglang' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
