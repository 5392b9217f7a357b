"""The overlap schedule: build and launch step N+1 while step N's forward runs.

`OverlapScheduler` is the `Scheduler` (scheduler.py) with its forward and sampling moved to a
forward thread (tp_worker_overlap_thread.py). One `step()` either launches a batch and returns, or,
with a batch in flight, chains the next decode step onto it and then waits for and processes the
in-flight batch's outputs (appending tokens, stop checks, caching, messages), so that host work
runs while the chained forward computes.

Chaining (decode after decode only): the requests still running have one token that is being
sampled; the chained batch counts it in every sequence length and feeds it as a future-token
placeholder. A request the in-flight step finishes by EOS, stop token or stop string still has a
row in the chained step: that row's output is discarded, and the KV slot it was given is freed
when the request finishes (the tail page frees it when it shares that page). Requests the
in-flight step finishes by length are left out of the chained step.

A step is not chained, and the in-flight batch is processed first, when the next step needs the
host to know the sampled tokens or to change the running batch: requests waiting or a chunked
prefill in progress (the next batch may be a prefill), a running request with a grammar (the
vocab mask follows the last token), frequency/presence/repetition penalties or min_new_tokens
still blocking EOS (sampling tables are built from the output so far), attention tokens, hidden
states or layer probes (their records follow each row), or too little free KV for one more
token each (retraction decides on settled state). Aborts and cache flushes drain first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.managers.scheduler import NEW_TOKEN_RATIO_DECAY, Scheduler
from sglang.srt.managers.tp_worker_overlap_thread import Launch, TpModelWorkerClient
from sglang.srt.mem_cache.base_prefix_cache import committed_kv_len
from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


# On CPU the overlap schedule is off unless this is 1: measured on the 2-core machine with the
# forward's OpenMP threads bound to both cores, the scheduler thread's Python competed with them
# and served single-stream TPOT went from 56 ms (sequential) to 96-108 ms
# (benchmark/results/overlap_schedule_cpu.md).
CPU_OVERLAP_ENV = "SGLANG_CPU_OVERLAP_SCHEDULE"


def overlap_enabled(server_args: Any, tp_size: int, device: str = "cuda") -> bool:
    """Whether the scheduler of one rank runs the overlap schedule."""
    if server_args.disable_overlap_schedule:
        return False
    # The forward thread's collectives and the control plane's broadcasts would share one
    # process group from two threads: TP > 1 keeps the sequential schedule.
    if tp_size != 1:
        return False
    return not str(device).startswith("cpu") or os.environ.get(CPU_OVERLAP_ENV, "0") == "1"


def make_scheduler(
    server_args: Any, model_runner: ModelRunner, tokenizer: Any = None, tp_size: int = 1
) -> Scheduler:
    if overlap_enabled(server_args, tp_size, model_runner.device):
        return OverlapScheduler(server_args, model_runner, tokenizer)
    return Scheduler(server_args, model_runner, tokenizer)


def needs_host_tokens(req: Req) -> bool:
    """The next step of `req` cannot be built before its last sampled token is on the host."""
    sp = req.sampling_params
    return (
        req.grammar is not None
        or req.attention is not None
        or req.return_hidden_states
        or req.probe is not None
        or sp.frequency_penalty != 0.0
        or sp.presence_penalty != 0.0
        or sp.repetition_penalty != 1.0
        or sp.min_new_tokens > len(req.output_ids)
    )


@dataclass
class InFlight:
    """A launched (or prepared) batch: its requests, KV lengths once prepared and new slots."""

    batch: ScheduleBatch
    kv_lens: list[int]
    out_loc: torch.Tensor
    handle: Optional[Launch] = None


class OverlapScheduler(Scheduler):
    def __init__(self, server_args: Any, model_runner: ModelRunner, tokenizer: Any = None) -> None:
        super().__init__(server_args, model_runner, tokenizer)
        self.worker = TpModelWorkerClient(model_runner, self.max_running_requests)
        self.launched: list[InFlight] = []  # in launch order; at most two
        self.chained_steps = 0  # decode steps launched before their inputs were on the host

    def is_idle(self) -> bool:
        return not self.launched and super().is_idle()

    def drain(self) -> None:
        while self.launched:
            self._finish(self.launched[0])

    def abort_request(self, rid: str) -> bool:
        self.drain()
        return super().abort_request(rid)

    # ---- one iteration ---------------------------------------------------------------------------
    def step(self) -> bool:
        if self.launched:
            prev = self.launched[0]
            self._launch_chained(prev)
            self._finish(prev)
            return True
        batch = self.get_next_batch_to_run()
        if batch is None:
            if self.is_idle():
                self.check_memory()
            return False
        extend = batch.forward_mode.is_extend()
        self.clock.set_kind("prefill" if extend else "decode")
        self.clock.mark("schedule")
        if extend:
            self._launch(batch, batch.prepare_for_extend(), False)
        else:
            # A copy: the running batch changes while this step is in flight.
            snapshot = self._new_batch(list(batch.reqs))
            self._launch(snapshot, snapshot.prepare_for_decode(), False)
        self.clock.mark("prepare")
        return True

    def _launch(self, batch: ScheduleBatch, worker_batch: Any, placeholders: bool) -> InFlight:
        entry = InFlight(batch, list(worker_batch.seq_lens), worker_batch.out_cache_loc)
        self.launched.append(entry)  # prepared: a failure from here on must free its KV
        if self.before_forward is not None:
            self.before_forward(batch)
        entry.handle = self.worker.launch(worker_batch, placeholders)
        return entry

    def _launch_chained(self, prev: InFlight) -> Optional[InFlight]:
        """Launch the decode step after `prev` before `prev`'s tokens are known, if it can be."""
        if prev.batch.forward_mode.is_extend():
            return None
        self.waiting_queue.extend(self.grammar_manager.poll())
        if self.waiting_queue or self.chunked_req is not None:
            return None
        reqs = [
            r
            for r in self.running_batch.reqs
            if len(r.output_ids) + 1 < r.sampling_params.max_new_tokens
            and r.seqlen + 1 < self.context_len
        ]
        if not reqs or any(needs_host_tokens(r) for r in reqs):
            return None
        batch = self._new_batch(reqs)
        if (
            self.allocator.available_size() + self.tree_cache.evictable_size()
            < batch.decode_slots_needed()
        ):
            return None
        self.clock.set_kind("decode")
        self.clock.mark("schedule")
        row = {id(r): i for i, r in enumerate(prev.batch.reqs)}
        assert prev.handle is not None
        future = [prev.handle.placeholder(row[id(r)]) for r in reqs]
        worker_batch = batch.prepare_for_decode(future)
        # The seeded sampler counts output tokens: each row's pending token is one of them.
        worker_batch.sampling_info.steps += 1
        self.new_token_ratio = max(
            self.new_token_ratio - NEW_TOKEN_RATIO_DECAY, self.min_new_token_ratio
        )
        entry = self._launch(batch, worker_batch, True)
        self.clock.mark("prepare")
        self.chained_steps += 1
        return entry

    def _finish(self, entry: InFlight) -> None:
        """Wait for `entry`'s forward, then record its outputs."""
        assert entry.handle is not None
        logits_output, _, sample = self.worker.wait(entry.handle)
        self.clock.mark("forward")
        self.launched.remove(entry)
        self.forward_ct += 1
        self.cur_recording = True
        batch = entry.batch
        if batch.forward_mode.is_extend():
            self.output.process_prefill_result(batch, logits_output, sample)
        else:
            self.output.process_decode_result(batch, sample, logits_output)
            self.running_batch.filter_batch()
            if self.launched:
                self._free_spare_slots(self.launched[0])
        self.cur_recording = False
        self.clock.mark("output")
        if self.on_batch is not None:
            self.on_batch(batch)

    def _free_spare_slots(self, chained: InFlight) -> None:
        """Requests that just finished have a row in the chained step: free that row's new slot
        unless it lies in the request's tail page, which finishing freed already."""
        page = self.page_size
        spare = [
            i
            for i, r in enumerate(chained.batch.reqs)
            if r.finished() and committed_kv_len(r) % page == 0
        ]
        if spare:
            self.allocator.free(chained.out_loc[torch.tensor(spare, dtype=torch.int64)])

    # ---- failures --------------------------------------------------------------------------------
    def fail_current_batch(self, message: str) -> Optional[str]:
        """Every launched batch fails together (a chained step reads its predecessor's tokens):
        their unfinished requests end with `message`, freeing KV up to the longest prepared."""
        if self.cur_recording:
            return "the failure happened while recording a batch's results"
        entries, self.launched = self.launched, []
        if not entries:
            return super().fail_current_batch(message)
        for entry in entries:
            if entry.handle is not None:
                entry.handle.done.wait()
        reqs: list[Req] = []
        kv_lens: dict[int, int] = {}
        for entry in entries:
            for req, kv_len in zip(entry.batch.reqs, entry.kv_lens):
                if req.finished():
                    continue
                if id(req) not in kv_lens:
                    reqs.append(req)
                kv_lens[id(req)] = max(kv_len, kv_lens.get(id(req), 0))
        batch = self._new_batch(reqs)
        batch.forward_mode = entries[0].batch.forward_mode
        self.cur_batch, self.cur_kv_lens = batch, [kv_lens[id(r)] for r in reqs]
        return super().fail_current_batch(message)
