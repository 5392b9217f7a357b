"""madengine-style benchmark wrapper: one run of this SGLang-compatible engine, two result lines.

Owns one benchmark run from start to finish and the summary a harness such as madengine reads
with a regex from the log:

    performance: <N> requests_per_second
    tokens_per_second: <N>

Modes:
  server   start `python -m sglang.launch_server`, wait for /health, drive it with
           `python -m sglang.bench_serving` (its JSONL record, `--output-file`), stop the server
  offline  run `python -m sglang.bench_offline_throughput` (an in-process Engine, no HTTP; its
           JSON record, `--result-filename`)

Flags this wrapper does not know are passed on to the server (server mode) or to the offline
benchmark, which accepts every server flag: `run_sglang.py --mode offline --tp 8
--mem-fraction-static 0.85`. `tokens_per_second` is the output (generated) token throughput by
default; `--tokens-metric total` reports input + output tokens instead. The tools' own output is
echoed as it comes; the two lines come last, and only when the run succeeded (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple, Optional

DEFAULT_MODEL = os.environ.get("MODEL_PATH", "smollm2-135m-instruct")
STOP_TIMEOUT_S = 60.0
TOKEN_KEYS = {"output": "output_throughput", "total": "total_throughput"}
# Fallback when a tool wrote no record: the labels of its printed result block (docs/compat.md).
BLOCK_LABELS = {
    "request_throughput": "Request throughput (req/s):",
    "output_throughput": "Output token throughput (tok/s):",
    "total_throughput": "Total token throughput (tok/s):",
}


class WrapperError(Exception):
    """A failed step; printed as one `error:` line."""


class Throughput(NamedTuple):
    requests_per_second: float
    tokens_per_second: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the engine and print madengine's performance lines.",
        allow_abbrev=False,  # unknown flags go to the engine; prefixes must not swallow them
    )
    parser.add_argument("--mode", choices=("server", "offline"), default="server")
    parser.add_argument("--model-path", default=DEFAULT_MODEL, help="Model (env MODEL_PATH).")
    parser.add_argument("--tp", type=int, default=1, help="Tensor parallel size.")
    parser.add_argument("--python", default=sys.executable, help="Interpreter for the tools.")
    data = parser.add_argument_group("workload")
    data.add_argument(
        "--dataset-name",
        default="random",
        choices=("random", "sharegpt", "generated-shared-prefix"),
    )
    data.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (sharegpt only).")
    data.add_argument("--num-prompts", type=int, default=200)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=256)
    data.add_argument("--random-range-ratio", type=float, default=0.0)
    data.add_argument("--seed", type=int, default=1)
    serve = parser.add_argument_group("server mode")
    serve.add_argument("--backend", default="sglang", help="bench_serving --backend.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=30000, help="0 picks a free port.")
    serve.add_argument("--max-concurrency", type=int, default=None)
    serve.add_argument("--request-rate", default="inf", help="Requests per second (inf: burst).")
    serve.add_argument("--health-timeout", type=float, default=1800.0, help="Seconds.")
    out = parser.add_argument_group("results")
    out.add_argument(
        "--tokens-metric",
        choices=sorted(TOKEN_KEYS),
        default="output",
        help="Which token throughput tokens_per_second reports.",
    )
    out.add_argument(
        "--output-dir", default=None, help="Keep the server log and records here (default: temp)."
    )
    return parser


def workload_flags(args: argparse.Namespace) -> list[str]:
    flags = [
        "--dataset-name", args.dataset_name,
        "--num-prompts", str(args.num_prompts),
        "--random-input-len", str(args.random_input_len),
        "--random-output-len", str(args.random_output_len),
        "--random-range-ratio", str(args.random_range_ratio),
        "--seed", str(args.seed),
    ]  # fmt: skip
    if args.dataset_path:
        flags += ["--dataset-path", args.dataset_path]
    return flags


def run_tool(cmd: list[str]) -> str:
    """Run a benchmark tool, echoing its output line by line; returns the output."""
    print("+ " + " ".join(cmd), flush=True)
    lines: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        status = proc.wait()
    if status != 0:
        raise WrapperError(f"{cmd[2]} exited with status {status}")
    return "".join(lines)


def read_throughput(record_file: Path, printed: str, tokens_metric: str) -> Throughput:
    """From the tool's last JSON record; from its printed result block when there is none."""
    token_key = TOKEN_KEYS[tokens_metric]
    values: dict[str, float] = {}
    if record_file.exists():
        lines = [ln for ln in record_file.read_text().splitlines() if ln.strip()]
        if lines:
            record = json.loads(lines[-1])
            values = {k: float(record[k]) for k in ("request_throughput", token_key) if k in record}
    for key in ("request_throughput", token_key):
        if key not in values:
            label = re.escape(BLOCK_LABELS[key])
            found = re.findall(rf"^{label}\s+([0-9.eE+-]+)\s*$", printed, re.M)
            if not found:
                raise WrapperError(f"no {key} in {record_file} nor in the printed result")
            values[key] = float(found[-1])
    return Throughput(values["request_throughput"], values[token_key])


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = "".join(log_file.read_text(errors="replace").splitlines(True)[-20:])
            raise WrapperError(f"the server exited with status {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while loading and warming up
        if time.monotonic() > deadline:
            raise WrapperError(f"{url}/health not healthy after {timeout:.0f}s (log: {log_file})")
        time.sleep(1.0)


def stop_server(proc: subprocess.Popen) -> None:
    """TERM the server's process group (scheduler and detokenizer too), KILL after a timeout."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_server_mode(args: argparse.Namespace, extra: list[str], workdir: Path) -> Throughput:
    port = args.port or free_port(args.host)
    if port_in_use(args.host, port):
        raise WrapperError(f"{args.host}:{port} is already in use; pick --port (0: a free one)")
    url = f"http://{args.host}:{port}"
    log_file = workdir / "server.log"
    server_cmd = [
        args.python, "-m", "sglang.launch_server",
        "--model-path", args.model_path,
        "--tp", str(args.tp),
        "--host", args.host,
        "--port", str(port),
        *extra,
    ]  # fmt: skip
    print("+ " + " ".join(server_cmd) + f"  (log: {log_file})", flush=True)
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            server_cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        started = time.monotonic()
        wait_healthy(url, proc, args.health_timeout, log_file)
        print(f"server healthy at {url} after {time.monotonic() - started:.1f}s", flush=True)
        record_file = workdir / "bench_serving.jsonl"
        bench_cmd = [
            args.python, "-m", "sglang.bench_serving",
            "--backend", args.backend,
            "--base-url", url,
            "--request-rate", str(args.request_rate),
            "--output-file", str(record_file),
            "--disable-tqdm",
            *workload_flags(args),
        ]  # fmt: skip
        if args.max_concurrency:
            bench_cmd += ["--max-concurrency", str(args.max_concurrency)]
        printed = run_tool(bench_cmd)
    finally:
        stop_server(proc)
    return read_throughput(record_file, printed, args.tokens_metric)


def run_offline_mode(args: argparse.Namespace, extra: list[str], workdir: Path) -> Throughput:
    record_file = workdir / "bench_offline.jsonl"
    cmd = [
        args.python, "-m", "sglang.bench_offline_throughput",
        "--model-path", args.model_path,
        "--tp", str(args.tp),
        "--result-filename", str(record_file),
        *workload_flags(args),
        *extra,
    ]  # fmt: skip
    printed = run_tool(cmd)
    return read_throughput(record_file, printed, args.tokens_metric)


def main(argv: Optional[list[str]] = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    # NOTE: SIGTERM (a harness timeout) must still run the finally blocks that stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="run_sglang_") as tmp:
        workdir = Path(args.output_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runner = run_server_mode if args.mode == "server" else run_offline_mode
        try:
            result = runner(args, extra, workdir)
        except WrapperError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"performance: {result.requests_per_second:.4f} requests_per_second")
    print(f"tokens_per_second: {result.tokens_per_second:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
