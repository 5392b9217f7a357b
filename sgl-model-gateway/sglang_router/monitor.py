"""Background work on the router's event loop: waiting for workers to come up, periodic health
checks, `/get_load` polling, tree eviction, and service discovery from a file or a command.

Health: `--health-failure-threshold` consecutive failed checks take a worker out of selection,
`--health-success-threshold` consecutive good ones bring it back. Discovery: the URL list read from
`--worker-urls-file` (when its modification time changes) or printed by `--worker-urls-command`
(every `--discovery-interval-secs`) is the pool: new URLs join once healthy, missing ones leave
(their in-flight requests finish).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Optional

import aiohttp

from sglang_router import metrics
from sglang_router.policies import CacheAware, Policy
from sglang_router.router_args import RouterArgs
from sglang_router.workers import WorkerRegistry

logger = logging.getLogger("sglang_router")


class Monitor:
    def __init__(self, args: RouterArgs, registry: WorkerRegistry, policy: Policy) -> None:
        self.args = args
        self.registry = registry
        self.policy = policy
        self.session: Optional[aiohttp.ClientSession] = None
        self.tasks: list[asyncio.Task] = []
        self.pending: set[str] = set()  # URLs waiting to become healthy before they join
        self._file_mtime: Optional[float] = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.args.health_check_timeout_secs)
        )
        a = self.args
        if not a.disable_health_check:
            self._spawn(self._every(a.health_check_interval_secs, self.check_health))
        if self.policy.needs_load:
            self._spawn(self._every(a.load_check_interval_secs, self.poll_loads))
        if isinstance(self.policy, CacheAware):
            self._spawn(self._every(a.eviction_interval_secs, self.policy.evict))
        if a.worker_urls_file or a.worker_urls_command:
            self._spawn(self._every(a.discovery_interval_secs, self.discover))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    def _spawn(self, coro) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def _every(self, interval: float, fn) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # a failed round must not end the loop
                logger.exception("background task %s failed", getattr(fn, "__name__", fn))

    async def probe(self, url: str) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(
                url + self.args.health_check_endpoint, headers=self.headers()
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    async def wait_healthy(self, url: str) -> bool:
        """Poll the worker every `--worker-startup-check-interval` s until it answers its health
        endpoint, for at most `--worker-startup-timeout-secs`."""
        deadline = time.monotonic() + self.args.worker_startup_timeout_secs
        while True:
            if await self.probe(url):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(
                min(self.args.worker_startup_check_interval, max(0.0, deadline - time.monotonic()))
            )

    async def add_worker(self, url: str) -> bool:
        """Add `url` once it is healthy; False if it never became healthy."""
        url = url.rstrip("/")
        if self.registry.get(url) is not None:
            return True
        self.pending.add(url)
        try:
            if not await self.wait_healthy(url):
                logger.warning("worker %s did not become healthy; not added", url)
                return False
        finally:
            self.pending.discard(url)
        self.registry.add(url)
        logger.info("added worker %s", url)
        return True

    def remove_worker(self, url: str) -> bool:
        worker = self.registry.remove(url)
        if worker is None:
            return False
        self.policy.on_remove(worker.url)
        logger.info("removed worker %s", worker.url)
        return True

    async def check_health(self) -> None:
        workers = list(self.registry.workers.values())
        results = await asyncio.gather(*(self.probe(w.url) for w in workers))
        for worker, ok in zip(workers, results):
            if ok:
                worker.health_failures = 0
                worker.health_successes += 1
                if (
                    not worker.healthy
                    and worker.health_successes >= self.args.health_success_threshold
                ):
                    self.registry.set_health(worker, True)
                    logger.info("worker %s is healthy again", worker.url)
            else:
                worker.health_successes = 0
                worker.health_failures += 1
                if worker.healthy and worker.health_failures >= self.args.health_failure_threshold:
                    self.registry.set_health(worker, False)
                    logger.warning(
                        "worker %s failed its health checks; out of the pool", worker.url
                    )

    async def poll_loads(self) -> None:
        assert self.session is not None
        workers = [w for w in self.registry.workers.values() if w.healthy]

        async def poll(worker) -> None:
            in_flight = worker.in_flight
            try:
                async with self.session.get(worker.url + "/get_load", headers=self.headers()) as r:
                    if r.status == 200:
                        loads = await r.json(content_type=None)
                        # DP-aware: one entry per DP rank, summed into the worker's load.
                        worker.set_polled_load(
                            loads if isinstance(loads, list) else [loads], in_flight
                        )
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
                pass

        await asyncio.gather(*(poll(w) for w in workers))

    async def discover(self) -> None:
        urls = await self._read_discovery()
        if urls is None:
            return
        wanted = {u.rstrip("/") for u in urls}
        for url in set(self.registry.urls()) - wanted:
            if self.remove_worker(url):
                metrics.DISCOVERY_UPDATES.labels("removed").inc()
        for url in wanted - set(self.registry.urls()) - self.pending:
            self._spawn(self._discovered(url))

    async def _discovered(self, url: str) -> None:
        if await self.add_worker(url):
            metrics.DISCOVERY_UPDATES.labels("added").inc()

    async def _read_discovery(self) -> Optional[list[str]]:
        """The current URL list, or None when it is unchanged or could not be read."""
        a = self.args
        if a.worker_urls_file:
            try:
                mtime = os.stat(a.worker_urls_file).st_mtime
            except OSError:
                return None
            if mtime == self._file_mtime:
                return None
            self._file_mtime = mtime
            with open(a.worker_urls_file) as f:
                text = f.read()
        else:
            proc = await asyncio.create_subprocess_shell(
                a.worker_urls_command, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                logger.warning(
                    "--worker-urls-command exited with %d; pool unchanged", proc.returncode
                )
                return None
            text = out.decode()
        return [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
