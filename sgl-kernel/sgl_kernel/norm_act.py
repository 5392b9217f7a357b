"""Fused elementwise kernels in Triton: RMSNorm, residual-add + RMSNorm, SiLU-and-mul.

Owns the one-launch CUDA versions of `sgl_kernel.ref.rmsnorm`, `fused_add_rmsnorm` and
`silu_and_mul`, with the same rounding steps as the references (norm statistics in float32, the
normalised row cast to the input dtype before the weight multiply; silu in float32 rounded to the
input dtype before the multiply), so they agree with them to a unit in the last place.
One program per row; the row (hidden size) fits one block.
"""

from __future__ import annotations

import torch

from sgl_kernel.triton_common import next_pow2, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_kernel(
        X,
        R,
        W,
        Out,
        ResOut,
        eps,
        stride_x,
        stride_r,
        stride_o,
        stride_ro,
        N: tl.constexpr,
        BLOCK: tl.constexpr,
        ADD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
        if ADD:
            x = (
                x.to(tl.float32)
                + tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            ).to(X.dtype.element_ty)
            tl.store(ResOut + row * stride_ro + offs, x, mask=mask)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
        xn = (xf * inv).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_o + offs, (xn * w).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(X, Out, stride_x, stride_o, D: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
        tl.store(Out + row * stride_o + offs, (act * up).to(Out.dtype.element_ty), mask=mask)


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not triton_available():
        raise RuntimeError("triton rmsnorm needs triton")
    shape, n = x.shape, x.shape[-1]
    x2 = _rows2d(x)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty_like(x2) if residual is not None else None
    r2 = _rows2d(residual) if residual is not None else x2
    rows = x2.shape[0]
    if rows:
        block = next_pow2(n)
        _rmsnorm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out,
            res_out if res_out is not None else out,
            float(eps),
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            (res_out if res_out is not None else out).stride(0),
            N=n,
            BLOCK=block,
            ADD=residual is not None,
            num_warps=min(16, max(1, block // 256)),
        )
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`ref.rmsnorm` in one launch; x: [..., N], weight: [N]."""
    return _norm(x, None, weight, eps)[0]


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ref.fused_add_rmsnorm` in one launch: (rmsnorm(x + residual), x + residual)."""
    out, res = _norm(x, residual, weight, eps)
    assert res is not None
    return out, res


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`ref.silu_and_mul` in one launch; x: [..., 2*D] = [gate, up] -> [..., D]."""
    if not triton_available():
        raise RuntimeError("triton silu_and_mul needs triton")
    d = x.shape[-1] // 2
    x2 = _rows2d(x)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(block, next_pow2(d))
        grid = (x2.shape[0], -(-d // block))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), D=d, BLOCK=block)
    return out.view(*x.shape[:-1], d)
