"""Gemma2ForCausalLM, and the pieces Gemma 3's text model reuses.

Owns the Gemma 2 graph under HF weight names: embeddings scaled by sqrt(hidden_size), four
(1 + w) RMSNorms per block (before and after attention, before and after the MLP), a GELU-tanh
gated MLP, attention scaled by `query_pre_attn_scalar ** -0.5` whose scores are soft-capped by
`attn_logit_softcapping` (RadixAttention's `logit_cap`: every backend and the attention capture
cap before the softmax), sliding windows on the layers `layer_types` marks, and final logits
soft-capped by `final_logit_softcapping`. Weight loading is Llama's (stacked q/k/v and gate/up).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.layers.layer_probe import tap_layer
from sglang.srt.layers.layernorm import GemmaRMSNorm
from sglang.srt.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.radix_attention import RadixAttention, sliding_window_for_layer
from sglang.srt.layers.rotary_embedding import RotaryEmbedding, get_rope, rope_config
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.models.llama import LlamaForCausalLM

# HF activation names of Gemma's gated MLP -> torch's gelu `approximate` argument.
_GELU_APPROXIMATE = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


def gemma_activation(config: Any) -> str:
    """The `approximate` mode of the config's GELU; other activations are refused."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if name not in _GELU_APPROXIMATE:
        raise ValueError(
            f"Gemma MLP activation {name!r} is not supported ({', '.join(_GELU_APPROXIMATE)})"
        )
    return _GELU_APPROXIMATE[name]


def check_causal(config: Any) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            "use_bidirectional_attention (Gemma embedding models) is not supported: "
            "the engine serves causal language models"
        )


class Gemma2MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, approximate: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)


class Gemma2Attention(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_id: int,
        rotary_emb: Optional[RotaryEmbedding] = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv, bias=bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=bias)
        if rotary_emb is None:
            theta, scaling = rope_config(config)
            rotary_emb = get_rope(self.head_dim, self.head_dim, theta, scaling)
        self.rotary_emb = rotary_emb
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attn = RadixAttention(
            self.num_heads,
            self.head_dim,
            float(config.query_pre_attn_scalar) ** -0.5,
            num_kv_heads=self.num_kv_heads,
            layer_id=layer_id,
            logit_cap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
            sliding_window_size=sliding_window_for_layer(config, layer_id),
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        if self.qk_norm:
            n = q.shape[0]
            q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim)).reshape(n, self.q_size)
            k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim)).reshape(n, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v.contiguous(), forward_batch))


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = self.make_attention(config, layer_id)
        self.mlp = Gemma2MLP(hidden, config.intermediate_size, gemma_activation(config))
        self.input_layernorm = GemmaRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps=eps)

    def make_attention(self, config: Any, layer_id: int) -> nn.Module:
        return Gemma2Attention(config, layer_id)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden_states), forward_batch)
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp)


class Gemma2Model(nn.Module):
    layer_cls = Gemma2DecoderLayer

    def __init__(self, config: Any) -> None:
        super().__init__()
        check_causal(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [self.layer_cls(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.embed_scale = float(config.hidden_size) ** 0.5

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        # HF rounds sqrt(hidden) to the weights' dtype before multiplying (55.4 -> 55.5 in bf16).
        hidden_states = hidden_states * torch.tensor(self.embed_scale, dtype=hidden_states.dtype)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(positions, hidden_states, forward_batch)
            tap_layer(forward_batch, i, hidden_states, None, self.norm)
        return self.norm(hidden_states)


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model

    def __init__(self, config: Any, quant_config: Any = None) -> None:
        super().__init__(config, quant_config)
        self.logits_processor = LogitsProcessor(
            config.vocab_size, getattr(config, "final_logit_softcapping", None)
        )


EntryClass = [Gemma2ForCausalLM]
