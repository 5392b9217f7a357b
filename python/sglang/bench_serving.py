"""`python -m sglang.bench_serving`: the online serving benchmark under its upstream module path.

The program lives in `sglang.benchmark.serving` (also runnable as `python -m
sglang.benchmark.serving`); this module re-exports its public names so that scripts importing
`sglang.bench_serving` keep working.
"""

from __future__ import annotations

import sys

from sglang.benchmark.datasets import DatasetRow, get_dataset
from sglang.benchmark.serving import (
    BenchmarkError,
    RequestInput,
    RequestOutput,
    build_parser,
    calculate_metrics,
    main,
    run_benchmark,
    send_request,
)

__all__ = [
    "BenchmarkError",
    "DatasetRow",
    "RequestInput",
    "RequestOutput",
    "build_parser",
    "calculate_metrics",
    "get_dataset",
    "main",
    "run_benchmark",
    "send_request",
]

if __name__ == "__main__":
    sys.exit(main())
