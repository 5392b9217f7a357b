"""The router (sgl-model-gateway, module `sglang_router`) in front of two real servers.

Two servers run the default model, smollm2-135m-instruct (float32, KV pools of 4096 tokens),
started with a router of their own by `python -m sglang_router.launch_server --dp-size 2`; each
test starts its own router process (`python -m sglang_router.launch_router`) in front of them and
drives it with `requests` and the official `openai` client:

- every route, streaming and not, with attention tokens requested, answers what a worker answers
  directly (ids, timestamps and cache counts aside);
- cache_aware sends requests sharing a long prefix to the worker holding it (the workers'
  `cached_tokens` prove it), round_robin splits them;
- `/add_worker`, `/remove_worker` and the `/workers` REST form under load lose no request; a
  discovery file and `--api-key` work;
- `--max-concurrent-requests 1 --queue-size 1`: a third request gets 429 while the first two
  finish, and the router keeps serving;
- a worker killed mid-run: its requests are retried on the other and succeed, it leaves the pool
  and rejoins after a restart (it restarts a shared server, so it runs next to last);
- SIGTERM to `launch_server` stops its router and servers together (last).

The router's parts, retries, the circuit breaker and the queue's 408 are tested in
test_model_gateway_units.py. Run: python -m pytest -q test/srt/test_model_gateway.py
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import openai
import psutil
import pytest
import requests

import sglang_router
from sglang.test.router_utils import RouterProcess, running_router
from sglang.test.test_utils import (
    DEFAULT_MODEL_NAME_FOR_TEST,
    DEFAULT_URL_FOR_TEST,
    descendants,
    find_free_port,
    kill_process_tree,
    popen_launch_server,
    wait_pids_gone,
)

SERVER_ARGS = [
    "--max-total-tokens",
    "4096",
    "--skip-server-warmup",
    "--dtype",
    "float32",
    "--return-attention-tokens",
]
ATTN = {"return_attention_tokens": True, "attention_tokens_top_k": 3}
GREEDY = {"temperature": 0, "max_new_tokens": 6}
# Fields that legitimately differ between two answers to the same request.
VOLATILE = {"id", "created", "rid", "e2e_latency", "cached_tokens", "prompt_tokens_details"}
WORDS = "alpha beta gamma delta river stone cloud maple ember quartz violet harbor lantern".split()


def test_installed_package_is_ours():
    here = Path(__file__).resolve().parents[2] / "sgl-model-gateway"
    assert Path(sglang_router.__file__).resolve().is_relative_to(here), (
        f"sglang_router comes from {sglang_router.__file__}; run `make install`"
    )


# ----------------------------------------------------------------------------- real servers


class Servers:
    """The two workers, started with their own router by `python -m
    sglang_router.launch_server --dp-size 2`; `kill` and `restart` end one and bring it back on
    its port (outside the launcher's group)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.router = f"{DEFAULT_URL_FOR_TEST}:{find_free_port()}"
        cmd = [sys.executable, "-m", "sglang_router.launch_server", "--model-path", model]
        cmd += ["--dp-size", "2", "--host", "127.0.0.1", "--port", self.router.rsplit(":", 1)[1]]
        cmd += ["--router-dp-worker-base-port", str(find_free_port()), "--router-policy"]
        cmd += ["round_robin", "--router-prometheus-port", str(find_free_port())]
        cmd += ["--router-worker-startup-check-interval", "1", *SERVER_ARGS]
        self.launcher = subprocess.Popen(cmd, start_new_session=True)
        self.restarted: list[subprocess.Popen] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.launcher.poll() is None, "launch_server exited"
            try:
                if requests.get(f"{self.router}/liveness", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        self.urls = requests.get(f"{self.router}/list_workers", timeout=30).json()["urls"]
        self.server_pids = [self._pid(url) for url in self.urls]

    def _pid(self, url: str) -> int:
        port = url.rsplit(":", 1)[1]
        for child in psutil.Process(self.launcher.pid).children():
            cmdline = child.cmdline()
            if "sglang.launch_server" in cmdline and port in cmdline:
                return child.pid
        raise LookupError(url)

    def kill(self, i: int) -> None:
        kill_process_tree(self.server_pids[i])

    def restart(self, i: int) -> None:
        self.restarted.append(popen_launch_server(self.model, self.urls[i], other_args=SERVER_ARGS))

    def stop(self) -> None:
        for proc in [self.launcher, *self.restarted]:
            kill_process_tree(proc.pid)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers(DEFAULT_MODEL_NAME_FOR_TEST)
    try:
        yield s
    finally:
        s.stop()


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _stream_summary(events: list[dict]) -> dict:
    """What a stream says independent of how its tokens were grouped into events: the text,
    every attention entry in order, the report headers and the finish reason. (Native streams
    repeat the whole text in each event, OpenAI ones send deltas; attention entries are deltas
    in both.)"""
    text, entries, headers, finish = "", [], set(), None
    for event in events:
        if "meta_info" in event:
            text, finish = event["text"], event["meta_info"]["finish_reason"]
            reports = [event["meta_info"].get("attention_tokens")]
        else:
            reports = []
            for ch in event.get("choices", []):
                text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                finish = ch.get("finish_reason") or finish
                reports.append(ch.get("attention_tokens"))
        for report in filter(None, reports):
            entries += report.pop("content", [])
            headers.add(json.dumps(report, sort_keys=True))
    return {"text": text, "attention": entries, "headers": sorted(headers), "finish": finish}


def _body(resp: requests.Response) -> Any:
    """A JSON answer, or a stream's summary, with volatile fields removed."""
    assert resp.status_code == 200, resp.text
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [ln[6:] for ln in resp.text.split("\n") if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return _stream_summary([_strip(json.loads(e)) for e in events[:-1]])
    return _strip(resp.json())


def _flush(url: str) -> None:
    assert requests.post(f"{url}/flush_cache", timeout=60).status_code == 200


def test_every_route_same_as_worker(servers):
    direct = servers.urls[0]
    with running_router("--worker-urls", *servers.urls) as r:
        cases = [
            ("/generate", {"text": "The capital of", "sampling_params": GREEDY, **ATTN}),
            ("/generate", {"input_ids": [1, 5, 9, 200], "sampling_params": GREEDY, **ATTN}),
            (
                "/v1/completions",
                {"model": "m", "prompt": "Once upon", "max_tokens": 6, "temperature": 0, **ATTN},
            ),
            (
                "/v1/chat/completions",
                {
                    "model": "m",
                    "messages": [{"role": "user", "content": "Hi!"}],
                    "max_tokens": 6,
                    "temperature": 0,
                    "logprobs": True,
                    "top_logprobs": 2,
                    **ATTN,
                },
            ),
        ]
        for path, body in cases:
            for stream in (False, True):
                req = {**body, "stream": stream}
                _flush(r.url)  # fan-out: both workers start cold, like the direct request
                want = _body(requests.post(direct + path, json=req, timeout=120))
                _flush(r.url)
                got = _body(r.post(path, json=req))
                assert got == want, f"{path} stream={stream}"
                assert "top_attention" in json.dumps(got), f"{path} stream={stream}"

        # The official client, with the attention fields in extra_body.
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="none")
        ref = openai.OpenAI(base_url=direct + "/v1", api_key="none")
        kw = dict(model="m", max_tokens=5, temperature=0, extra_body=ATTN)
        msgs = [{"role": "user", "content": "Tell me a story"}]
        _flush(r.url)
        want = _strip(ref.chat.completions.create(messages=msgs, **kw).model_dump())
        _flush(r.url)
        got = _strip(client.chat.completions.create(messages=msgs, **kw).model_dump())
        assert got == want and got["choices"][0]["attention_tokens"]["content"]
        chunks = list(client.completions.create(prompt="Stream me", stream=True, **kw))
        assert any(getattr(c.choices[0], "attention_tokens", None) for c in chunks if c.choices)

        for path in ("/v1/models", "/get_model_info", "/v1/models/unknown"):
            got, want = r.get(path), requests.get(direct + path, timeout=60)
            assert (got.status_code, _strip(got.json())) == (want.status_code, _strip(want.json()))
        for path in ("/health", "/health_generate", "/get_server_info"):
            assert r.get(path).status_code == 200, path
        for path, body in (
            ("/v1/tokenize", {"prompt": "Hello there"}),
            ("/v1/detokenize", {"tokens": [19556, 665]}),
        ):
            assert (
                r.post(path, json=body).json()
                == requests.post(direct + path, json=body, timeout=60).json()
            )
        loads = r.get("/get_loads").json()["workers"]
        assert sorted(w["worker"] for w in loads) == sorted(servers.urls)
        assert all(w["load"][0]["dp_rank"] == 0 for w in loads)
        bad = r.post("/generate", json={"text": "x", "sampling_params": {"temperature": -1}})
        assert bad.status_code == 400 and "temperature" in bad.text  # the worker's own error
        assert r.metric("sgl_router_requests_total", route="/generate") >= 4
        assert r.metric("sgl_router_cache_misses_total") >= 1


def _prefix_workload(seed: int, groups: int = 3, per_group: int = 4) -> list[str]:
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(120)) for _ in range(groups)]
    return [f"{p} question {i}: {rng.choice(WORDS)}?" for i in range(per_group) for p in prefixes]


