"""Quantized weights: which checkpoint methods load, and which `--quantization` values mean them.

`QUANT_CONFIGS` maps a checkpoint's `quant_method` to its config class (each rejects the variants
it does not implement with a ValueError); `FLAG_METHODS` maps every accepted `--quantization`
value to the checkpoint method it serves. The Marlin names are kernel choices upstream: here they
run the same int4 path (int4.py), and the loader logs so. ModelConfig parses the config
(model_loader/quantization.py), the loader attaches the int4 layers (int4_linear.py) or the FP8
ones (fp8.py, fp8_linear.py); kv_cache.py reads checkpoint k/v scales for a float8 KV cache.
"""

from __future__ import annotations

from typing import Union

from sglang.srt.layers.quantization.awq import AWQConfig
from sglang.srt.layers.quantization.fp8 import CompressedTensorsConfig, Fp8Config
from sglang.srt.layers.quantization.gptq import GPTQConfig

QuantConfig = Union[AWQConfig, GPTQConfig, Fp8Config]

QUANT_CONFIGS: dict[str, type[AWQConfig] | type[GPTQConfig] | type[Fp8Config]] = {
    "awq": AWQConfig,
    "gptq": GPTQConfig,
    "fp8": Fp8Config,
    "compressed-tensors": CompressedTensorsConfig,
}
FLAG_METHODS: dict[str, str] = {
    "awq": "awq",
    "awq_marlin": "awq",
    "gptq": "gptq",
    "gptq_marlin": "gptq",
    "fp8": "fp8",
    "compressed-tensors": "compressed-tensors",
}

__all__ = [
    "FLAG_METHODS",
    "QUANT_CONFIGS",
    "AWQConfig",
    "CompressedTensorsConfig",
    "Fp8Config",
    "GPTQConfig",
    "QuantConfig",
]
