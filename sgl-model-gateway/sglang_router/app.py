"""The router's HTTP surface: a bare ASGI application (run by uvicorn on uvloop) that dispatches
each path to the proxy (generation and pass-through routes), to a fan-out (`/flush_cache`,
`/get_loads`) or to worker management (`/add_worker`, `/remove_worker`, `/list_workers`,
`/workers`).

Generation routes (`/generate`, `/v1/completions`, `/v1/chat/completions`) go through the
concurrency limiter and the routing policy; their bodies are parsed only when the policy needs the
text (cache_aware), and forwarded unparsed. A client that disconnects cancels its request, which
closes the worker connection, so the worker aborts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional
from urllib.parse import parse_qs, unquote

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sglang_router import metrics
from sglang_router.monitor import Monitor
from sglang_router.policies import Policy, RoundRobin, make_policy
from sglang_router.proxy import Limiter, Proxy, Send, send_error, send_response
from sglang_router.router_args import RouterArgs
from sglang_router.workers import Worker, WorkerRegistry

logger = logging.getLogger("sglang_router")

GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
# Routes any one worker answers (GET without a body, POST with one).
ONE_WORKER_GET = (
    "/v1/models",
    "/get_model_info",
    "/model_info",
    "/get_server_info",
    "/server_info",
    "/health",
    "/health_generate",
)
ONE_WORKER_POST = ("/v1/tokenize", "/v1/detokenize")
OPEN_ROUTES = ("/health", "/health_generate", "/metrics", "/liveness", "/readiness")


def routing_text(path: str, body: Any) -> str:
    """The text cache-aware routing matches: the prompt, or the chat's messages rendered as
    `role: content` lines (what the worker's template will mostly contain)."""
    if not isinstance(body, dict):
        return ""
    if path == "/v1/chat/completions":
        lines = []
        for m in body.get("messages") or []:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            lines.append(f"{m.get('role', '')}: {content or ''}")
        return "\n".join(lines)
    prompt = body.get("text") if path == "/generate" else body.get("prompt")
    if prompt is None and path == "/generate":
        prompt = body.get("input_ids")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch goes to one worker; its first prompt decides where
    if isinstance(prompt, list):
        return " ".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""


class Router:
    def __init__(self, args: RouterArgs) -> None:
        self.args = args
        self.registry = WorkerRegistry(
            args.cb_failure_threshold,
            args.cb_success_threshold,
            args.cb_timeout_duration_secs,
            not args.disable_circuit_breaker,
        )
        self.policy: Policy = make_policy(args)
        self.any_worker = RoundRobin()  # for routes any worker can answer
        self.proxy = Proxy(args, self.registry)
        self.monitor = Monitor(args, self.registry, self.policy)
        self.limiter = Limiter(
            args.max_concurrent_requests, args.queue_size, args.queue_timeout_secs
        )
        self._auth = f"Bearer {args.api_key}".encode() if args.api_key else None

    # ------------------------------------------------------------------------------ lifespan

    async def startup(self) -> None:
        await self.proxy.start()
        await self.monitor.start()
        results = await asyncio.gather(*(self.monitor.add_worker(u) for u in self.args.worker_urls))
        failed = [u for u, ok in zip(self.args.worker_urls, results) if not ok]
        if failed:
            raise RuntimeError(
                f"workers not healthy within {self.args.worker_startup_timeout_secs} s: {failed}"
            )
        logger.info("router ready with %d workers, policy %s", len(results), self.policy.name)

    async def shutdown(self) -> None:
        await self.monitor.close()
        await self.proxy.close()

    async def __call__(self, scope: dict, receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:
                    logger.error("router start-up failed: %s", e)
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---------------------------------------------------------------------------------- http

    async def _http(self, scope: dict, receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = dict(scope["headers"])
        if self._auth and path not in OPEN_ROUTES and headers.get(b"authorization") != self._auth:
            await send_error(send, 401, "invalid or missing API key")
            return
        body = await self._read_body(receive)
        if body is None:
            await send_error(send, 413, f"payload larger than {self.args.max_payload_size} bytes")
            return
        query = scope.get("query_string", b"").decode()
        path_qs = path + ("?" + query if query else "")
        worker_headers = self.proxy.worker_headers(headers.get(b"authorization"))
        if path in GENERATION_ROUTES and method == "POST":
            await self._until_disconnect(receive, self._generate(path, body, worker_headers, send))
        elif (path in ONE_WORKER_GET or path.startswith("/v1/models/")) and method == "GET":
            await self._until_disconnect(
                receive, self._one_worker(path, "GET", path_qs, None, worker_headers, send)
            )
        elif path in ONE_WORKER_POST and method == "POST":
            await self._one_worker(path, "POST", path_qs, body, worker_headers, send)
        elif path in ("/liveness", "/readiness"):
            ready = path == "/liveness" or bool(self.registry.available())
            await send_response(send, 200 if ready else 503, b'{"status":"ok"}' if ready else b"{}")
        elif path == "/metrics":
            await send_response(send, 200, generate_latest(), CONTENT_TYPE_LATEST.encode())
        else:
            await self._control(path, method, query, body, send)

    async def _read_body(self, receive) -> Optional[bytes]:
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.args.max_payload_size:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _until_disconnect(self, receive, coro) -> None:
        """Run coro; cancel it (closing the worker connection) if the client goes away first."""
        task = asyncio.ensure_future(coro)
        watch = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))
        if not task.cancelled():
            task.result()

    @staticmethod
    async def _wait_disconnect(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _generate(self, path: str, body: bytes, headers: dict[str, str], send: Send) -> None:
        metrics.child(metrics.REQUESTS, path).inc()
        text: Optional[str] = None
        if self.policy.needs_text:
            try:
                text = routing_text(path, orjson.loads(body))
            except orjson.JSONDecodeError:
                text = ""  # the worker answers the malformed body with its own 400
        refused = await self.limiter.acquire()
        if refused is not None:
            metrics.REQUEST_ERRORS.labels(path, str(refused)).inc()
            reason = "too many requests: queue full" if refused == 429 else "timed out in queue"
            await send_error(send, refused, reason)
            return
        start = time.perf_counter()
        try:
            await self.proxy.forward(path, "POST", path, body, headers, self._select(text), send)
        finally:
            self.limiter.release()
            metrics.GENERATE_DURATION.observe(time.perf_counter() - start)

    def _select(self, text: Optional[str]):
        policy = self.policy

        def select(workers: list[Worker]) -> Worker:
            worker = policy.select(workers, text)
            metrics.child(metrics.POLICY_DECISIONS, policy.name, worker.url).inc()
            return worker

        return select

    async def _one_worker(
        self,
        route: str,
        method: str,
        path_qs: str,
        body: Optional[bytes],
        headers: dict[str, str],
        send: Send,
    ) -> None:
        metrics.child(metrics.REQUESTS, route).inc()
        pick = self.any_worker.select
        await self.proxy.forward(
            route, method, path_qs, body, headers, lambda ws: pick(ws, None), send
        )

    # ------------------------------------------------------------------------ control routes

    async def _control(self, path: str, method: str, query: str, body: bytes, send: Send) -> None:
        params = {k: v[0] for k, v in parse_qs(query).items()}
        if path == "/flush_cache" and method in ("GET", "POST"):
            await self._flush_cache(send)
        elif path == "/get_loads" and method == "GET":
            await self._get_loads(send)
        elif path == "/add_worker" and method == "POST":
            await self._add(params.get("url"), send)
        elif path == "/remove_worker" and method == "POST":
            await self._remove(params.get("url"), send)
        elif path == "/list_workers" and method == "GET":
            await send_response(send, 200, orjson.dumps({"urls": self.registry.urls()}))
        elif path == "/workers" and method == "GET":
            workers = [w.describe() for w in self.registry.workers.values()]
            await send_response(
                send, 200, orjson.dumps({"workers": workers, "total": len(workers)})
            )
        elif path == "/workers" and method == "POST":
            try:
                url = orjson.loads(body).get("url")
            except (orjson.JSONDecodeError, AttributeError):
                url = None
            await self._add(url, send)
        elif path.startswith("/workers/") and method in ("GET", "DELETE"):
            url = unquote(path[len("/workers/") :])
            if method == "DELETE":
                await self._remove(url, send)
            elif (worker := self.registry.get(url)) is not None:
                await send_response(send, 200, orjson.dumps(worker.describe()))
            else:
                await send_error(send, 404, f"worker {url} not found")
        else:
            await send_error(send, 404, f"no route {method} {path}")

    async def _add(self, url: Optional[str], send: Send) -> None:
        if not url or not url.startswith(("http://", "https://")):
            await send_error(send, 400, "url must be an http:// or https:// worker URL")
        elif self.registry.get(url) is not None:
            await send_error(send, 400, f"worker {url} is already in the pool")
        elif await self.monitor.add_worker(url):
            await send_response(send, 200, orjson.dumps({"status": "ok", "url": url.rstrip("/")}))
        else:
            await send_error(send, 503, f"worker {url} did not become healthy")

    async def _remove(self, url: Optional[str], send: Send) -> None:
        if url and self.monitor.remove_worker(url):
            await send_response(send, 200, orjson.dumps({"status": "ok", "url": url.rstrip("/")}))
        else:
            await send_error(send, 404, f"worker {url} not found")

    async def _fan_out(self, method: str, path: str) -> list[tuple[str, int, bytes]]:
        session = self.proxy.session
        assert session is not None
        headers = self.proxy.worker_headers(None)

        async def one(url: str) -> tuple[str, int, bytes]:
            try:
                async with session.request(method, url + path, headers=headers) as resp:
                    return url, resp.status, await resp.read()
            except Exception as e:  # reported per worker, never raised
                return url, 502, repr(e).encode()

        return list(await asyncio.gather(*(one(u) for u in self.registry.urls())))

    async def _flush_cache(self, send: Send) -> None:
        results = await self._fan_out("POST", "/flush_cache")
        ok = bool(results) and all(status == 200 for _, status, _ in results)
        out = [
            {"url": u, "status": s, "message": b.decode(errors="replace").strip()}
            for u, s, b in results
        ]
        await send_response(send, 200 if ok else 500, orjson.dumps({"workers": out}))

    async def _get_loads(self, send: Send) -> None:
        results = await self._fan_out("GET", "/get_load")
        out = []
        for url, status, data in results:
            try:
                load = orjson.loads(data) if status == 200 else None
            except orjson.JSONDecodeError:
                load = None
            out.append({"worker": url, "load": load})
        await send_response(send, 200, orjson.dumps({"workers": out}))
