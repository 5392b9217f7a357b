"""Model registry: HF `architectures` names -> model classes, imported lazily by module."""

from __future__ import annotations

import importlib

from torch import nn

# architecture name -> module under sglang.srt.models
_MODELS: dict[str, str] = {
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "Olmo2ForCausalLM": "olmo2",
    "Phi3ForCausalLM": "phi3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architectures: list[str]) -> type[nn.Module]:
    for arch in architectures or []:
        module = _MODELS.get(arch)
        if module is not None:
            return getattr(importlib.import_module(f"sglang.srt.models.{module}"), arch)
    raise ValueError(
        f"Model architectures {list(architectures or [])} are not supported. "
        f"Supported architectures: {', '.join(supported_architectures())}"
    )
