"""`python -m sglang_router.launch_router`: parse the flags, then serve the router with uvicorn
on uvloop until SIGINT/SIGTERM. Invalid settings exit with status 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from sglang_router.router_args import RouterArgs

logger = logging.getLogger("sglang_router")


def start_prometheus(args: RouterArgs) -> None:
    """The metrics endpoint on its own port, as upstream serves it (also on the router's)."""
    from prometheus_client import start_http_server

    try:
        start_http_server(args.prometheus_port, addr=args.prometheus_host)
    except OSError as e:
        logger.warning(
            "prometheus endpoint %s:%d not started (%s); /metrics on the router port still works",
            args.prometheus_host,
            args.prometheus_port,
            e,
        )


def launch_router(args: RouterArgs) -> int:
    """Serve until stopped; returns the exit status (1 when start-up failed)."""
    import uvicorn

    from sglang_router.app import Router

    level = {"warn": "WARNING"}.get(args.log_level, args.log_level.upper())
    logging.basicConfig(level=level, format="[%(asctime)s] router %(levelname)s %(message)s")
    start_prometheus(args)
    config = uvicorn.Config(
        Router(args),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # nothing reads the client address; saves a middleware hop
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def parse_args(argv: Optional[list[str]] = None) -> RouterArgs:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_router.launch_router",
        description="Cache-aware router in front of SGLang-compatible workers",
    )
    RouterArgs.add_cli_args(parser)
    args = RouterArgs.from_cli_args(parser.parse_args(argv))
    problem = args.validate()
    if problem:
        parser.exit(2, f"error: {problem}\n")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    sys.exit(launch_router(parse_args(argv)))


if __name__ == "__main__":
    main()
