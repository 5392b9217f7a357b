"""Legacy `sglang.Runtime(**server_args_fields)`: the HTTP server in a child process.

Older SGLang scripts start a server from Python with `Runtime(model_path=...)`, call
`.generate(...)`, read `.url`, and end with `.shutdown()`. This class validates the fields with
`ServerArgs` in the caller (so a bad value raises at once), runs
`python -m sglang.launch_server` with the same settings as command-line flags on a free port
(unless `port` is given), and waits until `/health` answers 200. `generate` posts to the native
`/generate` route and returns its parsed JSON: a dict, or a list of dicts for list input (never
a JSON string). `shutdown()` (also on context exit and at interpreter exit) stops the server with
SIGTERM, and kills whatever of its process tree is still alive after a grace period.
"""

from __future__ import annotations

import atexit
import dataclasses
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional, Union

import psutil
import requests

from sglang.srt.server_args import ServerArgs

LAUNCH_TIMEOUT_S = 600.0
SHUTDOWN_GRACE_S = 20.0


class Runtime:
    """`sglang.Runtime(model_path=..., **server_args_fields)`; `log_level` defaults to `error`."""

    def __init__(self, launch_timeout: float = LAUNCH_TIMEOUT_S, **kwargs: Any) -> None:
        kwargs.setdefault("log_level", "error")
        if kwargs.get("port") is None:
            kwargs["port"] = _free_port(kwargs.get("host", "127.0.0.1"))
        self.server_args = ServerArgs(**kwargs)
        self.url = self.server_args.url()
        self.generate_url = f"{self.url}/generate"
        headers = {}
        if self.server_args.api_key:
            headers["Authorization"] = f"Bearer {self.server_args.api_key}"
        self._session = requests.Session()
        self._session.headers.update(headers)
        cmd = [sys.executable, "-m", "sglang.launch_server", *_to_argv(kwargs)]
        self._proc: Optional[subprocess.Popen] = subprocess.Popen(cmd)
        self.pid = self._proc.pid
        atexit.register(self.shutdown)
        try:
            self._wait_healthy(launch_timeout)
        except BaseException:
            self.shutdown()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll() if self._proc is not None else -1
            if code is not None:
                raise RuntimeError(
                    f"the server process exited with code {code} before it was ready "
                    "(its log is above; pass log_level='info' for more)"
                )
            try:
                if self._session.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy within {timeout:.0f}s")

    # ---- requests ------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Optional[Union[str, list[str]]] = None,
        sampling_params: Optional[Union[dict[str, Any], list[dict[str, Any]]]] = None,
        return_logprob: Union[bool, list[bool]] = False,
        logprob_start_len: Union[int, list[int]] = -1,
        top_logprobs_num: Union[int, list[int]] = 0,
        input_ids: Optional[Union[list[int], list[list[int]]]] = None,
        **kwargs: Any,
    ) -> Union[dict[str, Any], list[dict[str, Any]]]:
        """What `/generate` answers; raises RuntimeError with the server's message otherwise."""
        body: dict[str, Any] = {
            "sampling_params": sampling_params or {},
            "return_logprob": return_logprob,
            "logprob_start_len": logprob_start_len,
            "top_logprobs_num": top_logprobs_num,
            **kwargs,
        }
        if input_ids is not None:
            body["input_ids"] = input_ids
        else:
            body["text"] = prompt
        return self._post("/generate", body)

    def get_server_info(self) -> dict[str, Any]:
        return self._get("/get_server_info")

    def get_model_info(self) -> dict[str, Any]:
        return self._get("/get_model_info")

    def flush_cache(self) -> bool:
        return self._session.post(f"{self.url}/flush_cache", timeout=30).status_code == 200

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        resp = self._session.post(f"{self.url}{path}", json=body)
        return _parse(resp)

    def _get(self, path: str) -> Any:
        return _parse(self._session.get(f"{self.url}{path}", timeout=30))

    # ---- lifecycle -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the server and every process it started; safe to call more than once."""
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is None:
            return
        atexit.unregister(self.shutdown)
        self._session.close()
        try:
            tree = [psutil.Process(proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(SHUTDOWN_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        # The server stops its children on SIGTERM; anything left over is killed.
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        if proc.poll() is None:
            proc.wait(5)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        self.shutdown()


def _parse(resp: requests.Response) -> Any:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code != 200:
        message = data.get("message") if isinstance(data, dict) else resp.text
        raise RuntimeError(f"the server answered {resp.status_code}: {message}")
    return data


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _to_argv(kwargs: dict[str, Any]) -> list[str]:
    """ServerArgs fields as launch flags; only the fields the caller set are passed on."""
    fields = {f.name for f in dataclasses.fields(ServerArgs)}
    argv: list[str] = []
    for name, value in kwargs.items():
        if name not in fields:
            raise TypeError(f"Runtime got an unknown server argument {name!r}")
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(str(v) for v in value)]
        else:
            # The '=' form keeps values that start with '-' from reading as flags.
            argv.append(f"{flag}={value}")
    return argv
