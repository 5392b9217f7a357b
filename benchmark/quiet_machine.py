"""Waiting for a quiet machine before a serving benchmark run, and saying how quiet it was.

Used by bench_serving_compare.py: before each engine starts, no other test or server may run, the
CPUs must be idle and the 1-minute load average low; a run that never got there is flagged busy.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

HEAVY_NAMES = ("pytest", "launch_server", "llama-server", "transformers serve", "cc1plus", "ninja")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """Share of all CPU time that was busy over `seconds` (from /proc/stat)."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals), idle

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    total = t1 - t0
    return 0.0 if total <= 0 else 1.0 - (i1 - i0) / total


def other_heavy_processes() -> list[str]:
    me = os.getpid()
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        pid, _, cmd = parts
        if int(pid) == me or "bench_serving_compare" in cmd or "ps -eo" in cmd:
            continue
        if any(name in cmd for name in HEAVY_NAMES):
            found.append(line.strip()[:160])
    return found


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def wait_for_quiet_machine(max_wait_s: float, max_load1: float) -> dict[str, Any]:
    """Wait (bounded) until no other server/test runs, the CPUs are idle and the 1-minute load
    average is at most `max_load1`; `busy` in the answer flags a start that never got there."""
    deadline = time.time() + max_wait_s
    while True:
        heavy = other_heavy_processes()
        busy = cpu_busy_fraction()
        load = loadavg()
        quiet = not heavy and busy < 0.25 and float(load.split()[0]) <= max_load1
        if quiet:
            break
        if time.time() > deadline:
            log(f"WARNING: machine still busy (load {load}, cpu {busy:.0%}, {heavy}); flagged")
            break
        log(f"waiting for a quiet machine: load {load}, cpu {busy:.0%}, others: {heavy}")
        time.sleep(10)
    return {
        "loadavg": load,
        "cpu_busy_before": round(busy, 3),
        "other_heavy": heavy,
        "busy": not quiet,
    }
