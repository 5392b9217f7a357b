"""GGUF block-quantized tensors kept packed: Q4_0 / Q4_1 / Q4_K / Q8_0 linear weights on CPU.

Every format here stores, per block of 32 weights along a row, codes q and values that make each
weight an affine function of its code: w = q * scale + bias, with

- Q4_0 (18-byte blocks): scale = d, bias = -8 d (w = d (q - 8));
- Q4_1 (20-byte blocks): scale = d, bias = m;
- Q4_K (144-byte super-blocks of 256): eight 32-wide sub-blocks with 6-bit scale/min codes sc, mn:
  scale = d sc, bias = -dmin mn;
- Q8_0 (34-byte blocks of signed bytes s): q = s + 128, scale = d, bias = -128 d.

`decode_blocks` turns a tensor's raw blocks into (codes, scale, bias). The matmul is
sgl_kernel's GGUF kernel (`GGUFCpuGemm`, sgl_kernel/cpu_gemm_gguf.py): the weight stays in its
GGUF bits (repacked so 16 output columns interleave), activations float32 or bfloat16 are
quantized to int8 per 32-block inside each call and multiplied with VNNI integer dot products,
as llama.cpp does; that rounding is the only difference from a matmul on the dequantized weight
(measured in docs/quantization.md). So the default float32 dtype gets packed weights too.
Where that kernel cannot run (no C compiler, not x86-64 Linux) or `SGLANG_CPU_GGUF_GEMM=0`, the
4-bit formats use `aten._weight_int4pack_mm_for_cpu` (`GGUFInt4`, bfloat16/float16 activations
only: its float32 path measured ~10x slower than dense) and Q8_0 stays dense.

`attach_gguf` swaps the model's linear layers whose GGUF tensors are all packable for
placeholders before `load_weights`, so the raw blocks (yielded by
gguf_utils.iterate_gguf_weights) go through the model's own name mapping and q/k/v, gate/up
stacking; each layer packs as soon as its parts are in. `--gguf-dequantize` keeps every tensor
dense (float32 or the model dtype), the exact path. The LM head and embedding load dense as
before (a tied head is the embedding table).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import nn

from sglang.srt.layers.quantization.gguf_tp import (
    columns_of_rank,
    local_shape,
    row_split_problem,
    rows_of_rank,
)

if TYPE_CHECKING:
    from sglang.srt.configs.model_config import ModelConfig

logger = logging.getLogger(__name__)

BLOCK = 32  # weights per scale/bias pair in every packed format (Q4_K: per sub-block)
PACKED_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # the 4-bit formats (both kernels)
GEMM_TYPES = (*PACKED_TYPES, "Q8_0")  # sgl_kernel's GGUF kernel
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # activations of the int4pack kernel
GEMM_DTYPES = (torch.float32, torch.bfloat16)  # activations of sgl_kernel's GGUF kernel
KERNEL_LABEL = "int4pack (aten._weight_int4pack_mm_for_cpu), group 32"
# 0: the int4pack kernel for 4-bit tensors (bf16/fp16 only) and Q8_0 dense, as before the kernel.
GEMM_ENV = "SGLANG_CPU_GGUF_GEMM"
# Checkpoint names of the parts a stacked layer is loaded from (the models' STACKED_PARAMS).
_HF_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class GGUFBlocks:
    """One GGUF tensor's raw blocks, yielded in place of a dequantized weight.

    raw: uint8 [rows, bytes per row] (rows already in HF order); qtype: a PACKED_TYPES name.
    """

    raw: torch.Tensor
    qtype: str
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.raw.shape[0]), self.in_features


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are elements 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_blocks(raw: np.ndarray, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 [rows, cols] and float32 scale, bias [rows, cols / 32] with
    w = q * scale + bias, from a tensor's raw blocks uint8 [rows, bytes per row]."""
    rows = raw.shape[0]
    if qtype == "Q4_0":
        blocks = raw.reshape(rows, -1, 18)
        d = _f16(blocks[..., :2]).reshape(rows, -1)
        codes = _low_high(blocks[..., 2:])
        scale, bias = d, -8.0 * d
    elif qtype == "Q4_1":
        blocks = raw.reshape(rows, -1, 20)
        d = _f16(blocks[..., :2]).reshape(rows, -1)
        m = _f16(blocks[..., 2:4]).reshape(rows, -1)
        codes = _low_high(blocks[..., 4:])
        scale, bias = d, m
    elif qtype == "Q8_0":
        blocks = raw.reshape(rows, -1, 34)
        d = _f16(blocks[..., :2]).reshape(rows, -1)
        signed = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        codes = (signed.astype(np.int16) + 128).astype(np.uint8)
        scale, bias = d, -128.0 * d
    elif qtype == "Q4_K":
        blocks = raw.reshape(rows, -1, 144)
        d = _f16(blocks[..., :2])  # [rows, supers, 1]
        dmin = _f16(blocks[..., 2:4])
        sc, mn = _q4k_scale_min(blocks[..., 4:16])  # [rows, supers, 8]
        # 128 bytes: four chunks of 32, each the low nibbles of sub-block 2c, high of 2c + 1.
        qs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-2)  # [rows, supers, 4, 2, 32]
        scale = (d * sc.astype(np.float32)).reshape(rows, -1)
        bias = -(dmin * mn.astype(np.float32)).reshape(rows, -1)
    else:
        raise ValueError(f"GGUF type {qtype} is not a packed type ({GEMM_TYPES})")
    codes = codes.reshape(rows, -1)
    return (
        torch.from_numpy(np.ascontiguousarray(codes)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)),
    )


