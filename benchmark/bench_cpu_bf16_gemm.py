"""Micro-benchmark of the CPU bf16-weight GEMM (sgl_kernel/cpu_gemm.py) against PyTorch.

For SmolLM2-135M's matmul shapes (fused QKV, O, gate-up, down: 30 layers each, and the 49152-row
LM head) at 1, 8 and 32 rows, times one call of: our kernel on packed bf16 weights (bf16 in and
out), PyTorch's bf16 `F.linear`, and PyTorch's float32 `F.linear` on column-major float32 weights
(the engine's float32 layout). Prints per-shape times and a per-decode-step total (each layer
shape x 30 plus the head), for each thread count asked, and writes a markdown table with the
command, machine, date and load average to benchmark/results/cpu_bf16_gemm.md.

    .venv/bin/python benchmark/bench_cpu_bf16_gemm.py --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sgl_kernel import cpu_gemm

# (name, N, K, repeats per decode step) for SmolLM2-135M: hidden 576, 9 q / 3 kv heads of 64,
# intermediate 1536, 30 layers, vocabulary 49152.
SHAPES = [
    ("qkv", 960, 576, 30),
    ("o", 576, 576, 30),
    ("gate_up", 3072, 576, 30),
    ("down", 576, 1536, 30),
    ("lm_head", 49152, 576, 1),
]
RESULTS = Path(__file__).parent / "results" / "cpu_bf16_gemm.md"


def _time_ms(fn, iters: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(3):  # best of three batches: the least disturbed by other processes
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters * 1e3)
    return best


def run(threads: int, rows: list[int], iters: int) -> list[dict]:
    torch.set_num_threads(threads)
    out = []
    for m in rows:
        step = {"threads": threads, "rows": m, "ours": 0.0, "torch_bf16": 0.0, "torch_fp32": 0.0}
        for name, n, k, reps in SHAPES:
            g = torch.Generator().manual_seed(n + k)
            w = torch.randn(n, k, generator=g).bfloat16()
            packed = cpu_gemm.pack_bf16(w)
            x = torch.randn(m, k, generator=g).bfloat16()
            w32 = w.float().t().contiguous().t()
            x32 = x.float()
            ours = _time_ms(lambda: cpu_gemm.linear_bf16w(x, packed, n), iters)
            bf16 = _time_ms(lambda: F.linear(x, w), iters)
            fp32 = _time_ms(lambda: F.linear(x32, w32), iters)
            print(
                f"threads {threads} rows {m:>2} {name:>8} [{n}x{k}]: ours {ours:.3f} ms, "
                f"torch bf16 {bf16:.3f} ms, torch fp32 {fp32:.3f} ms",
                flush=True,
            )
            step["ours"] += ours * reps
            step["torch_bf16"] += bf16 * reps
            step["torch_fp32"] += fp32 * reps
        out.append(step)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if not cpu_gemm.available():
        sys.exit(f"the kernel cannot run here: {cpu_gemm.unavailable_reason()}")
    load = open("/proc/loadavg").read().split()[:3]
    steps = [s for t in args.threads for s in run(t, args.rows, args.iters)]
    lines = [
        "# CPU bf16-weight GEMM vs PyTorch (SmolLM2-135M matmul shapes)",
        "",
        f"- Command: `.venv/bin/python benchmark/bench_cpu_bf16_gemm.py {' '.join(sys.argv[1:])}`",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before: "
        f"{' '.join(load)}",
        "- Per decode step: the four layer matmuls x 30 layers plus the LM head, best of three "
        "batches of calls, milliseconds. Ours: packed bf16 weights, bf16 in/out. torch bf16: "
        "`F.linear` on bf16. torch fp32: `F.linear` on column-major float32 weights.",
        "",
        "| threads | rows | ours (ms) | torch bf16 (ms) | torch fp32 (ms) | bf16 / ours |",
        "|---|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s['threads']} | {s['rows']} | {s['ours']:.1f} | {s['torch_bf16']:.1f} | "
            f"{s['torch_fp32']:.1f} | {s['torch_bf16'] / s['ours']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
