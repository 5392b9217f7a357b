"""Llama-family decoder (Llama 2/3/3.1/3.2, SmolLM2) and the pieces Mistral/Qwen reuse.

Owns the module tree under HuggingFace weight names, the forward over a ForwardBatch, and
`load_weights`, which maps HF checkpoint names onto the stacked tensor-parallel parameters
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) and reports missing weights clearly.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from torch import nn

from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.cpu_decoder_layers import decoder_layers_for
from sglang.srt.layers.layer_probe import tap_layer
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.layers.radix_attention import RadixAttention, sliding_window_for_layer
from sglang.srt.layers.rotary_embedding import get_rope, partial_rotary_factor, rope_config
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

# (stacked parameter, HF name, shard id)
STACKED_PARAMS = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_id: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // total_heads
        self.qkv_proj = QKVParallelLinear(
            self.hidden_size, self.head_dim, total_heads, total_kv, bias=qkv_bias
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, self.hidden_size, bias=o_bias)
        theta, scaling = rope_config(config)
        rotary_dim = int(self.head_dim * partial_rotary_factor(config))
        self.rotary_emb = get_rope(self.head_dim, rotary_dim, theta, scaling)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attn = RadixAttention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            layer_id=layer_id,
            sliding_window_size=sliding_window_for_layer(config, layer_id),
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            n = q.shape[0]
            q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim)).reshape(n, self.q_size)
            k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim)).reshape(n, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v.contiguous(), forward_batch)
        return self.o_proj(attn_output)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        self.self_attn = self.make_attention(config, layer_id)
        self.mlp = self.make_mlp(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def make_attention(self, config: Any, layer_id: int) -> nn.Module:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaAttention(config, layer_id, qkv_bias=bias, o_bias=bias)

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        bias = bool(getattr(config, "mlp_bias", False))
        return LlamaMLP(config.hidden_size, config.intermediate_size, bias=bias)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        forward_batch: ForwardBatch,
        residual: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [self.layer_cls(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        fused = decoder_layers_for(self, hidden_states, forward_batch)
        if fused is not None:  # a CPU decode step: the layers in one C call
            runner, max_kv = fused
            hidden_states, residual = runner.run(positions, hidden_states, forward_batch, max_kv)
        else:
            residual = None
            for i, layer in enumerate(self.layers):
                hidden_states, residual = layer(positions, hidden_states, forward_batch, residual)
                tap_layer(forward_batch, i, hidden_states, residual, self.norm)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel

    def __init__(self, config: Any, quant_config: Any = None) -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError("quantized checkpoints are not supported yet")
        self.config = config
        self.model = self.model_cls(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> LogitsProcessorOutput:
        hidden_states = self.model(input_ids, positions, forward_batch)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            for stacked, hf_part, shard_id in STACKED_PARAMS:
                if f".{hf_part}." in name:
                    target = name.replace(f".{hf_part}.", f".{stacked}.")
                    if target in params:
                        params[target].weight_loader(params[target], tensor, shard_id)
                        loaded.add(f"{target}:{shard_id}")
                        break
            else:
                if name in params:
                    param = params[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(name)
                else:
                    unexpected.append(name)
        if unexpected:
            logger.warning(
                "ignored %d checkpoint tensors not used by the model: %s",
                len(unexpected),
                unexpected[:8],
            )
        missing = [n for n in self.expected_weight_keys() if n not in loaded]
        if missing:
            raise ValueError(
                f"checkpoint is missing {len(missing)} weights the model needs, e.g. {missing[:5]}; "
                "the weight files may be incomplete or for a different architecture"
            )

    def expected_weight_keys(self) -> list[str]:
        keys = []
        for name, param in self.named_parameters():
            stacked = next((s for s, _, _ in STACKED_PARAMS if f".{s}." in name), None)
            if stacked is None:
                keys.append(name)
            else:
                keys += [f"{name}:{sid}" for s, _, sid in STACKED_PARAMS if s == stacked]
        return keys


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is the Llama graph (GQA, optional sliding window handled by the attention mask)."""


EntryClass = [LlamaForCausalLM, MistralForCausalLM]
