"""Prometheus metrics behind `--enable-metrics` (names: docs/compat.md) and their scheduler side.

Design: one registry, in the main process, served on `/metrics`; no prometheus multiprocess mode.
- Request metrics (`prompt_tokens_total`, `generation_tokens_total`, `time_to_first_token_seconds`,
  `inter_token_latency_seconds`, `e2e_request_latency_seconds`) are observed by the
  TokenizerManager as outputs arrive, in `TokenizerMetricsCollector`.
- Scheduler gauges (`num_running_reqs`, `num_queue_reqs`, `num_used_tokens`, `token_usage`,
  `gen_throughput`, `cache_hit_rate`) live in the scheduler process. Each scrape asks for them with
  a `GetSchedulerStatsReq` and sets the gauges from the `SchedulerStats` answer, so they are never
  stale and cost nothing between scrapes. `SchedulerStatsTracker` keeps the two derived values.
Every metric carries the `model_name` label (the served model name), prefix `sglang:`.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Optional

from sglang.srt.managers.io_struct import SchedulerStats

# Generated tokens per second are measured over this trailing window.
THROUGHPUT_WINDOW_S = 5.0

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
_TOKEN_LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip


class SchedulerStatsTracker:
    """Scheduler-process bookkeeping for the derived gauges (plain Python, no prometheus).

    `gen_throughput`: decode tokens in the last `THROUGHPUT_WINDOW_S` seconds over the window.
    `cache_hit_rate`: prompt tokens served from the prefix cache over all prompt tokens prefilled
    since start (cached + computed).
    """

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S) -> None:
        self.window_s = window_s
        self._decode: collections.deque[tuple[float, int]] = collections.deque()
        self._decode_in_window = 0
        self.cached_prompt_tokens = 0
        self.computed_prompt_tokens = 0

    def on_prefill(self, new_tokens: int, cached_tokens: int) -> None:
        self.computed_prompt_tokens += new_tokens
        self.cached_prompt_tokens += cached_tokens

    def on_decode(self, num_tokens: int, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        self._decode.append((now, num_tokens))
        self._decode_in_window += num_tokens
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._decode and self._decode[0][0] < now - self.window_s:
            self._decode_in_window -= self._decode.popleft()[1]

    def gen_throughput(self, now: Optional[float] = None) -> float:
        self._trim(time.monotonic() if now is None else now)
        return self._decode_in_window / self.window_s

    def cache_hit_rate(self) -> float:
        total = self.cached_prompt_tokens + self.computed_prompt_tokens
        return self.cached_prompt_tokens / total if total else 0.0

    def snapshot(
        self, num_running_reqs: int, num_queue_reqs: int, num_used_tokens: int, token_usage: float
    ) -> SchedulerStats:
        return SchedulerStats(
            num_running_reqs=num_running_reqs,
            num_queue_reqs=num_queue_reqs,
            num_used_tokens=num_used_tokens,
            token_usage=token_usage,
            gen_throughput=self.gen_throughput(),
            cache_hit_rate=self.cache_hit_rate(),
        )


class TokenizerMetricsCollector:
    """Every `sglang:` metric, in a private registry (so several servers or engines can share a
    process without clashing names)."""

    def __init__(self, labels: dict[str, str]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        names = list(labels)
        self.labels = labels

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"sglang:{name}", doc, names, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Any:
            # prometheus_client appends `_total` to counter names itself.
            metric = Counter(f"sglang:{name}", doc, names, registry=self.registry)
            return metric.labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            metric = Histogram(
                f"sglang:{name}", doc, names, buckets=buckets, registry=self.registry
            )
            return metric.labels(**labels)

        self.num_running_reqs = gauge("num_running_reqs", "Requests in the running batch.")
        self.num_queue_reqs = gauge("num_queue_reqs", "Requests waiting to be scheduled.")
        self.num_used_tokens = gauge("num_used_tokens", "KV cache slots held by requests.")
        self.token_usage = gauge("token_usage", "Fraction of the KV cache held by requests.")
        self.gen_throughput = gauge("gen_throughput", "Generated tokens per second (recent).")
        self.cache_hit_rate = gauge("cache_hit_rate", "Prefix-cache hit rate of prompt tokens.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated by requests.")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Seconds from arrival to the first output token.",
            _LATENCY_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Seconds between consecutive output tokens.",
            _TOKEN_LATENCY_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "Seconds from arrival to the last output token.",
            _LATENCY_BUCKETS,
        )

    # ---- request side (TokenizerManager) -----------------------------------------------------
    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int) -> None:
        """`num_tokens` arrived together `seconds` after the previous output: one sample each."""
        if num_tokens <= 0:
            return
        per_token = seconds / num_tokens
        for _ in range(num_tokens):
            self.inter_token_latency.observe(per_token)

    def observe_finished(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e_request_latency.observe(seconds)

    # ---- scheduler side (set on scrape) --------------------------------------------------------
    def set_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.num_running_reqs.set(stats.num_running_reqs)
        self.num_queue_reqs.set(stats.num_queue_reqs)
        self.num_used_tokens.set(stats.num_used_tokens)
        self.token_usage.set(stats.token_usage)
        self.gen_throughput.set(stats.gen_throughput)
        self.cache_hit_rate.set(stats.cache_hit_rate)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
