"""Fused attention-capture kernel in Triton: exact head-summed probabilities into score rows, top-k.

Owns the GPU drop-in for `AttentionCapture.record` and `_rank`
(python/sglang/srt/attention_capture/capture.py), with the same numbers:

    probs[r, j] = sum_h exp(cap(q[r, h] . K[slot(r, j), h // group] * sm_scale) - lse[r, h]) / H_total
    rows[r, j] (+)= probs[r, j] * weight[r]        for j < seq_len[r] (0 outside the window)

q and lse are those of the attention kernel (lse: natural log, float32); q and K are multiplied in
float32 (16-bit inputs of one dtype on tensor cores, whose products are exact in float32). One
program owns (row, block of key positions): for every KV head it reads the K block once and the
query heads of that group as one tile (GQA). Launch shapes are fixed by the buffers (grid = rows x
ceil(max_ctx / block)), nothing depends on host values, so CUDA graphs capture it; rows whose mask
is 0, blocks past the row's length and, when accumulating, rows whose layer weight is 0 do no work.
`capture_rank` is `_rank` over the static buffer (torch ops, no host sync).
"""

from __future__ import annotations

from typing import Optional

import torch

from sgl_kernel.triton_common import (
    dot_dtypes,
    next_pow2,
    torch_to_tl_dtype,
    triton_available,
)

NOT_RANKED = -1.0  # as capture.py: score of positions that must not be ranked

if triton_available():
    import triton
    import triton.language as tl

    from sgl_kernel.attention_scores import tl_key_visible, tl_softcap

    @triton.jit(do_not_specialize=["window"])
    def _capture_kernel(
        Q,
        Lse,
        QIndex,
        K,
        ReqToToken,
        ReqPoolIdx,
        SeqLens,
        RowMask,
        Weights,
        Rows,
        LayerRows,
        HeadW,
        HeadSlot,
        HeadRows,
        MaxRows,
        sm_scale,
        num_heads_total,
        window,
        stride_qt,
        stride_qh,
        stride_lt,
        stride_kt,
        stride_kh,
        stride_r2t,
        stride_w,
        stride_rows,
        stride_lrows,
        stride_hw,
        stride_hrows_r,
        stride_hrows_s,
        stride_mrows,
        HKV: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        OP_DTYPE: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        WRITE_LAYER: tl.constexpr,
        HEAD_WEIGHTS: tl.constexpr,
        WRITE_HEADS: tl.constexpr,
        WRITE_MAX: tl.constexpr,
        LOGIT_CAP: tl.constexpr,
    ):
        r = tl.program_id(0)
        n0 = tl.program_id(1) * BLOCK_N
        on = tl.load(RowMask + r) != 0
        weight = tl.load(Weights + r * stride_w)
        seq_len = tl.load(SeqLens + r).to(tl.int32)
        active = on & (n0 < seq_len)
        if ACCUMULATE and not (WRITE_LAYER or WRITE_HEADS or WRITE_MAX):
            active = active & (weight != 0.0)
        if active:
            row = tl.load(ReqPoolIdx + r).to(tl.int64)
            qi = tl.load(QIndex + r).to(tl.int64)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < seq_len
            slots = tl.load(ReqToToken + row * stride_r2t + offs_n, mask=n_mask, other=0)
            slots = slots.to(tl.int64)
            offs_h = tl.arange(0, BLOCK_H)
            h_mask = offs_h < GROUP
            offs_d = tl.arange(0, BLOCK_D)
            d_mask = offs_d < HEAD_DIM
            inside = n_mask & tl_key_visible(seq_len - 1 - offs_n, window)
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            top = tl.zeros([BLOCK_N], dtype=tl.float32)
            for kv_head in range(HKV):
                heads = kv_head * GROUP + offs_h
                q = (
                    tl.load(
                        Q + qi * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=h_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    )
                    .to(OP_DTYPE)
                    .to(DOT_DTYPE)
                )
                lse = tl.load(Lse + qi * stride_lt + heads, mask=h_mask, other=0.0)
                k = (
                    tl.load(
                        K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    )
                    .to(OP_DTYPE)
                    .to(DOT_DTYPE)
                )
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
                p = tl.exp(tl_softcap(s, LOGIT_CAP) - lse[:, None])
                p = tl.where(h_mask[:, None], p, 0.0)
                if HEAD_WEIGHTS:
                    # Chosen heads weigh 1/|chosen| (heads.py), the others 0.
                    hw = tl.load(HeadW + r * stride_hw + heads, mask=h_mask, other=0.0)
                    total += tl.sum(p * hw[:, None], 0)
                    if WRITE_MAX:
                        top = tl.maximum(top, tl.max(tl.where(hw[:, None] > 0, p, 0.0), 0))
                else:
                    total += tl.sum(p, 0)
                if WRITE_HEADS:
                    slot = tl.load(HeadSlot + r * stride_hw + heads, mask=h_mask, other=-1)
                    ptrs = HeadRows + r * stride_hrows_r + slot[:, None] * stride_hrows_s
                    tl.store(
                        ptrs + offs_n[None, :],
                        tl.where(inside[None, :], p, 0.0),
                        mask=(slot[:, None] >= 0) & n_mask[None, :],
                    )
            if HEAD_WEIGHTS:
                probs = tl.where(inside, total, 0.0)
            else:
                probs = tl.where(inside, total / num_heads_total, 0.0)
            if WRITE_MAX:
                tl.store(
                    MaxRows + r * stride_mrows + offs_n, tl.where(inside, top, 0.0), mask=n_mask
                )
            out = probs * weight
            if ACCUMULATE:
                out += tl.load(Rows + r * stride_rows + offs_n, mask=n_mask, other=0.0)
            tl.store(Rows + r * stride_rows + offs_n, out, mask=n_mask)
            if WRITE_LAYER:
                tl.store(LayerRows + r * stride_lrows + offs_n, probs, mask=n_mask)


