"""Helpers for tests that run the real server: free ports, launching, waiting, killing.

`popen_launch_server` starts `python -m sglang.launch_server` in its own process group, tees its
output into a list the test can search (`proc.log_lines`), and waits for `/health` to answer 200.
`kill_process_tree` stops a process and every descendant; `running_server` wraps both for
module fixtures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional

import psutil
import requests

DEFAULT_MODEL_NAME_FOR_TEST = "smollm2-135m-instruct"
DEFAULT_URL_FOR_TEST = "http://127.0.0.1"
DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH = 300.0


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_process_tree(pid: int, sig: int = signal.SIGKILL, include_parent: bool = True) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    children = parent.children(recursive=True)
    for proc in children + ([parent] if include_parent else []):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children + ([parent] if include_parent else []), timeout=10)


def _tee(proc: subprocess.Popen, lines: list[str], echo: bool) -> None:
    for raw in proc.stdout:  # type: ignore[union-attr]
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        if echo:
            print(line, file=sys.stderr)


def popen_launch_server(
    model: str,
    base_url: str,
    timeout: float = DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH,
    other_args: Optional[list[str]] = None,
    api_key: Optional[str] = None,
    wait_ready: bool = True,
    echo: bool = False,
) -> subprocess.Popen:
    """Start the server on base_url's port; with wait_ready, return once /health is 200.

    The returned Popen carries `log_lines` (the combined output so far) and `health_codes` (every
    distinct /health status seen while waiting, in order; -1 for connection refused).
    """
    host, port = base_url.split("//", 1)[-1].rsplit(":", 1)
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model]
    cmd += ["--host", host, "--port", port, *(other_args or [])]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.log_lines = []  # type: ignore[attr-defined]
    proc.health_codes = []  # type: ignore[attr-defined]
    threading.Thread(target=_tee, args=(proc, proc.log_lines, echo), daemon=True).start()
    if not wait_ready:
        return proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(proc.log_lines[-30:])  # type: ignore[attr-defined]
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{tail}")
        try:
            code = requests.get(f"{base_url}/health", timeout=2).status_code
        except requests.RequestException:
            code = -1
        if not proc.health_codes or proc.health_codes[-1] != code:  # type: ignore[attr-defined]
            proc.health_codes.append(code)  # type: ignore[attr-defined]
        if code == 200:
            return proc
        time.sleep(0.2)
    kill_process_tree(proc.pid)
    raise TimeoutError(f"server did not become healthy within {timeout:.0f}s")


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_pids_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """Wait until none of pids runs; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and _not_zombie(p)]
        time.sleep(0.1)
    return alive


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def terminate(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    os.kill(proc.pid, sig)
    return proc.wait(timeout)


@contextlib.contextmanager
def running_server(
    model: str = DEFAULT_MODEL_NAME_FOR_TEST, other_args: Optional[list[str]] = None
) -> Iterator[str]:
    """A server on a free port for the duration of the block (module fixtures); yields its URL.
    It is stopped with SIGTERM, and its process tree killed if that does not end it."""
    url = f"{DEFAULT_URL_FOR_TEST}:{find_free_port()}"
    proc = popen_launch_server(model, url, other_args=other_args or [])
    try:
        yield url
    finally:
        try:
            terminate(proc, signal.SIGTERM, timeout=30)
        finally:
            kill_process_tree(proc.pid)
