"""Scheduler core: continuous batching over one model runner, drivable in-process.

Owns the waiting queue, the running (decoding) batch, the chunked-prefill request in flight and
the choice each step makes: a prefill batch of newly admitted requests if any fit, else one decode
step of everything running (retracting requests back to the queue when the KV pool runs dry).
`step()` runs one iteration; `run_until_idle()` drives everything to completion (tests, benches).
Aborts take effect at once: between steps no forward is in flight, so an aborted request leaves
its batch and frees its KV before the next chunk or decode step. When a step raises,
`fail_current_batch` ends that batch's requests with a server error and frees their memory, and
`check_accounting` says whether the KV bookkeeping still adds up (then serving can go on).
The process wrapper (ZMQ in/out) wraps this class in the serving layer; nothing here does I/O.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from sglang.srt.constrained.grammar_manager import GrammarManager
from sglang.srt.managers.hidden_states import HIDDEN_STATES_OFF
from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req, ScheduleBatch
from sglang.srt.managers.schedule_policy import PrefillAdder, SchedulePolicy
from sglang.srt.managers.scheduler_output_processor import OutputProcessor
from sglang.srt.managers.step_profile import StepClock
from sglang.srt.mem_cache.base_prefix_cache import committed_kv_len
from sglang.srt.mem_cache.chunk_cache import ChunkCache
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO_FACTOR = 0.14
NEW_TOKEN_RATIO_DECAY = 0.001
ABORTED_BY_CLIENT = "aborted by the client"


class Scheduler:
    def __init__(self, server_args: Any, model_runner: ModelRunner, tokenizer: Any = None) -> None:
        self.server_args = server_args
        self.model_runner = model_runner
        self.tokenizer = tokenizer
        self.model_config = model_runner.model_config
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.page_size = model_runner.page_size
        self.max_total_num_tokens = model_runner.max_total_num_tokens
        self.max_running_requests = model_runner.max_running_requests
        self.context_len = model_runner.context_len
        if server_args.disable_radix_cache:
            self.tree_cache = ChunkCache(
                self.req_to_token_pool, self.allocator, page_size=self.page_size
            )
        else:
            self.tree_cache = RadixCache(
                self.req_to_token_pool, self.allocator, page_size=self.page_size
            )
        self.policy = SchedulePolicy(
            server_args.schedule_policy, self.tree_cache, server_args.disable_radix_cache
        )
        chunk = server_args.chunked_prefill_size
        self.chunked_prefill_size: Optional[int] = chunk if chunk and chunk > 0 else None
        self.max_prefill_tokens = server_args.max_prefill_tokens

        self.waiting_queue: list[Req] = []
        self.running_batch = self._new_batch([])
        self.chunked_req: Optional[Req] = None
        conservativeness = server_args.schedule_conservativeness
        self.init_new_token_ratio = min(INIT_NEW_TOKEN_RATIO * conservativeness, 1.0)
        self.min_new_token_ratio = min(self.init_new_token_ratio * MIN_NEW_TOKEN_RATIO_FACTOR, 1.0)
        self.new_token_ratio = self.init_new_token_ratio
        self.output = OutputProcessor(self, tokenizer)
        self.forward_ct = 0
        self.num_retractions = 0
        self.last_batch_info: dict[str, Any] = {}
        self.on_batch: Optional[Callable[[ScheduleBatch], None]] = None  # hook for logging/tests
        # Called with each batch just before its forward (the process wrapper's test-only faults).
        self.before_forward: Optional[Callable[[ScheduleBatch], None]] = None
        self.max_queued_requests: Optional[int] = getattr(server_args, "max_queued_requests", None)
        # The batch of the step in progress, the KV length of each of its requests once
        # prepared (None before), and whether its results are being recorded (see fail_current_batch).
        self.cur_batch: Optional[ScheduleBatch] = None
        self.cur_kv_lens: Optional[list[int]] = None
        self.cur_recording = False
        # Phase timing of each step (--enable-step-profile; the process wrapper enables it).
        self.clock = StepClock()
        # Constrained requests wait here until their grammar is compiled (constrained/).
        self.grammar_manager = GrammarManager(
            server_args, tokenizer, self.model_config.vocab_size, self._reject_invalid
        )

    # ---- requests ------------------------------------------------------------------------------
    def _new_batch(self, reqs: list[Req]) -> ScheduleBatch:
        return ScheduleBatch(
            reqs,
            self.req_to_token_pool,
            self.allocator,
            self.tree_cache,
            self.model_config.vocab_size,
            self.model_runner.device,
        )

    def validate_request(self, req: Req) -> Optional[str]:
        """An error message for a request that can never run, or None."""
        n = len(req.origin_input_ids)
        if n == 0:
            return "the prompt is empty; send at least one token"
        if n >= self.context_len:
            return (
                f"the prompt has {n} tokens, but the model's context length is {self.context_len}; "
                "shorten the prompt"
            )
        if any(t < 0 or t >= self.model_config.vocab_size for t in req.origin_input_ids):
            return f"input token ids must be in [0, {self.model_config.vocab_size})"
        max_new = req.sampling_params.max_new_tokens
        if max_new is not None and n + max_new > self.context_len:
            return (
                f"prompt ({n} tokens) plus max_new_tokens ({max_new}) exceeds the context length "
                f"{self.context_len}; lower max_new_tokens or shorten the prompt"
            )
        if n + 1 > self.max_total_num_tokens - self.page_size:
            return (
                f"the prompt has {n} tokens but the KV cache holds only {self.max_total_num_tokens}"
            )
        return None

    def add_request(self, req: Req) -> None:
        """Queue a request; an invalid one finishes at once with an abort reason that says why."""
        req.sampling_params.normalize()
        if req.sampling_params.max_new_tokens is None:
            req.sampling_params.max_new_tokens = self.context_len - len(req.origin_input_ids)
        if not req.eos_token_ids:
            req.eos_token_ids = set(self.model_config.eos_token_ids)
        error = self.validate_request(req)
        if error is None and req.attention is not None:
            if self.model_runner.attention_capture is None:
                error = (
                    "return_attention_tokens needs a server started with --return-attention-tokens"
                )
        if error is None and req.return_hidden_states:
            if not self.server_args.enable_return_hidden_states:
                error = HIDDEN_STATES_OFF
        if error is not None:
            req.finished_reason = FINISH_ABORT(error)
            self.output.emit_finished(req)
            return
        limit = self.max_queued_requests
        if limit is not None and len(self.waiting_queue) >= limit:
            req.finished_reason = FINISH_ABORT(
                f"The request queue is full ({limit} waiting, --max-queued-requests); retry later",
                status_code=503,
            )
            self.output.emit_finished(req)
            return
        if not self.grammar_manager.add(req):
            self.waiting_queue.append(req)

    def abort_request(self, rid: str) -> bool:
        """Finish `rid` now and free what it holds (call between steps, never during one)."""
        req = self.grammar_manager.remove(rid)
        if req is not None:
            self._finish_aborted(req, ABORTED_BY_CLIENT)
            return True
        for i, req in enumerate(self.waiting_queue):
            if req.rid == rid:
                self.waiting_queue.pop(i)
                if req.req_pool_idx is not None:
                    self.running_batch.release_req(req)
                self._finish_aborted(req, ABORTED_BY_CLIENT)
                return True
        req = self.chunked_req
        if req is not None and req.rid == rid:
            # Mid chunked prefill: its KV so far covers `fill_ids`; drop it before the next chunk.
            self.chunked_req = None
            self.tree_cache.release_req(req, len(req.fill_ids))
            self._finish_aborted(req, ABORTED_BY_CLIENT)
            return True
        for req in self.running_batch.reqs:
            if req.rid == rid:
                # Its KV up to the last sampled token is valid: cache it as a finished request's.
                self.running_batch.reqs.remove(req)
                req.finished_reason = FINISH_ABORT(ABORTED_BY_CLIENT)
                self.tree_cache.cache_finished_req(req)
                req.req_pool_idx = None
                self.output.emit_finished(req)
                return True
        return False

    def _finish_aborted(self, req: Req, message: str, status_code: Optional[int] = None) -> None:
        req.req_pool_idx = None
        req.finished_reason = FINISH_ABORT(message, status_code)
        self.output.emit_finished(req)

    def _reject_invalid(self, req: Req, message: str) -> None:
        self._finish_aborted(req, message, status_code=400)

    def drain(self) -> None:
        """Settle every step in flight (the overlap schedule's; here none ever is)."""

    def is_idle(self) -> bool:
        return (
            not self.waiting_queue
            and self.running_batch.is_empty()
            and self.chunked_req is None
            and not self.grammar_manager.has_waiting()
        )

    # ---- one iteration ---------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one batch if there is work. Returns False when idle."""
        clock = self.clock
        batch = self.get_next_batch_to_run()
        if batch is None:
            if self.is_idle():
                self.check_memory()
            return False
        clock.set_kind("prefill" if batch.forward_mode.is_extend() else "decode")
        clock.mark("schedule")
        self.cur_batch, self.cur_kv_lens, self.cur_recording = batch, None, False
        worker_batch = (
            batch.prepare_for_extend()
            if batch.forward_mode.is_extend()
            else batch.prepare_for_decode()
        )
        self.cur_kv_lens = list(worker_batch.seq_lens)
        if self.before_forward is not None:
            self.before_forward(batch)
        clock.mark("prepare")
        logits_output, forward_batch = self.model_runner.forward(worker_batch)
        clock.mark("forward", sync=True)
        sample = self.model_runner.sample(logits_output, forward_batch)
        clock.mark("sample", sync=True)
        self.forward_ct += 1
        self.cur_recording = True
        if batch.forward_mode.is_extend():
            self.output.process_prefill_result(batch, logits_output, sample)
        else:
            self.output.process_decode_result(batch, sample, logits_output)
        self.cur_batch = None
        clock.mark("output")
        if self.on_batch is not None:
            self.on_batch(batch)
        return True

    def run_until_idle(self, max_steps: int = 10**7) -> None:
        for _ in range(max_steps):
            if not self.step() and self.is_idle():
                return
        raise RuntimeError("scheduler did not become idle")

    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        self.waiting_queue.extend(self.grammar_manager.poll())
        prefill = self.get_new_batch_prefill()
        if prefill is not None:
            return prefill
        self.running_batch.filter_batch()
        if self.running_batch.is_empty():
            return None
        self.update_running_batch()
        return self.running_batch if not self.running_batch.is_empty() else None

    def get_new_batch_prefill(self) -> Optional[ScheduleBatch]:
        if self.chunked_req is None and not self.waiting_queue:
            return None
        running = len(self.running_batch.reqs)
        if running >= self.max_running_requests and self.chunked_req is None:
            return None
        self.policy.calc_priority(self.waiting_queue)
        adder = PrefillAdder(
            self.tree_cache,
            self.allocator,
            self.running_batch.reqs,
            self.new_token_ratio,
            self.max_prefill_tokens,
            self.chunked_prefill_size,
            max_new_reqs=self.max_running_requests - running - (1 if self.chunked_req else 0),
            page_size=self.page_size,
        )
        still_chunked = None
        if self.chunked_req is not None:
            still_chunked = adder.add_chunked_req(self.chunked_req)
        if still_chunked is None:
            for req in list(self.waiting_queue):
                if self.policy.policy != "lpm":
                    self.policy.match_prefix(req)
                if not adder.add_one_req(req):
                    break
            still_chunked = adder.new_chunked_req
        admitted = [r for r in adder.can_run_list if r is not self.chunked_req]
        if not adder.can_run_list:
            return None
        admitted_ids = {id(r) for r in admitted}
        self.waiting_queue = [r for r in self.waiting_queue if id(r) not in admitted_ids]
        for req in admitted:
            if not req.is_retracted:
                req.cached_tokens = len(req.prefix_indices)
        self.chunked_req = still_chunked
        for req in adder.can_run_list:
            req.is_chunked = 1 if req is still_chunked else 0
        batch = self._new_batch(adder.can_run_list)
        batch.forward_mode = batch.forward_mode.EXTEND
        self.last_batch_info = {
            "new_seq": len(admitted),
            "new_token": sum(r.extend_input_len for r in adder.can_run_list),
            "cached_token": sum(len(r.prefix_indices) for r in admitted),
        }
        return batch

    # ---- decode memory and retraction ------------------------------------------------------------
    def update_running_batch(self) -> None:
        batch = self.running_batch
        while not batch.is_empty():
            need = batch.decode_slots_needed()
            if self.allocator.available_size() + self.tree_cache.evictable_size() >= need:
                break
            self.retract_one(batch)
        self.new_token_ratio = max(
            self.new_token_ratio - NEW_TOKEN_RATIO_DECAY, self.min_new_token_ratio
        )

    def retract_one(self, batch: ScheduleBatch) -> None:
        """Preempt the request that has decoded least; it re-prefills later with the same tokens."""
        victim = min(batch.reqs, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
        batch.reqs.remove(victim)
        batch.release_req(victim)
        victim.reset_for_retract()
        self.num_retractions += 1
        if batch.is_empty() and not self.waiting_queue:
            # Alone it still does not fit: nothing can make progress for it.
            victim.finished_reason = FINISH_ABORT(
                "the KV cache is too small for this request; raise --max-total-tokens"
            )
            self.output.emit_finished(victim)
        else:
            self.waiting_queue.insert(0, victim)
        total_left = (
            sum(r.sampling_params.max_new_tokens - len(r.output_ids) for r in batch.reqs) or 1
        )
        ratio = (self.allocator.available_size() + self.tree_cache.evictable_size()) / total_left
        self.new_token_ratio = min(max(self.new_token_ratio, 1.0 - ratio), 1.0)
        logger.info(
            "KV cache full: retracted %s, %d requests still running", victim.rid, len(batch.reqs)
        )

    # ---- failures ------------------------------------------------------------------------------
    def fail_current_batch(self, message: str) -> Optional[str]:
        """The step in progress raised: end its requests with `message` (HTTP 500) and free
        their memory. Returns why the scheduler state can no longer be trusted, or None."""
        batch, kv_lens = self.cur_batch, self.cur_kv_lens
        self.cur_batch = None
        if batch is None:
            return "the failure happened outside a batch"
        if self.cur_recording:
            return "the failure happened while recording a batch's results"
        extend = batch.forward_mode.is_extend()
        for i, req in enumerate(batch.reqs):
            if kv_lens is not None:
                kv_len = kv_lens[i]  # prepared: KV slots were written up to the new length
            else:
                kv_len = len(req.prefix_indices) if extend else req.seqlen - 1
            if req.req_pool_idx is not None:
                self.tree_cache.release_req(req, kv_len)
            elif req.last_node is not None:
                self.tree_cache.dec_lock_ref(req.last_node)  # admitted, but got no row
            if req is self.chunked_req:
                self.chunked_req = None
            self._finish_aborted(req, message, status_code=500)
        self.running_batch.filter_batch()
        try:
            self.check_accounting()
        except RuntimeError as e:
            return str(e)
        return None

    # ---- invariants ----------------------------------------------------------------------------
    def check_accounting(self) -> None:
        """NOTE: check_memory while requests are live: every KV slot is free, cached (evictable or
        locked) or owned by exactly one live request's uncached tail; every row is free or live."""
        page = self.page_size
        live = [
            r for r in self.running_batch.reqs + self.waiting_queue if r.req_pool_idx is not None
        ]
        if self.chunked_req is not None and self.chunked_req.req_pool_idx is not None:
            live.append(self.chunked_req)
        owned = 0
        for req in live:
            kv_len = len(req.prefix_indices) if req.is_chunked else committed_kv_len(req)
            pages = -(-kv_len // page) * page  # allocation is page-granular
            owned += pages - self.tree_cache.cache_owned_len(req)
        free = self.allocator.available_size()
        evictable = self.tree_cache.evictable_size()
        protected = self.tree_cache.protected_size()
        total = self.max_total_num_tokens
        if free + evictable + protected + owned != total:
            raise RuntimeError(
                f"KV accounting broken: free {free} + evictable {evictable} + locked {protected} "
                f"+ owned by live requests {owned} != total {total}"
            )
        rows = self.req_to_token_pool
        if rows.available_size() + len(live) != rows.size:
            raise RuntimeError(
                f"request-row accounting broken: {rows.available_size()} free + {len(live)} live "
                f"!= {rows.size}"
            )

    def check_memory(self) -> None:
        """NOTE: when idle every KV slot is free, evictable (cached) or locked: nothing leaked."""
        free = self.allocator.available_size()
        evictable = self.tree_cache.evictable_size()
        protected = self.tree_cache.protected_size()
        total = self.max_total_num_tokens
        if free + evictable + protected != total:
            raise RuntimeError(
                f"KV memory leak: free {free} + evictable {evictable} + locked {protected} != total {total}"
            )
        if self.req_to_token_pool.available_size() != self.req_to_token_pool.size:
            raise RuntimeError("request-row leak: rows still allocated while idle")

    def token_usage(self) -> float:
        used = (
            self.max_total_num_tokens
            - self.allocator.available_size()
            - self.tree_cache.evictable_size()
        )
        return used / self.max_total_num_tokens
