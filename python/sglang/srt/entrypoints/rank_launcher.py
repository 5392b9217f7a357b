"""Starting one node's scheduler ranks (plus the DP controller), and the worker-node main.

`start_scheduler_ranks` spawns one scheduler process per rank this node runs (see
distributed/placement.py), each with its own readiness pipe, and under `--dp` the data parallel
controller; `wait_ranks_ready` collects their reports. `engine.launch_subprocesses` uses both on
node 0. `run_worker_node` is `launch_server` on nodes with `--node-rank > 0`: it runs only model
ranks, serves no HTTP, says what it waits for, and exits when node 0 ends the TP group (0) or
goes away (1), or on SIGTERM/SIGINT.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import time
from typing import Any, Callable, Optional

from sglang.srt.distributed.placement import (
    RankPlacement,
    check_parallel_model,
    plan_node_ranks,
)

logger = logging.getLogger(__name__)

# After one rank of a worker node exits, how long the others get to notice before being killed.
PEER_EXIT_GRACE_S = 10.0


def replica_port_args(port_args: Any, dp_rank: int) -> Any:
    """ipc names of one DP replica: its own input, its control answers go to the controller."""
    name = f"ipc://{os.path.join(port_args.ipc_dir, '')}"
    return dataclasses.replace(
        port_args,
        scheduler_input_ipc_name=f"{name}scheduler_input_dp{dp_rank}",
        tokenizer_ipc_name=f"{name}dp_control_{dp_rank}",
        ipc_dir="",  # owned (and removed) by the main PortArgs
    )


def process_name(placement: RankPlacement) -> str:
    single = placement.tp_size == 1 and placement.dp_size == 1
    return "scheduler" if single else f"scheduler {placement.tag}"


def start_scheduler_ranks(
    server_args: Any,
    port_args: Any,
    ctx: Any,
    parent_pid: int,
    heartbeats: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, mp.process.BaseProcess], dict[str, Any]]:
    """Spawn this node's ranks (and the DP controller); returns (processes, readiness readers).
    With `heartbeats`, fills it with each scheduler's shared heartbeat (for /health)."""
    from sglang.srt.managers.scheduler_watchdog import new_shared_heartbeat

    nccl_port = port_args.nccl_port if port_args is not None else 0
    plan = plan_node_ranks(server_args, nccl_port)
    dp = server_args.dp_size
    replicas = [replica_port_args(port_args, d) for d in range(dp)] if dp > 1 else [port_args]
    procs: dict[str, mp.process.BaseProcess] = {}
    readers: dict[str, Any] = {}
    for placement in plan:
        reader, writer = ctx.Pipe(duplex=False)
        name = process_name(placement)
        heartbeat = None
        if heartbeats is not None:
            heartbeat = heartbeats[name] = new_shared_heartbeat(ctx)
        proc = ctx.Process(
            target=_run_scheduler_process,
            args=(
                server_args,
                replicas[placement.dp_rank],
                writer,
                parent_pid,
                placement,
                heartbeat,
            ),
            name=f"sglang-{name.replace(' ', '-')}",
            daemon=True,
        )
        proc.start()
        writer.close()
        procs[name], readers[name] = proc, reader
    # NOTE: checked once the ranks are on their way: reading the config (torch, transformers)
    # took seconds of the main process that the ranks' own start-up now overlaps.
    try:
        from sglang.srt.configs.model_config import ModelConfig  # imports torch: after the spawn
        from sglang.srt.layers.quantization.gguf_tp import check_packed_split

        model_config = ModelConfig.from_server_args(server_args)
        check_parallel_model(model_config, server_args.tp_size, server_args.pp_size)
        check_packed_split(model_config, server_args)
    except BaseException:
        for proc in procs.values():
            proc.terminate()
        raise
    if dp > 1:
        from sglang.srt.managers.data_parallel_controller import (
            run_data_parallel_controller_process,
        )

        controller = ctx.Process(
            target=run_data_parallel_controller_process,
            args=(server_args, port_args, replicas, parent_pid),
            name="sglang-dp-controller",
            daemon=True,
        )
        controller.start()
        procs["data parallel controller"] = controller
    return procs, readers


def _run_scheduler_process(*args: Any) -> None:
    """The ranks' process target. The scheduler module (torch and the model code) is imported
    here, in the child, so the parent need not import it before it can spawn."""
    from sglang.srt.managers.scheduler_process import run_scheduler_process

    run_scheduler_process(*args)


