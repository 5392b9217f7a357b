"""Our router (sgl-model-gateway) against upstream's Rust router (sglang-router 0.3.2, kept by
`make install` in .venv/upstream-router) in one run, on one machine.

1. Added latency and maximum throughput with a stub worker (this file with `--stub-port`: an
   aiohttp server answering /generate at once): sequential requests straight to the stub and
   through each router give p50/p99 of the router's added latency; a closed loop of
   `--rps-concurrency` clients for `--rps-seconds` gives requests per second through each.
2. Generated-shared-prefix workload on two real servers (`--model`, small KV pools) behind each
   router with cache_aware: `--groups` system prompts of `--prefix-words` words, `--per-group`
   questions each, shuffled, `--concurrency` streams at a time; radix hit rate (sum of
   cached_tokens / sum of prompt_tokens the workers report), requests and output tokens per
   second, TTFT (first streamed chunk) mean and p50. The workers are warmed up with direct
   requests first, the routers run in ABBA order (`--rounds` times), caches are flushed before
   each pass, and each router's figures are the mean of its passes.

Run on a quiet machine: .venv/bin/python benchmark/bench_model_gateway.py
Writes benchmark/results/model_gateway_cpu.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
UPSTREAM = REPO / ".venv" / "upstream-router"
WORDS = "alpha beta gamma delta river stone cloud maple ember quartz violet harbor lantern".split()


# ------------------------------------------------------------------------------ stub worker


def run_stub(port: int) -> None:
    from aiohttp import web

    body = json.dumps(
        {"text": "ok", "output_ids": [1], "meta_info": {"prompt_tokens": 1, "completion_tokens": 1}}
    )

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=body, content_type="application/json")

    async def info(request: web.Request) -> web.Response:
        if request.path == "/get_load":
            return web.json_response(
                [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
            )
        return web.json_response({"model_path": "stub", "dp_size": 1, "data": []})

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/{tail:.*}", info)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ---------------------------------------------------------------------------------- helpers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def start_router(kind: str, workers: list[str], *extra: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = dict(os.environ)
    if kind == "upstream":
        env["PYTHONPATH"] = str(UPSTREAM)
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port())]
    cmd += ["--log-level", "warn", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", proc, 120)
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ------------------------------------------------------------------------- stub measurements

STUB_BODY = {"text": "hello", "sampling_params": {"max_new_tokens": 1}}


async def sequential_latency(url: str, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 50):
            t = time.perf_counter()
            async with s.post(url + "/generate", json=STUB_BODY) as r:
                await r.read()
                assert r.status == 200, r.status
            if i >= 50:  # warm-up
                out.append(time.perf_counter() - t)
    return out


async def closed_loop_rps(url: str, concurrency: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            async with s.post(url + "/generate", json=STUB_BODY) as r:
                await r.read()
                done += r.status == 200

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        start = time.perf_counter()
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


def stub_part(args) -> dict:
    port = free_port()
    stub = subprocess.Popen(
        [sys.executable, __file__, "--stub-port", str(port)], start_new_session=True
    )
    stub_url = f"http://127.0.0.1:{port}"
    results: dict = {}
    try:
        wait_http(stub_url + "/health", stub)
        direct = asyncio.run(sequential_latency(stub_url, args.latency_requests))
        results["direct"] = {
            "p50_ms": pct(direct, 0.5) * 1e3,
            "p99_ms": pct(direct, 0.99) * 1e3,
            "rps": asyncio.run(closed_loop_rps(stub_url, args.rps_concurrency, args.rps_seconds)),
        }
        for kind in ("ours", "upstream"):
            url, proc = start_router(kind, [stub_url], "--policy", "round_robin")
            try:
                lat = asyncio.run(sequential_latency(url, args.latency_requests))
                rps = asyncio.run(closed_loop_rps(url, args.rps_concurrency, args.rps_seconds))
            finally:
                stop(proc)
            results[kind] = {
                "p50_ms": pct(lat, 0.5) * 1e3,
                "p99_ms": pct(lat, 0.99) * 1e3,
                "added_p50_ms": (pct(lat, 0.5) - pct(direct, 0.5)) * 1e3,
                "added_p99_ms": (pct(lat, 0.99) - pct(direct, 0.99)) * 1e3,
                "rps": rps,
            }
            print(kind, results[kind], flush=True)
    finally:
        stop(stub)
    return results


# --------------------------------------------------------------------- shared-prefix workload


def prefix_prompts(args) -> list[str]:
    rng = random.Random(0)
    prefixes = [
        " ".join(rng.choice(WORDS) for _ in range(args.prefix_words)) for _ in range(args.groups)
    ]
    prompts = [
        f"{p}\nQuestion {i}: {rng.choice(WORDS)}?" for p in prefixes for i in range(args.per_group)
    ]
    rng.shuffle(prompts)
    return prompts


async def run_workload(url: str, prompts: list[str], args) -> dict:
    sem = asyncio.Semaphore(args.concurrency)
    ttfts, cached, prompt_tokens, out_tokens = [], 0, 0, 0

    async def one(s: aiohttp.ClientSession, text: str) -> None:
        nonlocal cached, prompt_tokens, out_tokens
        body = {
            "text": text,
            "stream": True,
            "sampling_params": {
                "max_new_tokens": args.output_len,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        async with sem:
            t = time.perf_counter()
            async with s.post(url + "/generate", json=body) as r:
                assert r.status == 200, await r.text()
                last, first = None, True
                async for line in r.content:
                    if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                        if first:
                            ttfts.append(time.perf_counter() - t)
                            first = False
                        last = line
        meta = json.loads(last[6:])["meta_info"]
        cached += meta["cached_tokens"]
        prompt_tokens += meta["prompt_tokens"]
        out_tokens += meta["completion_tokens"]

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        start = time.perf_counter()
        await asyncio.gather(*(one(s, p) for p in prompts))
        elapsed = time.perf_counter() - start
    return {
        "started": start,
        "hit_rate": cached / prompt_tokens,
        "req_per_s": len(prompts) / elapsed,
        "out_tok_per_s": out_tokens / elapsed,
        "ttft_mean_s": statistics.mean(ttfts),
        "ttft_p50_s": pct(ttfts, 0.5),
        "elapsed_s": elapsed,
    }


def serving_part(args) -> dict:
    server_args = ["--max-total-tokens", "16384", "--skip-server-warmup"]
    workers, procs = [], []
    for _ in range(2):
        port = free_port()
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model]
        cmd += ["--host", "127.0.0.1", "--port", str(port), *server_args]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        )
        workers.append(f"http://127.0.0.1:{port}")
    results: dict = {}
    try:
        for url, proc in zip(workers, procs):
            wait_http(url + "/health", proc)
        warm_up(workers, args)
        prompts = prefix_prompts(args)
        runs: dict[str, list[dict]] = {"ours": [], "upstream": []}
        # ABBA order, so neither router always runs first (on the coldest workers) or last.
        for kind in ["ours", "upstream", "upstream", "ours"] * args.rounds:
            for w in workers:
                requests.post(w + "/flush_cache", timeout=60)
            url, proc = start_router(kind, workers, "--policy", "cache_aware")
            try:
                runs[kind].append(asyncio.run(run_workload(url, prompts, args)))
            finally:
                stop(proc)
            print(kind, runs[kind][-1], flush=True)
        for kind, passes in runs.items():
            results[kind] = {
                k: statistics.mean(r[k] for r in passes) for k in passes[0] if k != "started"
            }
            results[kind]["passes"] = passes
    finally:
        for proc in procs:
            stop(proc)
    return results


def warm_up(workers: list[str], args) -> None:
    """Requests straight to each worker (other text than the workload's) before any router is
    measured: the servers start with --skip-server-warmup, and a worker's first batches are
    slower, which would count against whichever router ran first."""
    rng = random.Random(1)
    for w in workers:
        for n in (8, args.prefix_words // 2, args.prefix_words):
            text = " ".join(rng.choice(WORDS[::-1]) for _ in range(n))
            sp = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
            requests.post(w + "/generate", json={"text": text, "sampling_params": sp}, timeout=600)


def report(args, load_before: str, stub: dict, serving: dict) -> list[str]:
    sys.path.insert(0, str(HERE))
    from machine_info import header

    md = header(
        "Router: ours (sgl-model-gateway) vs upstream sglang-router 0.3.2",
        os.cpu_count() or 0,
        load_before,
    )
    if stub:
        md += ["", "## Stub worker: added latency and maximum throughput", ""]
        md += [
            f"{args.latency_requests} sequential requests; closed loop of {args.rps_concurrency} clients for {args.rps_seconds} s.",
            "",
        ]
        md += [
            "| path | p50 ms | p99 ms | added p50 ms | added p99 ms | requests/s |",
            "|---|---|---|---|---|---|",
        ]
        d = stub["direct"]
        md.append(
            f"| direct to stub | {d['p50_ms']:.3f} | {d['p99_ms']:.3f} | - | - | {d['rps']:.0f} |"
        )
        for kind in ("ours", "upstream"):
            r = stub[kind]
            md.append(
                f"| {kind} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['added_p50_ms']:.3f} | "
                f"{r['added_p99_ms']:.3f} | {r['rps']:.0f} |"
            )
        md += [
            "",
            f"Throughput ratio ours / upstream: {stub['ours']['rps'] / stub['upstream']['rps']:.2f}",
        ]
    if serving:
        md += ["", f"## Generated shared prefix on two servers ({args.model}, cache_aware)", ""]
        md += [
            f"{args.groups} prefixes x {args.per_group} questions, {args.prefix_words}-word prefixes, "
            f"{args.output_len} output tokens, {args.concurrency} concurrent streams. Workers "
            f"warmed up with direct requests first; routers run in ABBA order x {args.rounds} "
            "(ours, upstream, upstream, ours), caches flushed before each pass; the table is the "
            "mean of each router's passes.",
            "",
            "| router | radix hit rate | requests/s | output tok/s | TTFT mean s | TTFT p50 s |",
            "|---|---|---|---|---|---|",
        ]
        for kind in ("ours", "upstream"):
            r = serving[kind]
            md.append(
                f"| {kind} | {r['hit_rate']:.3f} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
                f"{r['ttft_mean_s']:.3f} | {r['ttft_p50_s']:.3f} |"
            )
        o, u = serving["ours"], serving["upstream"]
        md += [
            "",
            f"Ratios ours / upstream: hit rate {o['hit_rate'] / u['hit_rate']:.3f}, throughput {o['req_per_s'] / u['req_per_s']:.3f}",
            "",
            "Passes in run order (requests/s): "
            + ", ".join(
                f"{kind} {r['req_per_s']:.2f}"
                for kind, r in sorted(
                    ((k, r) for k in ("ours", "upstream") for r in serving[k]["passes"]),
                    key=lambda kr: kr[1]["started"],
                )
            ),
        ]
    return md


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stub-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--latency-requests", type=int, default=2000)
    p.add_argument("--rps-concurrency", type=int, default=32)
    p.add_argument("--rps-seconds", type=float, default=10.0)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--prefix-words", type=int, default=300)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds of the serving part")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--skip-stub", action="store_true")
    p.add_argument("--max-wait-quiet-s", type=float, default=1800)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    if args.stub_port:
        run_stub(args.stub_port)
        return
    if not (UPSTREAM / "sglang_router").is_dir():
        sys.exit("upstream sglang-router is not in .venv/upstream-router; run make install")
    sys.path.insert(0, str(HERE))
    from machine_info import RESULTS, load_average, write_result
    from quiet_machine import wait_for_quiet_machine

    quiet = wait_for_quiet_machine(args.max_wait_quiet_s, max_load1=1.0)
    load_before = load_average()
    stub = {} if args.skip_stub else stub_part(args)
    serving = {} if args.skip_serving else serving_part(args)
    md = report(args, load_before, stub, serving)
    if quiet["busy"]:
        md.insert(
            1, "\n**The machine was not quiet when this run started; numbers are indicative only.**"
        )
    write_result(md, "model_gateway_cpu.md", save=not args.no_save)
    if not args.no_save:
        (RESULTS / "model_gateway_cpu.json").write_text(
            json.dumps({"stub": stub, "serving": serving, "quiet": quiet}, indent=1)
        )


if __name__ == "__main__":
    main()
