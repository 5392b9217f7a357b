"""The capture's torch arithmetic, once: head-summed attention probabilities of score rows.

Owns the torch form of one captured layer's contribution, shared by the eager path (capture.py)
and the static graph path (static.py), and the reference the fused Triton kernel
(sgl-kernel/sgl_kernel/attention_capture.py) is checked against:

    probs[r, j] = sum_h exp(cap(q[r, h] . K[slots[r, j], h // group] * scale) - lse[r, h]) / H

where `allowed[r, j]`, else 0 (H: the model's query heads over all TP ranks). Keys are gathered and
widened to float32 a chunk of positions at a time, so the float32 working set stays under
`CHUNK_BYTES` whatever the batch's lengths, instead of one [R, width, Hkv, D] float32 copy of
every capturing row's keys per layer.
"""

from __future__ import annotations

import torch
from sgl_kernel.attention_scores import softcap

# Float32 bytes one chunk of key positions may occupy (gathered keys plus the score tensors).
CHUNK_BYTES = 64 << 20


def chunk_positions(num_rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Key positions per chunk: float32 keys [R, n, Hkv, D] plus scores and probabilities
    [R, Hq, n] twice stay within CHUNK_BYTES."""
    per_position = 4 * num_rows * (num_kv_heads * head_dim + 2 * num_q_heads)
    return max(1, CHUNK_BYTES // max(per_position, 1))


def head_summed_probs(
    q: torch.Tensor,
    lse: torch.Tensor,
    keys_all: torch.Tensor,
    slots: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    logit_cap: float,
    num_q_heads_total: int,
    per_head: bool = False,
) -> torch.Tensor:
    """[R, W] float32 probabilities of R query rows over W key positions each; with `per_head`,
    [R, Hq, W] each head's own probabilities (not summed, not divided).

    q: [R, Hq * D] or [R, Hq, D] (this rank's heads, after rotary); lse: [R, Hq] natural-log
    log-sum-exp of the scaled (and capped) scores; keys_all: [slots, Hkv, D] the layer's pool;
    slots / allowed: [R, W] KV slot and visibility of every position (slots of disallowed
    positions are never read).
    """
    num, width = slots.shape
    hkv, d = keys_all.shape[1], keys_all.shape[2]
    hq = q.numel() // (num * d)
    qr = q.reshape(num, hkv, hq // hkv, d).float()
    lr = lse.reshape(num, hkv, hq // hkv, 1).float()
    shape = (num, hq, width) if per_head else (num, width)
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    step = chunk_positions(num, hq, hkv, d)
    for start in range(0, width, step):
        end = min(width, start + step)
        ok = allowed[:, start:end]
        index = torch.where(ok, slots[:, start:end], 0).reshape(-1)
        keys = keys_all.index_select(0, index).view(num, end - start, hkv, d).float()
        scores = torch.einsum("rhgd,rjhd->rhgj", qr, keys) * scale
        probs = torch.exp(softcap(scores, logit_cap) - lr)
        if per_head:
            out[..., start:end] = torch.where(ok[:, None, :], probs.view(num, hq, -1), 0.0)
        else:
            out[:, start:end] = torch.where(ok, probs.sum(dim=(1, 2)), 0.0)
    return out if per_head else out / num_q_heads_total
