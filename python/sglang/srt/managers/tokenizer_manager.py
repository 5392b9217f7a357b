"""TokenizerManager: the main-process, asyncio side of the serving pipeline.

Owns tokenization (text or ids in; chat templates are the OpenAI layer's job), request validation
(sampling parameters, prompt length against the context), sending `TokenizedGenerateReqInput` to
the scheduler, and collecting `BatchStrOut` per rid into `ReqState`s that `generate_request`
turns into native `/generate` output dicts. It also aborts requests whose client went away or
whose coroutine was cancelled, and answers flush / load queries through the scheduler. With
`--enable-metrics` it owns the Prometheus collector: it times every request's outputs as they
arrive and, on `/metrics` scrapes, fetches the scheduler's gauges (see metrics/collector.py).

Contract of `generate_request(obj, request=None)` (an async generator):
- validation errors raise ValueError before anything is yielded or sent;
- single request, not streaming: yields exactly one final dict;
- single request, streaming: yields dicts as tokens arrive; each is cumulative (`text`,
  `output_ids`, logprobs) unless `--stream-output` (text and ids new since the previous dict) or
  the request's internal `stream_deltas` (text, ids and logprobs new; the OpenAI routes set it;
  req_output.py builds the dicts), and the last one has a non-null
  `meta_info.finish_reason`; `meta_info.attention_tokens.content` always holds only the entries
  of tokens new since the previous dict (each token's entry is sent once);
- batch (list input or n > 1), not streaming: yields exactly one list of final dicts, in input
  order (n samples of prompt i at indices i*n .. i*n+n-1);
- batch, streaming: yields single dicts from any member as they arrive, each with an `index` key;
- a request the server fails (its batch raised: 500; the queue is full: 503) raises
  `RequestFailed` carrying the status (see request_errors.py), even mid-stream;
- once a child process died or the server is shutting down (`set_dead`), pending and new requests
  raise `RequestFailed` with status 503 at once; while it drains (`closing_reason`), new ones do;
- when the client disconnects, the request is aborted and `ClientDisconnected` is raised.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, AsyncIterator, Optional

import zmq
import zmq.asyncio

from sglang.srt.attention_capture.config import parse_attention_request
from sglang.srt.attention_capture.prompt import apply_prompt_positions
from sglang.srt.managers.hidden_states import HIDDEN_STATES_OFF
from sglang.srt.managers.layer_probes import PROBE_FIELDS, ProbeOutput, parse_probe_request
from sglang.srt.managers.io_struct import (
    ATTENTION_FIELDS,
    AbortReq,
    BatchStrOut,
    FlushCacheReq,
    FlushCacheResp,
    GenerateReqInput,
    GetLoadReq,
    GetLoadResp,
    GetSchedulerStatsReq,
    HealthCheckReq,
    HealthCheckResp,
    SchedulerStats,
    TokenizedGenerateReqInput,
    recv_msg_async,
    send_msg,
)
from sglang.srt.managers.request_errors import (
    ClientDisconnected,
    RequestFailed,
    from_finish_reason,
)
from sglang.srt.managers.req_output import ReqState, make_output
from sglang.srt.managers.request_logger import RequestLogger
from sglang.srt.managers.step_profile import HOP_DETOK_TM, TOKENIZER_MANAGER, StepProfileStore
from sglang.srt.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How often a waiting request asks the HTTP layer whether its client is still there.
DISCONNECT_CHECK_S = 0.5
# Prompts with more characters than this are tokenized off the event loop (~5 ms of work).
TOKENIZE_OFFLOAD_CHARS = 4096


class TokenizerManager:
    def __init__(self, server_args: Any, port_args: Any) -> None:
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.hf_transformers_utils import get_tokenizer

        self.server_args = server_args
        self.port_args = port_args
        self.model_config = ModelConfig.from_server_args(server_args)
        self.context_len: int = self.model_config.context_len
        self.max_req_input_len: int = self.context_len - 1
        self.max_total_num_tokens: Optional[int] = None
        self.tokenizer: Any = None
        if not server_args.skip_tokenizer_init:
            self.tokenizer = get_tokenizer(
                server_args.tokenizer_path,
                tokenizer_mode=server_args.tokenizer_mode,
                trust_remote_code=server_args.trust_remote_code,
            )
        # Sending never blocks (PUSH over ipc queues), so a plain socket is safe from coroutines
        # and from `finally` blocks of cancelled ones.
        self._sync_ctx = zmq.Context(1)
        self.send_to_scheduler = self._sync_ctx.socket(zmq.PUSH)
        self.send_to_scheduler.connect(port_args.scheduler_input_ipc_name)
        self._async_ctx = zmq.asyncio.Context(1)
        self.recv_from_detokenizer = self._async_ctx.socket(zmq.PULL)
        self.recv_from_detokenizer.bind(port_args.tokenizer_ipc_name)

        self.rid_to_state: dict[str, ReqState] = {}
        self._waiters: dict[type, collections.deque[asyncio.Future]] = collections.defaultdict(
            collections.deque
        )
        self._handle_task: Optional[asyncio.Task] = None
        self.dead_reason: Optional[str] = None
        # Set while the server drains for shutdown: new requests get 503, running ones go on.
        self.closing_reason: Optional[str] = None
        self.metrics: Any = None
        # --enable-step-profile: every pipeline stage's time per step (managers/step_profile.py).
        self.step_profile: Optional[StepProfileStore] = (
            StepProfileStore() if getattr(server_args, "enable_step_profile", False) else None
        )
        if server_args.enable_metrics:
            from sglang.srt.metrics.collector import TokenizerMetricsCollector

            model_name = server_args.served_model_name or server_args.model_path
            self.metrics = TokenizerMetricsCollector({"model_name": model_name})
        self.captured_layers: tuple[int, ...] = ()
        if server_args.return_attention_tokens:
            from sglang.srt.attention_capture import resolve_capture_layers

            try:
                self.captured_layers = resolve_capture_layers(
                    server_args.attention_capture_layers, self.model_config.num_hidden_layers
                )
            except ValueError:
                pass  # the scheduler refuses to start with the same message
        self._token_text: dict[int, str] = {}
        self.request_logger: Optional[RequestLogger] = None
        if server_args.log_requests:
            self.request_logger = RequestLogger(server_args.log_requests_level)

    # ---- lifecycle ---------------------------------------------------------------------------
    def set_scheduler_info(self, info: dict[str, Any]) -> None:
        self.max_total_num_tokens = info["max_total_num_tokens"]
        self.max_req_input_len = info["max_req_input_len"]
        self.context_len = info["context_len"]
        self.quantization_info = info.get("quantization")
        self.kv_cache_dtype = info.get("kv_cache_dtype")

    def _ensure_handle_loop(self) -> None:
        if self._handle_task is None:
            self._handle_task = asyncio.get_running_loop().create_task(self._handle_loop())

    def set_dead(self, reason: str) -> None:
        """Stop serving (a child process died, or shutdown): fail every pending and future
        request with `reason` (HTTP 503). Call on the event loop's thread."""
        self.dead_reason = reason
        for state in self.rid_to_state.values():
            state.event.set()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(self._dead_error())
            waiters.clear()

    def _dead_error(self) -> RequestFailed:
        return RequestFailed(self.dead_reason or "the server is not serving", 503)

    def close(self) -> None:
        if self._handle_task is not None:
            self._handle_task.cancel()
        self.send_to_scheduler.close(linger=0)
        self.recv_from_detokenizer.close(linger=0)

    async def aclose(self) -> None:
        """Cancel the receive loop and wait until it has ended, then close the sockets."""
        task, self._handle_task = self._handle_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self.close()

    async def _handle_loop(self) -> None:
        while True:
            msg = await recv_msg_async(self.recv_from_detokenizer)
            if isinstance(msg, BatchStrOut):
                stamp, store = msg.profile, self.step_profile
                started = stamp.received(HOP_DETOK_TM) if stamp is not None else 0.0
                try:
                    self._handle_batch_str_out(msg)
                    if stamp is not None and store is not None:
                        store.last_output_at = time.perf_counter()
                        stamp.samples[TOKENIZER_MANAGER] = store.last_output_at - started
                        store.add_stamp(stamp)
                except Exception as e:  # one bad output must not stop every request's outputs
                    logger.exception(
                        "Failed to process the outputs of %d request(s)", len(msg.rids)
                    )
                    self._fail_requests(msg.rids, f"{type(e).__name__}: {e}")
            else:
                waiters = self._waiters.get(type(msg))
                if waiters:
                    fut = waiters.popleft()
                    if not fut.done():
                        fut.set_result(msg)

    def _handle_batch_str_out(self, out: BatchStrOut) -> None:
        for i, rid in enumerate(out.rids):
            state = self.rid_to_state.get(rid)
            if state is None:
                continue  # aborted by us; the scheduler's last word is not needed
            state.text += out.new_texts[i]
            state.output_ids.extend(out.new_output_ids[i])
            state.completion_tokens = out.completion_tokens[i]
            state.cached_tokens = out.cached_tokens[i]
            if out.output_token_logprobs[i]:
                state.output_token_logprobs.extend(out.output_token_logprobs[i])
            if out.output_top_logprobs[i]:
                state.output_top_logprobs.extend(out.output_top_logprobs[i])
            if out.attention_records and out.attention_records[i]:
                state.attention_records.extend(out.attention_records[i])
            if out.attention_prompt and out.attention_prompt[i]:
                state.attention_prompt.extend(out.attention_prompt[i])
            if out.hidden_states and out.hidden_states[i]:
                state.hidden_states.extend(h.tolist() for h in out.hidden_states[i])
            if out.probe_records and out.probe_records[i] and state.probe is not None:
                state.probe.add(out.probe_records[i])
            if out.input_token_logprobs[i] is not None:
                state.input_token_logprobs = list(out.input_token_logprobs[i])
                state.input_top_logprobs = list(out.input_top_logprobs[i] or [])
            if out.finished_reasons[i] is not None:
                state.finished_reason = out.finished_reasons[i]
                state.finished = True
            if self.metrics is not None:
                self._observe(state, len(out.new_output_ids[i]))
            state.event.set()

    def _fail_requests(self, rids: list[str], message: str) -> None:
        """End these requests with HTTP 500 and abort them in the scheduler."""
        for rid in rids:
            state = self.rid_to_state.get(rid)
            if state is None or state.finished:
                continue
            send_msg(self.send_to_scheduler, AbortReq(rid=rid))
            state.finished = True
            state.finished_reason = {"type": "abort", "message": message, "status_code": 500}
            state.event.set()

    def _observe(self, state: ReqState, num_new: int) -> None:
        now = time.perf_counter()
        if num_new > 0:
            if state.last_token_time is None:
                self.metrics.observe_first_token(now - state.created)
            else:
                self.metrics.observe_inter_token(now - state.last_token_time, num_new)
            state.last_token_time = now
        if state.finished:
            self.metrics.observe_finished(
                state.prompt_tokens, state.completion_tokens, now - state.created
            )

    async def _request(self, msg: Any, resp_type: type) -> Any:
        if self.dead_reason is not None:
            raise self._dead_error()
        self._ensure_handle_loop()
        fut = asyncio.get_running_loop().create_future()
        self._waiters[resp_type].append(fut)
        send_msg(self.send_to_scheduler, msg)
        return await fut

    # ---- control -----------------------------------------------------------------------------
    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        if abort_all:
            rids = list(self.rid_to_state)
        else:
            rids = [rid] if rid in self.rid_to_state else []
        send_msg(self.send_to_scheduler, AbortReq(rid=rid, abort_all=abort_all))
        for r in rids:
            state = self.rid_to_state.get(r)
            if state is not None and not state.finished:
                state.finished = True
                state.finished_reason = {"type": "abort", "message": "aborted by the client"}
                state.event.set()

    async def flush_cache(self) -> FlushCacheResp:
        return await self._request(FlushCacheReq(), FlushCacheResp)

    async def get_load(self, check_memory: bool = False) -> GetLoadResp:
        return await self._request(GetLoadReq(check_memory=check_memory), GetLoadResp)

    async def get_scheduler_stats(self) -> SchedulerStats:
        return await self._request(GetSchedulerStatsReq(), SchedulerStats)

    async def health_check(self) -> bool:
        resp = await self._request(HealthCheckReq(), HealthCheckResp)
        return resp.ok

    # ---- tokenize and validate -----------------------------------------------------------------
    def tokenize_request(self, obj: GenerateReqInput) -> TokenizedGenerateReqInput:
        """Turn one normalized single request into what the scheduler runs; ValueError if invalid."""
        if obj.input_ids is not None:
            input_ids, input_text = list(obj.input_ids), None
        else:
            if self.tokenizer is None:
                raise ValueError("this server runs with --skip-tokenizer-init: send input_ids")
            input_text = obj.text
            input_ids = list(self.tokenizer.encode(obj.text))
        vocab = self.model_config.vocab_size
        if not input_ids:
            raise ValueError("the prompt is empty; send at least one token")
        if any(t < 0 or t >= vocab for t in input_ids):
            raise ValueError(f"input_ids must be token ids in [0, {vocab})")
        sp = SamplingParams.from_dict(obj.sampling_params)
        sp.verify(vocab)
        sp.normalize()
        truncate = self.server_args.allow_auto_truncate
        limit = min(self.max_req_input_len, self.context_len - 1)
        if len(input_ids) > limit:
            if not truncate:
                raise ValueError(
                    f"The input ({len(input_ids)} tokens) is longer than the model's context "
                    f"length ({self.context_len} tokens; at most {limit} prompt tokens fit)."
                )
            input_ids = input_ids[:limit]
        if sp.max_new_tokens is not None and len(input_ids) + sp.max_new_tokens > self.context_len:
            if not truncate:
                raise ValueError(
                    f"Requested token count exceeds the model's maximum context length of "
                    f"{self.context_len} tokens: {len(input_ids)} prompt tokens + "
                    f"{sp.max_new_tokens} max_new_tokens."
                )
            sp.max_new_tokens = self.context_len - len(input_ids)
        start = obj.logprob_start_len
        if not isinstance(start, int) or start < -1 or start >= len(input_ids):
            raise ValueError(
                f"logprob_start_len must be -1 or in [0, {len(input_ids)}), got {start!r}"
            )
        if obj.return_hidden_states and not self.server_args.enable_return_hidden_states:
            raise ValueError(HIDDEN_STATES_OFF)
        attention = parse_attention_request(
            {name: getattr(obj, name) for name in ATTENTION_FIELDS},
            enabled=bool(self.server_args.return_attention_tokens),
            max_top_k=int(self.server_args.attention_tokens_top_k),
            captured_layers=self.captured_layers,
            num_layers=self.model_config.num_hidden_layers,
            num_heads=self.model_config.num_attention_heads,
            prompt_len=len(input_ids),
        )
        attention = apply_prompt_positions(
            attention,
            obj.attention_prompt_positions,
            len(input_ids),
            int(self.server_args.attention_prompt_max_len),
        )
        probe = parse_probe_request(
            {name: getattr(obj, name) for name in PROBE_FIELDS},
            num_layers=self.model_config.num_hidden_layers,
            hidden_size=self.model_config.hidden_size,
            max_new_tokens=(
                sp.max_new_tokens
                if sp.max_new_tokens is not None
                else self.context_len - len(input_ids)
            ),
            max_bytes=int(self.server_args.hidden_states_max_bytes),
        )
        return TokenizedGenerateReqInput(
            rid=obj.rid,
            input_text=input_text,
            input_ids=input_ids,
            sampling_params=sp,
            return_logprob=bool(obj.return_logprob),
            logprob_start_len=start,
            top_logprobs_num=obj.top_logprobs_num,
            stream=obj.stream,
            return_hidden_states=bool(obj.return_hidden_states),
            attention_options=attention,
            probe_options=probe,
        )

    # ---- generation ------------------------------------------------------------------------------
    async def generate_request(
        self, obj: GenerateReqInput, request: Any = None
    ) -> AsyncIterator[Any]:
        """See the module docstring for the exact contract."""
        if self.dead_reason is not None:
            raise self._dead_error()
        if self.closing_reason is not None:
            raise RequestFailed(self.closing_reason, 503)
        self._ensure_handle_loop()
        obj.normalize_batch_and_arguments()
        subs = [obj[i] for i in range(obj.batch_size)]
        if sum(len(s.text) for s in subs if s.text is not None) > TOKENIZE_OFFLOAD_CHARS:
            # Long texts tokenize in a worker thread (the tokenizer releases the GIL), so other
            # requests and /health are served meanwhile; short ones are not worth the hop.
            tokenized = await asyncio.to_thread(lambda: [self.tokenize_request(s) for s in subs])
        else:
            tokenized = [self.tokenize_request(s) for s in subs]
        rids = [t.rid for t in tokenized]
        if len(set(rids)) != len(rids) or any(r in self.rid_to_state for r in rids):
            raise ValueError("duplicate request id (rid); every request in flight needs its own")
        if obj.is_single:
            async for out in self._wait_one(subs[0], tokenized[0], request):
                yield out
            return
        if not obj.stream:
            gens = [self._wait_one(s, t, request) for s, t in zip(subs, tokenized)]
            yield list(await asyncio.gather(*[_last(g) for g in gens]))
            return
        async for out in self._merge_streams(subs, tokenized, request):
            yield out

    async def _wait_one(
        self, obj: GenerateReqInput, tokenized: TokenizedGenerateReqInput, request: Any
    ) -> AsyncIterator[dict[str, Any]]:
        rid = tokenized.rid
        state = ReqState(obj, prompt_tokens=len(tokenized.input_ids))
        if tokenized.attention_options is not None:
            state.attention_options = tokenized.attention_options
            state.prompt_ids = tokenized.input_ids
        if tokenized.probe_options is not None:
            state.probe = ProbeOutput(
                tokenized.probe_options, tokenized.attention_options is not None
            )
        self.rid_to_state[rid] = state
        send_msg(self.send_to_scheduler, tokenized)
        if self.request_logger is not None:
            self.request_logger.received(obj)
        try:
            while True:
                # NOTE: checked before every wait, so a request registered after set_dead ran
                # (it was being tokenized) fails at once instead of waiting for nothing.
                if self.dead_reason is not None:
                    raise self._dead_error()
                if request is None:
                    await state.event.wait()
                else:
                    try:
                        await asyncio.wait_for(state.event.wait(), DISCONNECT_CHECK_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            logger.info("client disconnected; aborting request %s", rid)
                            raise ClientDisconnected(rid) from None  # finally aborts it
                        continue
                state.event.clear()
                if self.dead_reason is not None:
                    raise self._dead_error()
                if state.finished:
                    failed = from_finish_reason(state.finished_reason)
                    if failed is not None:
                        raise failed
                    out = self._make_output(state)
                    if self.request_logger is not None:
                        self.request_logger.finished(obj, out)
                    yield out
                    return
                if obj.stream:
                    yield self._make_output(state)
        finally:
            if not state.finished:
                # Disconnect, cancellation or an abandoned generator: free the scheduler's KV.
                send_msg(self.send_to_scheduler, AbortReq(rid=rid))
            self.rid_to_state.pop(rid, None)

    async def _merge_streams(
        self,
        subs: list[GenerateReqInput],
        tokenized: list[TokenizedGenerateReqInput],
        request: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int) -> None:
            try:
                async for out in self._wait_one(subs[index], tokenized[index], request):
                    out["index"] = index
                    await queue.put(out)
            except BaseException as e:  # handed to the consumer, which re-raises it
                await queue.put(e)
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(subs))]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    def _make_output(self, state: ReqState) -> dict[str, Any]:
        return make_output(
            state, self.server_args.stream_output, self.token_text, self.tokenizer is not None
        )

    def token_text(self, token_id: int) -> str:
        """The text of one token as it reads on its own (cached; '' without a tokenizer)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
            self._token_text[token_id] = text
        return text


async def _last(gen: AsyncIterator[Any]) -> Any:
    last = None
    async for item in gen:
        last = item
    return last
