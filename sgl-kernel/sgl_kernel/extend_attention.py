"""Paged extend (prefill) attention in Triton over a cached prefix, with each head's LSE.

Owns the extend kernel of the `triton` attention backend. Request `b` brings
`extend_seq_lens[b]` new tokens (flat rows `extend_start_loc[b] ...` of q) on top of a prefix of
`seq_lens[b] - extend_seq_lens[b]` positions already in the pool. Every key, prefix and new, is
read from the pool through `req_to_token`, so the new tokens' K/V must be stored first (see
`kv_store`). New token i sits at position prefix + i and attends to the keys
`attention_scores.key_visible` allows (j <= prefix + i and, with a sliding window w,
j > prefix + i - w); scores are soft-capped first when `logit_cap > 0`.

One program owns a tile of rows = (tokens of one request) x (query heads of one KV head): with
GQA the group's heads share every K/V block read. Scores, softmax and the accumulator are float32
(online softmax); K/V are read in the query dtype, as torch_native does. Every row's natural-log
LSE is written ([num_tokens, Hq] float32): the attention-capture contract.
"""

from __future__ import annotations

from typing import Optional

import torch

from sgl_kernel.triton_common import (
    as_heads,
    dot_dtypes,
    next_pow2,
    torch_to_tl_dtype,
    triton_available,
)

if triton_available():
    import triton
    import triton.language as tl

    from sgl_kernel.attention_scores import tl_key_visible, tl_softcap

    @triton.jit(do_not_specialize=["window"])
    def _extend_kernel(
        Q,
        K,
        V,
        Out,
        Lse,
        ReqToToken,
        ReqPoolIdx,
        SeqLens,
        ExtendLens,
        ExtendStart,
        sm_scale,
        window,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ot,
        stride_oh,
        stride_lt,
        stride_r2t,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        OP_DTYPE: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        LOGIT_CAP: tl.constexpr,
    ):
        TOKENS: tl.constexpr = BLOCK_R // GROUP_PAD
        m_block = tl.program_id(0)
        b = tl.program_id(1)
        kv_head = tl.program_id(2)

        seq_len = tl.load(SeqLens + b).to(tl.int32)
        ext_len = tl.load(ExtendLens + b).to(tl.int32)
        q_start = tl.load(ExtendStart + b).to(tl.int64)
        row = tl.load(ReqPoolIdx + b).to(tl.int64)
        prefix = seq_len - ext_len

        offs_r = tl.arange(0, BLOCK_R)
        tok = m_block * TOKENS + offs_r // GROUP_PAD  # token index inside the request
        g = offs_r % GROUP_PAD
        r_mask = (tok < ext_len) & (g < GROUP)
        head = kv_head * GROUP + g
        pos = prefix + tok  # absolute position of each row's query
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM

        q = (
            tl.load(
                Q
                + (q_start + tok)[:, None] * stride_qt
                + head[:, None] * stride_qh
                + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            .to(OP_DTYPE)
            .to(DOT_DTYPE)
        )

        # Keys this tile can see; an empty range when the tile is past the request's tokens.
        first_pos = prefix + m_block * TOKENS
        active = m_block * TOKENS < ext_len
        hi = tl.minimum(seq_len, first_pos + TOKENS)
        lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
        hi = tl.where(active, hi, lo)

        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            slots = tl.load(ReqToToken + row * stride_r2t + offs_n, mask=n_mask, other=0)
            slots = slots.to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = (
                tl.load(
                    K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask,
                    other=0.0,
                )
                .to(OP_DTYPE)
                .to(DOT_DTYPE)
            )
            s = tl_softcap(tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale, LOGIT_CAP)
            allowed = n_mask[None, :] & tl_key_visible(pos[:, None] - offs_n[None, :], window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = (
                tl.load(
                    V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask,
                    other=0.0,
                )
                .to(OP_DTYPE)
                .to(DOT_DTYPE)
            )
            acc = acc * alpha[:, None] + tl.dot(
                p.to(OP_DTYPE).to(DOT_DTYPE), v, input_precision="ieee"
            )
            m_i = m_new

        nonempty = l_i > 0
        safe_l = tl.where(nonempty, l_i, 1.0)
        out = acc / safe_l[:, None]
        lse = tl.where(nonempty, m_i + tl.log(safe_l), float("-inf"))
        t_idx = q_start + tok
        tl.store(
            Out + t_idx[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=r_mask[:, None] & d_mask[None, :],
        )
        tl.store(Lse + t_idx * stride_lt + head, lse, mask=r_mask)


def extend_tile(group: int, block_rows: int = 64) -> tuple[int, int]:
    """(rows per tile, padded group): a tile is block_rows // group_pad tokens x group_pad heads."""
    group_pad = next_pow2(group)
    return max(block_rows, group_pad), group_pad


def extend_attention_fwd(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    sm_scale: float,
    max_extend_len: int,
    sliding_window: int = -1,
    logit_cap: float = 0.0,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    block_rows: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each request's new tokens over its prefix and themselves.

    q: [num_tokens, Hq*D] or [num_tokens, Hq, D] (rows grouped by request, request b's rows at
    extend_start_loc[b] ...); k_buffer/v_buffer: [slots, Hkv, D] already holding the new tokens;
    req_to_token: [rows, max_ctx] int; req_pool_indices, seq_lens, extend_seq_lens,
    extend_start_loc: [B] int; max_extend_len: a host int >= max(extend_seq_lens) (the grid).
    logit_cap > 0 soft-caps the scaled scores (sgl_kernel.attention_scores.softcap) before the
    softmax; the LSE is then that of the capped scores.
    Returns out [num_tokens, Hq*D] in q's dtype and lse [num_tokens, Hq] float32.
    """
    if not triton_available():
        raise RuntimeError("extend_attention_fwd needs triton")
    _, hkv, d = k_buffer.shape
    num_tokens = q.shape[0]
    hq = q.shape[1] if q.dim() == 3 else q.shape[1] // d
    assert hq % hkv == 0, f"{hq} query heads do not group over {hkv} KV heads"
    group = hq // hkv
    qh = as_heads(q, hq, d)
    dev = q.device
    if out is None:
        out = torch.empty(num_tokens, hq * d, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty(num_tokens, hq, dtype=torch.float32, device=dev)
    out_h = out.view(out.shape[0], hq, d)
    bs = req_pool_indices.shape[0]
    if bs == 0 or num_tokens == 0 or max_extend_len <= 0:
        return out, lse
    rows, group_pad = extend_tile(group, block_rows)
    tokens = rows // group_pad
    op_dtype, dot_dtype = dot_dtypes(q.dtype)
    grid = (-(-int(max_extend_len) // tokens), bs, hkv)
    _extend_kernel[grid](
        qh,
        k_buffer,
        v_buffer,
        out_h,
        lse,
        req_to_token,
        req_pool_indices,
        seq_lens,
        extend_seq_lens,
        extend_start_loc,
        float(sm_scale),
        int(sliding_window),
        qh.stride(0),
        qh.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        out_h.stride(0),
        out_h.stride(1),
        lse.stride(0),
        req_to_token.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=d,
        BLOCK_R=rows,
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(d)),
        OP_DTYPE=torch_to_tl_dtype(op_dtype),
        DOT_DTYPE=torch_to_tl_dtype(dot_dtype),
        LOGIT_CAP=float(logit_cap) if logit_cap > 0 else 0.0,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse
