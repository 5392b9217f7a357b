"""RMSNorm layer (optionally fused with the residual add), backed by sgl_kernel ops."""

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
