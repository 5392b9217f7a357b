"""The worker pool: one `Worker` per server URL with its in-flight count, polled load, health
state and circuit breaker; `WorkerRegistry` adds, removes and lists them.

A removed worker leaves the registry at once (no new requests), but requests already sent keep
their `Worker` object and finish normally. Selection sees only `available` workers: healthy and
with a circuit breaker that lets requests through.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from sglang_router import metrics

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_CB_STATE_VALUE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


@dataclasses.dataclass
class CircuitBreaker:
    """Closed: count consecutive failures, open after `failure_threshold`. Open: refuse for
    `timeout_s`, then half-open. Half-open: let requests through; `success_threshold`
    consecutive successes close it, one failure opens it again."""

    worker: str
    failure_threshold: int
    success_threshold: int
    timeout_s: float
    enabled: bool = True
    state: str = CLOSED
    failures: int = 0
    successes: int = 0
    opened_at: float = 0.0

    def allows(self) -> bool:
        if not self.enabled:
            return True
        if self.state == OPEN and time.monotonic() - self.opened_at >= self.timeout_s:
            self._move(HALF_OPEN)
        return self.state != OPEN

    def record(self, success: bool) -> None:
        if not self.enabled:
            return
        metrics.child(metrics.CB_OUTCOMES, self.worker, "success" if success else "failure").inc()
        if success:
            self.failures = 0
            self.successes += 1
            if self.state == HALF_OPEN and self.successes >= self.success_threshold:
                self._move(CLOSED)
            return
        self.successes = 0
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self.opened_at = time.monotonic()
            self._move(OPEN)

    def _move(self, state: str) -> None:
        if state != self.state:
            metrics.CB_TRANSITIONS.labels(self.worker, self.state, state).inc()
            self.state = state
            self.failures = self.successes = 0
            metrics.CB_STATE.labels(self.worker).set(_CB_STATE_VALUE[state])


@dataclasses.dataclass
class Worker:
    url: str
    breaker: CircuitBreaker
    healthy: bool = True
    health_failures: int = 0
    health_successes: int = 0
    in_flight: int = 0
    # Requests the worker reported beyond this router's own, at the last /get_load poll
    # (other routers' or direct clients'), one number summed over its DP ranks.
    external_load: int = 0
    dp_loads: list[dict] = dataclasses.field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.healthy and self.breaker.allows()

    @property
    def load(self) -> int:
        return self.in_flight + self.external_load

    def begin(self) -> None:
        self.in_flight += 1
        metrics.child(metrics.RUNNING, self.url).set(self.in_flight)

    def end(self) -> None:
        self.in_flight -= 1
        metrics.child(metrics.RUNNING, self.url).set(self.in_flight)

    def set_polled_load(self, loads: list[dict], in_flight_at_poll: int) -> None:
        self.dp_loads = loads
        reported = sum(int(x.get("num_reqs", 0)) + int(x.get("num_waiting_reqs", 0)) for x in loads)
        self.external_load = max(0, reported - in_flight_at_poll)

    def describe(self) -> dict:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "circuit_breaker": self.breaker.state,
            "in_flight": self.in_flight,
            "load": self.load,
            "dp_loads": self.dp_loads,
        }


class WorkerRegistry:
    def __init__(
        self,
        cb_failure_threshold: int,
        cb_success_threshold: int,
        cb_timeout_s: float,
        cb_enabled: bool,
    ) -> None:
        self._cb = (cb_failure_threshold, cb_success_threshold, cb_timeout_s, cb_enabled)
        self.workers: dict[str, Worker] = {}

    def add(self, url: str) -> Worker:
        url = url.rstrip("/")
        if url in self.workers:
            return self.workers[url]
        fail, succ, timeout, enabled = self._cb
        worker = Worker(url, CircuitBreaker(url, fail, succ, timeout, enabled))
        self.workers[url] = worker
        metrics.WORKER_HEALTH.labels(url).set(1)
        metrics.CB_STATE.labels(url).set(0)
        metrics.RUNNING.labels(url).set(0)
        self._update_gauge()
        return worker

    def remove(self, url: str) -> Optional[Worker]:
        worker = self.workers.pop(url.rstrip("/"), None)
        if worker is not None:
            for gauge in (metrics.WORKER_HEALTH, metrics.CB_STATE):
                gauge.remove(worker.url)
            self._update_gauge()
        return worker

    def get(self, url: str) -> Optional[Worker]:
        return self.workers.get(url.rstrip("/"))

    def available(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.available]

    def urls(self) -> list[str]:
        return list(self.workers)

    def set_health(self, worker: Worker, healthy: bool) -> None:
        worker.healthy = healthy
        metrics.WORKER_HEALTH.labels(worker.url).set(1 if healthy else 0)
        self._update_gauge()

    def _update_gauge(self) -> None:
        metrics.ACTIVE_WORKERS.set(sum(1 for w in self.workers.values() if w.healthy))
