"""Tensor-parallel linear layers with per-parameter weight loaders.

Owns how a HuggingFace weight is sharded onto this rank: column-parallel layers split the output
dim, row-parallel layers the input dim (and all-reduce their output), QKV and merged gate/up layers
load several HF tensors into one stacked parameter. Models call `param.weight_loader(param, w, id)`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)


def _divide(a: int, b: int) -> int:
    if a % b != 0:
        raise ValueError(f"{a} is not divisible by the tensor-parallel size {b}")
    return a // b


def _set_loader(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"shape mismatch loading {what}: expected {tuple(dst.shape)}, got {tuple(src.shape)}"
        )
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, *_: object) -> None:
    """Replicated parameter: copy as is."""
    with torch.no_grad():
        _copy_checked(param.data, loaded_weight, "replicated parameter")


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.has_bias = bias
        # Set by the loader for quantized checkpoints (layers/quantization/int4_linear.py): an
        # object whose `apply(x, bias)` replaces the dense matmul.
        self.quant_method: Optional[Any] = None
        # Set on CPU for bf16 weights (layers/cpu_weight_layout.py): the weight in the blocked
        # layout of sgl_kernel's bf16-weight GEMM, which then replaces F.linear.
        self.cpu_packed: Optional[Any] = None

    def _linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(x, bias)
        if self.cpu_packed is not None:
            return self.cpu_packed.matmul(x, bias)
        return F.linear(x, self.weight, bias)

    def _make_params(self, out_features: int, in_features: int, bias: bool, loader) -> None:
        self.weight = _set_loader(
            nn.Parameter(torch.empty(out_features, in_features), requires_grad=False), loader
        )
        if bias:
            self.bias = _set_loader(
                nn.Parameter(torch.empty(out_features), requires_grad=False), loader
            )
        else:
            self.register_parameter("bias", None)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = True) -> None:
        super().__init__(input_size, output_size, bias)
        self._make_params(output_size, input_size, bias, default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = X A with A split along its output dim; each rank holds output_size / tp columns."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False
    ) -> None:
        super().__init__(input_size, output_size, bias)
        self.gather_output = gather_output
        self.output_size_per_partition = _divide(output_size, self.tp_size)
        self._make_params(self.output_size_per_partition, input_size, bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, *_: object) -> None:
        size = param.shape[0]
        shard = loaded_weight.narrow(0, self.tp_rank * size, size)
        with torch.no_grad():
            _copy_checked(param.data, shard, "column-parallel shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear(x, self.bias)
        return tensor_model_parallel_all_gather(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked in one parameter (gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Optional[int] = None
    ) -> None:
        if shard_id is None:
            raise ValueError("merged column-parallel weights load one shard at a time")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        shard = loaded_weight.narrow(0, self.tp_rank * size, size)
        with torch.no_grad():
            _copy_checked(param.data.narrow(0, offset, size), shard, f"merged shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections in one parameter. KV heads are split across ranks, or replicated when
    the TP size exceeds their number (each rank then holds the one KV head its query heads use)."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = True,
    ) -> None:
        tp_size = get_tensor_model_parallel_world_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size)
            self.kv_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias)
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded_weight: torch.Tensor,
        shard_id: Optional[Union[str, int]] = None,
    ) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"QKV weights load as shard 'q', 'k' or 'v', not {shard_id!r}")
        shard = loaded_weight.narrow(0, rank * size, size)
        with torch.no_grad():
            _copy_checked(param.data.narrow(0, offset, size), shard, f"{shard_id}_proj shard")


class RowParallelLinear(LinearBase):
    """Y = X A with A split along its input dim; partial outputs are summed across ranks."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True, reduce_results: bool = True
    ) -> None:
        super().__init__(input_size, output_size, bias)
        self.reduce_results = reduce_results
        self.input_size_per_partition = _divide(input_size, self.tp_size)
        self._make_params(output_size, self.input_size_per_partition, bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, *_: object) -> None:
        with torch.no_grad():
            if param.dim() == 1:  # bias is not sharded
                _copy_checked(param.data, loaded_weight, "row-parallel bias")
                return
            size = param.shape[1]
            _copy_checked(
                param.data, loaded_weight.narrow(1, self.tp_rank * size, size), "row-parallel shard"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._linear(x, self.bias)
        out = self._linear(x, None)
        if self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        # NOTE: the bias is added once, after the reduction.
        return out + self.bias if self.bias is not None else out


def rows_of_rank(layer: LinearBase, shard_id: Any) -> Optional[slice]:
    """The output rows of checkpoint part `shard_id` (q/k/v, a merged index, or None) that this
    rank keeps, where the weight loaders above cut them (for quantized weights loaded outside
    them); None when it keeps all of them."""
    if layer.tp_size == 1 or not isinstance(layer, ColumnParallelLinear):
        return None
    if isinstance(layer, QKVParallelLinear):
        if shard_id == "q":
            size, rank = layer.q_size, layer.tp_rank
        else:
            size, rank = layer.kv_size, layer.tp_rank // layer.kv_replicas
    elif isinstance(layer, MergedColumnParallelLinear):
        size, rank = layer.output_sizes[shard_id] // layer.tp_size, layer.tp_rank
    else:
        size, rank = layer.output_size_per_partition, layer.tp_rank
    return slice(rank * size, (rank + 1) * size)
