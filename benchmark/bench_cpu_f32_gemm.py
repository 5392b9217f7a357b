"""The CPU kernel's float32-weight entry (sgl_kernel/cpu_gemm.py `pack_f32`) against PyTorch.

What `SGLANG_CPU_F32_GEMM` decides (layers/cpu_weight_layout.py): for SmolLM2-135M's matmul
shapes (fused QKV, O, gate-up, down: 30 layers each, and the 49152-row LM head) at each row
count, one call of our kernel on packed float32 weights against PyTorch's float32 `F.linear` on
column-major weights (the layout the engine gives float32 weights it does not pack). Rounds
alternate the two, so drift lands on both; each figure is the median over rounds of the mean of
a batch of calls. Also prints the largest difference between the two outputs relative to the
output's largest magnitude (summation order only). Writes a table of per-shape and per-decode-
step times (each layer shape x 30 plus the head) to benchmark/results/cpu_f32_gemm.md.

    .venv/bin/python benchmark/bench_cpu_f32_gemm.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench_cpu_bf16_gemm import SHAPES  # (name, N, K, calls per decode step): SmolLM2-135M
from machine_info import load_average, write_result
from timing import add_args, start
from sgl_kernel import cpu_gemm


def _batch_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def compare(n: int, k: int, m: int, rounds: int) -> tuple[float, float, float]:
    """(ours ms, torch ms, max |difference| / max |output|) for one shape and row count."""
    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g)
    packed = cpu_gemm.pack_f32(w)
    w_col = w.t().contiguous().t()
    ours = lambda: cpu_gemm.linear_bf16w(x, packed, n)  # noqa: E731
    theirs = lambda: F.linear(x, w_col)  # noqa: E731
    calls = max(2, min(200, int(2e8 / (m * n * k))))
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for fn in (ours, theirs):
        fn()
    for _ in range(rounds):
        times["ours"].append(_batch_ms(ours, calls))
        times["torch"].append(_batch_ms(theirs, calls))
    a, b = ours(), theirs()
    diff = ((a - b).abs().max() / b.abs().max()).item()
    return statistics.median(times["ours"]), statistics.median(times["torch"]), diff


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)  # --repeats (here: alternating rounds), --threads, --no-save
    p.set_defaults(repeats=7)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    args = p.parse_args()
    if not cpu_gemm.available():
        sys.exit(f"the kernel cannot run here: {cpu_gemm.unavailable_reason()}")
    md = start("CPU float32 matmul: packed kernel vs PyTorch (SmolLM2-135M shapes)", args)
    lines = ["| shape | rows | packed float32 ms | torch float32 ms | speed-up | max rel. diff |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    steps = []
    for m in args.rows:
        step = [0.0, 0.0]
        for name, n, k, per_step in SHAPES:
            ours, theirs, diff = compare(n, k, m, args.repeats)
            print(f"{name} {n}x{k} m={m}: packed {ours:.3f} ms, torch {theirs:.3f} ms, "
                  f"x{theirs / ours:.2f}, max rel. diff {diff:.1e}", flush=True)  # fmt: skip
            lines.append(f"| {name} {n}x{k} | {m} | {ours:.3f} | {theirs:.3f} | "
                         f"{theirs / ours:.2f}x | {diff:.1e} |")  # fmt: skip
            step[0] += ours * per_step
            step[1] += theirs * per_step
        steps.append((m, *step))
    lines += ["", "Per decode step (the four layer shapes x 30 plus the head):", ""]
    lines += ["| rows | packed float32 ms | torch float32 ms | speed-up |", "|---|---|---|---|"]
    lines += [f"| {m} | {a:.1f} | {b:.1f} | {b / a:.2f}x |" for m, a, b in steps]
    md += [f"- Load average after: `{load_average()}`",
           f"- Rounds: {args.repeats}, alternating; torch's weights column-major (the engine's "
           "layout for float32 weights it does not pack)", ""]  # fmt: skip
    write_result(md + lines + [""], "cpu_f32_gemm.md", save=not args.no_save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
