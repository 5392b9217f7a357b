"""Does a huge prompt stall the server? /health latency while a ~3 MB prompt is tokenized.

Starts the server twice on SmolLM2: as shipped (long prompts tokenized in a worker thread,
tokenizer_manager.TOKENIZE_OFFLOAD_CHARS) and with the offload switched off (every prompt
tokenized on the event loop, the behaviour before). Each run posts one big prompt to /generate
(it ends in a 400: longer than the context) and polls /health every 0.1 s meanwhile.
Writes benchmark/results/event_loop_tokenize.md.

Usage: .venv/bin/python benchmark/bench_event_loop_tokenize.py [--chars 3250000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import header, load_average  # noqa: E402

from sglang.test.test_utils import (  # noqa: E402
    DEFAULT_MODEL_NAME_FOR_TEST,
    find_free_port,
    kill_process_tree,
)

# Runs the server in this interpreter with the offload threshold patched first (the tokenizer
# manager lives in the HTTP server's process).
_LAUNCH = (
    "import sys; import sglang.srt.managers.tokenizer_manager as tm; "
    "tm.TOKENIZE_OFFLOAD_CHARS = int(sys.argv[1]); "
    "from sglang.srt.entrypoints.http_server import main_from_argv; main_from_argv(sys.argv[2:])"
)


def run(threshold: int, chars: int) -> dict[str, float]:
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", _LAUNCH, str(threshold), "--model-path",
           DEFAULT_MODEL_NAME_FOR_TEST, "--port", str(port), "--max-total-tokens", "8192"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        result: dict[str, float] = {}

        def big() -> None:
            start = time.monotonic()
            body = {
                "text": "hello world. " * (chars // 13),
                "sampling_params": {"max_new_tokens": 1},
            }
            status = requests.post(f"{url}/generate", json=body, timeout=600).status_code
            result["request_s"] = time.monotonic() - start
            result["status"] = status

        worker = threading.Thread(target=big)
        worker.start()
        time.sleep(0.5)
        latencies = []
        while worker.is_alive():
            start = time.monotonic()
            requests.get(f"{url}/health", timeout=600)
            latencies.append(time.monotonic() - start)
            time.sleep(0.1)
        worker.join()
        latencies.sort()
        result["health_max_s"] = latencies[-1] if latencies else float("nan")
        result["health_median_s"] = latencies[len(latencies) // 2] if latencies else float("nan")
        result["health_polls"] = len(latencies)
        return result
    finally:
        kill_process_tree(proc.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=3_250_000)
    args = parser.parse_args()
    load = load_average()
    rows = [("worker thread (shipped)", run(4096, args.chars)),
            ("event loop (offload off)", run(10**12, args.chars))]  # fmt: skip
    lines = header("Event loop during a big tokenization", 2, load)
    lines += ["", f"One /generate with a {args.chars / 1e6:.2f} MB prompt (answered 400: longer "
              "than the context); /health polled every 0.1 s while it runs.", "",
              "| tokenization | request (s) | status | /health polls | median (s) | max (s) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows:
        lines.append(f"| {name} | {r['request_s']:.1f} | {r['status']:.0f} | "
                     f"{r['health_polls']:.0f} | {r['health_median_s']:.3f} | "
                     f"{r['health_max_s']:.2f} |")  # fmt: skip
    out = Path(__file__).resolve().parent / "results" / "event_loop_tokenize.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
