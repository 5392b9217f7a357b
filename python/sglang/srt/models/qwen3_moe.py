"""Qwen3MoeForCausalLM: Qwen3 attention (q/k RMSNorm) with sparse MoE blocks.

Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` stride, keep a dense MLP of
`intermediate_size`; the others route each token to its top `num_experts_per_tok` of `num_experts`
experts of `moe_intermediate_size`, the chosen weights rescaled to sum to 1 when `norm_topk_prob`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sglang.srt.layers.moe import ExpertWeightsMixin, SparseMoeBlock, check_silu
from sglang.srt.models.llama import LlamaForCausalLM, LlamaMLP, LlamaModel
from sglang.srt.models.qwen3 import Qwen3DecoderLayer


def is_sparse_layer(config: Any, layer_id: int) -> bool:
    """HF's rule for which Qwen MoE decoder layers have experts."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return (
        layer_id not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_id + 1) % step == 0
    )


def make_qwen_moe_mlp(config: Any, layer_id: int) -> nn.Module:
    check_silu(config)
    if not is_sparse_layer(config, layer_id):
        return LlamaMLP(config.hidden_size, config.intermediate_size)
    return SparseMoeBlock(
        config.hidden_size,
        config.num_experts,
        config.moe_intermediate_size,
        config.num_experts_per_tok,
        renormalize=bool(getattr(config, "norm_topk_prob", False)),
    )


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        return make_qwen_moe_mlp(config, layer_id)


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(ExpertWeightsMixin, LlamaForCausalLM):
    model_cls = Qwen3MoeModel


EntryClass = [Qwen3MoeForCausalLM]
