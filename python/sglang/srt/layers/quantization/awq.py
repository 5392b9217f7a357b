"""AWQ checkpoints (`quant_method: awq`, GEMM packing): config checks and unpacking.

On disk, per quantized linear layer: `qweight` int32 [in, out/8], `qzeros` int32 [groups, out/8]
and `scales` fp16 [groups, out], groups of `group_size` consecutive input rows. Nibble i (bits
4i..4i+3) of a packed int32 holds output column 8c + AWQ_ORDER[i], and
W[in, out] = (q - zero[in // group]) * scale[in // group] with y = x @ W. `unpack` returns the
int4 path's canonical form (int4.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sglang.srt.layers.quantization.int4 import Int4Shard

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Position in the int32 of output column 8c + j: the inverse of AWQ_ORDER.
AWQ_INVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(8))
TENSOR_NAMES = ("qweight", "qzeros", "scales")


@dataclass(frozen=True)
class AWQConfig:
    group_size: int
    modules_to_not_convert: tuple[str, ...]

    method = "awq"

    @classmethod
    def from_dict(cls, qc: dict[str, Any]) -> AWQConfig:
        """Raise ValueError naming the field for every AWQ variant not implemented."""
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise ValueError(f"AWQ with bits={bits!r}: only 4-bit AWQ is implemented")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(
                f"AWQ version {version!r}: only the GEMM packing is implemented "
                "(GEMV and exllama/ipex packings are not)"
            )
        if not qc.get("zero_point", True):
            raise ValueError("AWQ with zero_point=false is not implemented")
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if group <= 0:
            raise ValueError(f"AWQ group_size={group}: a positive group size is required")
        return cls(group, tuple(qc.get("modules_to_not_convert") or ()))

    def tensor_names(self) -> tuple[str, ...]:
        return TENSOR_NAMES

    def unpack(self, tensors: dict[str, torch.Tensor]) -> Int4Shard:
        q = unpack_awq_int32(tensors["qweight"])  # [in, out]
        in_features, out_features = q.shape
        zeros = unpack_awq_int32(tensors["qzeros"])
        scales = tensors["scales"]
        groups = -(-in_features // self.group_size)
        if scales.shape != (groups, out_features) or zeros.shape != (groups, out_features):
            raise ValueError(
                f"AWQ tensors do not match group_size={self.group_size}: qweight unpacks to "
                f"{tuple(q.shape)}, scales {tuple(scales.shape)}, qzeros {tuple(zeros.shape)}"
            )
        g_idx = torch.arange(in_features) // self.group_size
        return Int4Shard(q=q.T.contiguous(), scales=scales, zeros=zeros.float(), g_idx=g_idx)


def unpack_awq_int32(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] in AWQ's interleaved nibble order -> uint8 [rows, cols]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [rows, cols/8, 8]
    nibbles = nibbles[..., list(AWQ_INVERSE_ORDER)]
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)
