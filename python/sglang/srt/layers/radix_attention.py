"""RadixAttention: the attention layer models call; the backend does the work.

Owns a layer's attention geometry (heads on this rank, head dim, scaling, sliding window) and the
hand-off to `forward_batch.attn_backend`. When the attention-capture feature asks for this layer,
the backend also returns per-head log-sum-exp and the capture object receives (q, lse).
`k_scale`/`v_scale` are the per-tensor scales of its K/V in a float8 KV pool; they stay 1.0, as
upstream's do for a checkpoint without scales (checkpoints that carry scales are quantized ones,
which the loader refuses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch


class RadixAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scaling: float,
        num_kv_heads: int,
        layer_id: int,
        sliding_window_size: int = -1,
    ) -> None:
        super().__init__()
        self.tp_q_head_num = num_heads
        self.tp_k_head_num = num_kv_heads
        self.tp_v_head_num = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.layer_id = layer_id
        self.sliding_window_size = sliding_window_size if sliding_window_size else -1
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        capture = forward_batch.attention_capture
        if capture is not None and capture.wants_layer(self.layer_id):
            out, lse = forward_batch.attn_backend.forward(
                q, k, v, self, forward_batch, save_kv_cache, return_lse=True
            )
            capture.record(self, q, lse, forward_batch)
            return out
        return forward_batch.attn_backend.forward(q, k, v, self, forward_batch, save_kv_cache)
