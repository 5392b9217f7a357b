"""RadixAttention: the attention layer models call; the backend does the work.

Owns a layer's attention geometry (heads on this rank, head dim, scaling, sliding window, the
soft-cap of its scores: `logit_cap`, upstream's name for `attn_logit_softcapping`) and the
hand-off to `forward_batch.attn_backend`. When the attention-capture feature asks for this layer,
the backend also returns per-head log-sum-exp and the capture object receives (q, lse).
`k_scale`/`v_scale` are the per-tensor scales of its K/V in a float8 KV pool: the checkpoint's
when it carries them (layers/quantization/kv_cache.py sets them at load), else 1.0 as upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch


def sliding_window_for_layer(config: Any, layer_id: int) -> int:
    """The sliding window of decoder layer `layer_id` (-1: full attention), for every model.

    HF's rule: `layer_types[layer_id] == "sliding_attention"` windows a layer (Gemma 2/3, and
    Qwen2/Qwen3 under transformers 5, whose configs derive it from `use_sliding_window` and
    `max_window_layers`). Configs without `layer_types` window layers >= `max_window_layers` when
    they have one (Qwen), else every layer (Mistral); `use_sliding_window: false` or no
    `sliding_window` means no window anywhere.
    """
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return -1
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if layer_types[layer_id] == "sliding_attention" else -1
    max_window_layers = getattr(config, "max_window_layers", None)
    if max_window_layers is not None and layer_id < int(max_window_layers):
        return -1
    return int(window)


class RadixAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scaling: float,
        num_kv_heads: int,
        layer_id: int,
        logit_cap: float = 0.0,
        sliding_window_size: int = -1,
    ) -> None:
        super().__init__()
        self.tp_q_head_num = num_heads
        self.tp_k_head_num = num_kv_heads
        self.tp_v_head_num = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.layer_id = layer_id
        self.logit_cap = float(logit_cap) if logit_cap and logit_cap > 0 else 0.0
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
