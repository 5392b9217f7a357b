"""Tensor-parallel process-group state.

Owns the answer to "which TP rank am I, of how many" for the layers, and the collectives they use.
With one rank (the only mode before the parallelism issue) every collective is the identity, so the
layers are written tensor-parallel from the start and run unchanged here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: Optional[object] = None  # torch.distributed ProcessGroup when world_size > 1


_TP = TPGroup()


def initialize_model_parallel(rank: int, world_size: int, group: Optional[object] = None) -> None:
    global _TP
    _TP = TPGroup(rank=rank, world_size=world_size, group=group)


def get_tp_group() -> TPGroup:
    return _TP


def get_tensor_model_parallel_rank() -> int:
    return _TP.rank


def get_tensor_model_parallel_world_size() -> int:
    return _TP.world_size


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.world_size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=_TP.group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _TP.world_size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(_TP.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)
