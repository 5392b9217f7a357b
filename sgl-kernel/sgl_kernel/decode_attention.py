"""Paged decode attention in Triton: one query per request over the KV pool, with each head's LSE.

Owns the decode kernel of the `triton` attention backend. Keys and values live in a slot-indexed
pool (`k_buffer`/`v_buffer` [slots, Hkv, D]); request `b`'s position `j` sits at slot
`req_to_token[req_pool_indices[b], j]`. The work is split over the KV length into `num_kv_splits`
pieces (stage 1: a partial softmax per piece, its output normalised and its natural-log LSE kept)
and merged per head (stage 2), so short batches still fill the GPU. Query heads that share a KV
head (GQA/MQA) are one tile of rows, so each K/V block is read once per KV head. The LSE returned
is log(sum_j exp(q.k_j * sm_scale)) over the keys attended: the attention-capture contract.

Semantics match `torch_native_backend`: K/V are read in the query dtype; scores, softmax and the
accumulator are float32; a sliding window of `w` keeps keys with position > seq_len - 1 - w (the
query is the last key, so this is `attention_scores.key_visible`); `logit_cap` soft-caps scores.
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

    from sgl_kernel.attention_scores import tl_softcap

    @triton.jit(do_not_specialize=["window"])
    def _decode_split_kernel(
        Q,
        K,
        V,
        ReqToToken,
        ReqPoolIdx,
        SeqLens,
        MidO,
        MidLse,
        sm_scale,
        window,
        stride_qb,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_r2t,
        stride_mob,
        stride_moh,
        stride_mos,
        stride_mlb,
        stride_mlh,
        GROUP: tl.constexpr,
        HEAD_BLOCKS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        OP_DTYPE: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        LOGIT_CAP: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1) // HEAD_BLOCKS
        h_in_group = (tl.program_id(1) % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        split = tl.program_id(2)
        h_mask = h_in_group < GROUP
        heads = kv_head * GROUP + h_in_group
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM

        seq_len = tl.load(SeqLens + b).to(tl.int32)
        row = tl.load(ReqPoolIdx + b).to(tl.int64)
        start = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
        split_len = tl.cdiv(seq_len - start, NUM_SPLITS)
        lo = start + split * split_len
        hi = tl.minimum(lo + split_len, seq_len)

        q = (
            tl.load(
                Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            .to(OP_DTYPE)
            .to(DOT_DTYPE)
        )
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
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
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
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
        tl.store(
            MidO
            + b * stride_mob
            + heads[:, None] * stride_moh
            + split * stride_mos
            + offs_d[None, :],
            out,
            mask=h_mask[:, None] & d_mask[None, :],
        )
        tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=h_mask)

    @triton.jit
    def _decode_merge_kernel(
        MidO,
        MidLse,
        Out,
        Lse,
        stride_mob,
        stride_moh,
        stride_mos,
        stride_mlb,
        stride_mlh,
        stride_ob,
        stride_oh,
        stride_lb,
        HEAD_DIM: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < NUM_SPLITS
        d_mask = offs_d < HEAD_DIM
        lse_s = tl.load(
            MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=s_mask, other=float("-inf")
        )
        m = tl.max(lse_s, 0)
        any_key = m > float("-inf")
        m_safe = tl.where(any_key, m, 0.0)
        w = tl.exp(lse_s - m_safe)
        w_sum = tl.sum(w, 0)
        o_s = tl.load(
            MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        w_safe = tl.where(any_key, w_sum, 1.0)
        out = tl.sum(o_s * w[:, None], 0) / w_safe
        lse = tl.where(any_key, m_safe + tl.log(w_safe), float("-inf"))
        tl.store(
            Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask
        )
        tl.store(Lse + b * stride_lb + h, lse)


def decode_head_block(group: int) -> int:
    """Rows of one program's query tile: the GQA group padded to a tensor-core shape (>= 16)."""
    return min(64, max(16, next_pow2(group)))


def decode_attention_fwd(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int = 8,
    sliding_window: int = -1,
    logit_cap: float = 0.0,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    mid_o: Optional[torch.Tensor] = None,
    mid_lse: Optional[torch.Tensor] = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per request over its paged keys; returns (out, lse).

    q: [bs, Hq*D] or [bs, Hq, D]; k_buffer/v_buffer: [slots, Hkv, D] (any float dtype; read in
    q's dtype); req_to_token: [rows, max_ctx] int; req_pool_indices, seq_lens: [bs] int (every
    seq_len >= 1, the query itself being the last key). out: [bs, Hq*D] in q's dtype, lse:
    [bs, Hq] float32 natural log. `out`, `lse`, `mid_o` ([bs, Hq, splits, D] float32) and `mid_lse`
    ([bs, Hq, splits] float32) may be passed preallocated (CUDA graphs): nothing is allocated then
    and nothing depends on host values of seq_lens. logit_cap > 0 soft-caps the scaled scores
    (sgl_kernel.attention_scores.softcap) before the softmax, and the LSE is of the capped ones.
    """
    if not triton_available():
        raise RuntimeError("decode_attention_fwd needs triton")
    num_slots, hkv, d = k_buffer.shape
    bs = q.shape[0]
    hq = q.shape[1] if q.dim() == 3 else q.shape[1] // d
    assert hq % hkv == 0, f"{hq} query heads do not group over {hkv} KV heads"
    group = hq // hkv
    qh = as_heads(q, hq, d)
    dev = q.device
    f32 = torch.float32
    if out is None:
        out = torch.empty(bs, hq * d, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty(bs, hq, dtype=f32, device=dev)
    if mid_o is None:
        mid_o = torch.empty(bs, hq, num_kv_splits, d, dtype=f32, device=dev)
    if mid_lse is None:
        mid_lse = torch.empty(bs, hq, num_kv_splits, dtype=f32, device=dev)
    assert mid_o.stride(-1) == 1 and mid_lse.stride(-1) == 1
    out_h = out.view(out.shape[0], hq, d)
    if bs == 0:
        return out, lse
    op_dtype, dot_dtype = dot_dtypes(q.dtype)
    block_h = decode_head_block(group)
    head_blocks = -(-group // block_h)
    block_d = max(16, next_pow2(d))
    grid = (bs, hkv * head_blocks, num_kv_splits)
    _decode_split_kernel[grid](
        qh,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        mid_o,
        mid_lse,
        float(sm_scale),
        int(sliding_window),
        qh.stride(0),
        qh.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        GROUP=group,
        HEAD_BLOCKS=head_blocks,
        HEAD_DIM=d,
        NUM_SPLITS=num_kv_splits,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        OP_DTYPE=torch_to_tl_dtype(op_dtype),
        DOT_DTYPE=torch_to_tl_dtype(dot_dtype),
        LOGIT_CAP=float(logit_cap) if logit_cap > 0 else 0.0,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_merge_kernel[(bs, hq)](
        mid_o,
        mid_lse,
        out_h,
        lse,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out_h.stride(0),
        out_h.stride(1),
        lse.stride(0),
        HEAD_DIM=d,
        NUM_SPLITS=num_kv_splits,
        BLOCK_S=next_pow2(num_kv_splits),
        BLOCK_D=block_d,
        num_warps=1 if d <= 64 else 2,
    )
    return out, lse
