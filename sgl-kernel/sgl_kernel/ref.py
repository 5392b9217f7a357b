"""Pure-torch reference ops: RMSNorm, SiLU-and-mul, rotary embedding.

Owned semantics: these define what every faster kernel must reproduce. The float handling mirrors
HuggingFace transformers (norm statistics in float32, cast back before the weight multiply) so the
engine matches it to float32 rounding on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in float32."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rmsnorm(residual), residual)."""
    residual = x + residual
    return rmsnorm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate, up] along the last dim; returns silu(gate) * up."""
    d = x.shape[-1] // 2
    out = F.silu(x[..., :d])  # a new contiguous tensor: multiplying into it saves a pass
    return out.mul_(x[..., d:])


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [num_tokens, rotary_dim], float32, in the half-split (neox) layout."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; rotates the first cos.shape[-1] dims, neox layout."""
    rot = cos.shape[-1]
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    # Same operations and roundings as x_rot * cos + rotated * sin, in fewer temporaries.
    out = x_rot * cos
    out.add_(rotated.mul_(sin))
    if x_pass.shape[-1] == 0:
        return out
    return torch.cat((out, x_pass), dim=-1)
