"""CPU weight layout: dense matmul weights stored column-major after loading.

A linear layer's weight is `[out, in]` (the checkpoint's layout, which the loaders and TP sharding
rely on). `F.linear(x, w)` multiplies by `w.T`; on CPU, MKL's GEMM at decode's small row counts
runs faster when that `w.T` is a contiguous `[in, out]` matrix. So once the weights are loaded,
each dense weight keeps its shape and values but moves to the transposed storage (strides
`(1, out)`). The LM head and the embedding it may share move too: an embedding lookup then reads
strided rows, a few hundred elements per token. Only float32 weights move. Measured on
SmolLM2-135M, torch 2.13, a 2-core AVX-512 Xeon without bf16 instructions, idle
(benchmark/results/cpu_weight_layout.md): the float32 decode step is 3-23 % faster at batch 1, 8
and 32; bfloat16 was 4-16 % faster at batch 1 but 9-20 % slower at batch 32, so it stays row-major.

`SGLANG_CPU_WEIGHT_LAYOUT=row` keeps the checkpoint layout (for A/B measurements).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

LAYOUT_ENV = "SGLANG_CPU_WEIGHT_LAYOUT"


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
