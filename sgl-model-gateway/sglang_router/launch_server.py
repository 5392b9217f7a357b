"""`python -m sglang_router.launch_server --model-path M --dp-size N [server flags]
[--router-* flags]`: start N servers (one data-parallel replica each, on free ports from
`--router-dp-worker-base-port`, GPUs `i * tp_size` onwards) and the router on `--host:--port` in
front of them; stop them all together.

Every flag that is neither a `--router-*` flag nor `--host`, `--port`, `--dp-size` goes to each
server unchanged, so the servers validate their own flags (a bad one ends start-up with its
error and stops the others). SIGINT or SIGTERM stops the router, then every server's process
group.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

from sglang_router.launch_router import launch_router
from sglang_router.router_args import RouterArgs

logger = logging.getLogger("sglang_router")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_ports(host: str, base: int, count: int) -> list[int]:
    """`count` free ports from `base` upwards, spaced apart so a server's own side ports (it
    takes a few above its HTTP port) do not collide with the next server's."""
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if _port_free(host, port):
            ports.append(port)
        port += random.randint(100, 1000)
    return ports


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def watch(procs: list[subprocess.Popen], urls: list[str]) -> None:
    """Until every server answers /health once: a server that exits ends the whole group (the
    router would wait for it for `--router-worker-startup-timeout-secs`). Later a dead server
    just leaves the router's pool through the health checks."""
    import requests

    pending = set(range(len(procs)))
    while pending:
        for i in sorted(pending):
            if procs[i].poll() is not None:
                logger.error("server on %s exited with %s; stopping", urls[i], procs[i].returncode)
                stop(procs)
                os._exit(1)
            try:
                if requests.get(urls[i] + "/health", timeout=2).status_code == 200:
                    pending.discard(i)
            except requests.RequestException:
                pass
        time.sleep(1.0)


def parse(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    # NOTE: no abbreviations, so a server flag is never taken for a router flag it prefixes.
    parser = argparse.ArgumentParser(
        prog="python -m sglang_router.launch_server", allow_abbrev=False
    )
    parser.add_argument("--host", type=str, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dp-size", "--dp", "--data-parallel-size", type=int, default=1)
    parser.add_argument("--router-dp-worker-base-port", type=int, default=31000)
    RouterArgs.add_cli_args(parser, use_router_prefix=True, exclude_host_port=True)
    args, server_argv = parser.parse_known_args(argv)
    tp = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    tp.add_argument("--tp-size", "--tp", "--tensor-parallel-size", type=int, default=1)
    args.tp_size = tp.parse_known_args(server_argv)[0].tp_size
    return args, server_argv


def main(argv: Optional[list[str]] = None) -> None:
    args, server_argv = parse(argv)
    router_args = RouterArgs.from_cli_args(args, use_router_prefix=True)
    router_args.host, router_args.port = args.host, args.port
    ports = find_ports(args.host, args.router_dp_worker_base_port, args.dp_size)
    router_args.worker_urls = [f"http://{args.host}:{port}" for port in ports]
    problem = router_args.validate()
    if problem:
        sys.exit(f"error: {problem}")
    procs = []
    for i, port in enumerate(ports):
        cmd = [sys.executable, "-m", "sglang.launch_server", *server_argv]
        cmd += ["--host", args.host, "--port", str(port), "--base-gpu-id", str(i * args.tp_size)]
        procs.append(subprocess.Popen(cmd, start_new_session=True))
    threading.Thread(target=watch, args=(procs, router_args.worker_urls), daemon=True).start()

    # NOTE: uvicorn restores these handlers when the router stops and re-raises the signal it
    # caught, so they also run after a SIGTERM/SIGINT the router handled.
    def on_signal(signum: int, frame) -> None:
        stop(procs)
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        status = launch_router(router_args)
    finally:
        stop(procs)
    sys.exit(status)


if __name__ == "__main__":
    main()