def wait_ranks_ready(
    readers: dict[str, Any],
    procs: dict[str, mp.process.BaseProcess],
    timeout: float,
    cancelled: Optional[Callable[[], bool]] = None,
) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(combined readiness info, None) once every rank reported, else (None, error message)."""
    infos: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(infos) < len(readers):
        pending = {name: r for name, r in readers.items() if name not in infos}
        for name, reader in pending.items():
            if not reader.poll():
                continue
            try:
                info = reader.recv()
            except EOFError:
                info = {"status": "error", "error": f"the {name} process closed its pipe"}
            if info.get("status") != "ready":
                return None, info.get("error") or f"the {name} process failed to start"
            infos[name] = info
        for name in pending:
            if name not in infos and not procs[name].is_alive() and not readers[name].poll():
                code = procs[name].exitcode
                return None, f"the {name} process exited with code {code} before it was ready"
        for name, proc in procs.items():
            if name not in readers and not proc.is_alive():
                return None, f"the {name} process exited with code {proc.exitcode}"
        if time.monotonic() > deadline:
            return None, "the scheduler did not become ready in time"
        if cancelled is not None and cancelled():
            return None, "cancelled"
        waitables = [r for n, r in readers.items() if n not in infos]
        multiprocessing.connection.wait(waitables + [p.sentinel for p in procs.values()], 0.5)
    return combine_ready_info(list(infos.values())), None


def combine_ready_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """What the tokenizer manager needs: the tightest limits over all replicas."""
    combined = dict(infos[0])
    for key in ("max_total_num_tokens", "max_running_requests", "max_req_input_len"):
        combined[key] = min(info[key] for info in infos)
    return combined


# ---------------------------------------------------------------------------------- worker node


def run_worker_node(server_args: Any) -> int:
    """Main of `launch_server --node-rank N>0`: run this node's TP ranks until node 0 is done."""
    logging.basicConfig(
        level=getattr(logging, server_args.log_level.upper(), logging.INFO),
        format=f"[%(asctime)s node{server_args.node_rank}] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )
    from sglang.srt.entrypoints.engine import READY_TIMEOUT_S

    ctx = mp.get_context("spawn")
    procs, readers = start_scheduler_ranks(server_args, None, ctx, os.getpid())
    tags = ", ".join(procs)
    logger.info(
        "node %d of %d runs %s; waiting for node 0 at %s (no HTTP server on this node)",
        server_args.node_rank,
        server_args.nnodes,
        tags,
        server_args.dist_init_addr,
    )
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        _, error = wait_ranks_ready(readers, procs, READY_TIMEOUT_S, lambda: bool(stop["signal"]))
        if stop["signal"] is None:
            if error is not None:
                logger.error("node %d failed to start: %s", server_args.node_rank, error)
                return 1
            logger.info(
                "node %d is ready; serving node 0's requests until it stops",
                server_args.node_rank,
            )
        sentinels = [p.sentinel for p in procs.values()]
        while stop["signal"] is None:
            if multiprocessing.connection.wait(sentinels, 0.5):
                return _after_rank_exit(server_args, procs)
        logger.info("node %d stops on signal %d", server_args.node_rank, stop["signal"])
        return 0
    finally:
        _stop_all(procs)


def _after_rank_exit(server_args: Any, procs: dict[str, mp.process.BaseProcess]) -> int:
    deadline = time.monotonic() + PEER_EXIT_GRACE_S
    for proc in procs.values():
        proc.join(max(0.0, deadline - time.monotonic()))
    codes = {name: p.exitcode for name, p in procs.items()}
    if all(code == 0 for code in codes.values()):
        logger.info("node 0 ended the TP group; node %d exits", server_args.node_rank)
        return 0
    failed = ", ".join(f"{name} exit code {code}" for name, code in codes.items() if code != 0)
    logger.error(
        "node %d stops: lost the TP group (node 0 went away or a rank failed: %s)",
        server_args.node_rank,
        failed,
    )
    return 1


def _stop_all(procs: dict[str, mp.process.BaseProcess]) -> None:
    for proc in procs.values():
        if proc.is_alive():
            proc.terminate()
    for proc in procs.values():
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(1)
