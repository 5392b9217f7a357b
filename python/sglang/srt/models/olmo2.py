"""Olmo2ForCausalLM: OLMo 2, the Llama graph with post-norms and whole-projection q/k norms.

Owns what differs from Llama: no norm before attention or MLP, an RMSNorm after each of them
(`post_attention_layernorm`, `post_feedforward_layernorm`) before the residual add, and RMSNorms
over the whole q and k projections (all heads at once, not per head). Under tensor parallelism each
rank holds only its heads, so the q/k norms sum their squares across the TP group. OLMo's RMSNorm
multiplies by the weight in float32 before casting back (Llama's casts first); this module keeps
that order so half-precision runs round as HF does.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from sglang.srt.layers.layer_probe import tap_layer
from sglang.srt.layers.linear import _copy_checked
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.models.utils import refuse_int4
from sglang.srt.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Olmo2RMSNorm(nn.Module):
    """y = (w * x / rms(x)).to(x.dtype), statistics and weight multiply in float32."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def mean_square(self, xf: torch.Tensor) -> torch.Tensor:
        return xf.pow(2).mean(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(self.mean_square(xf) + self.variance_epsilon)
        return (self.weight * xf).to(x.dtype)


class HeadShardedRMSNorm(Olmo2RMSNorm):
    """Olmo2RMSNorm over a projection whose heads are split across TP ranks.

    Each rank holds `local_heads` heads; head h of this rank is global head
    `(rank // replicas) * local_heads + h` (`replicas` > 1 when KV heads are replicated because the
    TP size exceeds their number). The mean square is the all-reduced sum of squares over every
    rank's columns, which counts a replicated head `replicas` times and divides by as many columns.
    """

    def __init__(self, local_heads: int, head_dim: int, eps: float, replicas: int = 1) -> None:
        super().__init__(local_heads * head_dim, eps)
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.replicas = replicas
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, *_: object) -> None:
        size = param.shape[0]
        shard = loaded_weight.narrow(0, (self.tp_rank // self.replicas) * size, size)
        with torch.no_grad():
            _copy_checked(param.data, shard, "head-sharded norm weight")

    def mean_square(self, xf: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().mean_square(xf)
        total = tensor_model_parallel_all_reduce(xf.pow(2).sum(-1, keepdim=True))
        return total / (xf.shape[-1] * self.tp_size)


class Olmo2Attention(LlamaAttention):
    def __init__(self, config: Any, layer_id: int) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, layer_id, qkv_bias=bias, o_bias=bias)
        eps = config.rms_norm_eps
        self.q_norm = HeadShardedRMSNorm(self.num_heads, self.head_dim, eps)
        self.k_norm = HeadShardedRMSNorm(
            self.num_kv_heads, self.head_dim, eps, replicas=self.qkv_proj.kv_replicas
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        q, k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        return self.o_proj(self.attn(q, k, v.contiguous(), forward_batch))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_id)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size)
        eps = config.rms_norm_eps
        self.post_attention_layernorm = Olmo2RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = Olmo2RMSNorm(config.hidden_size, eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        attn = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        return hidden_states + self.post_feedforward_layernorm(self.mlp(hidden_states))


class Olmo2Model(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [Olmo2DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(positions, hidden_states, forward_batch)
            tap_layer(forward_batch, i, hidden_states, None, self.norm)
        return self.norm(hidden_states)


class Olmo2ForCausalLM(LlamaForCausalLM):
    """Llama's LM head, logits and checkpoint loader (q/k/v and gate/up stacking) over OLMo 2."""

    model_cls = Olmo2Model

    def __init__(self, config: Any, quant_config: Any = None) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"OLMo 2 with hidden_act {act!r} is not supported (silu)")
        super().__init__(config, quant_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        refuse_int4(self)
        super().load_weights(weights)


EntryClass = [Olmo2ForCausalLM]
