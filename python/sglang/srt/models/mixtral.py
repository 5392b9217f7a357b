"""MixtralForCausalLM: the Mistral graph with a sparse MoE block in place of the dense MLP.

Each token goes to its top `num_experts_per_tok` of `num_local_experts` experts, weighted by a
softmax over the chosen experts' router logits (layers/moe.py). Checkpoints name the block
`block_sparse_moe` (router `gate`, experts `w1`/`w3`/`w2`); the loader reads it as `mlp`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sglang.srt.layers.moe import ExpertWeightsMixin, SparseMoeBlock, check_silu
from sglang.srt.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        check_silu(config)
        return SparseMoeBlock(
            config.hidden_size,
            config.num_local_experts,
            config.intermediate_size,
            config.num_experts_per_tok,
            renormalize=True,
        )


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(ExpertWeightsMixin, LlamaForCausalLM):
    model_cls = MixtralModel


EntryClass = [MixtralForCausalLM]
