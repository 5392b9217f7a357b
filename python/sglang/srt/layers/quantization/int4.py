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
  results equal HF transformers on the dequantized weights. The fallback for shapes the CPU
  kernel does not take, and on CUDA without Triton.
- `triton` (default on CUDA with Triton): the same two-codes-per-byte layout, multiplied by the
  Triton int4 GEMM `sgl_kernel.int4_gemm` (imported when the first layer is built), which
  dequantizes tiles in registers with the same formula; act-order `g_idx` is read in-kernel.
  CPU tensors run it only under Triton's interpreter (the tests).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


KERNEL_GROUP_SIZES = (256, 128, 64, 32)
# From this many activation rows on, float32 int4pack layers dequantize and run a dense matmul
# (PackedInt4); measured crossover in benchmark/results/int4_matmul_cpu.md.
DENSE_MIN_ROWS = 4
MATMUL_CHOICES = ("int4pack", "dequant", "triton")


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
    """The int4 matmul for this process: `SGLANG_INT4_MATMUL`, else int4pack on CPU and triton
    on CUDA (dequant there when Triton is missing)."""
    from sgl_kernel.triton_common import triton_usable

    wanted = os.environ.get("SGLANG_INT4_MATMUL", "").strip().lower()
    if wanted and wanted not in MATMUL_CHOICES:
        raise ValueError(f"SGLANG_INT4_MATMUL={wanted!r}; expected one of {MATMUL_CHOICES}")
    if wanted == "triton" and not triton_usable(device):
        raise ValueError(
            "SGLANG_INT4_MATMUL=triton needs Triton and a CUDA device (or TRITON_INTERPRET=1)"
        )
    if wanted == "int4pack" and device.type != "cpu":
        raise ValueError(f"SGLANG_INT4_MATMUL=int4pack is a CPU kernel; the device is {device}")
    if wanted:
        return wanted
    if device.type == "cpu":
        return "int4pack"
    return "triton" if triton_usable(device) else "dequant"


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


def dequantize_grouped(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int
) -> torch.Tensor:
    """W [out, in] float32 = (q - zero) * scale for contiguous groups of `group` input columns.

    q: uint8 [out, in]; zeros, scales: [out, in / group]. One rounding per weight, the formats'
    own formula.
    """
    out_features, in_features = q.shape
    w = q.float().view(out_features, -1, group)
    w.sub_(zeros.float().unsqueeze(-1)).mul_(scales.float().unsqueeze(-1))
    return w.view(out_features, in_features)


def unpack_int4pack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Codes uint8 [out, in] back from `aten._convert_weight_to_int4pack_for_cpu`'s layout.

    The AVX512 build stores output rows in blocks of 64: per block and input column, 32 bytes,
    byte d holding rows d (low nibble) and d + 32 (high), byte 16 + d rows d + 16 and d + 48; a
    last partial block of 16, 32 or 48 rows stores rows n and n + 1 in one byte.
    `int4pack_layout_known` checks this on the running build before anyone relies on it.
    """
    flat = packed.reshape(-1)
    out = torch.empty(out_features, in_features, dtype=torch.uint8, device=packed.device)
    full = out_features // 64 * 64
    if full:
        block = flat[: full * in_features // 2].view(full // 64, in_features, 2, 16)
        low, high = block & 0xF, block >> 4
        rows = torch.stack([low[:, :, 0], low[:, :, 1], high[:, :, 0], high[:, :, 1]], 2)
        out[:full] = rows.reshape(full // 64, in_features, 64).permute(0, 2, 1).reshape(full, -1)
    rest = out_features - full
    if rest:
        tail = flat[full * in_features // 2 :].view(in_features, rest // 2)
        out[full:] = torch.stack([tail & 0xF, tail >> 4], -1).reshape(in_features, rest).T
    return out


@functools.cache
def int4pack_layout_known() -> bool:
    """True when `unpack_int4pack` inverts this build's packing (checked on a probe)."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (112, 64), generator=generator, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    return torch.equal(unpack_int4pack(packed, 112, 64), probe.to(torch.uint8))


