"""The router's command line: `RouterArgs` holds every setting, `add_cli_args` declares the flags
(upstream's names and defaults; `--router-` prefixed when `launch_server` shares the parser with
the server's flags) and `from_cli_args` reads them back.

Upstream flags this router does not implement (PD disaggregation, Kubernetes discovery, history
backends, TLS, ...) are not declared, so argparse refuses them at start-up (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


@dataclasses.dataclass
class RouterArgs:
    worker_urls: list[str] = dataclasses.field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 30000
    policy: str = "cache_aware"
    # cache-aware routing
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: int = 60
    max_tree_size: int = 2**26
    # workers
    worker_startup_timeout_secs: int = 1800
    worker_startup_check_interval: int = 30
    api_key: Optional[str] = None
    # this router's discovery hook (upstream's is Kubernetes-only)
    worker_urls_file: Optional[str] = None
    worker_urls_command: Optional[str] = None
    discovery_interval_secs: float = 5.0
    load_check_interval_secs: float = 1.0
    # requests
    max_payload_size: int = 512 * 1024 * 1024
    request_timeout_secs: int = 1800
    max_concurrent_requests: int = -1
    queue_size: int = 100
    queue_timeout_secs: int = 60
    # retries
    retry_max_retries: int = 5
    retry_initial_backoff_ms: int = 50
    retry_max_backoff_ms: int = 30_000
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    disable_retries: bool = False
    # circuit breaker
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: int = 60
    disable_circuit_breaker: bool = False
    # health checks
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_timeout_secs: int = 5
    health_check_interval_secs: int = 60
    health_check_endpoint: str = "/health"
    disable_health_check: bool = False
    # observability
    log_level: str = "info"
    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = 29000

    @property
    def max_attempts(self) -> int:
        """Tries per request, the first included (upstream: disabling retries means one try)."""
        return 1 if self.disable_retries else max(1, self.retry_max_retries)

    @staticmethod
    def add_cli_args(
        parser: argparse.ArgumentParser,
        use_router_prefix: bool = False,
        exclude_host_port: bool = False,
    ) -> None:
        p = "router-" if use_router_prefix else ""
        d = RouterArgs
        if not exclude_host_port:
            parser.add_argument("--host", type=str, default=d.host)
            parser.add_argument("--port", type=int, default=d.port)
        parser.add_argument(
            "--worker-urls", type=str, nargs="*", default=[], help="worker base URLs"
        )
        parser.add_argument(f"--{p}policy", type=str, default=d.policy, choices=POLICIES)
        parser.add_argument(f"--{p}cache-threshold", type=float, default=d.cache_threshold)
        parser.add_argument(
            f"--{p}balance-abs-threshold", type=int, default=d.balance_abs_threshold
        )
        parser.add_argument(
            f"--{p}balance-rel-threshold", type=float, default=d.balance_rel_threshold
        )
        parser.add_argument(
            f"--{p}eviction-interval-secs", type=int, default=d.eviction_interval_secs
        )
        parser.add_argument(f"--{p}max-tree-size", type=int, default=d.max_tree_size)
        parser.add_argument(f"--{p}max-payload-size", type=int, default=d.max_payload_size)
        parser.add_argument(
            f"--{p}worker-startup-timeout-secs", type=int, default=d.worker_startup_timeout_secs
        )
        parser.add_argument(
            f"--{p}worker-startup-check-interval",
            type=int,
            default=d.worker_startup_check_interval,
        )
        parser.add_argument(
            f"--{p}worker-urls-file",
            type=str,
            default=None,
            help="file listing worker URLs, one a line; re-read when it changes",
        )
        parser.add_argument(
            f"--{p}worker-urls-command",
            type=str,
            default=None,
            help="shell command printing the current worker URLs, one a line; run periodically",
        )
        parser.add_argument(
            f"--{p}discovery-interval-secs", type=float, default=d.discovery_interval_secs
        )
        parser.add_argument(
            f"--{p}load-check-interval-secs",
            type=float,
            default=d.load_check_interval_secs,
            help="how often cache_aware and power_of_two poll each worker's /get_load",
        )
        parser.add_argument(
            f"--{p}log-level",
            type=str,
            default=d.log_level,
            choices=["debug", "info", "warn", "error"],
        )
        parser.add_argument(f"--{p}prometheus-port", type=int, default=d.prometheus_port)
        parser.add_argument(f"--{p}prometheus-host", type=str, default=d.prometheus_host)
        parser.add_argument(f"--{p}request-timeout-secs", type=int, default=d.request_timeout_secs)
        parser.add_argument(
            f"--{p}max-concurrent-requests", type=int, default=d.max_concurrent_requests
        )
        parser.add_argument(f"--{p}queue-size", type=int, default=d.queue_size)
        parser.add_argument(f"--{p}queue-timeout-secs", type=int, default=d.queue_timeout_secs)
        parser.add_argument(f"--{p}retry-max-retries", type=int, default=d.retry_max_retries)
        parser.add_argument(
            f"--{p}retry-initial-backoff-ms", type=int, default=d.retry_initial_backoff_ms
        )
        parser.add_argument(f"--{p}retry-max-backoff-ms", type=int, default=d.retry_max_backoff_ms)
        parser.add_argument(
            f"--{p}retry-backoff-multiplier", type=float, default=d.retry_backoff_multiplier
        )
        parser.add_argument(f"--{p}retry-jitter-factor", type=float, default=d.retry_jitter_factor)
        parser.add_argument(f"--{p}disable-retries", action="store_true")
        parser.add_argument(f"--{p}cb-failure-threshold", type=int, default=d.cb_failure_threshold)
        parser.add_argument(f"--{p}cb-success-threshold", type=int, default=d.cb_success_threshold)
        parser.add_argument(
            f"--{p}cb-timeout-duration-secs", type=int, default=d.cb_timeout_duration_secs
        )
        parser.add_argument(f"--{p}disable-circuit-breaker", action="store_true")
        parser.add_argument(
            f"--{p}health-failure-threshold", type=int, default=d.health_failure_threshold
        )
        parser.add_argument(
            f"--{p}health-success-threshold", type=int, default=d.health_success_threshold
        )
        parser.add_argument(
            f"--{p}health-check-timeout-secs", type=int, default=d.health_check_timeout_secs
        )
        parser.add_argument(
            f"--{p}health-check-interval-secs", type=int, default=d.health_check_interval_secs
        )
        parser.add_argument(
            f"--{p}health-check-endpoint", type=str, default=d.health_check_endpoint
        )
        parser.add_argument(f"--{p}disable-health-check", action="store_true")
        parser.add_argument(f"--{p}api-key", type=str, default=None)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, use_router_prefix: bool = False) -> RouterArgs:
        prefix = "router_" if use_router_prefix else ""
        values = {}
        for field in dataclasses.fields(cls):
            unprefixed = field.name in ("worker_urls", "host", "port")
            name = field.name if unprefixed else prefix + field.name
            if hasattr(args, name):
                values[field.name] = getattr(args, name)
        return cls(**values)

    def validate(self) -> Optional[str]:
        """A one-line reason the settings cannot work, or None."""
        if not 0.0 <= self.cache_threshold <= 1.0:
            return "--cache-threshold must be within [0, 1]"
        if not 0.0 <= self.retry_jitter_factor <= 1.0:
            return "--retry-jitter-factor must be within [0, 1]"
        if self.max_tree_size < 1:
            return "--max-tree-size must be positive"
        if self.queue_size < 0:
            return "--queue-size must not be negative"
        if self.worker_urls_file and self.worker_urls_command:
            return "--worker-urls-file and --worker-urls-command exclude each other"
        for url in self.worker_urls:
            if not url.startswith(("http://", "https://")):
                return f"worker URL {url!r} must start with http:// or https://"
        return None
