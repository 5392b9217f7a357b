"""One tensor-parallel rank inside a scheduler process: setup, lockstep control plane, failures.

`TpRank` prepares the process for its `RankPlacement` (CPU threads, GPU from --base-gpu-id and
--gpu-id-step among the visible devices, seeds, joining the TP group with --watchdog-timeout as the
collective timeout) and, after the model is loaded, makes every rank agree that loading worked.

`ControlPlane` keeps the ranks in lockstep. Only TP rank 0 reads the tokenizer's socket; at the top
of every scheduler iteration it broadcasts what it read (often nothing) and all ranks apply the same
messages, control messages included, at the same point, then run the same step. Schedulers are
deterministic given their inputs (logical-clock radix cache, counter-hash sampling, seeded random
policy), so every rank builds the same batches and issues the same collectives in the same order.
Ranks > 0 compute outputs but send them nowhere (`NullSocket`). While idle, rank 0 wakes every
second to broadcast a heartbeat, so the others never sit in a collective long enough to time out.
Rank 0 ends the group with a `StopTP` broadcast when it is told to stop (SIGTERM, parent gone), so
ranks on other nodes exit cleanly; a peer that dies surfaces as a collective error, reported by
`describe_peer_failure` in one line.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from dataclasses import dataclass
from typing import Any, Optional

from sglang.srt.distributed import parallel_state as ps
from sglang.srt.distributed.placement import ParallelConfigError, RankPlacement

logger = logging.getLogger(__name__)

# Cores of each local rank, as upstream SGLang's CPU backend reads it: "0-3|4-7" (one group per rank).
CPU_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
# Set to 1 to all-gather every step's sampled tokens and fail loudly if TP ranks ever disagree.
CHECK_TOKENS_ENV = "SGLANG_TP_CHECK_TOKENS"


@dataclass
class StopTP:
    """Broadcast by TP rank 0: every rank leaves its loop."""

    reason: str


class NullSocket:
    """Output socket of TP ranks > 0: outputs are computed on every rank, sent from rank 0 only."""

    def send(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self, *args: Any, **kwargs: Any) -> None:
        return None


class TpRank:
    def __init__(self, placement: RankPlacement, server_args: Any) -> None:
        self.placement = placement
        self.server_args = server_args

    @property
    def tag(self) -> str:
        return self.placement.tag

    def setup(self) -> None:
        """Threads, device, seeds and the TP group; raises with a one-line message on failure."""
        import torch

        p, args = self.placement, self.server_args
        if args.device == "cpu":
            local_ranks = max(1, p.dp_size * p.tp_size // p.nnodes)
            cores = cpu_binding(os.environ.get(CPU_BIND_ENV, ""), local_rank(p), local_ranks)
            if cores is not None:
                os.sched_setaffinity(0, cores)
                torch.set_num_threads(len(cores))
            else:
                torch.set_num_threads(default_cpu_threads(usable_cores(), local_ranks))
        elif p.gpu_id is not None:
            visible = torch.cuda.device_count()
            if p.gpu_id >= visible:
                raise ParallelConfigError(
                    f"{p.tag} needs GPU {p.gpu_id} (--base-gpu-id {args.base_gpu_id}, "
                    f"--gpu-id-step {args.gpu_id_step}) but only {visible} are visible "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
                )
            torch.cuda.set_device(p.gpu_id)
        random.seed(args.random_seed)  # the "random" schedule policy must agree across ranks
        if p.tp_size == 1:
            return
        if not p.is_leader:
            # Followers never look at their parent (they wait in rank 0's broadcasts): let the
            # kernel end them with it, so a killed launcher leaves no orphans.
            die_with_parent()
        if p.node_rank > 0 and p.tp_rank == p.node_rank * (p.tp_size // p.nnodes):
            logger.info("waiting for node 0 at %s ...", p.init_method)
        elif p.nnodes > 1 and p.tp_rank == 0:
            logger.info("waiting for %d other node(s) at %s ...", p.nnodes - 1, p.init_method)
        try:
            ps.init_distributed_environment(
                p.tp_rank, p.tp_size, p.init_method, p.backend, args.watchdog_timeout
            )
        except Exception as e:
            raise ParallelConfigError(
                f"{p.tag} could not join the TP group at {p.init_method}: {first_line(e)}"
            ) from None
        logger.info("joined the TP group (%d ranks, %s), pid %d", p.tp_size, p.backend, os.getpid())

    def agree_on_startup(self, error: Optional[str]) -> Optional[str]:
        """After loading: the first rank's error (tagged with its rank), or None on every rank."""
        if self.placement.tp_size == 1:
            return error
        try:
            ps.wait_for_all_ranks()  # loading may end far apart on each rank
            errors = ps.all_gather_pyobj(error)
        except Exception as e:
            return f"a TP rank did not finish starting: {first_line(e)}"
        for rank, err in enumerate(errors):
            if err:
                return f"TP{rank}: {err}"
        return None


