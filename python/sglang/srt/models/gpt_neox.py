"""GPTNeoXForCausalLM: GPT-NeoX and the Pythia suite.

Owns the NeoX graph: LayerNorms with bias, parallel residual (attention and MLP both read the
block input and are summed with it) or the sequential form when `use_parallel_residual` is off,
rotary on the first `rotary_pct` of each head's dims only, GELU MLP and an untied output embedding
(`embed_out`). HF fuses q, k and v per head ([heads, 3, head_dim] rows in `query_key_value`);
`load_weights` regroups them into the q/k/v shards of the tensor-parallel QKV layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sglang.srt.layers.activation import Activation
from sglang.srt.layers.layer_probe import tap_layer
from sglang.srt.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope, partial_rotary_factor, rope_config
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.models.utils import Routed, RoutedCausalLM


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        self.head_dim = hidden // total_heads
        bias = bool(getattr(config, "attention_bias", True))
        self.query_key_value = QKVParallelLinear(
            hidden, self.head_dim, total_heads, total_heads, bias=bias
        )
        self.num_heads = self.query_key_value.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.dense = RowParallelLinear(hidden, hidden, bias=bias)
        theta, scaling = rope_config(config)
        rotary_dim = int(self.head_dim * partial_rotary_factor(config))
        self.rotary_emb = get_rope(self.head_dim, rotary_dim, theta, scaling)
        self.attn = RadixAttention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_heads,
            layer_id=layer_id,
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden_states).split([self.q_size] * 3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v.contiguous(), forward_batch))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act = Activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        self.use_parallel_residual = bool(getattr(config, "use_parallel_residual", True))
        eps = config.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = GPTNeoXAttention(config, layer_id)
        self.mlp = GPTNeoXMLP(config)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        attn = self.attention(positions, self.input_layernorm(hidden_states), forward_batch)
        # NOTE: the additions keep HF's order, so float32 sums round identically.
        if self.use_parallel_residual:
            mlp = self.mlp(self.post_attention_layernorm(hidden_states))
            return mlp + attn + hidden_states
        attn = attn + hidden_states
        return self.mlp(self.post_attention_layernorm(attn)) + attn


class GPTNeoXModel(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [GPTNeoXLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        hidden_states = self.embed_in(input_ids)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(positions, hidden_states, forward_batch)
            tap_layer(forward_batch, i, hidden_states, None, self.final_layer_norm)
        return self.final_layer_norm(hidden_states)


class GPTNeoXForCausalLM(RoutedCausalLM):
    stacked = {"query_key_value": ("q", "k", "v")}

    def __init__(self, config: Any, quant_config: Any = None) -> None:
        super().__init__(config, quant_config)
        gpt_neox = GPTNeoXModel(config)
        self.attach("gpt_neox", gpt_neox, "embed_out", gpt_neox.embed_in, tie_default=False)

    def route(self, name: str, tensor: torch.Tensor) -> list[Routed]:
        # Buffers older checkpoints saved beside the weights (causal mask, rotary frequencies).
        if name.endswith((".attention.bias", ".attention.masked_bias", ".inv_freq")):
            return []
        if name == "embed_out.weight" and self.tie_word_embeddings:
            return []
        if ".query_key_value." in name:
            heads = self.config.num_attention_heads
            # Rows are [head][q|k|v][head_dim]: regroup into all q rows, all k rows, all v rows.
            per_head = tensor.view(heads, 3, -1, *tensor.shape[1:])
            q, k, v = (per_head[:, i].reshape(-1, *tensor.shape[1:]) for i in range(3))
            return [Routed(name, q, "q"), Routed(name, k, "k"), Routed(name, v, "v")]
        return [Routed(name, tensor)]


EntryClass = [GPTNeoXForCausalLM]
