"""Turn a built model's linear layers into int4 layers that load AWQ / GPTQ tensors.

Called by the loader (`get_model`) between building the model and `load_weights`:
`attach_int4` replaces the dense `weight` of every linear layer the checkpoint quantized with
empty placeholder parameters named like the checkpoint tensors (`qweight`, `qzeros`, `scales`,
`g_idx`), so the model's own `load_weights` (name mapping, q/k/v and gate/up stacking) routes
them unchanged. Their loaders collect the tensors of each stacked part; once a layer has all of
them it is unpacked (awq.py / gptq.py), cut to this TP rank's part, repacked for the chosen int4 matmul (int4.py) and
stored as buffers, so the full-precision weight never exists. `finish_int4` checks that every
layer got its tensors and reports the kernels in use.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional

import torch
from torch import nn

from sglang.srt.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    rows_of_rank,
)
from sglang.srt.layers.quantization import QuantConfig
from sglang.srt.layers.quantization.int4 import Int4LinearMethod, Int4Shard

logger = logging.getLogger(__name__)

# Checkpoint names of the parts a stacked layer is loaded from (the models' STACKED_PARAMS).
_HF_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PLACEHOLDER_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "g_idx": torch.int32}


def _shard_ids(layer: LinearBase) -> list[Any]:
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(len(layer.output_sizes)))
    return [None]


def _tp_slice(layer: LinearBase, shard: Int4Shard, shard_id: Any) -> Int4Shard:
    """This rank's part of a whole checkpoint matrix, split like the dense weight loaders do:
    output rows for column-parallel layers (KV heads replicated when TP exceeds them), input
    columns (with their g_idx entries; the group table stays whole) for row-parallel ones."""
    if layer.tp_size == 1:
        return shard
    if isinstance(layer, RowParallelLinear):
        size = layer.input_size_per_partition
        cols = slice(layer.tp_rank * size, (layer.tp_rank + 1) * size)
        return Int4Shard(shard.q[:, cols], shard.scales, shard.zeros, shard.g_idx[cols])
    rows = rows_of_rank(layer, shard_id)
    if rows is None:  # replicated
        return shard
    return Int4Shard(
        shard.q[rows].contiguous(), shard.scales[:, rows], shard.zeros[:, rows], shard.g_idx
    )


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    """True when `modules_to_not_convert` keeps the layer `name` dense.

    A stacked layer is kept dense only if all its parts are; a mix is refused, because one
    matmul cannot be partly dense.
    """
    if not patterns:
        return False
    prefix, _, leaf = name.rpartition(".")
    parts = [f"{prefix}.{p}" for p in _HF_PARTS.get(leaf, (leaf,))]
    hits = [any(pattern in part for pattern in patterns) for part in parts]
    if any(hits) and not all(hits):
        raise ValueError(
            f"modules_to_not_convert keeps only some of {parts} dense; they share one stacked "
            "layer here, which must be all quantized or all dense"
        )
    return all(hits)


class Int4State:
    """Per-layer load state: the collected tensors, then the int4 matmul."""

    def __init__(self, layer: LinearBase, config: QuantConfig, name: str) -> None:
        self.name = name
        self.config = config
        self.shard_ids = _shard_ids(layer)
        self.pending: dict[Any, dict[str, torch.Tensor]] = {}
        self.shards: dict[Any, Int4Shard] = {}
        self.method: Optional[Int4LinearMethod] = None
        self.device = layer.weight.device
        self.dtype = layer.weight.dtype

    def add(self, layer: LinearBase, kind: str, tensor: torch.Tensor, shard_id: Any) -> None:
        if shard_id not in self.shard_ids:
            raise ValueError(f"{self.name}: unexpected part {shard_id!r} for {kind}")
        parts = self.pending.setdefault(shard_id, {})
        parts[kind] = tensor
        if len(parts) < len(self.config.tensor_names()):
            return
        try:
            shard = self.config.unpack(self.pending.pop(shard_id))
            self.shards[shard_id] = _tp_slice(layer, shard, shard_id)
        except ValueError as exc:
            raise ValueError(f"{self.name} (part {shard_id!r}): {exc}") from exc
        if len(self.shards) == len(self.shard_ids):
            self._finish(layer)

    def apply(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.method is None:
            raise RuntimeError(f"{self.name}: int4 weights were never loaded")
        return self.method.apply(x, bias)

    def _finish(self, layer: LinearBase) -> None:
        shards = [self.shards.pop(sid) for sid in self.shard_ids]
        in_features = shards[0].q.shape[1]
        expected_in = getattr(layer, "input_size_per_partition", layer.input_size)
        out_features = sum(s.q.shape[0] for s in shards)
        expected_out = getattr(layer, "output_size_per_partition", layer.output_size)
        if in_features != expected_in or out_features != expected_out:
            raise ValueError(
                f"{self.name}: quantized weight unpacks to [{out_features}, {in_features}], "
                f"the model expects [{expected_out}, {expected_in}]"
            )
        self.method = Int4LinearMethod(shards, self.dtype, self.device)
        for i, tensor in enumerate(self.method.tensors()):
            layer.register_buffer(f"int4_{i}", tensor, persistent=False)


def _make_loader(state: Int4State, layer: LinearBase, kind: str):
    def loader(_param: nn.Parameter, tensor: torch.Tensor, shard_id: Any = None) -> None:
        state.add(layer, kind, tensor, shard_id)

    return loader


def attach_int4(model: nn.Module, config: QuantConfig) -> int:
    """Give every quantized linear layer of `model` int4 placeholders; returns their number."""
    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase) or _excluded(name, config.modules_to_not_convert):
            continue
        state = Int4State(layer, config, name)
        del layer.weight
        for kind in config.tensor_names():
            placeholder = nn.Parameter(
                torch.empty(0, dtype=_PLACEHOLDER_DTYPES.get(kind, torch.float16)),
                requires_grad=False,
            )
            placeholder.weight_loader = _make_loader(state, layer, kind)  # type: ignore[attr-defined]
            layer.register_parameter(kind, placeholder)
        layer.quant_method = state
        count += 1
    return count


def finish_int4(model: nn.Module) -> str:
    """Raise when a layer missed tensors; return a summary of the matmuls in use for the log."""
    kinds: Counter[str] = Counter()
    for name, layer in model.named_modules():
        state = getattr(layer, "quant_method", None)
        if not isinstance(state, Int4State):
            continue
        if state.method is None:
            raise ValueError(f"checkpoint is missing quantized tensors of {name}")
        kinds.update(state.method.kinds)
    return ", ".join(f"{kind} in {n} layers" for kind, n in sorted(kinds.items()))
