"""Served decode speed with the overlap schedule (default) against `--disable-overlap-schedule`.

For each model (the tiny served Llama, whose ~1 ms forward leaves the pipeline's cost alone, and
SmolLM2-135M), starts one server per schedule, alternating (on, off, on, off, ... `--rounds`
times, so drifting machine load hits both), and streams random-id `/generate` requests at each
concurrency (the client of bench_step_profile.py). Records the load average before each server:

    .venv/bin/python benchmark/bench_overlap_schedule.py --save overlap_schedule_cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step_profile import run_level  # noqa: E402
from machine_info import header, load_average, write_result  # noqa: E402

from sglang.test.served_tiny import make_tiny_served_model  # noqa: E402
from sglang.test.test_utils import find_free_port, popen_launch_server, terminate  # noqa: E402

SCHEDULES = {"overlap": [], "sequential": ["--disable-overlap-schedule"]}


def serve_and_measure(model: str, flags: list[str], args: Any) -> dict[int, dict[str, float]]:
    url = f"http://127.0.0.1:{find_free_port()}"
    proc = popen_launch_server(model, url, other_args=flags, timeout=600)
    try:
        out = {}
        for conc in args.concurrency:
            n = max(4, 2 * conc)
            asyncio.run(run_level(url, conc, min(n, 4), args))  # warm-up
            out[conc] = asyncio.run(run_level(url, conc, n, args))
        return out
    finally:
        terminate(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "/tmp/smollm2-135m-instruct-hf"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--extra", default="", help="more server flags, one string")
    parser.add_argument("--save", default="", help="file name under benchmark/results/")
    args = parser.parse_args()

    md = header(
        "Overlap schedule vs --disable-overlap-schedule", os.cpu_count() or 1, load_average()
    )
    base = ["--max-total-tokens", "16384", *args.extra.split()]
    for name in args.models:
        model = name
        if name == "tiny":
            model = make_tiny_served_model(
                os.path.join(os.path.expanduser("~/.cache/sglang"), "tiny-served-llama")
            )
        runs: dict[str, list[dict[int, dict[str, float]]]] = {s: [] for s in SCHEDULES}
        md += [
            f"## {name} ({args.input_len} in / {args.output_len} out, flags `{' '.join(base)}`)",
            "",
        ]
        md += ["| round | schedule | load avg before | " + " | ".join(
            f"c{c} TPOT ms | c{c} tok/s" for c in args.concurrency) + " |"]  # fmt: skip
        md += ["|---" * (3 + 2 * len(args.concurrency)) + "|"]
        for rnd in range(args.rounds):
            for schedule, flags in SCHEDULES.items():
                load = load_average()
                res = serve_and_measure(model, base + flags, args)
                runs[schedule].append(res)
                cells = " | ".join(
                    f"{res[c]['tpot_ms']:.2f} | {res[c]['output_tok_s']:.1f}"
                    for c in args.concurrency
                )
                md.append(f"| {rnd + 1} | {schedule} | {load} | {cells} |")
                print(md[-1], flush=True)
        md.append("")
        for c in args.concurrency:
            med = {s: statistics.median(r[c]["output_tok_s"] for r in runs[s]) for s in SCHEDULES}
            md.append(
                f"- concurrency {c}: median output tok/s overlap {med['overlap']:.1f}, "
                f"sequential {med['sequential']:.1f} ({med['overlap'] / med['sequential']:.3f}x)"
            )
        md.append("")
    write_result(md, args.save, save=bool(args.save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
