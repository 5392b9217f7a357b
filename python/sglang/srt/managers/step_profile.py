"""Per-step timing of the serving pipeline, with `--enable-step-profile` (docs/step_profile.md).

Owns the three pieces that split a served token's time into its parts:

- `StepClock` (scheduler process): the phases of one scheduler iteration, `recv` (read and apply
  the tokenizer manager's messages), `schedule` (pick the batch), `prepare` (build the forward's
  inputs), `forward`, `sample`, `output` (append tokens, check stops, collect what is sent). A
  disabled clock costs one attribute test per mark.
- `PipelineStamp`: rides on `BatchTokenIDOut` / `BatchStrOut` when profiling. It carries the
  scheduler steps since the previous message and the wall-clock time the message was sent, so the
  receiver can time the ZMQ hop (pickling, transport and unpickling) and add its own work.
- `StepProfileStore` (tokenizer manager): every sample by phase, summarised for `GET
  /step_profile` (count, mean, median, p90, total, in milliseconds).

Hops use `time.time()` (one clock for all processes of one machine); durations inside a process
use `time.perf_counter()`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, TypeVar

T = TypeVar("T")

SCHEDULER_PHASES = ("recv", "schedule", "prepare", "forward", "sample", "output")
STEP_KINDS = ("decode", "prefill")
# Names of the cross-process and tokenizer-side samples, in pipeline order.
OUTPUT_MESSAGE = "scheduler output message"
HOP_SCHED_DETOK = "zmq scheduler->detokenizer"
DETOKENIZE = "detokenizer"
HOP_DETOK_TM = "zmq detokenizer->tokenizer manager"
TOKENIZER_MANAGER = "tokenizer manager"
RESPONSE = "response chunk (wake-up, format)"
HTTP_WRITE = "http write"
PIPELINE_ORDER = (
    *(f"scheduler {kind} {p}" for kind in STEP_KINDS for p in SCHEDULER_PHASES),
    OUTPUT_MESSAGE,
    HOP_SCHED_DETOK,
    DETOKENIZE,
    HOP_DETOK_TM,
    TOKENIZER_MANAGER,
    RESPONSE,
    HTTP_WRITE,
)
MAX_SAMPLES = 200_000  # per phase; older samples are dropped first


class StepClock:
    """Phase durations of scheduler iterations; every method is a no-op when disabled."""

    def __init__(self, enabled: bool = False, synchronize: Any = None) -> None:
        self.enabled = enabled
        # On an accelerator the forward is asynchronous: wait for it so `forward` is the forward.
        self._synchronize = synchronize
        self._last = 0.0
        self._phases: dict[str, float] = {}
        self._kind = "decode"
        self._steps: list[dict[str, float]] = []

    def begin(self) -> None:
        if self.enabled:
            self._phases = {}
            self._last = time.perf_counter()

    def mark(self, phase: str, sync: bool = False) -> None:
        if not self.enabled:
            return
        if sync and self._synchronize is not None:
            self._synchronize()
        now = time.perf_counter()
        self._phases[phase] = self._phases.get(phase, 0.0) + now - self._last
        self._last = now

    def set_kind(self, kind: str) -> None:
        """Name what this step runs ("decode" or "prefill"); its phases are kept apart."""
        if self.enabled:
            self._kind = kind

    def end_step(self, ran: bool) -> None:
        """Keep this iteration's phases when it ran a batch (idle iterations are not steps)."""
        if self.enabled and ran:
            self._steps.append({f"{self._kind} {k}": v for k, v in self._phases.items()})
        self._phases = {}

    def stamp(self) -> Optional[PipelineStamp]:
        """The stamp for an outgoing message: the steps since the last one, and the send time."""
        if not self.enabled:
            return None
        steps, self._steps = self._steps, []
        return PipelineStamp(steps=steps, sent_at=time.time())


@dataclass
class PipelineStamp:
    """Profiling data travelling with one output message through the pipeline."""

    steps: list[dict[str, float]] = field(default_factory=list)
    samples: dict[str, float] = field(default_factory=dict)  # hop / stage -> seconds
    sent_at: float = 0.0

    def received(self, hop: str) -> float:
        """Record the hop that just delivered this message; returns a perf_counter start."""
        self.samples[hop] = max(0.0, time.time() - self.sent_at)
        return time.perf_counter()

    def forwarded(self, stage: str, started: float) -> None:
        """Record this process's work on the message, then stamp it as sent again."""
        self.samples[stage] = time.perf_counter() - started
        self.sent_at = time.time()


class StepProfileStore:
    """The tokenizer manager's collection of samples, by phase."""

    def __init__(self) -> None:
        self.samples: dict[str, deque] = {}
        self.last_output_at = 0.0  # perf_counter when the last BatchStrOut was handled

    def add(self, name: str, seconds: float) -> None:
        bucket = self.samples.get(name)
        if bucket is None:
            bucket = self.samples[name] = deque(maxlen=MAX_SAMPLES)
        bucket.append(seconds)

    def add_stamp(self, stamp: PipelineStamp) -> None:
        for step in stamp.steps:
            for phase, seconds in step.items():
                self.add(f"scheduler {phase}", seconds)
        for name, seconds in stamp.samples.items():
            self.add(name, seconds)

    def summary(self) -> dict[str, Any]:
        """{"phases": {name: {count, mean_ms, p50_ms, p90_ms, total_ms}}} in pipeline order."""
        names = [n for n in PIPELINE_ORDER if n in self.samples]
        names += sorted(n for n in self.samples if n not in PIPELINE_ORDER)
        phases = {}
        for name in names:
            values = sorted(self.samples[name])
            if not values:
                continue
            n = len(values)
            phases[name] = {
                "count": n,
                "mean_ms": 1e3 * sum(values) / n,
                "p50_ms": 1e3 * values[n // 2],
                "p90_ms": 1e3 * values[min(n - 1, int(0.9 * n))],
                "total_ms": 1e3 * sum(values),
            }
        return {"phases": phases}

    def reset(self) -> None:
        self.samples.clear()


def timed_chunks(chunks: AsyncIterator[T], store: Optional[StepProfileStore]) -> AsyncIterator[T]:
    """A streamed response's chunks, timed when profiling (`store`), else `chunks` itself.

    `RESPONSE`: from the tokenizer manager handling the step's output to this chunk being ready
    (waking the request's coroutine and formatting it). `HTTP_WRITE`: from yielding the chunk to
    being asked for the next one, which the ASGI server does once the chunk is written."""
    return chunks if store is None else _timed(chunks, store)


async def _timed(chunks: AsyncIterator[T], store: StepProfileStore) -> AsyncIterator[T]:
    async for chunk in chunks:
        ready = time.perf_counter()
        store.add(RESPONSE, max(0.0, ready - store.last_output_at))
        yield chunk
        store.add(HTTP_WRITE, time.perf_counter() - ready)
