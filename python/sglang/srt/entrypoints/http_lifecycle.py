"""How the HTTP server stops: on SIGTERM/SIGINT, and when a child process dies.

`http_server.launch_server` runs uvicorn through `DrainingServer` and hands child deaths to
`on_child_death`:
- SIGTERM / SIGINT: new requests get 503 at once, requests in flight get `SIGTERM_GRACE_S` to
  finish; whatever is left then fails with 503 (streams: an error event, then `[DONE]`). Only
  then does uvicorn close the connections, so no stream is cut mid-transfer and no cancelled
  task is logged; the process exits 0. A second signal stops at once.
- a child process died: every pending and new request fails with 503 at once (streams end with
  an error event and `[DONE]`), then the server stops and exits 1.
In both cases the error events get `FLUSH_S` to reach the clients before uvicorn shuts down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)

# How long requests in flight at SIGTERM may run on before they are failed.
SIGTERM_GRACE_S = 3.0
# How long failed requests get to write their last events before connections close.
FLUSH_S = 0.3
SHUTDOWN_MESSAGE = "The server is shutting down; this request was not finished"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT drains requests before stopping."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state
        self.draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        loop = self.state.loop
        if self.draining or loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        logger.info("Got signal %d: draining requests, then stopping", sig)
        # NOTE: a signal handler runs between two bytecodes of the loop's own thread; only
        # call_soon_threadsafe is safe here (it wakes the loop through its self-pipe).
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(drain_and_stop(self.state)))


async def drain_and_stop(state: Any) -> None:
    tm = state.tm
    state.accepting = False  # /health: 503
    tm.closing_reason = "The server is shutting down"  # new requests: 503
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SIGTERM_GRACE_S
    while tm.rid_to_state and loop.time() < deadline:
        await asyncio.sleep(0.05)
    left = len(tm.rid_to_state)
    if left:
        logger.info("%d request(s) still running after %.0f s: ending them", left, SIGTERM_GRACE_S)
    if tm.dead_reason is None:
        tm.set_dead(SHUTDOWN_MESSAGE)
    await asyncio.sleep(FLUSH_S if left else 0.0)
    state.uvicorn_server.should_exit = True


def on_child_death(state: Any, msg: str) -> None:
    """Called from the process watcher's thread when a child died unexpectedly."""
    loop = state.loop
    if loop is None or loop.is_closed():
        state.fail(msg, log=False)
        return

    def fail_requests() -> None:
        state.tm.set_dead(msg)
        loop.call_later(FLUSH_S, state.fail, msg, False)

    loop.call_soon_threadsafe(fail_requests)
