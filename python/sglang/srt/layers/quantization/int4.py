"""The int4 weight path shared by AWQ and GPTQ: canonical unpacked form, repacking, matmul.

Format modules (awq.py, gptq.py) turn a checkpoint's packed tensors into `Int4Shard`s: 4-bit
codes `q` [out, in] (0..15), and per group and output column a scale and a zero point, with
`g_idx[i]` naming the group of input column i, so that W[o, i] = (q - zero) * scale taken at
group g_idx[i]. The linear layers call `Int4LinearMethod.apply`; the weights stay 4-bit in
memory in one of two forms, chosen once per process (`SGLANG_INT4_MATMUL`):

- `int4pack` (default on CPU): PyTorch's CPU int4 GEMM, `aten._weight_int4pack_mm_for_cpu`,
  on weights repacked at load by `aten._convert_weight_to_int4pack_for_cpu`. The kernel computes
  (q - 8) * scale + (8 - zero) * scale, an algebraically equal but differently rounded form, and
  wants contiguous groups of 32/64/128/256 columns: act-order checkpoints get their input columns
  sorted by group (the activations are gathered the same way).
- `dequant`: two codes per byte; each forward dequantizes the layer's weight to the activation
  dtype with exactly (q - zero) * scale (float32 arithmetic) and runs a dense matmul, so float32
  results equal HF transformers on the dequantized weights. Also the path on CUDA, and the
  fallback for shapes the CPU kernel does not take.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
MATMUL_CHOICES = ("int4pack", "dequant")


@dataclass
class Int4Shard:
    """One weight matrix in canonical form (see the module docstring)."""

    q: torch.Tensor  # uint8 [out, in], values 0..15
    scales: torch.Tensor  # float [groups, out]
    zeros: torch.Tensor  # float [groups, out], in code units
    g_idx: torch.Tensor  # int64 [in]

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in float32: (q - zero) * scale, the formats' own formula."""
        scales = self.scales.float()[self.g_idx].T
        zeros = self.zeros.float()[self.g_idx].T
        return (self.q.float() - zeros) * scales


def merge_shards(shards: list[Int4Shard]) -> list[Int4Shard]:
    """Stack consecutive shards along the output dim when they group input columns alike.

    q/k/v (and gate/up) see the same input, so quantizers give them the same `g_idx`; when they
    do not, the shards stay separate matmuls whose outputs are concatenated.
    """
    merged: list[Int4Shard] = []
    for shard in shards:
        last = merged[-1] if merged else None
        if last is not None and torch.equal(last.g_idx, shard.g_idx):
            # Group ids index scale rows; both shards use the same ids, so stacking the columns
            # of their scale tables keeps every lookup valid.
            rows = max(last.scales.shape[0], shard.scales.shape[0])
            merged[-1] = Int4Shard(
                q=torch.cat([last.q, shard.q]),
                scales=torch.cat([_pad_rows(last.scales, rows), _pad_rows(shard.scales, rows)], 1),
                zeros=torch.cat([_pad_rows(last.zeros, rows), _pad_rows(shard.zeros, rows)], 1),
                g_idx=last.g_idx,
            )
        else:
            merged.append(shard)
    return merged


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])


def matmul_choice(device: torch.device) -> str:
    """The int4 matmul for this process: `SGLANG_INT4_MATMUL`, else int4pack on CPU."""
    wanted = os.environ.get("SGLANG_INT4_MATMUL", "").strip().lower()
    if wanted and wanted not in MATMUL_CHOICES:
        raise ValueError(f"SGLANG_INT4_MATMUL={wanted!r}; expected one of {MATMUL_CHOICES}")
    if device.type != "cpu":
        # NOTE: no int4 GPU kernel is built here yet; dequantize per forward on the device.
        return "dequant"
    return wanted or "int4pack"


def _kernel_layout(shard: Int4Shard) -> Optional[tuple[Optional[torch.Tensor], int]]:
    """(input permutation or None, kernel group size) when the CPU kernel can take `shard`.

    After sorting input columns by group, every group must be one contiguous run of the same
    length; the kernel group size is then the largest supported size dividing that length.
    """
    out_features, in_features = shard.q.shape
    if out_features % 16 != 0:
        return None
    perm = torch.argsort(shard.g_idx, stable=True)
    sorted_groups = shard.g_idx[perm]
    counts = torch.bincount(sorted_groups)
    counts = counts[counts > 0]
    run = int(counts[0])
    if not bool((counts == run).all()) or in_features % run != 0:
        return None
    size = next((g for g in KERNEL_GROUP_SIZES if run % g == 0), None)
    if size is None:
        return None
    identity = bool((perm == torch.arange(in_features)).all())
    return (None if identity else perm), size


class PackedInt4:
    """One int4 matmul in the CPU kernel's layout."""

    label = "int4pack (aten._weight_int4pack_mm_for_cpu)"

    def __init__(self, shard: Int4Shard, perm: Optional[torch.Tensor], group: int, dtype) -> None:
        q, scales, zeros, g_idx = shard.q, shard.scales.float(), shard.zeros.float(), shard.g_idx
        if perm is not None:
            q, g_idx = q[:, perm], g_idx[perm]
        # One (scale, zero) row per kernel group, taken at the group's first column.
        firsts = g_idx[::group]
        s, z = scales[firsts], zeros[firsts]  # [in / group, out]
        self.perm = perm
        self.group = group
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 1
        )
        self.scales_zeros = torch.stack([s, (8.0 - z) * s], -1).to(dtype).contiguous()
        self.out_features = q.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        extra = [] if self.perm is None else [self.perm]
        return [self.weight, self.scales_zeros, *extra]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.weight, self.group, self.scales_zeros
        )


class DequantInt4:
    """One int4 weight kept as two codes per byte, dequantized at every forward."""

    label = "dequant (dense matmul on weights dequantized per forward)"

    def __init__(self, shard: Int4Shard, device: torch.device) -> None:
        q = shard.q
        if q.shape[1] % 2:
            q = torch.cat([q, q.new_zeros(q.shape[0], 1)], 1)
        self.in_features = shard.q.shape[1]
        self.codes = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous().to(device)
        self.scales = shard.scales.to(device)
        self.zeros = shard.zeros.to(device=device, dtype=torch.uint8)
        self.g_idx = shard.g_idx.to(device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales, self.zeros, self.g_idx]

    def weight(self) -> torch.Tensor:
        q = torch.stack([self.codes & 0xF, self.codes >> 4], -1).flatten(1)[:, : self.in_features]
        scales = self.scales.float()[self.g_idx].T
        zeros = self.zeros.float()[self.g_idx].T
        return (q.float() - zeros) * scales

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class Int4LinearMethod:
    """The matmuls of one linear layer: one per merged shard, outputs concatenated."""

    def __init__(self, shards: list[Int4Shard], dtype: torch.dtype, device: torch.device) -> None:
        self.kind = matmul_choice(device)
        self.parts: list[PackedInt4 | DequantInt4] = []
        for shard in merge_shards(shards):
            layout = _kernel_layout(shard) if self.kind == "int4pack" else None
            if layout is not None and dtype in (torch.float32, torch.bfloat16, torch.float16):
                self.parts.append(PackedInt4(shard, layout[0], layout[1], dtype))
            else:
                self.parts.append(DequantInt4(shard, device))
        self.kinds = sorted({part.label for part in self.parts})

    def tensors(self) -> list[torch.Tensor]:
        return [t for part in self.parts for t in part.tensors()]

    def apply(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        outs = [part(x2) for part in self.parts]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        out = out.reshape(*shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out
