"""`--enable-torch-compile` on SmolLM2 (CPU): decode step time, eager against compiled.

Two in-process engines (ModelRunner + Scheduler, torch_native attention) per model dtype, one
with `--enable-torch-compile --torch-compile-max-bs <largest batch>`, decode the same seeded
random prompts in lockstep (step i of each engine back to back, so machine drift lands on both
alike); each `Scheduler.step()` is timed, sampling and output processing included. A warm-up
round per batch size pays the compilation, which is reported separately (wall time of that
round minus the eager one). Results go to benchmark/results/torch_compile_cpu.md with the
command, machine, date and load average before the run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from bench_attention_capture import lockstep_round
from machine_info import header, load_average, write_result

from sglang.test.runners import SRTRunner

MODEL = "smollm2-135m-instruct"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-write", action="store_true")
    return p.parse_args()


def run(dtype: str, args: argparse.Namespace) -> list[dict]:
    max_bs = max(args.batch_sizes)
    runners = {
        "eager": SRTRunner(MODEL, dtype=dtype, max_total_tokens=16384),
        "compiled": SRTRunner(MODEL, dtype=dtype, max_total_tokens=16384,
                              enable_torch_compile=True, torch_compile_max_bs=max_bs),
    }  # fmt: skip
    rows = []
    for bs in args.batch_sizes:
        ns = SimpleNamespace(batch_size=bs, input_len=args.input_len,
                             output_len=args.output_len, top_k=10)  # fmt: skip
        begin = time.perf_counter()
        warm = lockstep_round(runners, ns)  # compiles what this batch size needs
        warm_s = time.perf_counter() - begin
        compile_s = sum(warm["compiled"]) - sum(warm["eager"])
        samples: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.repeat):
            for name, times in lockstep_round(runners, ns).items():
                samples[name] += times
        eager = statistics.median(samples["eager"])
        compiled = statistics.median(samples["compiled"])
        rows.append(dict(dtype=dtype, bs=bs, eager=eager, compiled=compiled,
                         compile_s=compile_s, warm_s=warm_s))  # fmt: skip
        print(f"{dtype} bs={bs}: eager {eager * 1e3:.2f} ms, compiled {compiled * 1e3:.2f} ms, "
              f"first-round compile {compile_s:.1f} s", flush=True)  # fmt: skip
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| model dtype | batch | eager ms/step (tok/s) | compiled ms/step (tok/s) | "
        "compiled vs eager | compile time in warm-up round |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bs = r["bs"]
        change = r["compiled"] / r["eager"] - 1
        lines.append(
            f"| {r['dtype']} | {bs} | {r['eager'] * 1e3:.1f} ({bs / r['eager']:.1f}) | "
            f"{r['compiled'] * 1e3:.1f} ({bs / r['compiled']:.1f}) | {change * 100:+.1f} % | "
            f"{r['compile_s']:.0f} s |"
        )
    return lines


def main() -> int:
    args = parse_args()
    load_before = load_average()
    torch.set_num_threads(args.threads)
    rows = [row for dtype in args.dtypes for row in run(dtype, args)]
    md = header("`--enable-torch-compile` on CPU: decode step, eager vs compiled", args.threads,
                load_before)  # fmt: skip
    md += [
        f"- Model: SmolLM2-135M-Instruct, torch_native attention (eager inside the compiled "
        f"forward), input {args.input_len}, output {args.output_len}; median Scheduler.step() "
        f"over {args.repeat} rounds after a warm-up round, the two engines in lockstep; "
        "`--torch-compile-max-bs` = the largest batch.",
        "",
        *table(rows),
        "",
    ]
    write_result(md, "torch_compile_cpu.md", save=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
