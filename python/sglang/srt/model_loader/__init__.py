"""Model loading: path resolution, weight files (HF folders, GGUF, dummy) and `get_model`.

The names are resolved lazily: the HTTP process imports `resolve` to check `--model-path` and
must not pay for importing torch, which `loader` needs.
"""

from __future__ import annotations

from sglang.srt.lazy_exports import lazy_getattr

_WHERE = {
    "get_model": "loader",
    "ModelLoadError": "resolve",
    "known_short_names": "resolve",
    "resolve_model_path": "resolve",
    "iterate_weights": "weight_utils",
}

__all__ = sorted(_WHERE)

__getattr__ = lazy_getattr(__name__, _WHERE)
