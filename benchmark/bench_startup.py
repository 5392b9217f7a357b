"""Time from launching the server to ready, on the machine it runs on.

Each run starts `python -m sglang.launch_server --model-path MODEL --return-attention-tokens`
(plus `--extra` flags) on a free port and stamps, from the moment before the process is created:
  * `ready_s`: the server's ready line in its log;
  * `health_generate_s`: the first 200 from `/health_generate` (asked once `/health`, polled
    every 50 ms, answers 200);
and keeps the server's `Start-up` log lines (the per-phase times it prints). The load average is
read from /proc/loadavg before each run, so a figure taken on a busy machine says so. The server
is stopped with SIGTERM (its process tree killed if it lingers) before the next run starts.
The report (command, machine, date, per-run rows, median) goes to stdout as markdown; `--json`
writes every sample too, with the server's log stamped by seconds since launch. Usage:

    python benchmark/bench_startup.py --runs 3 [--label after] [--extra "--max-total-tokens 8192"]

On a machine shared with other work, `chrt -f 1 python benchmark/bench_startup.py ...` (root)
runs the server's processes ahead of everything else, which approximates an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Optional

import psutil
import requests

from sglang.test.test_utils import find_free_port, kill_process_tree, terminate

READY_LINE = "The server is fired up and ready to roll!"
LAUNCH_TIMEOUT_S = 300.0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def stop(proc: subprocess.Popen) -> None:
    try:
        if proc.poll() is None:
            terminate(proc, signal.SIGTERM, timeout=30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        kill_process_tree(proc.pid)


def one_run(cmd: list[str], url: str) -> dict[str, Any]:
    """Launch, stamp the ready line and the first good /health_generate, stop."""
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def tee() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter() - start, raw.decode(errors="replace").rstrip()))

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    health: Optional[float] = None
    try:
        while time.perf_counter() - start < LAUNCH_TIMEOUT_S:
            if proc.poll() is not None:
                tail = "\n".join(text for _, text in lines[-20:])
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
            try:
                # /health is cheap to poll; once it answers 200, /health_generate runs a token.
                if requests.get(f"{url}/health", timeout=30).status_code == 200:
                    if requests.get(f"{url}/health_generate", timeout=60).status_code == 200:
                        health = time.perf_counter() - start
                        break
            except requests.RequestException:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("the server did not become ready in time")
        # The ready line is logged just before the flag /health_generate waits on is set.
        deadline = time.perf_counter() + 10
        while not any(READY_LINE in text for _, text in lines) and time.perf_counter() < deadline:
            time.sleep(0.05)
    finally:
        stop(proc)
        reader.join(5)
    ready = next((t for t, text in lines if READY_LINE in text), None)
    phases = [text.split("] ", 1)[-1] for _, text in lines if "Start-up" in text]
    log = [f"{t:7.2f} {text}" for t, text in lines if "GET /health" not in text]
    return {"ready_s": ready, "health_generate_s": health, "startup_lines": phases, "log": log}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--extra", default="", help="more server flags, one shell-quoted string")
    ap.add_argument("--label", default="", help="a name for this set of runs in the report")
    ap.add_argument("--json", default=None, help="also write every sample to this file")
    args = ap.parse_args()

    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model_path]
    cmd += ["--return-attention-tokens", "--host", "127.0.0.1", "--port", str(port)]
    cmd += shlex.split(args.extra)
    runs = []
    for i in range(args.runs):
        load = load_average()
        result = one_run(cmd, url)
        result["load_before"] = load
        runs.append(result)
        brief = {k: v for k, v in result.items() if k != "log"}
        print(f"run {i + 1}: {json.dumps(brief)}", file=sys.stderr)

    shown = [c if c != str(port) else "PORT" for c in cmd]
    shown[0] = "python"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f" ({args.label})" if args.label else ""
    print(f"### Time to ready{title}\n")
    print(f"- command: `{shlex.join(shown)}`")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {_ram_gb():.0f} GB RAM")
    print(f"- date: {date}\n")
    print(
        "| run | load avg before (1/5/15 min) | ready line (s) | first /health_generate 200 (s) |"
    )
    print("|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        print(
            f"| {i} | {r['load_before']} | {_fmt(r['ready_s'])} | {_fmt(r['health_generate_s'])} |"
        )
    ready = [r["ready_s"] for r in runs if r["ready_s"] is not None]
    health = [r["health_generate_s"] for r in runs]
    print(
        f"| median | | {_fmt(statistics.median(ready) if ready else None)} "
        f"| {_fmt(statistics.median(health))} |\n"
    )
    for i, r in enumerate(runs, 1):
        for line in r["startup_lines"]:
            print(f"- run {i}: `{line}`")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": shown, "date": date, "runs": runs}, f, indent=1)


def _ram_gb() -> float:
    return psutil.virtual_memory().total / 2**30


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    main()
