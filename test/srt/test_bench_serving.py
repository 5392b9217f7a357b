"""The benchmark programs end to end: `sglang.bench_serving` against a real server on SmolLM2, and
`sglang.bench_offline_throughput` on an in-process Engine.

Every case runs the module as a subprocess, as users do, on a tiny workload, and checks the
result blocks of docs/compat.md, the JSONL records, that every request succeeded, and that the token
counts match what was asked for (requests ignore EOS, so each one generates exactly its length).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sglang.test.test_utils import (
    DEFAULT_MODEL_NAME_FOR_TEST,
    DEFAULT_URL_FOR_TEST,
    find_free_port,
    kill_process_tree,
    popen_launch_server,
)

NUM = r"[0-9]+(?:\.[0-9]+)?"
SERVING_LABELS = (
    "Successful requests:",
    "Benchmark duration (s):",
    "Total input tokens:",
    "Total generated tokens:",
    "Request throughput (req/s):",
    "Input token throughput (tok/s):",
    "Output token throughput (tok/s):",
    "Total token throughput (tok/s):",
    "Mean TTFT (ms):",
    "Median TTFT (ms):",
    "P99 TTFT (ms):",
    "Mean TPOT (ms):",
    "Median TPOT (ms):",
    "P99 TPOT (ms):",
    "Mean ITL (ms):",
    "Median ITL (ms):",
    "P95 ITL (ms):",
    "P99 ITL (ms):",
    "Max ITL (ms):",
    "Mean E2E Latency (ms):",
    "Median E2E Latency (ms):",
)
SERVING_KEYS = {
    "backend",
    "dataset_name",
    "request_rate",
    "max_concurrency",
    "completed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "input_throughput",
    "output_throughput",
    "total_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "p95_itl_ms",
    "p99_itl_ms",
    "max_itl_ms",
    "mean_e2e_latency_ms",
    "median_e2e_latency_ms",
}
OFFLINE_LABELS = SERVING_LABELS[:8]
PLAN_RE = re.compile(r"([0-9]+) input tokens, ([0-9]+) requested output tokens")
ENV = dict(os.environ, OMP_NUM_THREADS="2")


@pytest.fixture(scope="module")
def base_url():
    url = f"{DEFAULT_URL_FOR_TEST}:{find_free_port()}"
    proc = popen_launch_server(
        DEFAULT_MODEL_NAME_FOR_TEST, url, other_args=["--max-total-tokens", "4096"]
    )
    try:
        yield url
    finally:
        kill_process_tree(proc.pid)


def run_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def block_values(stdout: str, title: str, labels: tuple[str, ...]) -> dict[str, float]:
    assert re.search(rf"^={{3,}}{re.escape(title)}={{3,}}$", stdout, re.M), stdout
    values = {}
    for label in labels:
        m = re.search(rf"^{re.escape(label)} +({NUM})\s*$", stdout, re.M)
        assert m, f"missing {label!r} in:\n{stdout}"
        values[label] = float(m.group(1))
    return values


def bench_serving(base_url: str, out_file, *args: str, module: str = "sglang.bench_serving"):
    """Run one serving benchmark; returns (printed values, requested output tokens, JSON record)."""
    proc = run_module(
        module, "--base-url", base_url, "--disable-tqdm", "--output-file", str(out_file), *args
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    values = block_values(proc.stdout, " Serving Benchmark Result ", SERVING_LABELS)
    plan = PLAN_RE.search(proc.stdout)
    assert plan, proc.stdout
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert SERVING_KEYS <= record.keys(), SERVING_KEYS - record.keys()
    assert record["failed"] == 0, record["errors"]
    assert values["Successful requests:"] == record["completed"]
    assert values["Total generated tokens:"] == record["total_output_tokens"]
    assert record["total_input_tokens"] == int(plan.group(1))
    return values, int(plan.group(2)), record


@pytest.mark.parametrize("backend", ["sglang", "sglang-oai-chat"])
def test_random_workload(base_url, tmp_path, backend):
    values, requested, record = bench_serving(
        base_url,
        tmp_path / "serving.jsonl",
        "--backend", backend,
        "--num-prompts", "8",
        "--random-input-len", "32",
        "--random-output-len", "8",
        "--max-concurrency", "4",
    )  # fmt: skip
    assert record["completed"] == 8
    assert record["backend"] == backend and record["dataset_name"] == "random"
    assert record["max_concurrency"] == 4 and record["request_rate"] == "inf"
    assert record["total_output_tokens"] == requested
    assert 0 < values["Mean TTFT (ms):"] <= values["Mean E2E Latency (ms):"]
    assert record["output_throughput"] > 0 and record["median_itl_ms"] > 0


def test_generated_shared_prefix(base_url, tmp_path):
    values, requested, record = bench_serving(
        base_url,
        tmp_path / "gsp.jsonl",
        "--dataset-name", "generated-shared-prefix",
        "--gsp-num-groups", "2",
        "--gsp-prompts-per-group", "3",
        "--gsp-system-prompt-len", "64",
        "--gsp-question-len", "8",
        "--gsp-output-len", "4",
        "--flush-cache",
    )  # fmt: skip
    assert record["completed"] == 6 and record["dataset_name"] == "generated-shared-prefix"
    assert requested == 6 * 4 == record["total_output_tokens"]


def test_sharegpt_file(base_url, tmp_path):
    conversations = [
        {
            "conversations": [
                {"from": "human", "value": f"Name {i + 2} colours of the rainbow."},
                {"from": "gpt", "value": "Red, orange, yellow and green are a few of them."},
            ]
        }
        for i in range(5)
    ]
    conversations.append({"conversations": [{"from": "human", "value": "no reply"}]})
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(conversations))
    _, requested, record = bench_serving(
        base_url,
        tmp_path / "sharegpt.jsonl",
        "--backend", "sglang-oai",
        "--dataset-name", "sharegpt",
        "--dataset-path", str(data),
        "--num-prompts", "10",
        "--request-rate", "50",
        module="sglang.benchmark.serving",
    )  # fmt: skip
    assert record["completed"] == 5 and record["dataset_name"] == "sharegpt"
    assert record["total_output_tokens"] == requested


def test_unreachable_server(tmp_path):
    url = f"{DEFAULT_URL_FOR_TEST}:{find_free_port()}"
    proc = run_module("sglang.bench_serving", "--base-url", url, "--num-prompts", "2", timeout=60)
    assert proc.returncode == 1
    assert "error: cannot reach the server" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_offline_throughput(tmp_path):
    result_file = tmp_path / "offline.json"
    proc = run_module(
        "sglang.bench_offline_throughput",
        "--model-path", DEFAULT_MODEL_NAME_FOR_TEST,
        "--max-total-tokens", "2048",
        "--num-prompts", "8",
        "--random-input-len", "32",
        "--random-output-len", "8",
        "--result-filename", str(result_file),
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    values = block_values(proc.stdout, " Offline Throughput Benchmark Result ", OFFLINE_LABELS)
    result = json.loads(result_file.read_text())
    for key in (
        "request_throughput",
        "input_throughput",
        "output_throughput",
        "total_throughput",
        "total_latency",
    ):
        assert result[key] > 0, key
    assert result["successful_requests"] == values["Successful requests:"] == 8
    plan = PLAN_RE.search(proc.stdout)
    assert plan and result["total_output_tokens"] == int(plan.group(2))
