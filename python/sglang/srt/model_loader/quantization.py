"""Refuse checkpoints whose weights are quantized in a way the loader does not implement.

A checkpoint's config.json may carry a `quantization_config` (FP8, compressed-tensors, AWQ,
GPTQ, bitsandbytes, ...): its weight files then hold packed integers or low-precision values
plus scales. Loading those tensors as if they were plain weights runs without an error and
generates garbage, so ModelConfig calls `check_quantization_config` right after reading the
config and start-up stops with a ModelLoadError naming the method. GGUF files are not affected:
their quantized tensors are dequantized at load (gguf_utils.py).
"""

from __future__ import annotations

from typing import Any

from sglang.srt.model_loader.resolve import ModelLoadError

# quant_method values whose weights the loader can read. None yet: quantized checkpoints are
# refused until a later change implements them.
SUPPORTED_QUANT_METHODS: frozenset[str] = frozenset()


def quant_method_of(hf_config: Any) -> str | None:
    """The checkpoint's quantization method, or None for plain weights.

    Looks at the top-level config and, for multimodal wrappers, the text config.
    """
    for config in (hf_config, getattr(hf_config, "text_config", None)):
        qc = getattr(config, "quantization_config", None)
        if qc is None:
            continue
        if not isinstance(qc, dict):
            qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
        method = qc.get("quant_method")
        if method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
            method = "bitsandbytes"  # older bitsandbytes configs name no method
        return str(method or "unknown")
    return None


def check_quantization_config(hf_config: Any, model_path: str) -> None:
    """Raise ModelLoadError when the checkpoint is quantized with a method not implemented."""
    method = quant_method_of(hf_config)
    if method is None or method in SUPPORTED_QUANT_METHODS:
        return
    raise ModelLoadError(
        f"Model {model_path} is quantized (quantization_config.quant_method={method!r}), "
        "which this server does not load yet; serve an unquantized (fp16/bf16/fp32) checkpoint "
        "or a GGUF file"
    )
