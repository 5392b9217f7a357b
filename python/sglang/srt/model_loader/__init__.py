"""Model loading: path resolution, weight files (HF folders, GGUF, dummy) and `get_model`.

The names are resolved lazily: the HTTP process imports `resolve` to check `--model-path` and
must not pay for importing torch, which `loader` needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "get_model": "sglang.srt.model_loader.loader",
    "ModelLoadError": "sglang.srt.model_loader.resolve",
    "known_short_names": "sglang.srt.model_loader.resolve",
    "resolve_model_path": "sglang.srt.model_loader.resolve",
    "iterate_weights": "sglang.srt.model_loader.weight_utils",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
