"""Write FP8 checkpoints of a tiny model, and the dense model they dequantize to.

Tests quantize every decoder linear weight of a `make_tiny_model` folder to float8 e4m3 with the
scales each producer writes (python/sglang/srt/layers/quantization/fp8.py describes them): block
scales in `weight_scale_inv` under `quant_method: fp8` (DeepSeek-V3 / Qwen3 FP8), or per-channel /
per-tensor `weight_scale` under llm-compressor's compressed-tensors config, optionally with
per-layer `self_attn.k_scale` / `v_scale` for a float8 KV cache. A second, unquantized folder
holds the dequantized weights (q * scale in float32): HF transformers runs it as the reference.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from sglang.test.quantized_checkpoints import LINEAR_SUFFIXES, save_twins

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8 [out, in], scale float32 [ceil(out/bo), ceil(in/bi)]): per block amax / 448."""
    bo, bi = block
    out_features, in_features = w.shape
    rows, cols = -(-out_features // bo), -(-in_features // bi)
    padded = torch.zeros(rows * bo, cols * bi)
    padded[:out_features, :in_features] = w
    amax = padded.view(rows, bo, cols, bi).abs().amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    per_weight = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    q = (w / per_weight[:out_features, :in_features]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.float()


def quantize_rows(
    w: torch.Tensor, per_tensor: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8, scale) with one scale per output row ([out, 1]) or per tensor ([1])."""
    amax = w.abs().amax() if per_tensor else w.abs().amax(dim=1, keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    q = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(1) if per_tensor else scale


def write_fp8(
    tiny_folder: str,
    out_folder: str,
    ref_folder: str,
    form: str,
    *,
    block: tuple[int, int] = (128, 128),
    kv_scales: Optional[dict[int, tuple[float, float]]] = None,
) -> dict[str, Any]:
    """Write the `form` checkpoint of `tiny_folder` and its dequantized twin; returns the
    quantization_config written. form: `fp8-block`, `ct-channel` or `ct-tensor`.
    `kv_scales`: {layer: (k_scale, v_scale)} stored as `model.layers.N.self_attn.k_scale` etc."""
    state = load_file(os.path.join(tiny_folder, "model.safetensors"))
    with open(os.path.join(tiny_folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    quantized: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not name.endswith(LINEAR_SUFFIXES):
            quantized[name] = dense[name] = tensor
            continue
        prefix = name.removesuffix(".weight")
        if form == "fp8-block":
            q, scale = quantize_blocks(tensor.float(), block)
            quantized[f"{prefix}.weight_scale_inv"] = scale
            per_weight = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
            dense[name] = q.float() * per_weight[: q.shape[0], : q.shape[1]]
        else:
            # llm-compressor stores scales in the model's dtype; bfloat16 as for real models.
            q, scale = quantize_rows(tensor.float(), form == "ct-tensor", torch.bfloat16)
            quantized[f"{prefix}.weight_scale"] = scale
            dense[name] = q.float() * scale.float()
        quantized[name] = q
    for layer, (k_scale, v_scale) in (kv_scales or {}).items():
        quantized[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k_scale)
        quantized[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(v_scale)
    qc = quantization_config(form, block, kv_scales is not None)
    save_twins(tiny_folder, config, (out_folder, quantized, qc, "bfloat16"), (ref_folder, dense))
    return qc


def quantization_config(form: str, block: tuple[int, int], kv_scales: bool) -> dict[str, Any]:
    if form == "fp8-block":
        # As DeepSeek-V3 / Qwen3-FP8 (transformers' FineGrainedFP8Config) write it.
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": list(block),
        }
    # As llm-compressor's FP8_DYNAMIC scheme (compressed-tensors 0.10) writes it.
    args = dict(actorder=None, block_structure=None, group_size=None, num_bits=8, observer=None,
                observer_kwargs={}, symmetric=True, type="float")  # fmt: skip
    weights = dict(args, dynamic=False, observer="minmax", strategy=form.removeprefix("ct-"))
    kv = dict(args, dynamic=False, observer="minmax", strategy="tensor") if kv_scales else None
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": dict(args, dynamic=True, strategy="token"),
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": kv,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.10.2",
    }
