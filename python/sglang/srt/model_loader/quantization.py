"""Read a checkpoint's quantization config, and refuse what the loader does not implement.

A checkpoint's config.json may carry a `quantization_config` (older GPTQ folders: a separate
quantize_config.json): its weight files then hold packed integers plus scales. ModelConfig calls
`check_quantization_config` right after reading the config; it returns the parsed config of a
method the int4 path implements (AWQ GEMM, GPTQ; layers/quantization/) and otherwise raises a
one-line ModelLoadError naming the method or field, because loading packed tensors as plain
weights would run and generate garbage. It also checks `--quantization` against the checkpoint.
GGUF files are not affected: their quantized tensors are dequantized at load (gguf_utils.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from sglang.srt.model_loader.resolve import ModelLoadError

QUANTIZE_CONFIG_FILE = "quantize_config.json"


def quantization_config_dict(hf_config: Any, model_path: str = "") -> Optional[dict[str, Any]]:
    """The checkpoint's quantization config as a dict, or None for plain weights.

    Looks at the top-level config and, for multimodal wrappers, the text config, then at a
    quantize_config.json beside config.json (AutoGPTQ's older layout, always GPTQ).
    """
    for config in (hf_config, getattr(hf_config, "text_config", None)):
        qc = getattr(config, "quantization_config", None)
        if qc is None:
            continue
        if not isinstance(qc, dict):
            qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
        return dict(qc)
    path = os.path.join(model_path, QUANTIZE_CONFIG_FILE) if os.path.isdir(model_path) else ""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            qc = json.load(f)
        qc.setdefault("quant_method", "gptq")
        return qc
    return None


def quant_method_of(hf_config: Any, model_path: str = "") -> str | None:
    """The checkpoint's quantization method, or None for plain weights."""
    qc = quantization_config_dict(hf_config, model_path)
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"  # older bitsandbytes configs name no method
    return str(method or "unknown").lower()


def check_quantization_config(
    hf_config: Any, model_path: str, requested: Optional[str] = None
) -> Any:
    """The parsed quantization config (None for plain weights); ModelLoadError when the method,
    one of its settings, or `requested` (the `--quantization` value) is not served."""
    from sglang.srt.layers.quantization import FLAG_METHODS, QUANT_CONFIGS

    method = quant_method_of(hf_config, model_path)
    if requested is not None:
        wanted = FLAG_METHODS.get(requested)
        if wanted is None:
            raise ModelLoadError(
                f"--quantization {requested} is not supported; supported: {', '.join(FLAG_METHODS)}"
            )
        if method != wanted:
            found = f"quant_method={method!r}" if method else "no quantization_config"
            raise ModelLoadError(
                f"--quantization {requested} needs a {wanted.upper()} checkpoint, but model "
                f"{model_path} has {found}; quantizing at load time is not supported"
            )
    if method is None:
        return None
    if method not in QUANT_CONFIGS:
        raise ModelLoadError(
            f"Model {model_path} is quantized (quantization_config.quant_method={method!r}), "
            f"which this server does not load; supported: {', '.join(QUANT_CONFIGS)} (4-bit), "
            "or serve an unquantized (fp16/bf16/fp32) checkpoint or a GGUF file"
        )
    try:
        return QUANT_CONFIGS[method].from_dict(quantization_config_dict(hf_config, model_path))
    except ValueError as exc:
        raise ModelLoadError(f"Model {model_path}: {exc}") from exc
