"""Write AWQ and GPTQ checkpoints of a tiny model, and the dense model they dequantize to.

Tests quantize every decoder linear weight of a `make_tiny_model` folder to 4 bits, pack the codes
in the format's exact on-disk layout (python/sglang/srt/layers/quantization/awq.py and gptq.py
describe it), write config.json with the `quantization_config` the producing library writes, and
save a second, unquantized folder whose weights are the dequantized ones: HF transformers runs
that folder in float32 as the reference.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from sglang.srt.layers.quantization.awq import AWQ_ORDER

LINEAR_SUFFIXES = tuple(
    f"{p}.weight"
    for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
# Modules fed the same input share their act-order permutation, as GPTQ quantizers give them.
_SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def _as_int32(values: torch.Tensor) -> torch.Tensor:
    # A sum of eight nibbles can exceed 2**31; the file stores the same 32 bits as signed int32.
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes -> int32 [rows, cols/8], column 8c + AWQ_ORDER[i] in nibble i."""
    grouped = codes.to(torch.int64).reshape(codes.shape[0], -1, 8)[..., list(AWQ_ORDER)]
    return _as_int32((grouped << torch.arange(0, 32, 4)).sum(-1))


def pack_gptq_rows(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes -> int32 [rows/8, cols], row 8k + j in nibble j (GPTQ qweight)."""
    grouped = codes.to(torch.int64).reshape(-1, 8, codes.shape[1])
    return _as_int32((grouped << torch.arange(0, 32, 4).view(1, 8, 1)).sum(1))


def pack_gptq_cols(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes -> int32 [rows, cols/8], column 8c + j in nibble j (GPTQ qzeros)."""
    grouped = codes.to(torch.int64).reshape(codes.shape[0], -1, 8)
    return _as_int32((grouped << torch.arange(0, 32, 4)).sum(-1))


def quantize(
    weight: torch.Tensor, g_idx: torch.Tensor, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round W [out, in] to 4 bits per group of input columns (`g_idx`).

    Returns codes [in, out] (0..15), fp16 scales [groups, out], integer zeros [groups, out] and
    the dequantized W [out, in] in float32, (q - zero) * scale with the stored fp16 scale.
    """
    w = weight.float().T  # [in, out]
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, w.shape[1])
    zeros = torch.empty(groups, w.shape[1])
    for g in range(groups):
        rows = w[g_idx == g]
        if sym:
            scales[g] = rows.abs().amax(0).clamp_min(1e-6) / 7
            zeros[g] = 8
        else:
            lo, hi = rows.amin(0).clamp_max(0), rows.amax(0).clamp_min(0)
            scales[g] = (hi - lo).clamp_min(1e-6) / 15
            zeros[g] = torch.round(-lo / scales[g]).clamp(min_zero, 15)
    scales = scales.half()
    s, z = scales.float()[g_idx], zeros[g_idx]
    codes = torch.clamp(torch.round(w / s) + z, 0, 15)
    dequant = ((codes - z) * s).T.contiguous()
    return codes.to(torch.uint8), scales, zeros.to(torch.int64), dequant


def _group_index(
    name: str, in_features: int, group: int, desc_act: bool, seed: int, perms: dict
) -> torch.Tensor:
    """The g_idx of weight `name`: row // group, or under act-order a permuted assignment."""
    size = in_features if group == -1 else group
    if not desc_act:
        return torch.arange(in_features) // size
    parent, _, leaf = name.removesuffix(".weight").rpartition(".")
    key = f"{parent}.{_SAME_INPUT.get(leaf, leaf)}"
    if key not in perms:
        generator = torch.Generator().manual_seed(seed + len(perms))
        perms[key] = torch.randperm(in_features, generator=generator)
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[perms[key]] = torch.arange(in_features) // size
    return g_idx


def write_quantized(
    tiny_folder: str,
    out_folder: str,
    ref_folder: str,
    method: str,
    group_size: int = 32,
    *,
    desc_act: bool = False,
    sym: bool = True,
    checkpoint_format: str = "gptq",
    seed: int = 0,
    share_perms: bool = True,
) -> dict[str, Any]:
    """Write the `method` (awq|gptq) checkpoint of `tiny_folder` and its dequantized twin.

    Returns the quantization_config written. `share_perms=False` gives q/k/v (and gate/up)
    different act-order permutations, which quantizers do not produce but the format allows.
    """
    state = load_file(os.path.join(tiny_folder, "model.safetensors"))
    with open(os.path.join(tiny_folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    packed: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    perms: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not name.endswith(LINEAR_SUFFIXES):
            packed[name] = dense[name] = tensor
            continue
        prefix = name.removesuffix(".weight")
        in_features = tensor.shape[1]
        if method == "awq":
            g_idx = torch.arange(in_features) // group_size
            codes, scales, zeros, dequant = quantize(tensor, g_idx, sym=False)
            packed[f"{prefix}.qweight"] = pack_awq(codes)
            packed[f"{prefix}.qzeros"] = pack_awq(zeros)
            packed[f"{prefix}.scales"] = scales
        else:
            key_perms = perms if share_perms else {}
            g_idx = _group_index(name, in_features, group_size, desc_act, seed, key_perms)
            if not share_perms:
                seed += 1
            # v1 stores zero - 1 in a nibble, so a zero point of 0 cannot be written.
            min_zero = 1 if checkpoint_format == "gptq" else 0
            codes, scales, zeros, dequant = quantize(tensor, g_idx, sym=sym, min_zero=min_zero)
            offset = 1 if checkpoint_format == "gptq" else 0
            packed[f"{prefix}.qweight"] = pack_gptq_rows(codes)
            packed[f"{prefix}.qzeros"] = pack_gptq_cols(zeros - offset)
            packed[f"{prefix}.scales"] = scales
            packed[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        dense[name] = dequant
    qc = _quantization_config(method, group_size, desc_act, sym, checkpoint_format)
    save_twins(tiny_folder, config, (out_folder, packed, qc, "float16"), (ref_folder, dense))
    return qc


def save_twins(
    tiny_folder: str,
    config: dict[str, Any],
    quantized: tuple[str, dict[str, torch.Tensor], dict[str, Any], str],
    reference: tuple[str, dict[str, torch.Tensor]],
) -> None:
    """Write the quantized folder (tensors, config.json with its quantization_config and the
    producer's torch_dtype) and the dense reference folder, each with the tiny model's side files."""
    out_folder, packed, qc, torch_dtype = quantized
    ref_folder, dense = reference
    for folder, tensors, extra in ((out_folder, packed, qc), (ref_folder, dense, None)):
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        written = dict(config)
        if extra is not None:
            written["quantization_config"] = extra
            written["torch_dtype"] = torch_dtype
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(written, f, indent=2)
        if os.path.isfile(os.path.join(tiny_folder, "generation_config.json")):
            shutil.copy(os.path.join(tiny_folder, "generation_config.json"), folder)


def _quantization_config(
    method: str, group_size: int, desc_act: bool, sym: bool, checkpoint_format: Optional[str]
) -> dict[str, Any]:
    if method == "awq":
        # As AutoAWQ writes it (transformers' AwqConfig fields).
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    # As optimum / AutoGPTQ write it.
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": 0.1,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": checkpoint_format,
    }
