"""Data parallelism: `--dp 2` replicas behind the data parallel controller.

- `LoadBalancer`: round_robin alternates; total_requests / total_tokens pick the replica with the
  smallest estimate (its last report plus what was sent to it since), ties alternate.
- `combine`: one answer per replica becomes the single answer the tokenizer manager expects.
- For each `--load-balance-method`, a real server with `--dp 2` serves concurrent requests on both
  replicas: while streams run, `/get_load` lists both DP ranks with work, both replicas log
  prefill batches, and afterwards everything drains to zero and the cache flushes on both.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
import requests

from sglang.srt.managers.data_parallel_controller import (
    GetLoadsReq,
    GetLoadsResp,
    LoadBalancer,
    combine,
)
from sglang.srt.managers.io_struct import (
    FlushCacheReq,
    FlushCacheResp,
    GetLoadReq,
    GetLoadResp,
    HealthCheckReq,
    HealthCheckResp,
    TokenizedGenerateReqInput,
)
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.test.runners import make_tiny_model
from sglang.test.test_utils import (
    find_free_port,
    kill_process_tree,
    popen_launch_server,
    terminate,
)

METHODS = ["round_robin", "total_requests", "total_tokens"]
NUM_STREAMS = 4
SERVER_ARGS = [
    "--skip-tokenizer-init",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--max-total-tokens",
    "65536",
    "--dp",
    "2",
]


def _req(n_tokens: int) -> TokenizedGenerateReqInput:
    return TokenizedGenerateReqInput(
        rid=f"r{n_tokens}",
        input_text=None,
        input_ids=list(range(1, n_tokens + 1)),
        sampling_params=SamplingParams(),
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        stream=False,
    )


def _load(dp_rank: int, num_reqs: int, num_tokens: int = 0) -> GetLoadResp:
    return GetLoadResp(dp_rank, num_reqs, 0, num_tokens)


def test_round_robin_alternates():
    lb = LoadBalancer("round_robin", 3)
    assert [lb.pick(_req(4)) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_total_requests_uses_reports_and_recent_sends():
    lb = LoadBalancer("total_requests", 2)
    assert [lb.pick(_req(4)) for _ in range(4)] == [0, 1, 0, 1]  # equal estimates alternate
    # A poll sent after all four: replica 0 reports 1 left, replica 1 reports 2.
    polled = list(lb.sent)
    lb.on_report(0, _load(0, 1), polled[0])
    lb.on_report(1, _load(1, 2), polled[1])
    assert lb.pick(_req(4)) == 0  # estimates 1 vs 2
    assert lb.pick(_req(4)) == 1  # 2 vs 2: the tie goes to the next in turn
    # A report from a poll sent before the last two requests still counts them.
    lb.on_report(0, _load(0, 0), polled[0])
    assert [lb.estimate(0), lb.estimate(1)] == [1, 3]


def test_total_tokens_weighs_prompt_length():
    lb = LoadBalancer("total_tokens", 2)
    assert lb.pick(_req(100)) == 0
    assert lb.pick(_req(10)) == 1
    assert lb.pick(_req(10)) == 1  # 100 vs 10 tokens
    lb.on_report(0, _load(0, 1, num_tokens=5), lb.sent[0])
    assert lb.pick(_req(10)) == 0  # 5 vs 20


def test_combine_answers():
    loads = combine(GetLoadsReq(), [_load(0, 3, 30), _load(0, 1, 10)])
    assert isinstance(loads, GetLoadsResp)
    assert [(x.dp_rank, x.num_reqs, x.num_tokens) for x in loads.loads] == [(0, 3, 30), (1, 1, 10)]
    total = combine(GetLoadReq(), [_load(0, 3, 30), _load(0, 1, 10)])
    assert (total.num_reqs, total.num_tokens) == (4, 40)
    flush = combine(FlushCacheReq(), [FlushCacheResp(True, "ok"), FlushCacheResp(False, "busy")])
    assert not flush.success and flush.message == "DP1: busy"
    assert combine(HealthCheckReq(), [HealthCheckResp(True), HealthCheckResp(True)]).ok


# ------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    # A long context, so streams outlast the time it takes to start them all, even when a busy
    # machine delays the first chunks (CI once saw a 4000-token stream finish before the last start).
    folder = str(tmp_path_factory.mktemp("tiny_dp"))
    return make_tiny_model("llama", folder, max_position_embeddings=32768)


@pytest.fixture(scope="module", params=METHODS)
def dp_server(request, tiny):
    url = f"http://127.0.0.1:{find_free_port()}"
    args = [*SERVER_ARGS, "--load-balance-method", request.param]
    proc = popen_launch_server(tiny, url, other_args=args)
    yield request.param, url, proc
    try:
        terminate(proc, signal.SIGTERM, timeout=30)
    finally:
        kill_process_tree(proc.pid)


def _loads(url: str) -> list[dict]:
    resp = requests.get(f"{url}/get_load", timeout=10)
    assert resp.status_code == 200
    return resp.json()


def test_concurrent_requests_use_both_replicas(dp_server):
    method, url, proc = dp_server
    params = {"max_new_tokens": 30000, "temperature": 0.0, "ignore_eos": True}
    ready = next(i for i, line in enumerate(proc.log_lines) if "ready to roll" in line)
    streams = []
    try:
        for i in range(NUM_STREAMS):
            body = {"input_ids": [1, 10 + i, 11, 12], "sampling_params": params, "stream": True}
            # The server answers a stream once its first chunk exists: the request is running.
            resp = requests.post(f"{url}/generate", json=body, stream=True, timeout=60)
            assert resp.status_code == 200
            streams.append(resp)
        loads = _loads(url)
        assert [x["dp_rank"] for x in loads] == [0, 1], loads
        assert all(x["num_reqs"] >= 1 and x["num_tokens"] > 0 for x in loads), (method, loads)
        assert sum(x["num_reqs"] for x in loads) == NUM_STREAMS, loads
        if method == "round_robin":
            assert [x["num_reqs"] for x in loads] == [2, 2], loads
    finally:
        for resp in streams:
            resp.close()  # the server aborts requests whose client went away
    deadline = time.monotonic() + 30
    while any(x["num_reqs"] for x in _loads(url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(x["num_reqs"] == 0 and x["num_tokens"] == 0 for x in _loads(url))
    assert requests.post(f"{url}/flush_cache", timeout=10).status_code == 200
    # Every request was prefilled by one replica, and each replica got some (warm-up excluded).
    admitted = {"DP0": 0, "DP1": 0}
    for line in proc.log_lines[ready:]:
        match = re.search(r" (DP\d) TP0\] Prefill batch\. #new-seq: (\d+)", line)
        if match:
            admitted[match.group(1)] += int(match.group(2))
    assert sum(admitted.values()) == NUM_STREAMS and min(admitted.values()) >= 1, admitted
    if method == "round_robin":
        assert admitted == {"DP0": 2, "DP1": 2}, admitted
    info = requests.get(f"{url}/get_server_info", timeout=10).json()
    assert (info["dp_size"], info["load_balance_method"]) == (2, method)
