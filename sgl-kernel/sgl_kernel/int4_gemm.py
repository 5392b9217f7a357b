"""Int4 weight GEMM in Triton: y = x @ ((q - zero) * scale)^T with 4-bit weight codes in memory.

Owns the matmul of AWQ / GPTQ layers on CUDA (python/sglang/srt/layers/quantization/int4.py,
`TritonInt4`). The layout is the one the loader repacks every int4 checkpoint into (`DequantInt4`
there), not AWQ's interleaved GEMM packing nor GPTQ's row packing: one repack at load serves both
formats and both act orders.

- `codes` uint8 [N, ceil(K / 2)]: output row n, input column k in byte k // 2, low nibble for
  even k, high nibble for odd k (codes 0..15).
- `scales` [N, groups] (the checkpoint's fp16, or any float) and `zeros` uint8 [N, groups]
  (in code units; GPTQ v1's stored zero - 1 is already undone by the loader).
- the group of input column k: k // `group` (contiguous groups: AWQ, GPTQ without act order), or
  `g_idx[k]` (GPTQ `desc_act`, or any irregular grouping), an int32/int64 [K] table.

Each weight tile is dequantized in registers, (q - zero) * scale in float32 (the formats' own
formula, one rounding), rounded to the activation dtype and multiplied with the activations as
they are, accumulating in float32: the same weight values as the dense `dequant` path, so results
differ from a dense matmul on the dequantized weights only by accumulation order. Weights cost
half a byte each in memory and bandwidth. `int4_linear_ref` is the torch definition.
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
    def _int4_gemm_kernel(
        X,
        C,
        S,
        Z,
        G,
        Bias,
        Y,
        M,
        N,
        K,
        stride_xm,
        stride_cn,
        stride_sn,
        stride_zn,
        stride_ym,
        GROUP: tl.constexpr,
        HAS_GIDX: tl.constexpr,
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
        row_codes = C + rn[:, None].to(tl.int64) * stride_cn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = load_x_tile(X, rm, kk, m_ok, k_ok, stride_xm)
            w_mask = n_ok[:, None] & k_ok[None, :]
            # Both nibbles of a byte are read by neighbouring columns; the second load hits cache.
            byte = tl.load(row_codes + (kk // 2)[None, :], mask=w_mask, other=0).to(tl.int32)
            q = (byte >> ((kk % 2) * 4)[None, :]) & 0xF
            if HAS_GIDX:
                grp = tl.load(G + kk, mask=k_ok, other=0).to(tl.int32)
            else:
                grp = kk // GROUP
            s = tl.load(S + rn[:, None] * stride_sn + grp[None, :], mask=w_mask, other=0.0)
            z = tl.load(Z + rn[:, None] * stride_zn + grp[None, :], mask=w_mask, other=0)
            w = (q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)
            acc = dot_weight_tile(acc, x, tl.where(w_mask, w, 0.0), OP_DTYPE, DOT_DTYPE)
        store_rows(acc, Bias, Y, rm, rn, m_ok, n_ok, stride_ym, HAS_BIAS)


def unpack_codes(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, in_features] codes from the two-per-byte layout of the module docstring."""
    return torch.stack([codes & 0xF, codes >> 4], -1).flatten(1)[:, :in_features]


def int4_linear_ref(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: Optional[int],
    g_idx: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The definition: dequantize in float32, round to x's dtype, dense matmul."""
    k = x.shape[-1]
    cols = g_idx.long() if g_idx is not None else torch.arange(k, device=x.device) // group
    q = unpack_codes(codes, k).float()
    weight = (q - zeros.float()[:, cols]) * scales.float()[:, cols]
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


def _blocks(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): decode rows get the smallest M tile tl.dot takes."""
    if m <= 16:
        return 16, 64, 64, 4
    if m <= 64:
        return 32, 64, 64, 4
    return 64, 64, 64, 4


def int4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: Optional[int],
    g_idx: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y [..., N] in x's dtype = x [..., K] @ dequant(codes)^T (+ bias); module docstring.

    Exactly one of `group` (contiguous groups of that many input columns) and `g_idx` is given.
    """
    if not triton_available():
        raise RuntimeError("int4_linear needs triton")
    if (group is None) == (g_idx is None):
        raise ValueError("give either a contiguous group size or a g_idx table, not both")
    k = x.shape[-1]
    n = codes.shape[0]
    assert codes.dtype == torch.uint8 and codes.shape[1] == -(-k // 2) and codes.stride(1) == 1
    assert scales.shape == zeros.shape and scales.shape[0] == n
    assert scales.stride(1) == 1 and zeros.stride(1) == 1
    if g_idx is None:
        assert scales.shape[1] == -(-k // group), "scale columns must cover the input groups"
    else:
        assert g_idx.shape == (k,) and g_idx.is_contiguous()
    lead = x.shape[:-1]
    x2, y = as_rows(x, n)
    m = x2.shape[0]
    if m == 0:
        return y.reshape(*lead, n)
    op_dtype, dot_dtype = dot_dtypes(x.dtype)
    block_m, block_n, block_k, num_warps = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](
        x2,
        codes,
        scales,
        zeros,
        g_idx if g_idx is not None else codes,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        x2.stride(0),
        codes.stride(0),
        scales.stride(0),
        zeros.stride(0),
        y.stride(0),
        GROUP=group or 1,
        HAS_GIDX=g_idx is not None,
        HAS_BIAS=bias is not None,
        OP_DTYPE=torch_to_tl_dtype(op_dtype),
        DOT_DTYPE=torch_to_tl_dtype(dot_dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return y.reshape(*lead, n)
