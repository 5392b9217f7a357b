"""Pieces shared by the quantized-weight GEMMs (fp8_gemm.py, int4_gemm.py): y = x @ W^T with W
dequantized tile by tile in registers.

Owns the parts that do not depend on the weight format: flattening the activations to rows, the
activation tile load, the tile product (weights rounded to the activation dtype, float32
accumulation, never tf32) and the biased store.
"""

from __future__ import annotations

import torch

from sgl_kernel.triton_common import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def load_x_tile(X, rm, kk, m_ok, k_ok, stride_xm):
        return tl.load(
            X + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )

    @triton.jit
    def dot_weight_tile(acc, x, w, OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
        """acc + x @ w^T with w (float32 [BLOCK_N, BLOCK_K]) rounded to the activation dtype."""
        return acc + tl.dot(
            x.to(OP_DTYPE).to(DOT_DTYPE),
            tl.trans(w.to(OP_DTYPE).to(DOT_DTYPE)),
            input_precision="ieee",
        )

    @triton.jit
    def store_rows(acc, Bias, Y, rm, rn, m_ok, n_ok, stride_ym, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(out, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def as_rows(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as [M, K] with unit column stride, the output y [M, n] in x's dtype, uninitialised)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
