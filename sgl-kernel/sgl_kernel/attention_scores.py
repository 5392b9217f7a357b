"""What an attention score is and which keys a query sees: the one definition every path uses.

Owns two rules shared by the torch_native backend, the attention capture (torch and fused paths)
and the Triton attention kernels, so that they cannot drift apart:

* visibility: the query at absolute position p sees key position j when j <= p and, under a
  sliding window w > 0, p - j < w (HuggingFace's `kv_idx > q_idx - sliding_window`);
* soft-capping: with a cap c > 0 the scaled score s becomes c * tanh(s / c) before the softmax
  (Gemma 2's `attn_logit_softcapping`), so the log-sum-exp the capture divides by is that of the
  capped scores; c <= 0 means no cap.

`key_visible` and `softcap` are the torch forms; `tl_key_visible` and `tl_softcap` the Triton
forms (defined only where Triton imports). Triton's interpreter has no tanh, so the Triton form
computes it from exp(-2|x|), which is within a few float32 ulps of torch.tanh.
"""

from __future__ import annotations

import torch

from sgl_kernel.triton_common import triton_available


def key_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean mask (broadcast of q_pos and k_pos): key k_pos is in the context of query q_pos."""
    visible = k_pos <= q_pos
    if window > 0:
        visible = visible & (q_pos - k_pos < window)
    return visible


def softcap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(scores / cap) for cap > 0 (HF's order: divide, tanh, multiply); else scores."""
    if cap <= 0:
        return scores
    return torch.tanh(scores / cap) * cap


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def tl_key_visible(dist, window):
        """dist = query position - key position (any shape); window <= 0: no window."""
        return (dist >= 0) & ((dist < window) | (window <= 0))

    @triton.jit
    def tl_softcap(s, CAP: tl.constexpr):
        """CAP * tanh(s / CAP) when the constexpr CAP > 0, else s."""
        if CAP > 0:
            x = s / CAP
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(x < 0, -t, t) * CAP
        return s
