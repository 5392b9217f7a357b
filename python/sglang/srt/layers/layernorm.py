"""RMSNorm layers (optionally fused with the residual add): Llama's, backed by sgl_kernel ops, and
Gemma's, which scales by (1 + weight) and multiplies before casting back."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

import sgl_kernel


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return sgl_kernel.rmsnorm(x, self.weight, self.variance_epsilon)
        return sgl_kernel.fused_add_rmsnorm(x, residual, self.weight, self.variance_epsilon)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: y = (x / rms(x)) * (1 + w), all in float32, cast to x's dtype at the end
    (HF computes (x * w).to(dtype) here, where Llama's computes x.to(dtype) * w). The checkpoint
    stores w centred on 0."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = (xf * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)
