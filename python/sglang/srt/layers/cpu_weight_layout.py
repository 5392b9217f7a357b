"""CPU weight layout: dense matmul weights stored column-major after loading.

A linear layer's weight is `[out, in]` (the checkpoint's layout, which the loaders and TP sharding
rely on). `F.linear(x, w)` multiplies by `w.T`; on CPU, MKL's GEMM at decode's small row counts
runs faster when that `w.T` is a contiguous `[in, out]` matrix. So once the weights are loaded,
each dense weight keeps its shape and values but moves to the transposed storage (strides
`(1, out)`). The LM head and the embedding it may share move too: an embedding lookup then reads
strided rows, a few hundred elements per token. Only float32 weights left unpacked (below) move.
Measured on SmolLM2-135M, torch 2.13, a 2-core AVX-512 Xeon without bf16 instructions, idle
(benchmark/results/cpu_weight_layout.md): the float32 decode step is 3-23 % faster at batch 1, 8
and 32; bfloat16 was 4-16 % faster at batch 1 but 9-20 % slower at batch 32, so it stays row-major.

bfloat16 weights take another route when sgl_kernel's CPU bf16-weight GEMM can run here
(sgl_kernel/cpu_gemm.py: x86-64 with AVX-512F and a C compiler): each dense weight, and the LM
head, is packed once into that kernel's blocked layout and the kernel replaces F.linear. It widens
bf16 to float32 in registers, so it streams half the bytes of a float32 weight at float32 speed,
where PyTorch's bf16 GEMM on a CPU without native bf16 runs about 3x slower than float32 (idle
A/B in benchmark/results/cpu_bf16_gemm.md). A packed linear layer frees its row-major weight
(`weight` becomes an empty tensor); the LM head keeps it, because a tied head is also the
embedding table. `SGLANG_CPU_BF16_GEMM=0` keeps PyTorch's bf16 matmul.

float32 weights take the same packed route where PyTorch's float32 GEMM is slow: MKL, which
PyTorch's CPU wheels use, runs far below the machine's bandwidth on non-Intel CPUs (on a 2-core
AMD EPYC, Zen 4, SmolLM2's 49152 x 576 head at 16 rows: 44 ms column-major against 9 ms packed;
1.6-9.3x across its shapes at 1-64 rows, benchmark/results/cpu_f32_gemm.md). The kernel's
float32 entry is the bf16 one with plain loads. `SGLANG_CPU_F32_GEMM`: `auto` (default) packs
float32 weights on CPUs whose vendor is not GenuineIntel, `1` on any AVX-512 CPU, `0` never.

`SGLANG_CPU_WEIGHT_LAYOUT=row` keeps the checkpoint layout and PyTorch's matmul for every dtype
(for A/B measurements).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

LAYOUT_ENV = "SGLANG_CPU_WEIGHT_LAYOUT"
F32_ENV = "SGLANG_CPU_F32_GEMM"


def pack_f32_wanted() -> bool:
    """Whether float32 matmul weights go to the packed kernel (module docstring)."""
    mode = os.environ.get(F32_ENV, "auto")
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"{F32_ENV} must be 'auto', '1' or '0', not {mode!r}")
    from sgl_kernel.cpu_build import cpu_vendor

    return mode == "1" or (mode == "auto" and cpu_vendor() not in ("", "GenuineIntel"))


def use_column_major_weights(model: nn.Module) -> int:
    """Move every dense 2-D matmul weight of `model` to transposed storage; returns how many."""
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding

    layout = os.environ.get(LAYOUT_ENV, "column")
    if layout not in ("column", "row"):
        raise ValueError(f"{LAYOUT_ENV} must be 'column' or 'row', not {layout!r}")
    if layout == "row":
        return 0
    moved = 0
    for module in model.modules():
        dense = isinstance(module, LinearBase) and module.quant_method is None
        if not (dense or isinstance(module, VocabParallelEmbedding)):
            continue
        weight = getattr(module, "weight", None)
        if (
            not isinstance(weight, torch.Tensor)
            or weight.dim() != 2
            # bf16/fp16 stay row-major: no clear gain without native bf16 (module docstring).
            or weight.dtype != torch.float32
        ):
            continue
        if weight.stride() == (1, weight.shape[0]):
            continue  # already moved (a tied weight seen twice)
        # Assigning .data keeps the Parameter (and its weight_loader) and every module sharing it.
        weight.data = weight.data.t().contiguous().t()
        moved += 1
    logger.debug("CPU weight layout: %d matmul weights stored column-major", moved)
    return moved


class PackedCpuWeight(nn.Module):
    """A bf16 or float32 `[N, K]` weight in sgl_kernel's blocked layout, bias in float32.

    Held by a linear layer as `cpu_packed` (and by an LM head); its buffers count in the model's
    weight bytes and follow `.to()`.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        from sgl_kernel.cpu_gemm import pack_bf16, pack_f32

        self.out_features = int(weight.shape[0])
        pack = pack_bf16 if weight.dtype == torch.bfloat16 else pack_f32
        self.register_buffer("packed", pack(weight.detach()), persistent=False)
        bias_f32 = None if bias is None else bias.detach().float().contiguous()
        self.register_buffer("bias_f32", bias_f32, persistent=False)
        self._bias_ptr = None if bias is None else bias.data_ptr()

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        from sgl_kernel.cpu_gemm import linear_bf16w, linear_bf16w_op

        if bias is not None:
            own = self.bias_f32 is not None and bias.data_ptr() == self._bias_ptr
            bias = self.bias_f32 if own else bias.float().contiguous()
        if torch.compiler.is_compiling():
            return linear_bf16w_op(x, self.packed, self.out_features, bias)
        return linear_bf16w(x, self.packed, self.out_features, bias)


