"""Forwarding a request to a worker: pick one, send the client's body bytes unchanged, relay the
answer, retry on another worker when the first attempt fails before anything reached the client.

The body is never re-serialized, so every field the worker knows (attention-token fields
included) survives the hop, and the worker's answer comes back byte for byte with its status and
content type. A server-sent-event stream is relayed chunk by chunk as it arrives; its response
starts only when the first chunk does, so a worker that fails before its first chunk is retried
like a non-streaming request, and one that fails later ends the client's stream (no retry after
the first byte). Retried: connection errors and statuses 408/429/500/502/503/504, with
exponential backoff and jitter. Every outcome feeds the worker's circuit breaker.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Awaitable, Callable, Optional

import aiohttp
import orjson

from sglang_router import metrics
from sglang_router.router_args import RouterArgs
from sglang_router.workers import Worker, WorkerRegistry

Send = Callable[[dict], Awaitable[None]]
Selector = Callable[[list[Worker]], Worker]

RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
_CONNECT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def error_body(message: str, status: int) -> bytes:
    """The OpenAI-style error object the workers use."""
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(
        status, "RouterError"
    )
    return orjson.dumps(
        {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    )


async def send_response(
    send: Send, status: int, body: bytes, content_type: bytes = b"application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, message: str) -> None:
    await send_response(send, status, error_body(message, status))


class _Failed(Exception):
    """An attempt that failed before anything reached the client (retryable)."""

    def __init__(self, status: int, body: bytes, content_type: bytes) -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


class Limiter:
    """`--max-concurrent-requests` with a bounded FIFO queue: a full queue answers 429, a wait
    longer than `--queue-timeout-secs` answers 408 (upstream's codes)."""

    def __init__(self, max_concurrent: int, queue_size: int, timeout_s: float) -> None:
        self.max, self.queue_size, self.timeout_s = max_concurrent, queue_size, timeout_s
        self.active = 0
        self.waiters: list[asyncio.Future] = []

    async def acquire(self) -> Optional[int]:
        """None once a slot is held, else the status to refuse the request with."""
        if self.max <= 0:
            return None
        if self.active < self.max and not self.waiters:
            self.active += 1
            return None
        if len(self.waiters) >= self.queue_size:
            metrics.QUEUE_REJECTED.labels("queue_full").inc()
            return 429
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            metrics.QUEUE_REJECTED.labels("queue_timeout").inc()
            return 408
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted a slot while being cancelled
                self.release()
            raise
        finally:
            if fut in self.waiters:
                self.waiters.remove(fut)
        return None

    def release(self) -> None:
        if self.max <= 0:
            return
        while self.waiters:
            fut = self.waiters.pop(0)
            if not fut.done():
                fut.set_result(None)  # the slot passes to the waiter; active stays the same
                return
        self.active -= 1


class Proxy:
    def __init__(self, args: RouterArgs, registry: WorkerRegistry) -> None:
        self.args = args
        self.registry = registry
        self.session: Optional[aiohttp.ClientSession] = None

    async def start(self) -> None:
        # NOTE: keep-alive shorter than uvicorn's 5 s, so a pooled connection is not reused just
        # as the worker closes it.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.args.request_timeout_secs),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def worker_headers(self, client_auth: Optional[bytes]) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.args.api_key:
            headers["Authorization"] = f"Bearer {self.args.api_key}"
        elif client_auth:
            headers["Authorization"] = client_auth.decode("latin-1")
        return headers

    def backoff_s(self, retry: int) -> float:
        a = self.args
        delay = a.retry_initial_backoff_ms * a.retry_backoff_multiplier ** (retry - 1)
        delay = min(delay, a.retry_max_backoff_ms) / 1000.0
        return max(0.0, delay * (1 + random.uniform(-a.retry_jitter_factor, a.retry_jitter_factor)))

    async def forward(
        self,
        route: str,
        method: str,
        path_qs: str,
        body: Optional[bytes],
        headers: dict[str, str],
        select: Selector,
        send: Send,
    ) -> None:
        """Answer the client with one worker's response, retrying failed attempts elsewhere."""
        start = time.perf_counter()
        tried: set[str] = set()
        last: Optional[_Failed] = None
        for attempt in range(self.args.max_attempts):
            if attempt:
                metrics.RETRIES.labels(route).inc()
                delay = self.backoff_s(attempt)
                metrics.RETRY_BACKOFF.observe(delay)
                await asyncio.sleep(delay)
            workers = self.registry.available()
            if not workers:
                last = _Failed(503, error_body("no available workers", 503), b"application/json")
                continue
            fresh = [w for w in workers if w.url not in tried]
            worker = select(fresh or workers)
            tried.add(worker.url)
            try:
                await self._attempt(worker, method, path_qs, body, headers, send, start)
                metrics.child(metrics.REQUEST_DURATION, route).observe(time.perf_counter() - start)
                return
            except _Failed as failed:
                last = failed
        metrics.RETRIES_EXHAUSTED.labels(route).inc()
        metrics.REQUEST_ERRORS.labels(route, str(last.status)).inc()
        await send_response(send, last.status, last.body, last.content_type)

    async def _attempt(
        self,
        worker: Worker,
        method: str,
        path_qs: str,
        body: Optional[bytes],
        headers: dict[str, str],
        send: Send,
        start: float,
    ) -> None:
        assert self.session is not None
        metrics.child(metrics.PROCESSED, worker.url).inc()
        worker.begin()
        resp: Any = None
        done = False
        try:
            try:
                resp = await self.session.request(
                    method, worker.url + path_qs, data=body, headers=headers
                )
            except _CONNECT_ERRORS as e:
                worker.breaker.record(False)
                raise _Failed(
                    502, error_body(f"worker {worker.url}: {e!r}", 502), b"application/json"
                )
            ctype = resp.headers.get("Content-Type", "application/json").encode("latin-1")
            if resp.status in RETRYABLE:
                data = await self._read(resp, worker)
                if resp.status >= 500:
                    worker.breaker.record(False)
                raise _Failed(resp.status, data, ctype)
            if ctype.startswith(b"text/event-stream"):
                await self._relay_stream(resp, worker, ctype, send, start)
            else:
                data = await self._read(resp, worker)
                worker.breaker.record(True)
                await send_response(send, resp.status, data, ctype)
            done = True
        finally:
            worker.end()
            if resp is not None:
                # A response not read to its end closes its connection, so the worker sees
                # the disconnect and aborts the request.
                if done:
                    resp.release()
                else:
                    resp.close()

    async def _read(self, resp: aiohttp.ClientResponse, worker: Worker) -> bytes:
        try:
            return await resp.read()
        except _CONNECT_ERRORS as e:
            worker.breaker.record(False)
            raise _Failed(502, error_body(f"worker {worker.url}: {e!r}", 502), b"application/json")

    async def _relay_stream(
        self, resp: aiohttp.ClientResponse, worker: Worker, ctype: bytes, send: Send, start: float
    ) -> None:
        started = False
        try:
            async for chunk in resp.content.iter_any():
                if not started:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": resp.status,
                            "headers": [(b"content-type", ctype), (b"cache-control", b"no-cache")],
                        }
                    )
                    metrics.TTFT.observe(time.perf_counter() - start)
                    started = True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except _CONNECT_ERRORS as e:
            worker.breaker.record(False)
            if not started:
                raise _Failed(
                    502, error_body(f"worker {worker.url}: {e!r}", 502), b"application/json"
                )
            # NOTE: bytes already reached the client; a retry would duplicate them, so the
            # stream ends here, truncated, as upstream's router does.
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        worker.breaker.record(True)
        if not started:
            await send(
                {
                    "type": "http.response.start",
                    "status": resp.status,
                    "headers": [(b"content-type", ctype)],
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