def capture_head_block(group: int) -> int:
    return max(16, next_pow2(group))


def capture_scores(
    q: torch.Tensor,
    lse: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    q_index: torch.Tensor,
    row_mask: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    sm_scale: float,
    num_q_heads_total: int,
    sliding_window: int = -1,
    logit_cap: float = 0.0,
    accumulate: bool = True,
    layer_rows: Optional[torch.Tensor] = None,
    head_weights: Optional[torch.Tensor] = None,
    head_slots: Optional[torch.Tensor] = None,
    head_rows: Optional[torch.Tensor] = None,
    max_rows: Optional[torch.Tensor] = None,
    block_n: int = 64,
    num_warps: int = 4,
) -> None:
    """One captured layer's head-summed probabilities, weighted into `rows` (in place).

    q: [num_tokens, Hq*D] or [num_tokens, Hq, D] (this rank's heads, after rotary); lse:
    [num_tokens, Hq] float32 from the attention kernel; k_buffer: [slots, Hkv, D] of the layer.
    Per capture row r (R = len(q_index) rows, fixed): q_index[r] its query token,
    req_pool_indices[r] / seq_lens[r] its req_to_token row and length, row_mask[r] (bool/int)
    whether it captures, weights[r] its weight for this layer (float32, may be a strided column).
    rows: [>= R, max_ctx] float32. With accumulate=False the row's first seq_len positions are
    overwritten (no zeroing pass needed for the first layer) and masked rows are left as they are.
    layer_rows ([>= R, max_ctx] float32), if given, receives the unweighted probabilities.
    logit_cap > 0: the layer soft-caps its scores, so q.K is capped before exp(s - lse).
    Head selection (python/sglang/srt/attention_capture/heads.py): head_weights ([>= R, Hq]
    float32) replaces the uniform 1/H_total by a weight per head (0 for heads not chosen);
    head_slots ([>= R, Hq] int32, same strides) and head_rows ([>= R, S, max_ctx] float32)
    receive each head's own probabilities in its slot (heads of slot -1 are not written);
    max_rows ([>= R, max_ctx] float32) receives the maximum over the
    heads of positive weight. head_rows and max_rows are written (not accumulated) for every
    active row's first seq_len positions.
    """
    if not triton_available():
        raise RuntimeError("capture_scores needs triton")
    _, hkv, d = k_buffer.shape
    hq = q.shape[1] if q.dim() == 3 else q.shape[1] // d
    assert hq % hkv == 0
    assert rows.dtype == torch.float32 and rows.stride(-1) == 1
    assert lse.stride(-1) == 1 and q.stride(-1) == 1
    num_rows = q_index.shape[0]
    if num_rows == 0:
        return
    group = hq // hkv
    max_ctx = rows.shape[1]
    op_dtype, dot_dtype = dot_dtypes(q.dtype, k_buffer.dtype)
    write_layer = layer_rows is not None
    if layer_rows is None:
        layer_rows = rows  # never written (WRITE_LAYER is off)
    if max_rows is not None:
        assert head_weights is not None and max_rows.stride(-1) == 1
    if head_rows is not None:
        assert head_slots is not None and head_slots.stride() == head_weights.stride()
    # Pointers the flags leave unused still need a tensor argument.
    head_w = head_weights if head_weights is not None else weights
    slots_arg = head_slots if head_slots is not None else weights
    head_out = head_rows if head_rows is not None else rows[None]
    max_out = max_rows if max_rows is not None else rows
    grid = (num_rows, -(-max_ctx // block_n))
    _capture_kernel[grid](
        q,
        lse,
        q_index,
        k_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        row_mask,
        weights,
        rows,
        layer_rows,
        head_w,
        slots_arg,
        head_out,
        max_out,
        float(sm_scale),
        float(num_q_heads_total),
        int(sliding_window),
        q.stride(0),
        d if q.dim() == 2 else q.stride(1),
        lse.stride(0),
        k_buffer.stride(0),
        k_buffer.stride(1),
        req_to_token.stride(0),
        weights.stride(0),
        rows.stride(0),
        layer_rows.stride(0),
        head_w.stride(0) if head_weights is not None else 0,
        head_out.stride(0),
        head_out.stride(1),
        max_out.stride(0),
        HKV=hkv,
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_H=capture_head_block(group),
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(d)),
        OP_DTYPE=torch_to_tl_dtype(op_dtype),
        DOT_DTYPE=torch_to_tl_dtype(dot_dtype),
        ACCUMULATE=bool(accumulate),
        WRITE_LAYER=write_layer,
        HEAD_WEIGHTS=head_weights is not None,
        WRITE_HEADS=head_rows is not None,
        WRITE_MAX=max_rows is not None,
        LOGIT_CAP=float(logit_cap) if logit_cap > 0 else 0.0,
        num_warps=num_warps,
    )


def capture_rank(
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    row_mask: torch.Tensor,
    exclude: torch.Tensor,
    k: int,
    width: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of score rows, as `AttentionCapture._rank`: (values, indices, excluded mass).

    rows: [R, >= width] float32 (R = len(seq_lens)); positions j < exclude[r] are left out and
    their scores summed into `excluded`; positions >= seq_len[r] and masked rows score NOT_RANKED.
    width (default: the buffer's) bounds the columns ranked; static widths keep CUDA graphs valid.
    """
    num = seq_lens.shape[0]
    width = rows.shape[1] if width is None else width
    row = rows[:num, :width]
    j = torch.arange(width, device=rows.device)
    valid = (j[None, :] < seq_lens[:, None]) & (row_mask[:, None] != 0)
    sink = j[None, :] < exclude[:, None]
    excluded = torch.where(sink & valid, row, 0.0).sum(dim=1)
    ranked = row.masked_fill(sink | ~valid, NOT_RANKED)
    vals, idx = ranked.topk(k, dim=1)
    return vals, idx, excluded
