"""Tensor-parallel shards of packed GGUF weights (the packed path of layers/quantization/gguf.py).

Each rank keeps its part of a packed layer, cut where the dense weight loaders (layers/linear.py)
cut a dense weight, so a packed layer computes on every rank what its dense twin computes:

- column-parallel layers (q/k/v, gate/up, other column-parallel ones): whole output rows, cut from
  the raw GGUF bytes before decoding (`rows_of_rank`, layers/linear.py's cut); KV heads are
  replicated when the TP size exceeds them, as for dense weights;
- row-parallel layers (o_proj, down_proj): input columns, cut from the decoded codes and their
  per-32-weight scale/bias in whole 32-weight blocks (`columns_of_rank`; a Q4_K super-block of
  256 decodes to eight such blocks with exact float32 scales, so it may be cut between them).
  A layer whose per-rank input width is not a whole number of blocks cannot be cut: the start
  is refused (`row_split_problem`) with the layer, the widths and the ways out.

`check_packed_split` makes the same refusal in the launching process from the config and the
GGUF header, before any rank loads weights: one line, like the other `--tp` split checks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from sglang.srt.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    RowParallelLinear,
    rows_of_rank,
)

__all__ = ["columns_of_rank", "local_shape", "row_split_problem", "rows_of_rank"]

BLOCK = 32  # weights per scale/bias pair after decoding, in every packed format


def local_shape(layer: LinearBase) -> tuple[int, int]:
    """(output rows, input columns) of this rank's part of `layer`'s weight."""
    if isinstance(layer, RowParallelLinear):
        return layer.output_size, layer.input_size_per_partition
    if isinstance(layer, ColumnParallelLinear):
        return layer.output_size_per_partition, layer.input_size
    return layer.output_size, layer.input_size


def row_split_problem(layer: LinearBase, name: str) -> Optional[str]:
    """Why `layer` (row-parallel under TP) cannot keep packed blocks on each rank, else None."""
    if not isinstance(layer, RowParallelLinear) or layer.tp_size == 1:
        return None
    width = layer.input_size_per_partition
    if width % BLOCK == 0:
        return None
    return (
        f"packed GGUF layer {name} splits its {layer.input_size} input columns into "
        f"{layer.tp_size} parts of {width}, not a whole number of {BLOCK}-weight GGUF blocks; "
        f"use a --tp that cuts it in whole blocks or --gguf-dequantize (dense weights split "
        "anywhere)"
    )


def columns_of_rank(
    layer: LinearBase, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's input columns of a decoded weight: codes [rows, cols] and scale, bias
    [rows, cols / 32], cut in whole blocks (row_split_problem refused the others at start)."""
    if layer.tp_size == 1 or not isinstance(layer, RowParallelLinear):
        return codes, scale, bias
    width = layer.input_size_per_partition
    start = layer.tp_rank * width
    blocks = slice(start // BLOCK, (start + width) // BLOCK)
    return (
        codes[:, start : start + width].contiguous(),
        scale[:, blocks].contiguous(),
        bias[:, blocks].contiguous(),
    )


def check_packed_split(model_config: Any, server_args: Any) -> None:
    """Raise ParallelConfigError when an o_proj or down_proj tensor of the GGUF file would stay
    packed (gguf.py's choice for this dtype and device) but not split `--tp` ways in whole
    blocks."""
    tp = server_args.tp_size
    if tp == 1 or model_config.gguf_file is None or server_args.gguf_dequantize:
        return
    from sglang.srt.distributed.placement import ParallelConfigError
    from sglang.srt.layers.quantization.gguf import packable_reason, packs
    from sglang.srt.model_loader.gguf_utils import gguf_tensor_types

    reason, gemm = packable_reason(model_config, server_args.device)
    if reason:
        return  # every tensor loads dense: dense weights split anywhere
    text = model_config.hf_text_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    widths = {"self_attn.o_proj": heads * head_dim, "mlp.down_proj": text.intermediate_size}
    for name, qtype in gguf_tensor_types(model_config.gguf_file).items():
        for leaf, width in widths.items():
            if name.endswith(f".{leaf}.weight") and packs({qtype}, gemm) and (width // tp) % BLOCK:
                raise ParallelConfigError(
                    f"--tp {tp} splits the {width} input columns of the packed GGUF tensor "
                    f"{name} ({qtype}) into parts of {width // tp}, not a whole number of "
                    f"{BLOCK}-weight blocks; use a --tp that cuts it in whole blocks or "
                    "--gguf-dequantize (dense weights split anywhere)"
                )
