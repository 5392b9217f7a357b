"""Attention backends, created by name with lazy imports (GPU-only ones need triton/flashinfer)."""

from __future__ import annotations

from typing import Any


def create_attention_backend(name: str, model_runner: Any):
    if name == "torch_native":
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        return TorchNativeAttnBackend(model_runner)
    if name in ("triton", "flashinfer"):
        raise ValueError(
            f"attention backend {name!r} is not available in this build yet; use --attention-backend torch_native"
        )
    raise ValueError(f"unknown attention backend {name!r} (choose torch_native, triton or flashinfer)")
