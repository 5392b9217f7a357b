"""The router's parts on their own, and the router process in front of stand-in workers.

In-process: the approximate tree (prefix match, eviction), the cache-aware decision, the circuit
breaker and the concurrency limiter. With `SlowWorker` stand-ins (aiohttp, in a thread) for what
a real worker finishes too fast to observe or never does: a worker answering 503 (streams retried
on the other, circuit breaker opening, `--disable-retries`), and the queue limit (429 when full,
408 after the timeout) with a client disconnect closing the worker's connection. Flags the router
does not implement, and impossible values, exit 2 at start-up.
Run: python -m pytest -q test/srt/test_model_gateway_units.py
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pytest
import requests

from sglang.test.router_utils import running_router
from sglang.test.test_utils import DEFAULT_URL_FOR_TEST, find_free_port
from sglang_router.policies import CacheAware
from sglang_router.proxy import Limiter
from sglang_router.tree import Tree
from sglang_router.workers import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Worker


def _worker(url: str, in_flight: int = 0) -> Worker:
    worker = Worker(url, CircuitBreaker(url, 3, 2, 60.0))
    worker.in_flight = in_flight
    return worker


def test_tree_prefix_match_and_eviction():
    tree = Tree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    tree.insert("hello world, again", "b")
    assert tree.prefix_match("hello world, again and again", ["a", "b"]) == (18, "b")
    assert tree.prefix_match("hello world!", ["a"]) == (11, "a")
    assert tree.prefix_match("hello th", ["a"]) == (6, "a")  # a owns "hello " only
    assert tree.prefix_match("xyz", ["a", "b"]) == (0, None)
    assert tree.tenant_chars == {"a": 11, "b": 23}  # b: "hello " "there" "world" ", again"
    tree.insert("zzzz", "a")
    tree.evict(max_chars=5)  # a's least recently used leaf ("hello world" branch) goes first
    assert tree.tenant_chars["a"] <= 5 and tree.prefix_match("zzzz", ["a"]) == (4, "a")
    assert tree.prefix_match("hello", ["a"]) == (0, None)
    tree.remove_tenant("b")
    assert tree.prefix_match("hello world", ["b"]) == (0, None) and "b" not in tree.tenant_chars


def test_cache_aware_decision():
    policy = CacheAware(0.5, balance_abs_threshold=4, balance_rel_threshold=1.5, max_tree_size=1000)
    a, b = _worker("http://a"), _worker("http://b")
    first = policy.select([a, b], "shared prefix, request one")
    # Matching more than half the text: the holder; a new text: the smallest tree.
    assert policy.select([a, b], "shared prefix, request two") is first
    other = policy.select([a, b], "something unrelated entirely")
    assert other is not first
    # Imbalance (difference > 4 and ratio > 1.5) overrides the match: least loaded.
    first.in_flight = 10
    assert policy.select([a, b], "shared prefix, request three") is other


def test_circuit_breaker_opens_half_opens_and_closes():
    cb = CircuitBreaker("http://w", failure_threshold=2, success_threshold=2, timeout_s=0.05)
    cb.record(False)
    assert cb.allows()
    cb.record(False)
    assert cb.state == OPEN and not cb.allows()
    time.sleep(0.06)
    assert cb.allows() and cb.state == HALF_OPEN
    cb.record(False)  # one failure while half-open opens it again
    assert cb.state == OPEN
    time.sleep(0.06)
    assert cb.allows()
    cb.record(True)
    cb.record(True)
    assert cb.state == CLOSED


def test_limiter_queue_full_and_timeout():
    async def run() -> list[Optional[int]]:
        limiter = Limiter(max_concurrent=1, queue_size=1, timeout_s=0.2)
        assert await limiter.acquire() is None
        waiter = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0)
        full = await limiter.acquire()  # the one queue slot is taken
        timed_out = await waiter  # nobody released within 0.2 s
        limiter.release()
        again = await limiter.acquire()
        return [full, timed_out, again]

    assert asyncio.run(run()) == [429, 408, None]


# ------------------------------------------------------------------------ stand-in workers


class SlowWorker:
    """A stand-in worker whose /generate streams `n` events (default 400), one every 50 ms, for
    what a real worker on the tiny model finishes too fast to observe: requests holding the only
    slot for seconds, the moment a connection is closed (`aborted`); and, with `fail_status`,
    a worker that answers every /generate with that status (`calls` counts them)."""

    def __init__(self, fail_status: Optional[int] = None) -> None:
        from aiohttp import web

        self.fail_status, self.calls = fail_status, 0
        self.aborted = threading.Event()
        self.url = f"{DEFAULT_URL_FOR_TEST}:{find_free_port()}"
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/generate", self._generate)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        port = int(self.url.rsplit(":", 1)[1])
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", port).start())
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _health(self, request):
        from aiohttp import web

        return web.Response(text="ok")

    async def _generate(self, request):
        from aiohttp import web

        self.calls += 1
        if self.fail_status:
            return web.json_response({"message": "overloaded"}, status=self.fail_status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = (await request.json()).get("n", 400)
        try:
            for i in range(n):
                await resp.write(b'data: {"i": %d}\n\n' % i)
                await asyncio.sleep(0.05)
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted.set()
            return resp
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_queue_limit_timeout_and_client_disconnect():
    slow = SlowWorker()
    try:
        args = ["--worker-urls", slow.url, "--max-concurrent-requests", "1"]
        with running_router(*args, "--queue-size", "1", "--queue-timeout-secs", "5") as r:
            # NOTE: the session and the line iterator are kept: dropping either closes the
            # stream's connection, which would end the request early.
            client = requests.Session()
            hold = client.post(f"{r.url}/generate", json={"text": "x", "stream": True}, stream=True)
            lines = hold.iter_lines()
            assert next(lines) == b'data: {"i": 0}'  # relayed before the stream ends
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(r.post, "/generate", json={"text": "y"})
                deadline = time.monotonic() + 30
                while not r.metric("sgl_router_requests_total", route="/generate") >= 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                full = r.post("/generate", json={"text": "z"})  # slot busy, queue full
                assert full.status_code == 429 and "queue" in full.json()["message"]
                assert queued.result().status_code == 408  # waited 5 s in the queue
            assert not slow.aborted.is_set()
            hold.close()  # the client goes away: the router closes the worker's connection
            assert slow.aborted.wait(30)
            ok = r.post("/generate", json={"text": "again", "n": 2})  # the router stays up
            assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n")
            for reason in ("queue_full", "queue_timeout"):
                assert r.metric("sgl_router_queue_rejections_total", reason=reason) == 1
    finally:
        slow.stop()


def test_status_retries_and_circuit_breaker():
    """A worker answering 503: streams are retried on the other one (nothing was sent yet), its
    circuit breaker opens after `--cb-failure-threshold` failures and it gets no more requests;
    with `--disable-retries` its 503 reaches the client."""
    good, bad = SlowWorker(), SlowWorker(fail_status=503)
    try:
        urls = ["--worker-urls", bad.url, good.url, "--policy", "round_robin"]
        with running_router(
            *urls, "--cb-failure-threshold", "2", "--retry-initial-backoff-ms", "1"
        ) as r:
            for _ in range(6):
                out = r.post("/generate", json={"text": "x", "stream": True, "n": 2})
                assert out.status_code == 200 and out.text.endswith("data: [DONE]\n\n")
            assert bad.calls == 2 and good.calls == 6
            assert r.metric("sgl_router_cb_state", worker=bad.url) == 1  # open
            assert r.metric("sgl_router_retries_total", route="/generate") == 2
        with running_router(*urls, "--disable-retries") as r:
            codes = [r.post("/generate", json={"text": "x", "n": 1}).status_code for _ in range(4)]
            assert sorted(codes) == [200, 200, 503, 503]
    finally:
        good.stop()
        bad.stop()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pd-disaggregation"], "unrecognized arguments: --pd-disaggregation"),
        (["--cache-threshold", "2"], "--cache-threshold must be within [0, 1]"),
        (["--worker-urls", "localhost:1"], "must start with http:// or https://"),
    ],
)
def test_refused_flags_exit_2(flags, message):
    """Upstream flags this router does not implement, and impossible values, end start-up."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
