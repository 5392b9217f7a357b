"""MLP activations: gated SiLU(gate) * up over a merged [gate, up] projection, and the plain
elementwise activations of ungated MLPs, looked up by their HF config name."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import sgl_kernel


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sgl_kernel.silu_and_mul(x)


# HF `hidden_act` / `activation_function` names of the plain (ungated) MLPs of GPT-2 and GPT-NeoX.
# gelu_new and gelu_fast are the tanh approximation written out in HF; torch's fused form computes
# the same function (it differs from them by float rounding only).
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class Activation(nn.Module):
    """An elementwise activation chosen by its HF config name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(
                f"activation {name!r} is not supported ({', '.join(sorted(_ACTIVATIONS))})"
            )
        self.name = name
        self.fn = _ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
