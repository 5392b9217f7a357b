"""Per-layer k/v scales of a float8 KV cache, read from the checkpoint.

Checkpoints quantized for a float8 KV cache carry one scale per layer for K and one for V: FP8
checkpoints and llm-compressor's `kv_cache_scheme` write `model.layers.N.self_attn.k_scale` /
`v_scale` (some exporters under `self_attn.attn.`), older compressed-tensors ones
`k_proj.output_scale` / `v_proj.output_scale`, older vLLM ones a single `kv_scale` for both. The
loader passes the weight stream through `KVScales.filter`, which takes these tensors out (no
model has parameters by these names), and `KVScales.apply` sets them on the RadixAttention of
layer N as `k_scale` / `v_scale`. A float8 pool stores K / k_scale cast to float8 and every
attention backend and the attention capture read float8 * k_scale (mem_cache/memory_pool.py);
wider pools ignore the scales, and layers without them keep 1.0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

# Name suffix -> which scales it sets.
KV_SCALE_SUFFIXES = {
    ".k_scale": ("k",),
    ".v_scale": ("v",),
    ".k_proj.output_scale": ("k",),
    ".v_proj.output_scale": ("v",),
    ".kv_scale": ("k", "v"),
}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class KVScales:
    """The k/v scales found in one checkpoint, by decoder layer index."""

    def __init__(self) -> None:
        self.scales: dict[int, dict[str, float]] = {}

    def filter(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream without its k/v scale tensors, which are kept here."""
        for name, tensor in weights:
            suffix = next((s for s in KV_SCALE_SUFFIXES if name.endswith(s)), None)
            if suffix is None:
                yield name, tensor
                continue
            layer = _LAYER_INDEX.search(name)
            if layer is None:
                raise ValueError(f"k/v scale {name} names no layer index")
            if tensor.numel() != 1:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}: only per-tensor k/v scales (one "
                    "value per layer) are implemented"
                )
            value = float(tensor.float().item())
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} = {value}: a k/v scale must be positive and finite")
            for kind in KV_SCALE_SUFFIXES[suffix]:
                self.scales.setdefault(int(layer.group(1)), {})[kind] = value

    def apply(self, model: nn.Module) -> int:
        """Set the scales on the model's attention layers; returns how many layers got one."""
        from sglang.srt.layers.radix_attention import RadixAttention

        if not self.scales:
            return 0
        layers = {m.layer_id: m for m in model.modules() if isinstance(m, RadixAttention)}
        unknown = sorted(set(self.scales) - set(layers))
        if unknown:
            raise ValueError(f"k/v scales for layers {unknown} that the model does not have")
        for layer_id, scales in self.scales.items():
            layers[layer_id].k_scale = scales.get("k", 1.0)
            layers[layer_id].v_scale = scales.get("v", 1.0)
        return len(self.scales)
