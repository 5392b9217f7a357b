"""The router (`python -m sglang_router.launch_router`) as a process for tests: started on a free
port in front of the given workers, its output kept in `log`, its Prometheus metrics read back
by name and labels; `running_router` wraps it for a with-block.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from typing import Iterator

import requests

from sglang.test.test_utils import DEFAULT_URL_FOR_TEST, find_free_port


class RouterProcess:
    def __init__(self, *args: str) -> None:
        self.url = f"{DEFAULT_URL_FOR_TEST}:{find_free_port()}"
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
        cmd += ["--port", self.url.rsplit(":", 1)[1], "--prometheus-port", str(find_free_port())]
        cmd += ["--worker-startup-check-interval", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.log: list[str] = []
        threading.Thread(target=self._tee, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "router exited:\n" + "\n".join(self.log)
            try:
                if requests.get(f"{self.url}/liveness", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise TimeoutError("router did not start")

    def _tee(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.log.append(line.decode(errors="replace").rstrip())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        prefix = f"{name}{{{want}}} " if want else f"{name} "
        lines = self.get("/metrics").text.splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith(prefix))


@contextlib.contextmanager
def running_router(*args: str) -> Iterator[RouterProcess]:
    """A router with these flags for the duration of the block."""
    router = RouterProcess(*args)
    try:
        yield router
    finally:
        router.stop()