class ControlPlane:
    """Rank 0's messages, broadcast to every TP rank at the top of each scheduler iteration."""

    def __init__(self, placement: RankPlacement) -> None:
        self.placement = placement
        self.stop_reason: Optional[str] = None
        self.check_tokens = os.environ.get(CHECK_TOKENS_ENV, "") == "1"

    @property
    def is_leader(self) -> bool:
        return self.placement.is_leader

    def install_sigterm(self) -> None:
        """SIGTERM on rank 0 ends the whole group at the next iteration (no collective is cut)."""

        def on_term(*_: Any) -> None:
            self.stop_reason = "terminated"

        signal.signal(signal.SIGTERM, on_term)

    def exchange(self, messages: Optional[list[Any]]) -> Optional[list[Any]]:
        """Rank 0 passes what it read; every rank gets the same list, or None when stopping."""
        if self.is_leader and self.stop_reason is not None:
            messages = [StopTP(self.stop_reason)]
        messages = ps.broadcast_pyobj(messages if self.is_leader else None)
        if messages and isinstance(messages[0], StopTP):
            logger.info("TP group stops (%s on TP0)", messages[0].reason)
            return None
        return messages

    def check_same_tokens(self, batch: Any) -> None:
        """With SGLANG_TP_CHECK_TOKENS=1: every rank must have sampled the same tokens."""
        if not self.check_tokens:
            return
        mine = [(r.rid, len(r.output_ids), r.output_ids[-1:]) for r in batch.reqs]
        every = ps.all_gather_pyobj(mine)
        for rank, theirs in enumerate(every):
            if theirs != every[0]:
                raise RuntimeError(f"TP{rank} sampled different tokens than TP0: {theirs[:4]}")


def local_rank(p: RankPlacement) -> int:
    """This rank's index among the scheduler processes of its node."""
    per_node = max(1, p.tp_size // p.nnodes)
    return p.dp_rank * per_node + p.tp_rank % per_node


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: what Slurm or taskset granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_cpu_threads(cores: int, local_ranks: int) -> int:
    """Torch intra-op threads per scheduler rank when no cores are bound: one core is left to the
    HTTP process and the detokenizer, the rest shared among the ranks on this node (at least 1).

    Every core would serve faster on an idle machine (two threads 1.5-1.7x faster than one on the
    2-core machine, benchmark/results/threads_cpu.md), but OpenMP threads that share their cores
    with other busy processes wait for each other at every parallel region: with a test client or
    a second server on the same two cores, a decode step took 10x longer. A dedicated server
    binds its cores with SGLANG_CPU_OMP_THREADS_BIND.
    """
    return max(1, (cores - 1) // max(1, local_ranks))


def cpu_binding(spec: str, rank: int, local_ranks: int) -> Optional[list[int]]:
    """Cores of `rank` from SGLANG_CPU_OMP_THREADS_BIND ("0-3|4-7", one group per local rank,
    each a comma list of cores or ranges); None when unset. ParallelConfigError when malformed."""
    if not spec:
        return None
    groups = spec.split("|")
    if len(groups) != local_ranks:
        raise ParallelConfigError(
            f"{CPU_BIND_ENV}={spec!r} has {len(groups)} core group(s) for {local_ranks} rank(s) "
            "on this node; give one group per rank, separated by '|'"
        )
    cores: list[int] = []
    try:
        for part in groups[rank].split(","):
            lo, _, hi = part.strip().partition("-")
            cores += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ParallelConfigError(
            f"{CPU_BIND_ENV}={spec!r}: group {groups[rank]!r} is not a list of cores or ranges "
            "such as 0-3,8"
        ) from None
    allowed = os.sched_getaffinity(0)
    if not cores or not set(cores) <= allowed:
        raise ParallelConfigError(
            f"{CPU_BIND_ENV}={spec!r}: group {groups[rank]!r} names cores this process may not "
            f"use (allowed: {sorted(allowed)})"
        )
    return sorted(set(cores))


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (a no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    # gloo appends generic advice to its messages; the cause is what comes before it.
    text = lines[0].split(". This is typically")[0] if lines else ""
    return f"{type(exc).__name__}: {text}"


def describe_peer_failure(exc: BaseException, tag: str) -> Optional[str]:
    """A one-line message when `exc` says another TP rank died or hung, else None."""
    import torch.distributed as dist

    kinds = tuple(
        k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistError", None)) if k
    )
    text = str(exc)
    markers = ("gloo", "Connection closed", "Connection reset", "Timed out", "NCCL")
    if not (
        isinstance(exc, kinds)
        or (isinstance(exc, RuntimeError) and any(m in text for m in markers))
    ):
        return None
    return (
        f"{tag} lost contact with the other TP ranks (one exited, was killed or hung past "
        f"--watchdog-timeout); stopping. Cause: {first_line(exc)}"
    )