class PackedInt4:
    """One int4 matmul in the CPU kernel's layout.

    With float32 activations the kernel is fast only for a few rows (decode): from
    `DENSE_MIN_ROWS` rows on (prefill), the weight is dequantized from the packed codes and a
    dense matmul runs instead, which measured many times faster
    (benchmark/results/int4_matmul_cpu.md). bfloat16/float16 activations always use the kernel.
    """

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
        self.out_features, self.in_features = q.shape
        # Per-group scale and zero kept as the checkpoint has them, for dense prefill.
        self.dense: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if dtype == torch.float32 and int4pack_layout_known():
            self.dense = (z.T.to(torch.uint8).contiguous(), shard.scales[firsts].T.contiguous())

    def tensors(self) -> list[torch.Tensor]:
        extra = [] if self.perm is None else [self.perm]
        dense = list(self.dense) if self.dense is not None else []
        return [self.weight, self.scales_zeros, *dense, *extra]

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] float32 (columns in kernel order) from the packed codes; float32 only."""
        assert self.dense is not None, "dense weights are kept for float32 activations only"
        codes = unpack_int4pack(self.weight, self.out_features, self.in_features)
        return dequantize_grouped(codes, *self.dense, self.group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.dense is not None and x.shape[0] >= DENSE_MIN_ROWS:
            return F.linear(x, self.dense_weight())
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
        self.in_features = in_features = shard.q.shape[1]
        self.codes = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous().to(device)
        # Contiguous equal groups (everything but act-order) dequantize by a reshape; otherwise
        # scales and zeros are gathered per column through g_idx.
        # (A row-parallel TP shard starts at some group `first`.)
        first = int(shard.g_idx[0])
        size = int((shard.g_idx == first).sum())
        self.group = (
            size
            if in_features % size == 0
            and bool((shard.g_idx == first + torch.arange(in_features) // size).all())
            else None
        )
        rows = slice(first, first + in_features // size) if self.group else slice(None)
        self.scales = shard.scales[rows].T.contiguous().to(device)  # [out, groups]
        self.zeros = shard.zeros[rows].T.contiguous().to(device=device, dtype=torch.uint8)
        self.g_idx = None if self.group else shard.g_idx.to(device)

    def tensors(self) -> list[torch.Tensor]:
        extra = [] if self.g_idx is None else [self.g_idx]
        return [self.codes, self.scales, self.zeros, *extra]

    def weight(self) -> torch.Tensor:
        """W [out, in] in float32, (q - zero) * scale (one rounding, as the formats define it)."""
        q = torch.stack([self.codes & 0xF, self.codes >> 4], -1).flatten(1)[:, : self.in_features]
        if self.group is None:
            zeros, scales = self.zeros.float()[:, self.g_idx], self.scales.float()[:, self.g_idx]
            return (q.float() - zeros) * scales
        return dequantize_grouped(q, self.zeros, self.scales, self.group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class TritonInt4(DequantInt4):
    """`DequantInt4`'s tensors multiplied by the Triton int4 GEMM (sgl_kernel.int4_gemm)."""

    label = "triton int4 GEMM (sgl_kernel.int4_gemm; 4-bit codes, dequantized in-kernel)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from sgl_kernel.int4_gemm import int4_linear

        return int4_linear(x, self.codes, self.scales, self.zeros, self.group, self.g_idx)


class Int4LinearMethod:
    """The matmuls of one linear layer: one per merged shard, outputs concatenated."""

    def __init__(self, shards: list[Int4Shard], dtype: torch.dtype, device: torch.device) -> None:
        self.kind = matmul_choice(device)
        self.parts: list[PackedInt4 | DequantInt4] = []
        for shard in merge_shards(shards):
            layout = _kernel_layout(shard) if self.kind == "int4pack" else None
            if layout is not None and dtype in (torch.float32, torch.bfloat16, torch.float16):
                self.parts.append(PackedInt4(shard, layout[0], layout[1], dtype))
            elif self.kind == "triton":
                self.parts.append(TritonInt4(shard, device))
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
