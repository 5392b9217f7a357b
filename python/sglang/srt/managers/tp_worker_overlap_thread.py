"""The forward thread of the overlap schedule: runs each launched batch's forward and sampling.

`TpModelWorkerClient` owns one daemon thread that takes `ModelWorkerBatch`es in launch order and
runs `forward` + `sample` on the model runner, so the scheduler thread can build the next batch
and process the previous batch's outputs meanwhile (torch releases the GIL inside its ops).

Future tokens: a decode batch may be launched before the batch in flight has sampled, so the
input ids it needs are not known on the host yet. Each launch owns `max_bs` slots of a device
buffer (two halves, alternating), and the forward thread writes the batch's sampled ids there.
A later batch names such a token with the negative placeholder `-slot`; the forward thread
replaces placeholders from the buffer right before its forward. Batches run one after the other
on the thread, so a placeholder is always written before it is read, and a half is reused only
by the launch after next, which the scheduler issues after it has waited for the reader.

On CUDA the thread runs on its own stream that first waits for an event the scheduler recorded
on its stream at launch (the batch's inputs and req_to_token writes were queued before it), and
synchronizes once the batch has sampled, so results handed back are complete and the scheduler thread never waits for a forward
it did not ask about.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sglang.srt.model_executor.forward_batch_info import ModelWorkerBatch


@dataclass
class Launch:
    """One batch handed to the forward thread; `wait` gives its outputs or raises its error."""

    slot_base: int  # the batch's row i samples into future slot slot_base + i
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[tuple[Any, Any, Any]] = None  # (logits_output, forward_batch, sample)
    error: Optional[BaseException] = None

    def placeholder(self, row: int) -> int:
        return -(self.slot_base + row)


class TpModelWorkerClient:
    def __init__(self, model_runner: Any, max_bs: int) -> None:
        self.runner = model_runner
        self.max_bs = max_bs
        self.device = torch.device(model_runner.device)
        # Slot 0 is never named (placeholders are negative, -0 is not one).
        self.future_ids = torch.zeros(2 * max_bs + 1, dtype=torch.int64, device=self.device)
        self.launches = 0
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.inputs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="sglang-forward", daemon=True)
        self.thread.start()

    def launch(self, batch: ModelWorkerBatch, has_placeholders: bool) -> Launch:
        """Queue `batch`; its input ids may hold placeholders of batches launched before it."""
        handle = Launch(1 + (self.launches % 2) * self.max_bs)
        self.launches += 1
        ready = None
        if self.stream is not None:
            # The batch's inputs and req_to_token writes are queued on the caller's stream.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self.inputs.put((batch, handle, has_placeholders, ready))
        return handle

    @staticmethod
    def wait(handle: Launch) -> tuple[Any, Any, Any]:
        handle.done.wait()
        if handle.error is not None:
            raise handle.error
        assert handle.result is not None
        return handle.result

    def _loop(self) -> None:
        while True:
            batch, handle, has_placeholders, ready = self.inputs.get()
            try:
                if self.stream is None:
                    handle.result = self._run(batch, handle, has_placeholders)
                else:
                    with torch.cuda.stream(self.stream):
                        self.stream.wait_event(ready)
                        handle.result = self._run(batch, handle, has_placeholders)
                    self.stream.synchronize()
            except BaseException as e:  # handed to the scheduler thread, which fails the batch
                handle.error = e
            handle.done.set()

    def _run(self, batch: ModelWorkerBatch, handle: Launch, has_placeholders: bool):
        if has_placeholders:
            ids = batch.input_ids.to(self.device, non_blocking=True)
            batch.input_ids = torch.where(ids < 0, self.future_ids[(-ids).clamp(min=0)], ids)
        logits_output, forward_batch = self.runner.forward(batch)
        sample = self.runner.sample(logits_output, forward_batch)
        n = sample.next_token_ids.shape[0]
        base = handle.slot_base
        self.future_ids[base : base + n] = sample.next_token_ids.to(self.future_ids.dtype)
        return logits_output, forward_batch, sample
