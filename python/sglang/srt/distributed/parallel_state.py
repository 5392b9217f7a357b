"""Tensor-parallel process-group state.

Owns the answer to "which TP rank am I, of how many" for the layers, the collectives they use, and
the control-plane collectives the scheduler processes use to stay in lockstep. With one rank every
collective is the identity, so the layers are written tensor-parallel from the start and run
unchanged at TP 1.

`init_distributed_environment` is called once per scheduler process (see managers/tp_worker.py):
it joins the TP group through torch.distributed (NCCL for tensors on CUDA, gloo on CPU) and, on
CUDA, adds a gloo group for Python objects, so control messages never touch the GPU. Every
collective has the group's timeout, so a hung peer cannot block the others forever; a peer that
exits is noticed at once (its sockets close).
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any, Optional

import torch


# Startup barriers (after loading weights) wait this long instead of the collective timeout.
STARTUP_BARRIER_TIMEOUT_S = 600.0


@dataclass
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: Optional[object] = None  # torch.distributed ProcessGroup when world_size > 1
    cpu_group: Optional[object] = None  # gloo group for objects (the same group on CPU)


_TP = TPGroup()


def initialize_model_parallel(
    rank: int, world_size: int, group: Optional[object] = None, cpu_group: Optional[object] = None
) -> None:
    global _TP
    _TP = TPGroup(rank=rank, world_size=world_size, group=group, cpu_group=cpu_group or group)


def init_distributed_environment(
    rank: int, world_size: int, init_method: str, backend: str, timeout_s: float
) -> None:
    """Join the TP group (blocks until every rank has joined or `timeout_s` passes)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=timeout,
    )
    group = dist.group.WORLD
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    initialize_model_parallel(rank, world_size, group, cpu_group)


def destroy_distributed_environment() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    initialize_model_parallel(0, 1)


def get_tp_group() -> TPGroup:
    return _TP


def get_tensor_model_parallel_rank() -> int:
    return _TP.rank


def get_tensor_model_parallel_world_size() -> int:
    return _TP.world_size


# ---- tensor collectives (the layers and attention capture) ------------------------------------


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group (in place when `x` is contiguous); any dtype the backend supports."""
    if _TP.world_size == 1:
        return x
    import torch.distributed as dist

    if not x.is_contiguous():
        x = x.contiguous()
    dist.all_reduce(x, group=_TP.group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _TP.world_size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(_TP.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)


# ---- control-plane collectives (Python objects over the gloo group) ---------------------------


def broadcast_pyobj(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank.

    NOTE: an empty list (the scheduler's idle heartbeat) travels as a bare zero size: one 8-byte
    broadcast instead of two.
    """
    if _TP.world_size == 1:
        return obj
    import torch.distributed as dist

    data = b""
    if _TP.rank == src:
        if not (isinstance(obj, list) and not obj):
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        size = torch.tensor([len(data)], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=src, group=_TP.cpu_group)
    n = int(size.item())
    if n == 0:
        return obj if _TP.rank == src else []
    if _TP.rank == src:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        payload = torch.empty(n, dtype=torch.uint8)
    dist.broadcast(payload, src=src, group=_TP.cpu_group)
    return obj if _TP.rank == src else pickle.loads(payload.numpy().tobytes())


def all_gather_pyobj(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if _TP.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _TP.world_size
    dist.all_gather_object(out, obj, group=_TP.cpu_group)
    return out


def wait_for_all_ranks(timeout_s: float = STARTUP_BARRIER_TIMEOUT_S) -> None:
    """Barrier with its own timeout: at startup ranks may arrive far apart (loading)."""
    if _TP.world_size == 1:
        return
    import torch.distributed as dist

    dist.monitored_barrier(
        group=_TP.cpu_group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True
    )


def all_reduce_min_int(value: int) -> int:
    """The smallest of every rank's `value` (startup: ranks must agree on the KV pool size)."""
    if _TP.world_size == 1:
        return value
    import torch.distributed as dist

    wait_for_all_ranks()
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_TP.cpu_group)
    return int(t.item())
