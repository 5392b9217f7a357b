"""Rotary position embeddings: default, linear and llama3 frequency scaling.

Owns the inverse-frequency computation (matching HuggingFace's float32 arithmetic) and applies
the rotation to flattened q/k projections. cos/sin are computed from the positions each forward
rather than from a max-length cache, which is exact and cheap and keeps 128k-context configs small.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

import sgl_kernel


def rope_config(config: Any) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, scaling dict or None) from a HF config of any transformers version."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return theta, scaling
    # GPT-NeoX configs before transformers 5 name the base `rotary_emb_base`.
    theta = float(
        getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", 10000.0)
    )
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def partial_rotary_factor(config: Any) -> float:
    """Fraction of each head's dims that rotary rotates (the rest pass through), from any config:
    transformers 5 keeps it in `rope_parameters`, older configs as `partial_rotary_factor`, and
    GPT-NeoX/Pythia configs as `rotary_pct`."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
        return float(params["partial_rotary_factor"])
    for key in ("partial_rotary_factor", "rotary_pct"):
        value = getattr(config, key, None)
        if value is not None:
            return float(value)
    return 1.0


def _base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between
    # them interpolated linearly in 1/wavelength.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        base: float,
        rope_scaling: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        inv_freq = _base_inv_freq(rotary_dim, base)
        kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
        elif kind == "linear":
            inv_freq = inv_freq / float(rope_scaling["factor"])
        elif kind != "default":
            raise ValueError(
                f"rope scaling type {kind!r} is not supported (default, linear, llama3)"
            )
        # Kept float32 on whatever device the model is built on; not a checkpoint weight.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cache: Optional[tuple] = None

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Layers share this module (get_rope), so one forward computes cos/sin once. The cache
        # holds the positions tensor itself and its version counter, so a new tensor or an
        # in-place update (static CUDA-graph inputs) recomputes.
        key = (positions, positions._version)
        cached = self._cache
        if cached is not None and cached[0] is key[0] and cached[1] == key[1]:
            return cached[2], cached[3]
        cos, sin = sgl_kernel.rotary_cos_sin(positions, self.inv_freq)
        self._cache = (positions, positions._version, cos, sin)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [N, Hq*D], k: [N, Hkv*D] -> rotated, same shapes."""
        cos, sin = self._cos_sin(positions)
        n = q.shape[0]
        q = sgl_kernel.apply_rotary_emb(q.view(n, -1, self.head_size), cos, sin)
        k = sgl_kernel.apply_rotary_emb(k.view(n, -1, self.head_size), cos, sin)
        return q.reshape(n, -1), k.reshape(n, -1)


_ROPE_CACHE: dict[tuple, RotaryEmbedding] = {}


def get_rope(
    head_size: int, rotary_dim: int, base: float, rope_scaling: Optional[dict[str, Any]] = None
) -> RotaryEmbedding:
    """One shared module per distinct rope setting and device (layers reuse its cos/sin)."""
    scaling_key = tuple(sorted((k, str(v)) for k, v in (rope_scaling or {}).items()))
    device = torch.empty(0).device  # the device the model is being built on
    key = (head_size, rotary_dim, base, scaling_key, str(device))
    rope = _ROPE_CACHE.get(key)
    if rope is None:
        rope = _ROPE_CACHE[key] = RotaryEmbedding(head_size, rotary_dim, base, rope_scaling)
    return rope
