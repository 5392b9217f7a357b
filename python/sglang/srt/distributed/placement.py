"""Where each scheduler rank runs: DP replica, TP rank, node, GPU and rendezvous address.

Pure functions over ServerArgs, so the launch layout is unit-testable without processes.
`plan_node_ranks` lists the ranks one node starts (`--tp` is global: each of `--nnodes` nodes runs
tp/nnodes consecutive ranks of every TP group); `check_parallel_model` rejects a TP size the
model's shapes cannot be split by, with one-line messages, before any process starts.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Optional


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; the message is meant for the user as is."""


@dataclass(frozen=True)
class RankPlacement:
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    gpu_id: Optional[int] = None  # index among the visible GPUs; None on CPU
    init_method: Optional[str] = None  # tcp://host:port of the TP group's rendezvous
    backend: str = "gloo"  # tensor collectives: nccl on CUDA, gloo on CPU

    @property
    def tag(self) -> str:
        """Log tag and process label: TP1, or DP1 TP0 under data parallelism."""
        return f"DP{self.dp_rank} TP{self.tp_rank}" if self.dp_size > 1 else f"TP{self.tp_rank}"

    @property
    def is_leader(self) -> bool:
        """TP rank 0 talks to the tokenizer side; the others follow its broadcasts."""
        return self.tp_rank == 0


def split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def tcp_url(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_urls(server_args: Any, nccl_port: int) -> list[str]:
    """One rendezvous per DP replica. Replica 0 uses --dist-init-addr when given (required with
    several nodes), else the single-node collective port; further replicas get free local ports."""
    if server_args.dist_init_addr:
        host, port = split_host_port(server_args.dist_init_addr)
    else:
        host, port = "127.0.0.1", nccl_port
    urls = [tcp_url(host, port)]
    urls += [tcp_url("127.0.0.1", free_port()) for _ in range(1, server_args.dp_size)]
    return urls


def plan_node_ranks(server_args: Any, nccl_port: int) -> list[RankPlacement]:
    """Every scheduler rank that node `--node-rank` starts, replica by replica."""
    args = server_args
    per_node = args.tp_size // args.nnodes
    on_cuda = args.device == "cuda"
    urls = rendezvous_urls(args, nccl_port) if args.tp_size > 1 else [None] * args.dp_size
    plan = []
    for dp_rank in range(args.dp_size):
        for local in range(per_node):
            gpu = args.base_gpu_id + (dp_rank * per_node + local) * args.gpu_id_step
            plan.append(
                RankPlacement(
                    dp_rank=dp_rank,
                    dp_size=args.dp_size,
                    tp_rank=args.node_rank * per_node + local,
                    tp_size=args.tp_size,
                    nnodes=args.nnodes,
                    node_rank=args.node_rank,
                    gpu_id=gpu if on_cuda else None,
                    init_method=urls[dp_rank],
                    backend="nccl" if on_cuda else "gloo",
                )
            )
    return plan


def check_parallel_model(model_config: Any, tp_size: int, pp_size: int = 1) -> None:
    """Raise ParallelConfigError when the model's heads or MLP cannot be split `tp_size` ways."""
    if pp_size > 1:
        raise ParallelConfigError(
            "pipeline parallelism (--pp-size > 1) is not supported; use --tp across GPUs and nodes"
        )
    if tp_size == 1:
        return
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_key_value_heads
    if heads % tp_size:
        raise ParallelConfigError(
            f"--tp {tp_size} does not divide the model's {heads} attention heads; "
            f"use a TP size that divides {heads}"
        )
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ParallelConfigError(
            f"--tp {tp_size} must divide the model's {kv_heads} KV heads or be a multiple of "
            "them (KV heads are then replicated)"
        )
    inter = getattr(model_config.hf_text_config, "intermediate_size", None)
    if inter and inter % tp_size:
        raise ParallelConfigError(f"--tp {tp_size} does not divide the model's MLP size {inter}")