def _cache_misses(r: RouterProcess, prompts: list[str]) -> int:
    """Requests whose prompt the serving worker had (mostly) not cached."""
    misses = 0
    for text in prompts:
        sp = {"temperature": 0, "max_new_tokens": 1}
        meta = r.post("/generate", json={"text": text, "sampling_params": sp}).json()["meta_info"]
        misses += meta["cached_tokens"] < meta["prompt_tokens"] // 2
    return misses


def test_cache_aware_keeps_prefix_on_its_worker(servers):
    with running_router("--worker-urls", *servers.urls, "--policy", "cache_aware") as r:
        _flush(r.url)
        assert _cache_misses(r, _prefix_workload(1)) == 3  # one per prefix group
        # Both workers took groups (a new prefix goes to the smaller tree).
        per_worker = [
            r.metric("sgl_router_processed_requests_total", worker=u) for u in servers.urls
        ]
        assert all(n >= 4 for n in per_worker), per_worker
        assert r.metric("sgl_router_cache_hits_total") == 9
    with running_router("--worker-urls", *servers.urls, "--policy", "round_robin") as r:
        _flush(r.url)
        # Three groups in turn on two workers: every group visits both, missing once on each.
        assert _cache_misses(r, _prefix_workload(2)) == 6


def _gen(url: str, max_new_tokens: int = 16, **kw) -> requests.Response:
    sp = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
    return requests.post(
        f"{url}/generate", json={"text": "Count with me", "sampling_params": sp}, timeout=300, **kw
    )


