"""GPT2LMHeadModel: GPT-2 (small to XL), with learned absolute positions and no rotary.

Owns the GPT-2 graph (pre-LayerNorm blocks with biases, GELU MLP, embeddings tied to the LM head
unless the config unties them) and the checkpoint mapping: HF stores every projection as a Conv1D
with a transposed [in, out] weight, and c_attn fuses q, k and v, which `load_weights` transposes and
splits into the tensor-parallel q/k/v shards. Checkpoints saved without the `transformer.` prefix
(the original OpenAI conversion) load too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sglang.srt.layers.activation import Activation
from sglang.srt.layers.layer_probe import tap_layer
from sglang.srt.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.models.utils import Routed, RoutedCausalLM


class GPT2Attention(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        self.head_dim = hidden // total_heads
        self.c_attn = QKVParallelLinear(hidden, self.head_dim, total_heads, total_heads, bias=True)
        self.num_heads = self.c_attn.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        scaling = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scaling /= float(layer_id + 1)
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, scaling, num_kv_heads=self.num_heads, layer_id=layer_id
        )

    def forward(self, hidden_states: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.c_attn(hidden_states).split([self.q_size] * 3, dim=-1)
        return self.c_proj(self.attn(q, k, v.contiguous(), forward_batch))


class GPT2MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)
        self.act = Activation(getattr(config, "activation_function", "gelu_new"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_id)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden_states: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), forward_batch)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # Learned positions: replicated on every rank (n_positions x hidden is small).
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList([GPT2Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for i, block in enumerate(self.h):
            hidden_states = block(hidden_states, forward_batch)
            tap_layer(forward_batch, i, hidden_states, None, self.ln_f)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(RoutedCausalLM):
    stacked = {"c_attn": ("q", "k", "v")}

    def __init__(self, config: Any, quant_config: Any = None) -> None:
        super().__init__(config, quant_config)
        transformer = GPT2Model(config)
        self.attach("transformer", transformer, "lm_head", transformer.wte, tie_default=True)

    def route(self, name: str, tensor: torch.Tensor) -> list[Routed]:
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"
        # Causal-mask buffers that older transformers saved with the weights.
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return []
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return []
        conv1d = ".attn.c_" in name or ".mlp.c_" in name
        if conv1d and name.endswith(".weight"):
            tensor = tensor.t()  # Conv1D keeps [in, out]; the linear layers hold [out, in]
        if ".c_attn." in name:
            q, k, v = tensor.chunk(3, dim=0)
            return [Routed(name, q, "q"), Routed(name, k, "k"), Routed(name, v, "v")]
        return [Routed(name, tensor)]


EntryClass = [GPT2LMHeadModel]
