"""FP8 weight GEMM in Triton: y = x @ (q * scale)^T with float8 e4m3 weights in memory.

Owns the matmul of float8 checkpoint layers on CUDA (python/sglang/srt/layers/quantization/
fp8_linear.py). Weights `w` are float8 e4m3 [N, K], one byte each; `scale` is float32
[N, ceil(K / block_in)], one multiplier per output row and block of `block_in` input columns
(block scales, per-channel and per-tensor scales all take this form). The kernel dequantizes each
weight tile in registers, q * scale in float32, rounds it to the activation dtype and multiplies
it with the activations as they are, accumulating in float32: the weight values are exactly those
of the dense path (which dequantizes at load and casts to the model dtype), and activations are
not quantized, so results match a dense matmul on the dequantized weights up to accumulation
order. What this buys is weight bandwidth (1 byte per weight instead of 2), which bounds decode;
H100's float8 tensor cores (which would need the activations quantized per token too) are not
used. `fp8_linear_ref` is the torch definition.
"""

from __future__ import annotations

from typing import Optional

import torch

from sgl_kernel.triton_common import dot_dtypes, torch_to_tl_dtype, triton_available
from sgl_kernel.weight_gemm import as_rows

if triton_available():
    import triton
    import triton.language as tl

    from sgl_kernel.weight_gemm import dot_weight_tile, load_x_tile, store_rows

    @triton.jit
    def _fp8_gemm_kernel(
        X,
        W,
        S,
        Bias,
        Y,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_ym,
        BLOCK_IN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        OP_DTYPE: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = load_x_tile(X, rm, kk, m_ok, k_ok, stride_xm)
            w_mask = n_ok[:, None] & k_ok[None, :]
            q = tl.load(W + rn[:, None].to(tl.int64) * stride_wn + kk[None, :], mask=w_mask)
            s = tl.load(S + rn[:, None] * stride_sn + (kk // BLOCK_IN)[None, :], mask=w_mask)
            w = tl.where(w_mask, q.to(tl.float32) * s, 0.0)
            acc = dot_weight_tile(acc, x, w, OP_DTYPE, DOT_DTYPE)
        store_rows(acc, Bias, Y, rm, rn, m_ok, n_ok, stride_ym, HAS_BIAS)


def fp8_linear_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    block_in: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The definition: dequantize (float32), round to x's dtype, dense matmul."""
    per_column = scale.float().repeat_interleave(block_in, 1)[:, : w.shape[1]]
    weight = (w.float() * per_column).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    block_in: int,
    bias: Optional[torch.Tensor] = None,
    block_m: int = 32,
    block_n: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """y [..., N] in x's dtype = x [..., K] @ (w * scale)^T (+ bias); see the module docstring."""
    if not triton_available():
        raise RuntimeError("fp8_linear needs triton")
    n, k = w.shape
    assert x.shape[-1] == k and w.stride(1) == 1 and scale.shape[0] == n
    assert scale.shape[1] == -(-k // block_in), "scale columns must cover the input blocks"
    lead = x.shape[:-1]
    x2, y = as_rows(x, n)
    m = x2.shape[0]
    if m == 0:
        return y.reshape(*lead, n)
    scale = scale.float().contiguous()
    op_dtype, dot_dtype = dot_dtypes(x.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        x2,
        w,
        scale,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        x2.stride(0),
        w.stride(0),
        scale.stride(0),
        y.stride(0),
        BLOCK_IN=block_in,
        HAS_BIAS=bias is not None,
        OP_DTYPE=torch_to_tl_dtype(op_dtype),
        DOT_DTYPE=torch_to_tl_dtype(dot_dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return y.reshape(*lead, n)
