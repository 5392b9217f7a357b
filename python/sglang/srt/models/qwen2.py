"""Qwen2ForCausalLM: the Llama graph with biases on q/k/v (none on o_proj)."""

from __future__ import annotations

from typing import Any

from torch import nn

from sglang.srt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen2DecoderLayer(LlamaDecoderLayer):
    def make_attention(self, config: Any, layer_id: int) -> nn.Module:
        return LlamaAttention(config, layer_id, qkv_bias=True, o_bias=False)


class Qwen2Model(LlamaModel):
    layer_cls = Qwen2DecoderLayer


class Qwen2ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2Model


EntryClass = [Qwen2ForCausalLM]
