"""Quantized weights: which checkpoint methods load, and which `--quantization` values mean them.

`QUANT_CONFIGS` maps a checkpoint's `quant_method` to its config class (each rejects the variants
it does not implement with a ValueError); `FLAG_METHODS` maps every accepted `--quantization`
value to the checkpoint method it serves. The Marlin names are kernel choices upstream: here they
run the same int4 path (int4.py), and the loader logs so. ModelConfig parses the config
(model_loader/quantization.py), the loader attaches the int4 layers (int4_linear.py).
"""

from __future__ import annotations

from typing import Union

from sglang.srt.layers.quantization.awq import AWQConfig
from sglang.srt.layers.quantization.gptq import GPTQConfig

QuantConfig = Union[AWQConfig, GPTQConfig]

QUANT_CONFIGS: dict[str, type[AWQConfig] | type[GPTQConfig]] = {
    "awq": AWQConfig,
    "gptq": GPTQConfig,
}
FLAG_METHODS: dict[str, str] = {
    "awq": "awq",
    "awq_marlin": "awq",
    "gptq": "gptq",
    "gptq_marlin": "gptq",
}

__all__ = ["FLAG_METHODS", "QUANT_CONFIGS", "AWQConfig", "GPTQConfig", "QuantConfig"]
