"""Scheduler liveness: the heartbeat `/health` reads, the watchdog, and test-only fault hooks.

Each scheduler process writes a `Heartbeat` (two doubles in memory shared with the main process,
created by `new_shared_heartbeat` before the spawn): when its current loop iteration began, and
whether work is pending. `stall_seconds` is how long an iteration with pending work has been
running; `/health` answers 503 once that exceeds `--watchdog-timeout`. An idle scheduler blocked
waiting for requests is not stalled.

The `Watchdog` thread in the scheduler process stops a hung step `WATCHDOG_GRACE_S` after that:
it logs one line saying why, dumps the stack of every thread (faulthandler) to the log, and exits
with code 1, which the main process reports and turns into a non-zero exit of the whole server.
A step stuck in native code that holds the GIL cannot run a Python thread, so the loop also arms
faulthandler's own timer (a C thread) as a backstop a little later.

Test-only hooks (read once in the scheduler process; never set them in production):
- `SGLANG_TEST_HANG_ON_RID=<prefix>`: a batch holding a request whose rid starts with the prefix
  hangs forever before its forward (exercises /health and the watchdog).
- `SGLANG_TEST_RAISE_ON_RID=<prefix>`: such a batch raises before its forward (exercises the
  failed-batch path: its requests get HTTP 500 and the scheduler serves on).
"""

from __future__ import annotations

import array
import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

# Seconds between /health turning 503 and the watchdog stopping the scheduler: time for a load
# balancer polling /health to route away before connections fail.
WATCHDOG_GRACE_S = 2.0
# The C backstop fires this much later than the Python watchdog would.
BACKSTOP_EXTRA_S = 10.0
# The backstop timer is re-armed at most this often (each arming starts a thread).
REARM_INTERVAL_S = 1.0

HANG_ENV = "SGLANG_TEST_HANG_ON_RID"
RAISE_ENV = "SGLANG_TEST_RAISE_ON_RID"


def new_shared_heartbeat(ctx: Any) -> Any:
    """Shared [iteration start (monotonic s), work pending (0/1)] for one scheduler process."""
    return ctx.RawArray("d", 2)


def stall_seconds(shared: Any, now: Optional[float] = None) -> float:
    """How long the scheduler has been in one iteration with work pending (0 when idle)."""
    started, busy = shared[0], shared[1]
    if not busy or started == 0.0:
        return 0.0
    return max(0.0, (time.monotonic() if now is None else now) - started)


class Heartbeat:
    """The scheduler loop's side: `begin()` at the top of every iteration, `idle()` before it
    blocks waiting for requests. CLOCK_MONOTONIC is one clock for every process of the host."""

    def __init__(self, shared: Any = None) -> None:
        self.shared = shared if shared is not None else array.array("d", [0.0, 0.0])

    def begin(self) -> None:
        self.shared[0] = time.monotonic()
        self.shared[1] = 1.0

    def idle(self) -> None:
        self.shared[1] = 0.0


class Watchdog:
    """Stops the scheduler process when one iteration with pending work outlives the timeout."""

    def __init__(self, heartbeat: Heartbeat, timeout: float, what: str = "scheduler") -> None:
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.what = what
        self.limit = timeout + WATCHDOG_GRACE_S
        self._armed_at = 0.0
        self._thread = threading.Thread(target=self._run, name="sglang-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        period = min(0.5, self.timeout / 4)
        while True:
            time.sleep(period)
            stall = stall_seconds(self.heartbeat.shared)
            if stall > self.limit:
                self._fire(stall)

    def _fire(self, stall: float) -> None:
        logger.error(
            "Watchdog: a %s step has run %.1f s with work pending (--watchdog-timeout %g); "
            "dumping every thread's stack, then exiting",
            self.what,
            stall,
            self.timeout,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(1)

    def arm_backstop(self) -> None:
        """Called at each busy iteration: (re)start faulthandler's timer, at most once a second."""
        now = time.monotonic()
        if now - self._armed_at >= REARM_INTERVAL_S:
            self._armed_at = now
            faulthandler.dump_traceback_later(
                self.limit + BACKSTOP_EXTRA_S + REARM_INTERVAL_S, exit=True
            )

    def disarm_backstop(self) -> None:
        if self._armed_at:
            self._armed_at = 0.0
            faulthandler.cancel_dump_traceback_later()


def fault_hook_from_env() -> Optional[Callable[[Any], None]]:
    """The `Scheduler.before_forward` hook the test-only environment variables ask for, if any."""
    hang, fail = os.environ.get(HANG_ENV), os.environ.get(RAISE_ENV)
    if not hang and not fail:
        return None
    logger.warning(
        "test-only fault injection is on (%s=%r, %s=%r)", HANG_ENV, hang, RAISE_ENV, fail
    )

    def hook(batch: Any) -> None:
        rids = [req.rid for req in batch.reqs]
        if fail and any(rid.startswith(fail) for rid in rids):
            raise RuntimeError(f"test fault injected by {RAISE_ENV}")
        if hang and any(rid.startswith(hang) for rid in rids):
            while True:
                time.sleep(3600)

    return hook
