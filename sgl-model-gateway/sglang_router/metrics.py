"""Prometheus metrics under upstream's `sgl_router_*` names, in prometheus_client's default
registry (served on `/metrics` of the router port and of `--prometheus-host:--prometheus-port`).
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram


@functools.lru_cache(maxsize=4096)
def child(metric, *values: str):
    """A metric's labelled child, looked up once: `labels()` costs microseconds a call and the
    request path makes several. NOTE: only for metrics whose children are never removed."""
    return metric.labels(*values)


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("sgl_router_requests_total", "Requests received", ["route"])
REQUEST_ERRORS = Counter(
    "sgl_router_request_errors_total", "Requests answered with an error", ["route", "error_type"]
)
REQUEST_DURATION = Histogram(
    "sgl_router_request_duration_seconds",
    "Time from request to the end of the response",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
GENERATE_DURATION = Histogram(
    "sgl_router_generate_duration_seconds",
    "Duration of generation requests (native and OpenAI)",
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "sgl_router_time_to_first_token_seconds",
    "Time from request to the first streamed chunk",
    buckets=_LATENCY_BUCKETS,
)
RETRIES = Counter("sgl_router_retries_total", "Retried attempts", ["route"])
RETRIES_EXHAUSTED = Counter(
    "sgl_router_retries_exhausted_total", "Requests that failed after every attempt", ["route"]
)
RETRY_BACKOFF = Histogram(
    "sgl_router_retry_backoff_duration_seconds",
    "Backoff slept before a retry",
    buckets=_LATENCY_BUCKETS,
)
PROCESSED = Counter("sgl_router_processed_requests_total", "Requests sent to a worker", ["worker"])
RUNNING = Gauge("sgl_router_running_requests", "Requests in flight per worker", ["worker"])
POLICY_DECISIONS = Counter(
    "sgl_router_policy_decisions_total", "Worker choices", ["policy", "worker"]
)
CACHE_HITS = Counter("sgl_router_cache_hits_total", "cache_aware: prefix match above threshold")
CACHE_MISSES = Counter("sgl_router_cache_misses_total", "cache_aware: no useful prefix match")
TREE_SIZE = Gauge("sgl_router_tree_size", "Characters in the tree per worker", ["worker"])
LOAD_BALANCING_EVENTS = Counter(
    "sgl_router_load_balancing_events_total",
    "cache_aware: imbalance sent a request to the least loaded",
)
MAX_LOAD = Gauge("sgl_router_max_load", "Highest worker load at the last decision")
MIN_LOAD = Gauge("sgl_router_min_load", "Lowest worker load at the last decision")
ACTIVE_WORKERS = Gauge("sgl_router_active_workers", "Healthy workers in the pool")
WORKER_HEALTH = Gauge("sgl_router_worker_health", "1 healthy, 0 unhealthy", ["worker"])
CB_STATE = Gauge("sgl_router_cb_state", "0 closed, 1 open, 2 half-open", ["worker"])
CB_TRANSITIONS = Counter(
    "sgl_router_cb_state_transitions_total", "Circuit breaker transitions", ["worker", "from", "to"]
)
CB_OUTCOMES = Counter(
    "sgl_router_cb_outcomes_total", "Request outcomes the breaker counted", ["worker", "outcome"]
)
QUEUE_REJECTED = Counter(
    "sgl_router_queue_rejections_total", "Requests refused by the concurrency limit", ["reason"]
)
DISCOVERY_UPDATES = Counter(
    "sgl_router_discovery_updates_total", "Workers added or removed by discovery", ["action"]
)