def _lm_head(model: nn.Module) -> Optional[nn.Module]:
    return getattr(model, getattr(model, "head_name", "lm_head"), None)


def pack_cpu_weights(model: nn.Module) -> int:
    """Give every dense bf16 linear layer and the LM head a packed weight, and float32 ones too
    where `pack_f32_wanted()`; returns how many.

    Does nothing (returns 0) when the kernel cannot run here or the layout is pinned to `row`.
    """
    from sglang.srt.layers.linear import LinearBase

    if os.environ.get(LAYOUT_ENV, "column") == "row":
        return 0
    from sgl_kernel import cpu_gemm

    dtypes = (torch.bfloat16, torch.float32) if pack_f32_wanted() else (torch.bfloat16,)

    def wants(module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.dtype in dtypes
            and weight.device.type == "cpu"
        )

    linears = [m for m in model.modules() if isinstance(m, LinearBase) and m.quant_method is None]
    linears = [m for m in linears if wants(m)]
    head = _lm_head(model)
    # A GGUF head may already run from the file's quantized rows (quantization/gguf.py).
    keep = head is not None and getattr(head, "cpu_packed", None) is not None
    head = head if head is not None and wants(head) and not keep else None
    if not (linears or head) or not cpu_gemm.available():
        return 0
    for module in linears:
        module.cpu_packed = PackedCpuWeight(module.weight, module.bias)
        # The packed copy is the only one read from now on: free the row-major one.
        module.weight.data = torch.empty(0, dtype=module.weight.dtype)
    if head is not None:
        head.cpu_packed = PackedCpuWeight(head.weight, None)
    count = len(linears) + (head is not None)
    kinds = " and ".join(str(d).removeprefix("torch.") for d in dtypes)
    logger.info(
        "CPU packed GEMM: %d %s matmul weights packed (sgl_kernel/cpu_gemm.py)", count, kinds
    )
    return count


def prepare_cpu_weights(model: nn.Module) -> None:
    """The CPU layout step of loading: bf16 weights packed (float32 ones too where PyTorch's
    float32 GEMM is slow), the float32 weights left to PyTorch column-major."""
    pack_cpu_weights(model)
    use_column_major_weights(model)
