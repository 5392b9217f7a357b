"""sgl_kernel: the engine's compute kernels.

Every op has a pure-torch reference in `ref` that defines its exact semantics (it matches
HuggingFace transformers' float behaviour) and runs on any device. On CUDA tensors with Triton
installed, `rmsnorm`, `fused_add_rmsnorm` and `silu_and_mul` run the one-launch Triton kernels of
`norm_act` (the references' rounding steps, within a unit in the last place); everywhere else the
references. Importing this package never requires a GPU or Triton.
"""

from __future__ import annotations

import torch

from sgl_kernel import ref
from sgl_kernel.ref import apply_rotary_emb, rotary_cos_sin
from sgl_kernel.triton_common import triton_available


def _triton_on(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _triton_on(x):
        from sgl_kernel import norm_act

        return norm_act.rmsnorm(x, weight, eps)
    return ref.rmsnorm(x, weight, eps)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton_on(x):
        from sgl_kernel import norm_act

        return norm_act.fused_add_rmsnorm(x, residual, weight, eps)
    return ref.fused_add_rmsnorm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _triton_on(x):
        from sgl_kernel import norm_act

        return norm_act.silu_and_mul(x)
    return ref.silu_and_mul(x)


__all__ = ["apply_rotary_emb", "fused_add_rmsnorm", "rmsnorm", "rotary_cos_sin", "silu_and_mul"]
