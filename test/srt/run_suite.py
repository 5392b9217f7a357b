"""Test-suite runner: each suite is a list of test files with estimated seconds.

Every file runs in its own process under pytest with a per-file timeout; the last line printed is
`N passed, N failed` and the exit status is non-zero when any file failed or timed out.
Usage: python test/srt/run_suite.py --suite per-commit-cpu [--timeout-per-file 900]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TestFile:
    name: str
    estimated_time: float = 60.0


SUITES: dict[str, list[TestFile]] = {
    "per-commit-cpu": [
        TestFile("test_server_args.py", 10),
        TestFile("test_mem_cache.py", 10),
        TestFile("test_radix_cache.py", 10),
        TestFile("test_sampling.py", 20),
        TestFile("test_attention_viz.py", 5),
        TestFile("test_model_loader.py", 60),
        TestFile("test_torch_native_backend.py", 20),
        TestFile("test_model_parity.py", 180),
        TestFile("test_smollm2_parity.py", 180),
        TestFile("test_scheduler.py", 120),
        TestFile("test_bench_one_batch.py", 60),
        TestFile("test_engine.py", 60),
        TestFile("test_srt_endpoint.py", 90),
        TestFile("test_openai_protocol.py", 60),
        TestFile("test_openai_server.py", 60),
        TestFile("test_runtime.py", 45),
        TestFile("test_bench_serving.py", 120),
        TestFile("test_tensor_parallel.py", 90),
        TestFile("test_data_parallel.py", 60),
        TestFile("test_topk_attention.py", 60),
        TestFile("test_attention_tokens.py", 120),
        TestFile("test_cuda_graph_runner.py", 20),
        TestFile("test_deploy_examples.py", 75),
    ],
    "per-commit-1-gpu": [
        TestFile("test_cuda_graph_runner.py", 60),
        TestFile("test_triton_kernels.py", 30),
        TestFile("test_triton_backend.py", 60),
    ],
}


def run_file(test: TestFile, timeout: float) -> tuple[bool, float, str]:
    path = HERE / test.name
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(path)]
    try:
        proc = subprocess.run(cmd, cwd=HERE, timeout=timeout, env=os.environ.copy())
        # NOTE: 5 is pytest's "no tests collected": the file skipped itself (e.g. no GPU/Triton).
        ok = proc.returncode in (0, 5)
        why = "" if ok else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        ok, why = False, f"timed out after {timeout:.0f}s"
    return ok, time.monotonic() - start, why


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--timeout-per-file", type=float, default=900.0)
    parser.add_argument("--only", nargs="*", default=None, help="run only these file names")
    args = parser.parse_args()

    files = [t for t in SUITES[args.suite] if args.only is None or t.name in args.only]
    total_est = sum(t.estimated_time for t in files)
    print(f"Suite {args.suite}: {len(files)} files, estimated {total_est:.0f}s", flush=True)
    passed, failed = [], []
    for i, test in enumerate(files, 1):
        print(f"\n[{i}/{len(files)}] {test.name} (est. {test.estimated_time:.0f}s)", flush=True)
        ok, elapsed, why = run_file(test, args.timeout_per_file)
        (passed if ok else failed).append(test.name)
        status = "PASSED" if ok else f"FAILED ({why})"
        print(f"[{i}/{len(files)}] {test.name} {status} in {elapsed:.1f}s", flush=True)
    if failed:
        print("\nFailed files: " + ", ".join(failed))
    print(f"{len(passed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
