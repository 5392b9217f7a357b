"""Test-suite runner: each suite is a list of test files with estimated seconds.

Every file runs in its own pytest process under a per-file timeout, with the `suite_results`
plugin recording each test's outcome as it finishes. Per file it prints the passed / failed /
skipped test counts; the last line is the total, e.g. `412 passed, 0 failed, 7 skipped (23 files)`.
A file passes only when pytest exits 0 and at least one of its tests passed: a file that collects
no test, or whose tests all skip, fails, except a GPU-only file (every file of a GPU suite, or
`gpu_only=True`) on a machine without CUDA, which is not run and is reported as skipped. The exit
status is non-zero when any file failed or timed out. docs/testing.md describes the output.

Usage: python test/srt/run_suite.py --suite per-commit-cpu [--only test_a.py ...]
       [--timeout-per-file 900]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The Triton interpreter suite's own environment (see `make install`): triton 3.6.0's interpreter
# needs numpy < 2.4, the main .venv pins numpy 2.4.6.
TRITON_VENV = ".venv-triton"
GPU_SUITES = {"per-commit-1-gpu"}


@dataclass(frozen=True)
class TestFile:
    name: str
    estimated_time: float = 60.0
    gpu_only: bool = False  # needs CUDA; implied for every file of a GPU suite
    venv: Optional[str] = None  # run under this venv (path from the repo root), not sys.executable


SUITES: dict[str, list[TestFile]] = {
    "per-commit-cpu": [
        TestFile("test_server_args.py", 15),
        TestFile("test_flag_honesty.py", 30),
        TestFile("test_hidden_states.py", 45),
        TestFile("test_layer_probes.py", 60),
        TestFile("test_layer_probes_http.py", 75),
        TestFile("test_mem_cache.py", 10),
        TestFile("test_radix_cache.py", 10),
        TestFile("test_sampling.py", 20),
        TestFile("test_attention_viz.py", 5),
        TestFile("test_attention_viewer.py", 90),
        TestFile("test_attention_notebook.py", 120),
        TestFile("test_attention_prompt.py", 120),
        TestFile("test_model_loader.py", 60),
        TestFile("test_quantized_checkpoints.py", 120),
        TestFile("test_gguf_packed.py", 60),  # loads the default model twice
        TestFile("test_cpu_gguf_gemm.py", 20),
        TestFile("test_gguf_tp.py", 60),  # two gloo ranks + one refused server; 63 s at load 12
        TestFile("test_hub_ids.py", 60),
        TestFile("test_hub_download.py", 45),  # one server; measured 79 s at load 8
        TestFile("test_torch_native_backend.py", 20),
        TestFile("test_sdpa_with_lse.py", 5),
        TestFile("test_kv_cache_dtype.py", 60),
        TestFile("test_torch_compile.py", 90),
        TestFile("test_model_parity.py", 180),
        TestFile("test_model_parity_archs.py", 100),
        TestFile("test_model_parity_gemma.py", 120),
        TestFile("test_model_parity_windowed.py", 60),
        TestFile("test_model_parity_moe.py", 60),
        TestFile("test_supported_models_table.py", 5),
        TestFile("test_smollm2_parity.py", 180),
        TestFile("test_scheduler.py", 120),
        TestFile("test_bench_one_batch.py", 60),
        TestFile("test_engine.py", 60),
        TestFile("test_srt_endpoint.py", 90),
        TestFile("test_openai_protocol.py", 60),
        TestFile("test_chat_template.py", 10),
        TestFile("test_openai_server.py", 60),
        TestFile("test_runtime.py", 45),
        TestFile("test_bench_serving.py", 120),
        TestFile("test_tensor_parallel.py", 90),
        TestFile("test_data_parallel.py", 60),
        TestFile("test_topk_attention.py", 60),
        TestFile("test_attention_tokens.py", 120),
        TestFile("test_attention_heads_spans.py", 150),
        TestFile("test_startup.py", 90),
        TestFile("test_detokenizer.py", 15),
        TestFile("test_hot_path.py", 60),
        TestFile("test_overlap_schedule.py", 60),
        TestFile("test_cpu_bf16_gemm.py", 45),
        TestFile("test_cpu_layer_kernels.py", 30),
        TestFile("test_cpu_decoder_layers.py", 25),
        TestFile("test_cuda_graph_runner.py", 20),
        TestFile("test_gpu_path_costs.py", 60),
        TestFile("test_triton_kernels.py", 60, venv=TRITON_VENV),  # Triton interpreter
        TestFile("test_triton_backend.py", 200, venv=TRITON_VENV),  # Triton interpreter
        TestFile("test_attention_prompt_triton.py", 60, venv=TRITON_VENV),  # Triton interpreter
        TestFile("test_triton_fp8.py", 40, venv=TRITON_VENV),  # Triton interpreter
        TestFile("test_triton_int4.py", 60, venv=TRITON_VENV),  # Triton interpreter
        TestFile("test_fp8_checkpoints.py", 30),
        TestFile("test_deploy_examples.py", 75),
        TestFile("test_reliability_faults.py", 240),
        TestFile("test_reliability.py", 300),
        TestFile("test_model_gateway.py", 130),  # two smollm2-135m-instruct servers
        TestFile("test_model_gateway_units.py", 15),
        TestFile("test_structured_output.py", 120),
        TestFile("test_structured_output_scheduler.py", 60),
        TestFile("test_cpu_token_bitmask.py", 8),
        TestFile("test_cpu_log_softmax_topk.py", 6),
        TestFile("test_tool_calls_tiny.py", 60),  # --dp 2
        TestFile("test_reasoning_tiny.py", 60),  # --tp 2
        TestFile("test_tool_call_detectors.py", 5),
    ],
    "per-commit-1-gpu": [
        TestFile("test_cuda_graph_runner.py", 60),
        TestFile("test_triton_kernels.py", 30),
        TestFile("test_triton_backend.py", 60),
        TestFile("test_triton_fp8.py", 30),
        TestFile("test_triton_int4.py", 30),
    ],
}


@dataclass
class FileResult:
    status: str  # PASSED | FAILED | SKIPPED
    why: str = ""
    counts: dict[str, int] = field(default_factory=lambda: {"passed": 0, "failed": 0, "skipped": 0})
    seconds: float = 0.0


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill pytest and everything it started: its process group, plus servers that tests put in
    their own sessions (found through psutil, which the GPU image may lack)."""
    try:
        import psutil

        kids = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 -- psutil missing or pytest already gone
        kids = []
    for pid in [proc.pid] + [k.pid for k in kids]:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def read_results(path: str) -> tuple[dict[str, int], list[str]]:
    """Test counts from the plugin's lines, and the tests that started but never finished."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    started: dict[str, None] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec["event"] == "start":
                    started[rec["nodeid"]] = None
                else:
                    started.pop(rec["nodeid"], None)
                    counts[rec["outcome"]] += 1
    return counts, list(started)


def run_file(test: TestFile, timeout: float) -> FileResult:
    python = str(REPO / test.venv / "bin" / "python") if test.venv else sys.executable
    if not os.path.exists(python):
        return FileResult("FAILED", f"{python} is missing (run `make install`)")
    fd, results = tempfile.mkstemp(prefix="suite-", suffix=".jsonl")
    os.close(fd)
    # `python -m` puts the cwd (this folder) on sys.path, so `-p suite_results` imports.
    cmd = [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "suite_results"]
    env = dict(os.environ, SGLANG_SUITE_RESULTS=results)
    start = time.monotonic()
    proc = subprocess.Popen([*cmd, str(HERE / test.name)], cwd=HERE, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        rc: Optional[int] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        rc = None
    res = FileResult("FAILED", seconds=time.monotonic() - start)
    res.counts, unfinished = read_results(results)
    os.unlink(results)
    # The test that was running when the file died or timed out counts as failed.
    res.counts["failed"] += len(unfinished)
    ran = res.counts["passed"] + res.counts["failed"]
    if rc is None:
        res.why = f"timed out after {timeout:.0f}s" + (f" in {unfinished[0]}" if unfinished else "")
    elif rc == 5:
        res.why = "no test collected"
    elif rc == 0 and ran == 0:
        res.why = f"no test ran ({res.counts['skipped']} skipped)"
    elif rc != 0:
        res.why = f"pytest exit code {rc}"
    else:
        res.status = "PASSED"
    return res


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--timeout-per-file", type=float, default=900.0)
    parser.add_argument("--only", nargs="*", default=None, help="run only these file names")
    args = parser.parse_args()

    suite = SUITES[args.suite]
    if args.only is not None:
        unknown = sorted(set(args.only) - {t.name for t in suite})
        if unknown:
            parser.error(f"not in suite {args.suite}: {', '.join(unknown)}")
    files = [t for t in suite if args.only is None or t.name in args.only]
    gpu_only = {t.name for t in files if t.gpu_only or args.suite in GPU_SUITES}
    cuda = has_cuda() if gpu_only else False
    total_est = sum(t.estimated_time for t in files)
    print(f"Suite {args.suite}: {len(files)} files, estimated {total_est:.0f}s", flush=True)

    tests = {"passed": 0, "failed": 0, "skipped": 0}
    by_status: dict[str, list[str]] = {"PASSED": [], "FAILED": [], "SKIPPED": []}
    for i, test in enumerate(files, 1):
        tag = f"[{i}/{len(files)}] {test.name}"
        if test.name in gpu_only and not cuda:
            res = FileResult("SKIPPED", "GPU-only, no CUDA device")
            print(f"{tag} SKIPPED (GPU-only, no CUDA device): not run", flush=True)
        else:
            print(f"\n{tag} (est. {test.estimated_time:.0f}s)", flush=True)
            res = run_file(test, args.timeout_per_file)
            why = f" ({res.why})" if res.why else ""
            print(f"{tag} {res.status}{why}: {describe(res.counts)} in {res.seconds:.1f}s",
                  flush=True)  # fmt: skip
        by_status[res.status].append(test.name)
        for k in tests:
            tests[k] += res.counts[k]

    if by_status["FAILED"]:
        print("\nFailed files: " + ", ".join(by_status["FAILED"]))
    if by_status["SKIPPED"]:
        print("Skipped files (not run): " + ", ".join(by_status["SKIPPED"]))
    files_note = f"{len(files)} file" + ("" if len(files) == 1 else "s")
    if len(by_status["PASSED"]) != len(files):
        files_note += ": " + ", ".join(f"{len(v)} {k.lower()}" for k, v in by_status.items() if v)
    print(f"{describe(tests)} ({files_note})", flush=True)
    return 1 if by_status["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
