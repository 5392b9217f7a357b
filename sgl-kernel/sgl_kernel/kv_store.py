"""KV-cache store in Triton: write the new tokens' K and V into the pool at `out_cache_loc`.

Owns the one-launch equivalent of `MHATokenToKVPool.set_kv_buffer` for CUDA: token t's K/V
([Hkv*D] each, any float dtype, rows may be strided slices of a fused qkv projection) are cast to
the pool's dtype and stored at slot loc[t] of `k_buffer`/`v_buffer` ([slots, Hkv, D]).
"""

from __future__ import annotations

import torch

from sgl_kernel.triton_common import next_pow2, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _kv_store_kernel(
        K,
        V,
        KBuf,
        VBuf,
        Loc,
        stride_k,
        stride_v,
        stride_kb,
        stride_vb,
        ROW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < ROW
        loc = tl.load(Loc + t).to(tl.int64)
        k = tl.load(K + t * stride_k + offs, mask=mask)
        v = tl.load(V + t * stride_v + offs, mask=mask)
        tl.store(KBuf + loc * stride_kb + offs, k.to(KBuf.dtype.element_ty), mask=mask)
        tl.store(VBuf + loc * stride_vb + offs, v.to(VBuf.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """[n, width] with a contiguous last dim (a view when possible)."""
    x = x.reshape(x.shape[0], width) if x.dim() != 2 or x.shape[1] != width else x
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
    block: int = 1024,
) -> None:
    """k_buffer[loc] = k, v_buffer[loc] = v (cast to the pool dtype); k/v: [n, Hkv*D] or [n, Hkv, D]."""
    if not triton_available():
        raise RuntimeError("store_kv_cache needs triton")
    n = loc.shape[0]
    if n == 0:
        return
    _, hkv, d = k_buffer.shape
    width = hkv * d
    assert k_buffer.stride(1) == d and k_buffer.stride(2) == 1
    assert v_buffer.stride(1) == d and v_buffer.stride(2) == 1
    k2, v2 = _rows(k, width), _rows(v, width)
    block = min(block, next_pow2(width))
    grid = (n, -(-width // block))
    _kv_store_kernel[grid](
        k2,
        v2,
        k_buffer,
        v_buffer,
        loc,
        k2.stride(0),
        v2.stride(0),
        k_buffer.stride(0),
        v_buffer.stride(0),
        ROW=width,
        BLOCK=block,
    )
