"""Run a function on every rank of a real gloo TP group, in spawned processes (CPU TP tests).

`run_tp_group(tp_size, fn, *args)` starts `tp_size` processes, joins them into a TP group on a free
loopback port (the same `init_distributed_environment` the scheduler uses), calls `fn(*args)` on
each rank and returns the per-rank results in rank order. `fn` must be importable (module level)
and its result picklable. Any rank's exception is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import traceback
from typing import Any, Callable

from sglang.test.test_utils import find_free_port

COLLECTIVE_TIMEOUT_S = 120.0


def _rank_main(
    rank: int, tp_size: int, port: int, fn: Callable[..., Any], args: tuple, out: Any
) -> None:
    import torch

    from sglang.srt.distributed.parallel_state import (
        destroy_distributed_environment,
        init_distributed_environment,
    )

    torch.set_num_threads(1)
    try:
        init_distributed_environment(
            rank, tp_size, f"tcp://127.0.0.1:{port}", "gloo", COLLECTIVE_TIMEOUT_S
        )
        out.put((rank, True, fn(*args)))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))
    finally:
        try:
            destroy_distributed_environment()
        except Exception:
            pass


def run_tp_group(tp_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 300) -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, tp_size, port, fn, args, out), daemon=True)
        for r in range(tp_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < tp_size:
            try:
                rank, ok, value = out.get(timeout=timeout)
            except queue_mod.Empty:
                raise TimeoutError(f"the TP group did not finish within {timeout:.0f}s") from None
            if not ok:
                raise RuntimeError(f"TP{rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(1)
    return [results[r] for r in range(tp_size)]
