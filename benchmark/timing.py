"""The timing loop and command line the matmul micro-benchmarks share (bench_gguf_linear.py,
bench_fp8_matmul.py, bench_int4_matmul.py; bench_cpu_f32_gemm.py takes the command line).

`median_ms` times a call: median wall-clock milliseconds after one untimed warm-up call, which
pays one-time costs (lazy kernel builds, allocator growth, weight packing caches). `add_args` and
`start` are the `--repeats / --threads / --no-save` options and the result header of the two that
write benchmark/results/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from machine_info import header, load_average


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` timed calls of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-save", action="store_true")


def start(title: str, args: argparse.Namespace) -> list[str]:
    """Set torch's threads to `--threads`; the result's header lines, with the load average now
    (before any timing)."""
    torch.set_num_threads(args.threads)
    return header(title, args.threads, load_average())
