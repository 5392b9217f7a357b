"""Qwen2MoeForCausalLM: Qwen2 attention (q/k/v bias per `qkv_bias`) with sparse MoE blocks that
add a shared expert to the routed ones.

The shared expert is a dense SiLU MLP of `shared_expert_intermediate_size` every token goes
through, scaled by sigmoid(`shared_expert_gate`(x)); the routed experts follow the Qwen MoE rules
of qwen3_moe.py (sparse layers, `norm_topk_prob`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.moe import ExpertWeightsMixin, SparseMoeBlock, check_silu
from sglang.srt.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)
from sglang.srt.models.qwen3_moe import is_sparse_layer


class Qwen2MoeSparseMoeBlock(SparseMoeBlock):
    """Routed experts plus the gated shared expert (each TP-sharded and all-reduced)."""

    def __init__(self, config: Any) -> None:
        super().__init__(
            config.hidden_size,
            config.num_experts,
            config.moe_intermediate_size,
            config.num_experts_per_tok,
            renormalize=bool(getattr(config, "norm_topk_prob", False)),
        )
        self.shared_expert = LlamaMLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def make_attention(self, config: Any, layer_id: int) -> nn.Module:
        return LlamaAttention(config, layer_id, qkv_bias=bool(getattr(config, "qkv_bias", True)))

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        check_silu(config)
        if is_sparse_layer(config, layer_id):
            return Qwen2MoeSparseMoeBlock(config)
        return LlamaMLP(config.hidden_size, config.intermediate_size)


class Qwen2MoeModel(LlamaModel):
    layer_cls = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(ExpertWeightsMixin, LlamaForCausalLM):
    model_cls = Qwen2MoeModel


EntryClass = [Qwen2MoeForCausalLM]
