"""Phi3ForCausalLM: Phi-3 / Phi-3.5 / Phi-4-mini dense models, the Llama graph with fused weights.

HF checkpoints store q, k and v as one `qkv_proj` tensor and gate/up as one `gate_up_proj` tensor;
`load_weights` splits them into the per-projection tensors Llama's loader shards across TP ranks.
Partial rotary (`partial_rotary_factor`) and the sliding window come from the config through the
Llama layers. LongRoPE checkpoints (the 128k variants) are refused by the rotary layer.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from sglang.srt.models.utils import refuse_int4
from sglang.srt.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any, quant_config: Any = None) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Phi-3 with hidden_act {act!r} is not supported (silu)")
        super().__init__(config, quant_config)

    def split_fused(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's fused tensors as the separate q/k/v and gate/up tensors Llama loads."""
        config = self.config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        q_size = config.num_attention_heads * head_dim
        kv_size = (config.num_key_value_heads or config.num_attention_heads) * head_dim
        for name, tensor in weights:
            if ".qkv_proj." in name:
                parts = tensor.split([q_size, kv_size, kv_size], dim=0)
                for part_name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                    yield name.replace(".qkv_proj.", f".{part_name}."), part
            elif ".gate_up_proj." in name:
                gate, up = tensor.chunk(2, dim=0)
                yield name.replace(".gate_up_proj.", ".gate_proj."), gate
                yield name.replace(".gate_up_proj.", ".up_proj."), up
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        refuse_int4(self)
        super().load_weights(self.split_fused(weights))


EntryClass = [Phi3ForCausalLM]