def _num_reqs(url: str) -> int:
    return sum(
        x["num_reqs"] + x["num_waiting_reqs"]
        for x in requests.get(f"{url}/get_load", timeout=30).json()
    )


class Load:
    """Client threads sending requests until stopped; every status is kept."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url, self.codes, self.running = url, [], True
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while self.running:
            try:
                self.codes.append(_gen(self.url, 8).status_code)
            except requests.RequestException as e:
                self.codes.append(repr(e))

    def stop(self) -> list:
        self.running = False
        for t in self.threads:
            t.join(300)
        return self.codes


def _settle(load: Load, n: int) -> None:
    """Wait until `n` more requests finished."""
    target = len(load.codes) + n
    deadline = time.monotonic() + 120
    while len(load.codes) < target and time.monotonic() < deadline:
        time.sleep(0.05)


def test_add_and_remove_workers_under_load(servers):
    a, b = servers.urls
    with running_router("--worker-urls", a, "--policy", "round_robin") as r:
        load = Load(r.url)
        _settle(load, 3)
        assert r.post(f"/add_worker?url={b}").status_code == 200
        _settle(load, 6)
        assert r.post(f"/remove_worker?url={a}").status_code == 200
        assert r.get("/list_workers").json() == {"urls": [b]}
        _settle(load, 6)
        # The REST form: add a back, remove b.
        assert r.post("/workers", json={"url": a}).status_code == 200
        _settle(load, 3)
        assert (
            requests.delete(
                f"{r.url}/workers/{requests.utils.quote(b, safe='')}", timeout=60
            ).status_code
            == 200
        )
        _settle(load, 3)
        codes = load.stop()
        assert codes and all(c == 200 for c in codes), codes
        assert [w["url"] for w in r.get("/workers").json()["workers"]] == [a]
        assert r.metric("sgl_router_processed_requests_total", worker=b) > 0
        assert r.post(f"/remove_worker?url={b}").status_code == 404


def test_discovery_file_and_api_key(servers, tmp_path):
    a, b = servers.urls
    listing = tmp_path / "workers.txt"
    listing.write_text(f"{a}\n")
    auth = {"Authorization": "Bearer secret"}
    with running_router(
        "--worker-urls-file",
        str(listing),
        "--discovery-interval-secs",
        "0.2",
        "--api-key",
        "secret",
    ) as r:

        def urls() -> list[str]:
            return sorted(r.get("/list_workers", headers=auth).json()["urls"])

        def wait_for(want: list[str]) -> None:
            deadline = time.monotonic() + 60
            while urls() != sorted(want) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert urls() == sorted(want)

        wait_for([a])
        listing.write_text(f"# the autoscaling group\n{a}\n{b}\n")
        wait_for([a, b])
        listing.write_text(f"{b}\n")
        wait_for([b])
        assert r.get("/list_workers").status_code == 401
        assert r.post("/generate", json={"text": "hi"}).status_code == 401
        ok = r.post("/generate", json={"text": "hi", "sampling_params": GREEDY}, headers=auth)
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 6


def test_queue_limit_429_router_stays_up(servers):
    args = ["--worker-urls", *servers.urls, "--max-concurrent-requests", "1"]
    with running_router(*args, "--queue-size", "1", "--queue-timeout-secs", "300") as r:
        # The one slot: a long stream, open until the 429 is seen, then dropped (the router
        # aborts it on its worker and the slot passes to the queued request). The session and
        # the line iterator are kept: dropping either would close the stream early.
        client = requests.Session()
        body = {"text": "Count with me", "stream": True}
        body["sampling_params"] = {"max_new_tokens": 2048, "ignore_eos": True}
        hold = client.post(f"{r.url}/generate", json=body, stream=True, timeout=300)
        lines = hold.iter_lines()
        assert next(lines).startswith(b"data: ")
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(_gen, r.url, 4)  # waits in the one queue place
            deadline = time.monotonic() + 120
            while r.metric("sgl_router_requests_total", route="/generate") < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            full = _gen(r.url, 4)
            assert full.status_code == 429 and "queue" in full.json()["message"]
            hold.close()
            assert queued.result().status_code == 200
        assert _gen(r.url, 4).status_code == 200  # the router and its workers stay up
        assert r.metric("sgl_router_queue_rejections_total", reason="queue_full") == 1
        assert sum(_num_reqs(u) for u in servers.urls) == 0  # the dropped stream was aborted


def test_killed_worker_retried_leaves_and_rejoins(servers):
    """Next to last: it kills and restarts the second server."""
    a, b = servers.urls
    args = ["--worker-urls", a, b, "--policy", "round_robin", "--health-check-interval-secs", "1"]
    args += ["--health-failure-threshold", "1", "--health-success-threshold", "1"]
    with running_router(
        *args, "--retry-initial-backoff-ms", "20", "--retry-max-backoff-ms", "200"
    ) as r:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_gen, r.url, 64) for _ in range(8)]
            deadline = time.monotonic() + 60
            while _num_reqs(b) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _num_reqs(b) > 0
            servers.kill(1)  # b dies with requests in flight
            codes = [f.result().status_code for f in futures]
        assert codes == [200] * 8
        assert r.metric("sgl_router_retries_total", route="/generate") >= 1
        more = [_gen(r.url, 4).status_code for _ in range(4)]
        assert more == [200] * 4

        def health(url: str) -> bool:
            return next(
                w["healthy"] for w in r.get("/workers").json()["workers"] if w["url"] == url
            )

        deadline = time.monotonic() + 60
        while health(b) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not health(b) and r.metric("sgl_router_worker_health", worker=b) == 0
        servers.restart(1)
        deadline = time.monotonic() + 60
        while not health(b) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health(b)
        served = r.metric("sgl_router_processed_requests_total", worker=b)
        assert [_gen(r.url, 4).status_code for _ in range(4)] == [200] * 4
        assert r.metric("sgl_router_processed_requests_total", worker=b) > served


def test_launch_server_stops_together(servers):
    """Last: SIGTERM to `launch_server` stops its router and its servers."""
    assert requests.get(f"{servers.router}/list_workers", timeout=30).json()["urls"] == servers.urls
    group = [servers.launcher.pid] + descendants(servers.launcher.pid)
    servers.launcher.terminate()
    assert servers.launcher.wait(60) == 128 + signal.SIGTERM
    assert wait_pids_gone(group, 60) == []
