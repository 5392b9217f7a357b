"""Start-up phase times: how long each step of bringing a server up took.

Each process that starts something (the main process, every scheduler rank, the model runner
inside it) keeps a `StartupTimer`, marks the end of each phase, and logs its phases as one line:
`Start-up: imports 2.0 s, load weights 1.1 s, KV pool 0.0 s, ..., total 5.3 s`. The scheduler
sends its phases to the main process with its readiness report, so the main process's line,
logged just before the ready line, covers the whole start-up. `process_age` counts from the
process's creation, so interpreter start and module imports are a phase too.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

import psutil

LOG_PREFIX = "Start-up"


def process_age() -> float:
    """Seconds since this process was created (interpreter start and imports included)."""
    return max(0.0, time.time() - psutil.Process().create_time())


class StartupTimer:
    """Named, consecutive phases; `mark(name)` ends the phase that began at the previous mark."""

    def __init__(self, since_process_start: bool = False) -> None:
        self.phases: list[tuple[str, float]] = []
        self._last = time.perf_counter()
        if since_process_start:
            self.phases.append(("imports", process_age()))

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.phases.append((name, seconds))
        return seconds

    def restart(self) -> None:
        """Start the next phase now (time since the last mark belongs to no phase)."""
        self._last = time.perf_counter()

    def extend(self, phases: Iterable[tuple[str, float]]) -> None:
        self.phases.extend((str(name), float(seconds)) for name, seconds in phases)

    def total(self) -> float:
        return sum(seconds for _, seconds in self.phases)

    def line(self, total: Optional[float] = None) -> str:
        """`Start-up: phase 1.0 s, ..., total 3.0 s` (total: the phases' sum unless given)."""
        total = self.total() if total is None else total
        return f"{LOG_PREFIX}: {format_phases(self.phases)}, total {total:.1f} s"


def format_phases(phases: Iterable[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases)
