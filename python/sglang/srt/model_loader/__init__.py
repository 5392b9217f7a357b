"""Model loading: path resolution, weight files (HF folders, GGUF, dummy) and `get_model`."""

from __future__ import annotations

from sglang.srt.model_loader.loader import get_model
from sglang.srt.model_loader.resolve import ModelLoadError, known_short_names, resolve_model_path
from sglang.srt.model_loader.weight_utils import iterate_weights

__all__ = [
    "ModelLoadError",
    "get_model",
    "iterate_weights",
    "known_short_names",
    "resolve_model_path",
]
