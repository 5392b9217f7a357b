"""Gemma3ForCausalLM (the text model): Gemma 2's graph with q/k norms and per-layer-type rope.

Differences from gemma2.py: each layer's `layer_types` entry (sliding / full) picks both its
window and its rotary embedding: local (sliding) layers rotate with their own base
(`rope_parameters["sliding_attention"]`, or `rope_local_base_freq` in older configs), global
layers with `rope_parameters["full_attention"]` (or `rope_theta` and `rope_scaling`), including
its linear scaling; q and k are (1 + w) RMS-normalised per head before rotary. Soft-capping is
off in Gemma 3 checkpoints but honoured when a config sets it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

from torch import nn

from sglang.srt.layers.rotary_embedding import get_rope, rope_config
from sglang.srt.models.gemma2 import (
    Gemma2Attention,
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2Model,
)

# transformers 5's default bases (Gemma3TextConfig.default_theta) when a config names none.
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def gemma3_rope(config: Any, layer_type: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(base, scaling) of the rotary embedding of `layer_type` layers, from any config version."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        sub = dict(params[layer_type])
        sub.setdefault("rope_theta", _DEFAULT_THETA[layer_type])
        return rope_config(SimpleNamespace(rope_parameters=sub))
    if layer_type == "sliding_attention":
        return float(getattr(config, "rope_local_base_freq", None) or 10_000.0), None
    theta, scaling = rope_config(config)
    if getattr(config, "rope_theta", None) is None:
        theta = _DEFAULT_THETA[layer_type]
    return theta, scaling


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    def make_attention(self, config: Any, layer_id: int) -> nn.Module:
        layer_type = config.layer_types[layer_id]
        if layer_type not in _DEFAULT_THETA:
            raise ValueError(f"Gemma 3 layer type {layer_type!r} is not supported")
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        theta, scaling = gemma3_rope(config, layer_type)
        rope = get_rope(head_dim, head_dim, theta, scaling)
        return Gemma2Attention(config, layer_id, rotary_emb=rope, qk_norm=True)


class Gemma3TextModel(Gemma2Model):
    layer_cls = Gemma3DecoderLayer


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_cls = Gemma3TextModel


EntryClass = [Gemma3ForCausalLM]
