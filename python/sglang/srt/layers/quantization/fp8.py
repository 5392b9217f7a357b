"""FP8 weight checkpoints: the two config dialects, their scale layouts, and dequantization.

Two producers write float8 e4m3 weights, each `W[out, in] = q * scale` with q the stored float8
value:

- `quant_method: fp8` (DeepSeek-V3 / Qwen3 FP8, transformers' FineGrainedFP8): with
  `weight_block_size: [bo, bi]` each `*.weight` has a float32 `*.weight_scale_inv`
  [ceil(out/bo), ceil(in/bi)], one multiplier per block (despite the name, the stored value is
  multiplied in); without it (AutoFP8 style) a per-tensor `*.weight_scale`.
- `quant_method: compressed-tensors` (llm-compressor's FP8 / FP8_DYNAMIC schemes): `config_groups`
  whose weights are `num_bits: 8, type: float` with strategy `tensor` (scalar `weight_scale`),
  `channel` ([out, 1]) or `block` (`block_structure`).

Which layers are quantized is read from the weight files themselves (a float8 `weight`), so the
dialects' lists of dense modules (`modules_to_not_convert`, `ignore`) need no interpretation.

Only dynamic (per-token, computed at run time) or absent activation quantization is accepted:
static `input_scale` schemes are refused. Activations are not quantized here at all: the dense
path multiplies full-precision activations with the dequantized weights (docs/quantization.md).
`expand_scale` turns every layout into one canonical form, a scale per output row and block of
`block_in` input columns, which both matmuls (fp8_linear.py) use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fp8Config:
    """A parsed FP8 checkpoint config (either dialect)."""

    method: str  # "fp8" or "compressed-tensors"
    scale_name: str  # the checkpoint tensor beside each `weight`
    block: Optional[tuple[int, int]]  # (bo, bi) for block scales
    strategy: str  # "block", "channel" or "tensor"
    activations: str  # "dynamic" or "none" (weight-only)
    kv_cache_scheme: bool  # the checkpoint declares per-layer k/v scales

    bits = 8

    @classmethod
    def from_dict(cls, qc: dict[str, Any]) -> Fp8Config:
        """`quant_method: fp8`; ValueError naming the field for what is not implemented."""
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"FP8 fmt={fmt!r}: only e4m3 weights are implemented")
        scheme = str(qc.get("activation_scheme", "dynamic")).lower()
        if scheme != "dynamic":
            raise ValueError(
                f"FP8 activation_scheme={scheme!r}: static activation scales (input_scale) are "
                "not implemented; only dynamic"
            )
        block = qc.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or min(int(b) for b in block) <= 0:
                raise ValueError(f"FP8 weight_block_size={block!r}: expected two positive sizes")
            block = (int(block[0]), int(block[1]))
        return cls(
            method="fp8",
            scale_name="weight_scale_inv" if block else "weight_scale",
            block=block,
            strategy="block" if block else "tensor",
            activations="dynamic",
            kv_cache_scheme=False,
        )

    def describe(self) -> dict[str, Any]:
        """The quantization fields of /get_model_info (without the kernel)."""
        granularity = {"block": list(self.block or ()), "channel": "channel", "tensor": "tensor"}
        return {
            "method": self.method,
            "bits": self.bits,
            "weight_dtype": "float8_e4m3fn",
            "group_size": granularity[self.strategy],
            "activation_scheme": self.activations,
        }


class CompressedTensorsConfig(Fp8Config):
    """`quant_method: compressed-tensors`: only its FP8 weight schemes load (as Fp8Config)."""

    @classmethod
    def from_dict(cls, qc: dict[str, Any]) -> Fp8Config:
        """ValueError naming the field for every scheme that is not FP8 as implemented here."""
        fmt = qc.get("format")
        if fmt not in (None, "float-quantized", "naive-quantized"):
            raise ValueError(
                f"compressed-tensors format {fmt!r}: only float-quantized (FP8) is implemented"
            )
        groups = qc.get("config_groups") or {}
        if not groups:
            raise ValueError("compressed-tensors config without config_groups")
        schemes = {_weight_scheme(name, group) for name, group in groups.items()}
        if len(schemes) != 1:
            raise ValueError(
                f"compressed-tensors config_groups use different FP8 schemes {sorted(schemes)}; "
                "one scheme for all quantized layers is implemented"
            )
        strategy, block, activations = schemes.pop()
        kv = qc.get("kv_cache_scheme")
        if kv is not None:
            if kv.get("type") != "float" or int(kv.get("num_bits", 0)) != 8:
                raise ValueError(f"compressed-tensors kv_cache_scheme {kv}: only 8-bit float")
            if str(kv.get("strategy", "tensor")) != "tensor":
                raise ValueError("compressed-tensors kv_cache_scheme: only per-tensor scales")
        return Fp8Config(
            method="compressed-tensors",
            scale_name="weight_scale",
            block=block,
            strategy=strategy,
            activations=activations,
            kv_cache_scheme=kv is not None,
        )


def _weight_scheme(name: str, group: dict[str, Any]) -> tuple[str, Optional[tuple[int, int]], str]:
    """(strategy, block, activations) of one compressed-tensors config group."""
    weights = group.get("weights") or {}
    kind, bits = weights.get("type"), int(weights.get("num_bits", 0))
    if kind != "float" or bits != 8:
        raise ValueError(
            f"compressed-tensors group {name!r}: weights {bits}-bit {kind}; only 8-bit float "
            "(FP8) weights are implemented (int4/int8 compressed-tensors are not)"
        )
    if weights.get("dynamic"):
        raise ValueError(f"compressed-tensors group {name!r}: dynamic weight scales")
    if not weights.get("symmetric", True):
        raise ValueError(f"compressed-tensors group {name!r}: asymmetric FP8 weights")
    strategy = str(weights.get("strategy", "tensor"))
    block = None
    if strategy == "block":
        structure = weights.get("block_structure")
        if not structure or len(structure) != 2:
            raise ValueError(f"compressed-tensors group {name!r}: block without block_structure")
        block = (int(structure[0]), int(structure[1]))
    elif strategy not in ("tensor", "channel"):
        raise ValueError(
            f"compressed-tensors group {name!r}: weight strategy {strategy!r}; tensor, channel "
            "and block are implemented"
        )
    acts = group.get("input_activations")
    if acts is None:
        return strategy, block, "none"
    if not acts.get("dynamic", False):
        raise ValueError(
            f"compressed-tensors group {name!r}: static input activation scales (input_scale) "
            "are not implemented; only dynamic"
        )
    return strategy, block, "dynamic"


def expand_scale(
    scale: torch.Tensor, out_features: int, in_features: int, block: Optional[tuple[int, int]]
) -> tuple[torch.Tensor, int]:
    """(scales float32 [out, ceil(in / block_in)], block_in) for any stored scale layout:
    a scalar (per tensor), [out] / [out, 1] (per channel) or [ceil(out/bo), ceil(in/bi)]."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(out_features, 1).contiguous(), in_features
    if scale.numel() == out_features and (scale.dim() == 1 or scale.shape[-1] == 1):
        return scale.reshape(out_features, 1).contiguous(), in_features
    if block is not None:
        bo, bi = block
        want = (-(-out_features // bo), -(-in_features // bi))
        if tuple(scale.shape) == want:
            return scale.repeat_interleave(bo, 0)[:out_features].contiguous(), bi
    raise ValueError(
        f"weight scale of shape {tuple(scale.shape)} does not fit a [{out_features}, "
        f"{in_features}] weight with block {block}"
    )


def dequantize(q: torch.Tensor, rows: torch.Tensor, block_in: int) -> torch.Tensor:
    """W [out, in] float32 = q * scale, one multiplication per weight (the formats' formula).

    `rows`, `block_in`: the canonical scales of `expand_scale`.
    """
    in_features = q.shape[1]
    per_column = rows.repeat_interleave(block_in, 1)[:, :in_features]
    return q.float() * per_column
