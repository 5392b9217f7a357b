"""The timing loop the matmul micro-benchmarks share (bench_gguf_linear.py, bench_fp8_matmul.py,
bench_int4_matmul.py): median wall-clock milliseconds per call after one untimed warm-up call,
which pays one-time costs (lazy kernel builds, allocator growth, weight packing caches)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` timed calls of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
