"""GPTQ checkpoints (`quant_method: gptq`): config checks and unpacking.

On disk, per quantized linear layer: `qweight` int32 [in/8, out] with input row 8k + j in bits
4j..4j+3; `qzeros` int32 [groups, out/8] packed along the output dim (column 8c + j in bits
4j..4j+3), stored as zero - 1 by the v1 format (AutoGPTQ, `checkpoint_format: gptq` or none) and
as zero by `gptq_v2`; `scales` fp16 [groups, out]; `g_idx` int32 [in], the group of each input
row (a permutation of row // group_size under `desc_act`). W[i, o] = (q - zero[g_idx[i], o]) *
scale[g_idx[i], o]. Symmetric checkpoints store their constant zero point like any other, so sym
and asym unpack alike. `unpack` returns the int4 path's canonical form (int4.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sglang.srt.layers.quantization.int4 import Int4Shard

TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQConfig:
    group_size: int  # -1: one group spanning all input rows
    desc_act: bool
    sym: bool
    zero_offset: int  # 1 for the v1 format, 0 for v2
    modules_to_not_convert: tuple[str, ...] = ()

    method = "gptq"

    @classmethod
    def from_dict(cls, qc: dict[str, Any]) -> GPTQConfig:
        """Raise ValueError naming the field for every GPTQ variant not implemented."""
        bits = qc.get("bits")
        if bits != 4:
            raise ValueError(f"GPTQ with bits={bits!r}: only 4-bit GPTQ is implemented")
        fmt = str(qc.get("checkpoint_format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"GPTQ checkpoint_format={fmt!r}: only gptq (v1) and gptq_v2 are implemented"
            )
        if qc.get("lm_head"):
            raise ValueError("GPTQ with a quantized lm_head (lm_head=true) is not implemented")
        if qc.get("dynamic"):
            raise ValueError("GPTQ per-module overrides ('dynamic') are not implemented")
        group = int(qc.get("group_size", 128))
        if group == 0 or group < -1:
            raise ValueError(f"GPTQ group_size={group}: expected -1 or a positive size")
        return cls(
            group_size=group,
            desc_act=bool(qc.get("desc_act", False)),
            sym=bool(qc.get("sym", True)),
            zero_offset=1 if fmt == "gptq" else 0,
            modules_to_not_convert=tuple(qc.get("modules_to_not_convert") or ()),
        )

    def tensor_names(self) -> tuple[str, ...]:
        return TENSOR_NAMES

    def unpack(self, tensors: dict[str, torch.Tensor]) -> Int4Shard:
        q = unpack_rows_int32(tensors["qweight"])  # [in, out]
        in_features, out_features = q.shape
        zeros = unpack_cols_int32(tensors["qzeros"]).float() + self.zero_offset
        scales = tensors["scales"]
        g_idx = tensors["g_idx"].to(torch.int64)
        if g_idx.shape != (in_features,):
            raise ValueError(
                f"GPTQ g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)"
            )
        groups = scales.shape[0]
        if zeros.shape != (groups, out_features) or scales.shape[1] != out_features:
            raise ValueError(
                f"GPTQ tensors disagree: qweight unpacks to {tuple(q.shape)}, scales "
                f"{tuple(scales.shape)}, qzeros {tuple(zeros.shape)}"
            )
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"GPTQ g_idx names groups outside 0..{groups - 1}")
        return Int4Shard(q=q.T.contiguous(), scales=scales, zeros=zeros, g_idx=g_idx)


def unpack_rows_int32(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows/8, cols], row 8k + j in bits 4j.. -> uint8 [rows, cols]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32).view(1, 8, 1)
    nibbles = (packed.to(torch.int32).unsqueeze(1) >> shifts) & 0xF  # [rows/8, 8, cols]
    return nibbles.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_cols_int32(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8], column 8c + j in bits 4j.. -> uint8 [rows, cols]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [rows, cols/8, 8]
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)
