"""Qwen3ForCausalLM: the Llama graph with per-head RMSNorm on q and k before rotary."""

from __future__ import annotations

from typing import Any

from torch import nn

from sglang.srt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3DecoderLayer(LlamaDecoderLayer):
    def make_attention(self, config: Any, layer_id: int) -> nn.Module:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaAttention(config, layer_id, qkv_bias=bias, o_bias=bias, qk_norm=True)


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model


EntryClass = [Qwen3ForCausalLM]