def _q4k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (llama.cpp's get_scale_min_k4):
    bytes 0-3 / 4-7 hold scales / mins 0-3 in their low 6 bits and the top 2 bits of scales /
    mins 4-7; bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high)."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, mn


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """W [rows, cols] float32 = q * scale + bias per 32-wide block (one rounding per weight)."""
    rows = codes.shape[0]
    w = codes.float().view(rows, -1, BLOCK) * scale.unsqueeze(-1)
    return (w + bias.unsqueeze(-1)).view(rows, -1)


class GGUFInt4:
    """One packed matmul: y = x @ W.T with W from 4-bit codes, on PyTorch's CPU int4 kernel."""

    label = KERNEL_LABEL

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), 1
        )
        # Kernel weight (q - 8) * s + z; z computed in float32, then both cast to the activation
        # dtype the kernel requires.
        zero = bias + 8.0 * scale
        self.scales_zeros = torch.stack([scale.T, zero.T], -1).to(dtype).contiguous()

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scales_zeros]

    def apply(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]), self.weight, BLOCK, self.scales_zeros
        )
        out = out.reshape(*shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out


def gemm_kernel():
    """sgl_kernel.cpu_gemm_gguf when it runs here and is not switched off, else None."""
    if os.environ.get(GEMM_ENV, "1") == "0":
        return None
    from sgl_kernel import cpu_gemm_gguf

    return cpu_gemm_gguf if cpu_gemm_gguf.available() else None


class GGUFCpuGemm:
    """One packed matmul on sgl_kernel's GGUF kernel: y = x @ W.T, x float32 or bfloat16.

    A layer whose parts mix 4-bit formats runs in the Q4_K form (float32 scales, exact for all).
    """

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, qtypes: set[str]
    ) -> None:
        from sgl_kernel import cpu_gemm_gguf

        self.qtype = next(iter(qtypes)) if len(qtypes) == 1 else "Q4_K"
        fmt = cpu_gemm_gguf.FORMATS[self.qtype]
        self.out_features = int(codes.shape[0])
        self.weight = cpu_gemm_gguf.pack(codes, scale, bias if fmt.has_min else None, self.qtype)
        self.label = (
            f"sgl_kernel cpu_gemm_gguf ({cpu_gemm_gguf.isa_name()}, "
            f"{cpu_gemm_gguf.activation_mode()} activations per 32-block)"
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def apply(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        from sgl_kernel.cpu_gemm_gguf import linear_gguf, linear_gguf_op

        if bias is not None:
            bias = bias.float().contiguous()
        if torch.compiler.is_compiling():
            return linear_gguf_op(x, self.weight, self.out_features, self.qtype, bias)
        return linear_gguf(x, self.weight, self.out_features, self.qtype, bias)


def _parts(layer_name: str) -> list[tuple[str, Any]]:
    """(HF weight name, shard id) of each checkpoint tensor a model layer is loaded from."""
    prefix, _, leaf = layer_name.rpartition(".")
    if leaf == "qkv_proj":
        return [(f"{prefix}.{p}.weight", s) for p, s in zip(_HF_PARTS[leaf], ("q", "k", "v"))]
    if leaf == "gate_up_proj":
        return [(f"{prefix}.{p}.weight", i) for i, p in enumerate(_HF_PARTS[leaf])]
    return [(f"{layer_name}.weight", None)]


class _GGUFLayerState:
    """Collects a layer's GGUFBlocks parts; packs them into one matmul when all are in
    (GGUFCpuGemm when `gemm`, else GGUFInt4)."""

    def __init__(
        self, layer: nn.Module, name: str, shard_ids: list[Any], dtype, gemm: bool
    ) -> None:
        self.layer = layer
        self.name = name
        self.shard_ids = shard_ids
        self.dtype = dtype
        self.gemm = gemm
        self.parts: dict[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.types: Counter[str] = Counter()
        self.method: Optional[GGUFCpuGemm | GGUFInt4] = None

    def add(self, blocks: Any, shard_id: Any) -> None:
        if not isinstance(blocks, GGUFBlocks) or shard_id not in self.shard_ids:
            raise ValueError(f"{self.name}: expected GGUF 4-bit blocks for part {shard_id!r}")
        rows = rows_of_rank(self.layer, shard_id)  # TP: this rank's part (gguf_tp.py)
        raw = blocks.raw if rows is None else blocks.raw[rows]
        codes, scale, bias = decode_blocks(raw.numpy(), blocks.qtype)
        self.parts[shard_id] = columns_of_rank(self.layer, codes, scale, bias)
        self.types[blocks.qtype] += 1
        if len(self.parts) < len(self.shard_ids):
            return
        # q/k/v (gate/up) share the input, so their rows stack into one matmul.
        ordered = [self.parts.pop(sid) for sid in self.shard_ids]
        codes, scale, bias = (torch.cat([p[i] for p in ordered]) for i in range(3))
        expected = local_shape(self.layer)
        if tuple(codes.shape) != expected:
            raise ValueError(
                f"{self.name}: GGUF tensors give {tuple(codes.shape)}, expected {expected}"
            )
        if self.gemm:
            self.method = GGUFCpuGemm(codes, scale, bias, set(self.types))
        else:
            self.method = GGUFInt4(codes, scale, bias, self.dtype)
        for i, tensor in enumerate(self.method.tensors()):
            self.layer.register_buffer(f"gguf_int4_{i}", tensor, persistent=False)

    def apply(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.method is None:
            raise RuntimeError(f"{self.name}: GGUF 4-bit weights were never loaded")
        return self.method.apply(x, bias)


def packable_reason(model_config: ModelConfig, device: str | torch.device) -> tuple[str, bool]:
    """(why this run keeps every GGUF tensor dense, '' when some may stay packed; whether the
    packed ones run on sgl_kernel's GGUF kernel rather than PyTorch's int4 kernel)."""
    if torch.device(device).type != "cpu":
        return "no GGUF GPU kernel is built here", False
    dtype = model_config.dtype
    if dtype in GEMM_DTYPES and gemm_kernel() is not None:
        return "", True
    if dtype in KERNEL_DTYPES:
        return "", False
    if os.environ.get(GEMM_ENV, "1") == "0":
        why = f"{GEMM_ENV}=0"
    elif dtype in GEMM_DTYPES:
        from sgl_kernel import cpu_gemm_gguf

        why = f"sgl_kernel's GGUF kernel cannot run here: {cpu_gemm_gguf.unavailable_reason()}"
    else:
        why = "sgl_kernel's GGUF kernel takes float32 and bfloat16 activations"
    return (
        f"the model dtype is {str(dtype).removeprefix('torch.')} and {why}; PyTorch's CPU int4 "
        "kernel's float32 path measured ~10x slower than a dense float32 matmul",
        False,
    )


def packs(part_types: set[Optional[str]], gemm: bool) -> bool:
    """Whether a layer whose checkpoint parts have these GGUF types stays packed: all 4-bit, or
    (on sgl_kernel's GGUF kernel, `gemm`) all Q8_0."""
    return part_types <= set(PACKED_TYPES) or (gemm and part_types == {"Q8_0"})


def attach_gguf(
    model: nn.Module, path: str, dtype: torch.dtype, gemm: bool = False
) -> frozenset[str]:
    """Give every linear layer whose GGUF tensors are all packable a collecting placeholder:
    with `gemm` (sgl_kernel's GGUF kernel) Q8_0 layers or layers whose parts are all 4-bit; else
    layers whose parts are all 4-bit (PyTorch's int4 kernel).

    Returns the HF names of the tensors to be yielded as GGUFBlocks; other tensors (Q6_K, F16,
    F32, a stacked layer mixing 8- and 4-bit parts) load dense as before.
    """
    from sglang.srt.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear
    from sglang.srt.model_loader.gguf_utils import gguf_tensor_types
    from sglang.srt.model_loader.resolve import ModelLoadError

    types = gguf_tensor_types(path)
    packed: set[str] = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase) or layer.quant_method is not None:
            continue
        parts = _parts(name)
        if isinstance(layer, (QKVParallelLinear, MergedColumnParallelLinear)) != (len(parts) > 1):
            continue  # a layer this naming does not describe: leave it dense
        if not packs({types.get(hf) for hf, _ in parts}, gemm):
            continue
        problem = row_split_problem(layer, name)
        if problem:
            raise ModelLoadError(f"Cannot load GGUF model {path}: {problem}")
        out_size, in_size = local_shape(layer)
        if (not gemm and out_size % 16) or in_size % BLOCK:
            continue  # shapes the kernel does not take
        state = _GGUFLayerState(layer, name, [sid for _, sid in parts], dtype, gemm)
        del layer.weight
        placeholder = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        placeholder.weight_loader = _make_loader(state)  # type: ignore[attr-defined]
        layer.register_parameter("weight", placeholder)
        layer.quant_method = state
        packed.update(hf for hf, _ in parts)
    return frozenset(packed)


def _make_loader(state: _GGUFLayerState):
    def loader(_param: nn.Parameter, blocks: Any, shard_id: Any = None) -> None:
        state.add(blocks, shard_id)

    return loader


def finish_gguf(model: nn.Module) -> dict[str, Any]:
    """Raise when a packed layer missed parts; return the counts for the log and model info."""
    layers, types, kernels = 0, Counter(), set()
    for name, layer in model.named_modules():
        state = getattr(layer, "quant_method", None)
        if not isinstance(state, _GGUFLayerState):
            continue
        if state.method is None:
            raise ValueError(f"GGUF file is missing packed tensors of {name}")
        layers += 1
        types.update(state.types)
        kernels.add(state.method.label)
    return {
        "layers": layers,
        "tensor_types": dict(sorted(types.items())),
        "kernel": "; ".join(sorted(kernels)),
    }


def load_gguf_packed(
    model: nn.Module, model_config: ModelConfig, weights: Iterable, device
) -> Iterable:
    """The weight stream for `model`: when this run can use a kernel, the packable layers get
    their placeholders now (before `load_weights` looks up parameters) and the stream yields
    their raw blocks; the rest stays dense. Logs and records what was packed once it ends."""
    reason, gemm = packable_reason(model_config, device)
    if reason:
        logger.info("GGUF: every tensor dequantized to dense weights at load (%s)", reason)
        return weights
    packed = attach_gguf(model, model_config.gguf_file, model_config.dtype, gemm)
    return _packed_stream(model, model_config.gguf_file, packed, gemm)


class _PackedHead:
    """An LM head's matmul on sgl_kernel's GGUF kernel (the logits processor calls `matmul`)."""

    def __init__(self, method: GGUFCpuGemm) -> None:
        self.method = method

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.method.apply(x, bias)


def attach_gguf_head(model: nn.Module, path: str) -> Optional[str]:
    """Run the LM head on sgl_kernel's GGUF kernel straight from the file's quantized rows
    (`output.weight`, or `token_embd.weight` when the embeddings are tied, which then stay dense
    for the lookup); returns the tensor's type, None when it stays dense (a type the kernel does
    not take, a vocabulary split across TP ranks). At one row the head is about half of a small
    model's decode matmul bytes: SmolLM2's Q8_0 rows are a quarter of its float32 head."""
    from sgl_kernel import cpu_gemm_gguf

    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_world_size
    from sglang.srt.model_loader.gguf_utils import open_gguf

    head = getattr(model, getattr(model, "head_name", "lm_head"), None)
    if head is None or get_tensor_model_parallel_world_size() != 1:
        return None
    tensors = {t.name: t for t in open_gguf(path).tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    qtype = None if tensor is None else tensor.tensor_type.name
    if qtype not in cpu_gemm_gguf.FORMATS:
        return None
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
    codes, scale, bias = decode_blocks(raw.numpy(), qtype)
    if codes.shape[1] % BLOCK or codes.shape[0] < getattr(model.config, "vocab_size", 0):
        return None
    method = GGUFCpuGemm(codes, scale, bias, {qtype})
    head.register_buffer("gguf_head_weight", method.weight, persistent=False)
    head.cpu_packed = _PackedHead(method)
    return qtype


def _packed_stream(model: nn.Module, path: str, packed: frozenset[str], gemm: bool) -> Iterator:
    from sglang.srt.model_loader.gguf_utils import iterate_gguf_weights
    from sglang.srt.model_loader.resolve import ModelLoadError

    yield from iterate_gguf_weights(path, packed=packed)
    try:
        info = finish_gguf(model)
    except ValueError as exc:
        raise ModelLoadError(f"Cannot load GGUF model {path}: {exc}") from exc
    head_type = attach_gguf_head(model, path) if gemm else None
    dense = Counter(gguf_dense_types(path, packed))
    if not info["layers"]:
        logger.info(
            "GGUF: no linear layer has only packable tensors; dequantized at load: %s",
            ", ".join(f"{n} {t}" for t, n in sorted(dense.items())),
        )
        return
    bits = sorted({8 if t == "Q8_0" else 4 for t in info["tensor_types"]})
    logger.info(
        "GGUF: %d linear layers packed %s-bit (%s tensors), matmul: %s; LM head: %s; dequantized "
        "at load: %s (--gguf-dequantize keeps every tensor dense)",
        info["layers"],
        "/".join(map(str, bits)),
        ", ".join(f"{n} {t}" for t, n in info["tensor_types"].items()),
        info["kernel"],
        f"packed {head_type} rows on the same kernel" if head_type else "dense",
        ", ".join(f"{n} {t}" for t, n in sorted(dense.items())) or "nothing",
    )
    # The loader's quantization summary (/get_model_info, start-up log).
    model.quant_info = {
        "method": "gguf",
        "bits": bits[0] if len(bits) == 1 else bits,
        "group_size": BLOCK,
        "kernel": info["kernel"],
        "quantized_tensors": sum(info["tensor_types"].values()),
        "tensor_types": info["tensor_types"],
        "lm_head": head_type or "dense",
    }


def gguf_dense_types(path: str, packed: frozenset[str]) -> list[str]:
    """GGUF types of the tensors that load dense (one entry per tensor)."""
    from sglang.srt.model_loader.gguf_utils import gguf_tensor_types

    return [t for name, t in gguf_tensor_types(path).items() if name not in packed]
