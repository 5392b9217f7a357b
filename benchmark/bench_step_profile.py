"""Where a served token's time goes: the per-step pipeline breakdown (issue: serving hot path).

Starts the server with `--enable-step-profile` on a tiny random-weight Llama that carries the
default model's tokenizer (python/sglang/test/served_tiny.py: its forward takes ~1 ms, so the
pipeline's own cost stands alone), streams `/generate` requests of random token ids at each
concurrency, and prints the client's time per output token next to every stage's time from
`GET /step_profile`:

    .venv/bin/python benchmark/bench_step_profile.py --concurrency 1 32 --save step_profile_cpu.md

"overhead" is the client's median time per output token minus the engine's own decode step
(prepare + forward + sample, what `bench_one_batch` times). `--model-path` profiles another model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import header, load_average, write_result  # noqa: E402

from sglang.test.served_tiny import make_tiny_served_model  # noqa: E402
from sglang.test.test_utils import find_free_port, popen_launch_server, terminate  # noqa: E402

ENGINE_STEP = ("decode prepare", "decode forward", "decode sample")


async def one_request(session: Any, url: str, ids: list[int], output_len: int) -> list[float]:
    """Stream one request; return the gaps between its chunks (seconds)."""
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True},
    }
    stamps = []
    async with session.post(url + "/generate", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


async def run_level(url: str, concurrency: int, requests_n: int, args: Any) -> dict[str, Any]:
    rng = random.Random(concurrency)
    prompts = [
        [rng.randrange(100, 40000) for _ in range(args.input_len)] for _ in range(requests_n)
    ]
    sem = asyncio.Semaphore(concurrency)
    gaps: list[float] = []

    async def bounded(ids: list[int]) -> None:
        async with sem:
            gaps.extend(await one_request(session, url, ids, args.output_len))

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(bounded(p) for p in prompts))
        elapsed = time.perf_counter() - started
    return {
        "tpot_ms": 1e3 * statistics.median(gaps),
        "output_tok_s": requests_n * args.output_len / elapsed,
    }


def table(level: dict[str, Any], phases: dict[str, Any]) -> list[str]:
    engine = sum(phases.get(f"scheduler {p}", {}).get("p50_ms", 0.0) for p in ENGINE_STEP)
    lines = [
        f"Client median time per output token: {level['tpot_ms']:.2f} ms; output "
        f"{level['output_tok_s']:.1f} tok/s; engine decode step (prepare + forward + sample, "
        f"medians): {engine:.2f} ms; overhead: {level['tpot_ms'] - engine:.2f} ms",
        "",
        "| stage | samples | mean ms | median ms | p90 ms |",
        "|---|---|---|---|---|",
    ]
    for name, s in phases.items():
        lines.append(
            f"| {name} | {s['count']} | {s['mean_ms']:.3f} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: the tiny served model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--requests", type=int, default=0, help="per level (default 2 x conc, min 8)"
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--extra", default="", help="more server flags, one string")
    parser.add_argument("--save", default="", help="file name under benchmark/results/")
    parser.add_argument("--json", default="", help="also write the raw summaries here")
    args = parser.parse_args()

    load_before = load_average()
    model = args.model_path or make_tiny_served_model(
        os.path.join(os.path.expanduser("~/.cache/sglang"), "tiny-served-llama")
    )
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ["--enable-step-profile", "--max-total-tokens", "65536", *args.extra.split()]
    proc = popen_launch_server(model, url, other_args=flags, timeout=300)
    md = header("Serving pipeline per-step profile", torch_threads(), load_before)
    md += [f"- Model: `{model}`; server flags: `{' '.join(flags)}`", ""]
    raw: dict[str, Any] = {}
    try:
        for conc in args.concurrency:
            n = args.requests or max(8, 2 * conc)
            asyncio.run(run_level(url, conc, min(n, 4), args))  # warm-up
            requests.get(url + "/step_profile", params={"reset": "true"}, timeout=30)
            level = asyncio.run(run_level(url, conc, n, args))
            phases = requests.get(url + "/step_profile", timeout=30).json()["phases"]
            raw[str(conc)] = {"client": level, "phases": phases}
            md += [f"## Concurrency {conc} ({n} requests, {args.input_len} in / "
                   f"{args.output_len} out)", ""]  # fmt: skip
            md += table(level, phases) + [""]
    finally:
        terminate(proc)
    write_result(md, args.save, save=bool(args.save))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


def torch_threads() -> int:
    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
