"""Gated activation used by the MLPs: SiLU(gate) * up over a merged [gate, up] projection."""

from __future__ import annotations

import torch
from torch import nn

import sgl_kernel


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sgl_kernel.silu_and_mul(x)
