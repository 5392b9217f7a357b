"""sgl_kernel: the engine's compute kernels.

Every op has a pure-torch reference in `ref` that defines its exact semantics (it matches
HuggingFace transformers' float behaviour) and runs on any device. On CUDA tensors with Triton
installed, `rmsnorm`, `fused_add_rmsnorm` and `silu_and_mul` run the one-launch Triton kernels of
`norm_act` (the references' rounding steps, within a unit in the last place); on CPU float32 and
bfloat16 tensors these and `apply_rotary_emb` run the C row kernels of `cpu_layer` (same
operations and roundings, one call instead of several operator calls); everywhere else the
references. Importing this package never requires a GPU, Triton or a C compiler.
"""

from __future__ import annotations

import torch

from sgl_kernel import cpu_layer, ref
from sgl_kernel.ref import rotary_cos_sin
from sgl_kernel.triton_common import triton_available


def _triton_on(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def _cpu_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return weight.dtype in (torch.float32, torch.bfloat16) and cpu_layer.usable_rows(x)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _triton_on(x):
        from sgl_kernel import norm_act

        return norm_act.rmsnorm(x, weight, eps)
    if _cpu_norm_ok(x, weight):
        return cpu_layer.rmsnorm(x, weight, eps)[0]
    return ref.rmsnorm(x, weight, eps)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton_on(x):
        from sgl_kernel import norm_act

        return norm_act.fused_add_rmsnorm(x, residual, weight, eps)
    if residual.dtype == x.dtype and _cpu_norm_ok(x, weight):
        out, res = cpu_layer.rmsnorm(x, weight, eps, residual)
        assert res is not None
        return out, res
    return ref.fused_add_rmsnorm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _triton_on(x):
        from sgl_kernel import norm_act

        return norm_act.silu_and_mul(x)
    if cpu_layer.usable_rows(x):
        return cpu_layer.silu_and_mul(x)
    return ref.silu_and_mul(x)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.dtype == torch.float32 and cos.shape[0] == x.shape[0] and cos.is_contiguous():
        if x.shape[0] <= cpu_layer.ROW_KERNEL_MAX_ROWS and cpu_layer.usable(x):
            return cpu_layer.apply_rotary_emb(x, cos, sin)
    return ref.apply_rotary_emb(x, cos, sin)


__all__ = ["apply_rotary_emb", "fused_add_rmsnorm", "rmsnorm", "rotary_cos_sin", "silu_and_mul"]
