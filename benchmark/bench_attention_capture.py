"""Cost of attention-token capture on decode: SmolLM2 on CPU, batch 16, four configurations.

  * off: a server without --return-attention-tokens (no capture object, nothing allocated);
  * on, unused: the flag on (buffers allocated), no request asks;
  * last layer: every request asks, k=10, the last layer;
  * all layers: every request asks, k=10, the mean over all 30 layers.
Each configuration is its own real in-process engine (ModelRunner + Scheduler) with the same 16
seeded random prompts; after their prefills, the four batches decode in lockstep (step i of every
configuration back to back) and each `Scheduler.step()` is timed, sampling, output processing and
the capture's host copy included, so drift on a shared machine lands on all alike. Each number is
the median decode step over `--repeat` rounds. Results (markdown, the command, the machine, the date) go to
`benchmark/results/attention_capture_cpu.md`, with every sample beside it as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.test.runners import SRTRunner

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "smollm2-135m-instruct"
NUM_LAYERS = 30
CONFIGS = ("off", "on, unused", "last layer", "all layers")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-write", action="store_true", help="Print only; do not write results.")
    return p.parse_args()


def prompts(bs: int, input_len: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (bs, input_len), generator=gen).tolist()


def attention_for(config: str, k: int) -> Optional[AttentionRequest]:
    if config == "last layer":
        return AttentionRequest(top_k=k, layers=(NUM_LAYERS - 1,))
    if config == "all layers":
        return AttentionRequest(top_k=k, layers=tuple(range(NUM_LAYERS)))
    return None


def start_batch(runner: SRTRunner, config: str, args: argparse.Namespace) -> None:
    """Queue the batch and run its prefill (maybe several chunks) until all 16 are decoding."""
    sched = runner.scheduler
    for i, ids in enumerate(prompts(args.batch_size, args.input_len)):
        params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        sched.add_request(Req(f"{config}-{i}-{time.time_ns()}", ids, params,
                              attention=attention_for(config, args.top_k)))  # fmt: skip
    while len(sched.running_batch.reqs) < args.batch_size:
        sched.step()


def finish_batch(runner: SRTRunner) -> None:
    sched = runner.scheduler
    sched.run_until_idle()
    sched.tree_cache.evict(sched.tree_cache.evictable_size())  # the next round prefills again
    sched.check_memory()


def lockstep_round(
    runners: dict[str, SRTRunner], args: argparse.Namespace, start: Callable = start_batch
) -> dict[str, list]:
    """One batch per configuration (queued and prefilled by `start`), decoded in lockstep: step
    i of every configuration runs back to back, so machine drift lands on all of them alike.
    Returns decode step times."""
    for config, runner in runners.items():
        start(runner, config, args)
    times: dict[str, list[float]] = {c: [] for c in runners}
    for _ in range(args.output_len - 2):  # the last step only finishes requests
        for config, runner in runners.items():
            begin = time.perf_counter()
            runner.scheduler.step()
            times[config].append(time.perf_counter() - begin)
    for runner in runners.values():
        finish_batch(runner)
    return times


def build(dtype: str, on: bool) -> SRTRunner:
    kwargs: dict[str, Any] = dict(dtype=dtype, max_total_tokens=16384, random_seed=0)
    if on:
        kwargs.update(return_attention_tokens=True, attention_capture_layers="all")
    return SRTRunner(MODEL, **kwargs)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for dtype in args.dtypes:
        # One engine per configuration: "off" without the flag, the others with it.
        runners = {c: build(dtype, c != "off") for c in CONFIGS}
        lockstep_round(runners, args)  # warm-up
        samples: dict[str, list[list[float]]] = {c: [] for c in CONFIGS}
        for _ in range(args.repeat):
            for config, times in lockstep_round(runners, args).items():
                samples[config].append(times)
        for config in CONFIGS:
            step = statistics.median(t for s in samples[config] for t in s)
            rows.append({"dtype": dtype, "config": config, "step_s": step,
                         "tok_s": args.batch_size / step, "samples": samples[config]})  # fmt: skip
            print(f"{dtype:9s} {config:11s} decode step {step * 1e3:7.2f} ms  "
                  f"{args.batch_size / step:8.1f} tok/s", flush=True)  # fmt: skip
        del runners
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| dtype | configuration | decode step ms | tok/s | vs off |", "|---|---|---|---|---|"]
    off = {r["dtype"]: r["step_s"] for r in rows if r["config"] == "off"}
    for r in rows:
        slower = r["step_s"] / off[r["dtype"]] - 1
        lines.append(f"| {r['dtype']} | {r['config']} | {r['step_s'] * 1e3:.2f} | "
                     f"{r['tok_s']:.1f} | {slower * 100:+.1f} % |")  # fmt: skip
    return "\n".join(lines)


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    md = [
        "# Attention-token capture: decode cost on CPU",
        "",
        f"- Command: `{command}`",
        f"- Machine: {cpu}, {args.threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Model: SmolLM2-135M-Instruct ({NUM_LAYERS} layers), batch {args.batch_size}, "
        f"input {args.input_len}, output {args.output_len}, k={args.top_k}; median decode "
        f"step over {args.repeat} rounds, configurations decoding in lockstep (in-process "
        "Scheduler.step, one engine per configuration).",
        "- Targets (issue 4, CPU): on-but-unused within 1 % of off; last layer within 5 %.",
        "",
        table(rows),
        "",
    ]
    (RESULTS / "attention_capture_cpu.md").write_text("\n".join(md))
    (RESULTS / "attention_capture_cpu.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    print(table(rows))
    if not args.no_write:
        write(args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
