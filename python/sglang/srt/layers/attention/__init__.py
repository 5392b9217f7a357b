"""Attention backends, created by name with lazy imports (GPU-only ones need triton/flashinfer)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def create_attention_backend(name: str, model_runner: Any):
    if name in ("triton", "flashinfer"):
        # NOTE: the GPU kernels land with the GPU-path issue; until then CUDA runs the reference.
        logger.warning("attention backend %r is not built yet; using torch_native", name)
        name = "torch_native"
    if name == "torch_native":
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        return TorchNativeAttnBackend(model_runner)
    raise ValueError(
        f"unknown attention backend {name!r} (choose torch_native, triton or flashinfer)"
    )
