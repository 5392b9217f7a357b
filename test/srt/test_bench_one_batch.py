"""`python -m sglang.bench_one_batch` end to end on a tiny random llama: output formats and errors.

Each case runs the module as a subprocess, as users do, and checks upstream's printed lines
(docs/compat.md), the JSONL records, and that bad input ends with a readable one-line error instead
of a traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sglang.test.runners import make_tiny_model

NUM = r"[0-9]+(?:\.[0-9]+)?"
PREFILL_RE = re.compile(rf"^Prefill\. latency: +{NUM} s, throughput: +{NUM} token/s$", re.M)
DECODE_RE = re.compile(
    rf"^Decode\.  median latency: +{NUM} s, median throughput: +{NUM} token/s$", re.M
)
TOTAL_RE = re.compile(rf"^Total\. latency: +{NUM} s, throughput: +{NUM} token/s$", re.M)
STEP_RE = re.compile(
    rf"^Decode [0-9]+\. Batch size: [0-9]+, latency: +{NUM} s, throughput: +{NUM} token/s$",
    re.M,
)
KEYS = {
    "run_name",
    "batch_size",
    "input_len",
    "output_len",
    "prefill_latency",
    "prefill_throughput",
    "median_decode_latency",
    "median_decode_throughput",
    "total_latency",
    "overall_throughput",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("tiny-llama")))


def run_bench(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "sglang.bench_one_batch", "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_formats_and_jsonl(tiny_model, tmp_path):
    result = tmp_path / "out" / "result.jsonl"
    proc = run_bench(
        "--model-path", tiny_model,
        "--batch-size", "1", "2",
        "--input-len", "16",
        "--output-len", "4",
        "--log-decode-step", "1",
        "--run-name", "unit",
        "--result-filename", str(result),
        cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert len(PREFILL_RE.findall(out)) == 2, out
    assert len(DECODE_RE.findall(out)) == 2, out
    assert len(TOTAL_RE.findall(out)) == 2, out
    assert len(STEP_RE.findall(out)) == 2 * 3, out  # output_len - 1 decode steps per run

    records = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["batch_size"] for r in records] == [1, 2]
    for r in records:
        assert set(r) == KEYS
        assert r["run_name"] == "unit" and r["input_len"] == 16 and r["output_len"] == 4
        for key in KEYS - {"run_name"}:
            assert r[key] > 0, key
        assert r["total_latency"] >= r["prefill_latency"]


def test_missing_model_is_a_clean_error(tmp_path):
    proc = run_bench("--model-path", str(tmp_path / "no-such-model"), cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "error:" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "result.jsonl").exists()


def test_run_beyond_context_is_a_clean_error(tiny_model, tmp_path):
    proc = run_bench(
        "--model-path",
        tiny_model,
        "--input-len",
        "1020",
        "--output-len",
        "8",
        cwd=str(tmp_path),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "context length 1024" in proc.stderr


def test_pool_too_small_is_a_clean_error(tiny_model, tmp_path):
    proc = run_bench(
        "--model-path", tiny_model, "--batch-size", "4", "--input-len", "16", "--max-total-tokens", "32",
        cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "KV slots" in proc.stderr
