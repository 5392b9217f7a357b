"""The scheduler process: ZMQ in, core Scheduler steps, token ids out.

`run_scheduler_process` is the process entry (spawned by `entrypoints/engine.py`). It builds the
model runner and `Scheduler`, reports readiness (or the load error) through a pipe, then loops:
drain every pending message from the tokenizer manager (PULL), apply requests / aborts / control
messages, run one `step()` (under the overlap schedule, managers/scheduler_overlap.py, a step
launches a batch or chains the next decode onto the one in flight and records that one), and push `BatchTokenIDOut` to the detokenizer every
`--stream-interval` tokens of a streaming request and whenever a request finishes (with
`--enable-metrics`, also the first token of every request, so the tokenizer manager can time it).
Control answers (flush, load, metrics stats, health) go straight to the tokenizer manager. When
there is no work it blocks on the socket. It also writes the `Prefill batch.` / `Decode batch.`
log lines (format: docs/compat.md) and keeps the scheduler gauges that `/metrics` asks for.
A step that raises ends its batch's requests with HTTP 500; the loop serves on when the KV
accounting still adds up, else it exits 1 with a one-line reason. Every iteration beats the
heartbeat `/health` reads, and a watchdog stops a hung step (managers/scheduler_watchdog.py).
Under tensor parallelism there is one such process per TP rank: rank 0 owns the sockets and
broadcasts what it reads, so every rank runs the same steps (see managers/tp_worker.py).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import zmq

from sglang.srt.attention_capture.prompt import take_prompt_records
from sglang.srt.distributed.placement import (
    ParallelConfigError,
    RankPlacement,
    check_parallel_model,
)
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    DetokenizeOptions,
    FlushCacheReq,
    FlushCacheResp,
    GetLoadReq,
    GetLoadResp,
    GetSchedulerStatsReq,
    HealthCheckReq,
    HealthCheckResp,
    TokenizedGenerateReqInput,
    recv_all_nowait,
    send_msg,
)
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.managers.scheduler_overlap import make_scheduler
from sglang.srt.managers.scheduler_watchdog import Heartbeat, Watchdog, fault_hook_from_env
from sglang.srt.managers.step_profile import OUTPUT_MESSAGE, StepClock
from sglang.srt.managers.tp_worker import (
    ControlPlane,
    NullSocket,
    TpRank,
    describe_peer_failure,
)
from sglang.srt.metrics.collector import SchedulerStatsTracker
from sglang.srt.model_loader.resolve import ModelLoadError
from sglang.srt.startup_timing import StartupTimer, process_age

logger = logging.getLogger(__name__)

# How often an idle loop wakes up to check that its parent is still alive.
PARENT_CHECK_MS = 1000


def configure_child_logging(log_level: str, tag: str) -> None:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format=f"[%(asctime)s {tag}] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )


def set_process_name(name: str) -> None:
    """Name the process as `ps`, `top` and psutil show it (Linux; at most 15 characters)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass  # not Linux: the name is cosmetic


def watch_parent(parent_pid: int) -> bool:
    """True while the process that spawned us lives (we get re-parented when it dies)."""
    return os.getppid() == parent_pid


@dataclass
class _SendState:
    sent_ids: int = 0  # output tokens already sent
    sent_out_logprobs: int = 0
    sent_input_logprobs: bool = False
    options_sent: bool = False
    sent_hidden: int = 0  # hidden-state entries already sent


@dataclass
class SchedulerProcess:
    scheduler: Scheduler
    recv_from_tokenizer: zmq.Socket
    send_to_detokenizer: zmq.Socket
    send_to_tokenizer: zmq.Socket
    stream_interval: int
    decode_log_interval: int
    parent_pid: int
    report_first_token: bool = False
    # TP > 1: rank 0 broadcasts what it reads; ranks > 0 have no input socket (None).
    control: Optional[ControlPlane] = None
    send_state: dict[str, _SendState] = field(default_factory=dict)
    pending: list[Req] = field(default_factory=list)
    decode_steps: int = 0
    last_decode_log: float = field(default_factory=time.perf_counter)
    decode_tokens_since_log: int = 0
    stats: SchedulerStatsTracker = field(default_factory=SchedulerStatsTracker)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    watchdog: Optional[Watchdog] = None
    last_parent_check: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.scheduler.output.listener = self.pending.extend
        self.scheduler.on_batch = self.on_batch
        self.poller = zmq.Poller()
        if self.recv_from_tokenizer is not None:
            self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)

    # ---- loop -------------------------------------------------------------------------------
    def event_loop(self) -> None:
        clock = self.scheduler.clock
        while True:
            self.heartbeat.begin()
            clock.begin()
            if self.watchdog is not None:
                self.watchdog.arm_backstop()
            msgs = self.recv_messages()
            if msgs is None:
                return
            for msg in msgs:
                self.handle(msg)
            self.flush_outputs()
            clock.mark("recv")
            try:
                ran = self.scheduler.step()
            except Exception as e:
                self.recover_from_failed_step(e)
                ran = True
            clock.end_step(ran)
            self.flush_outputs()
            if ran:
                if self.parent_gone():
                    return
                continue
            if not self.wait_for_messages():
                return

    def parent_gone(self) -> bool:
        """While busy, still notice (about once a second) that the main process went away."""
        now = time.monotonic()
        if now - self.last_parent_check < PARENT_CHECK_MS / 1000:
            return False
        self.last_parent_check = now
        if watch_parent(self.parent_pid):
            return False
        logger.info("parent process exited; scheduler stops")
        return True

    def recover_from_failed_step(self, exc: Exception) -> None:
        """End the failed batch's requests with an error; raise SystemExit(1) if the scheduler's
        state cannot be trusted afterwards (or under TP, where the ranks cannot agree on it)."""
        if self.control is not None:
            raise exc
        logger.error(
            "A batch failed; its requests get an error:\n%s",
            "".join(traceback.format_exception(exc)).rstrip(),
        )
        why = self.scheduler.fail_current_batch(
            f"The server failed while running this request: {type(exc).__name__}: {exc}"
        )
        self.flush_outputs()  # the errors reach the clients before any exit
        if why is not None:
            logger.error(
                "Scheduler stops after a failed step (%s: %s): %s", type(exc).__name__, exc, why
            )
            raise SystemExit(1)
        logger.info("KV accounting intact after the failed batch; serving on")

    def recv_messages(self) -> Optional[list[Any]]:
        """This iteration's messages (the same on every TP rank); None means stop."""
        mine = None
        if self.recv_from_tokenizer is not None:
            mine = recv_all_nowait(self.recv_from_tokenizer)
        return mine if self.control is None else self.control.exchange(mine)

    def wait_for_messages(self) -> bool:
        """Nothing ran this iteration: wait for a message; False when the scheduler must stop."""
        if self.recv_from_tokenizer is None:
            return True  # TP rank > 0: waits inside rank 0's next broadcast
        if not self.scheduler.is_idle():
            # Work is queued but nothing fits right now; wait briefly for a message.
            self.poller.poll(5)
            return not self.parent_gone()
        self.heartbeat.idle()
        if self.watchdog is not None:
            self.watchdog.disarm_backstop()
        if self.control is not None:
            # NOTE: the other ranks wait in a collective: wake at least once a second, so the
            # next broadcast (maybe empty) comes long before their timeout.
            if not self.poller.poll(PARENT_CHECK_MS) and not watch_parent(self.parent_pid):
                self.control.stop_reason = "parent process exited"
            return True
        # NOTE: idle means nothing can change until a message arrives: block, do not spin.
        while not self.poller.poll(PARENT_CHECK_MS):
            if not watch_parent(self.parent_pid):
                logger.info("parent process exited; scheduler stops")
                return False
        return True

    def on_batch(self, batch: ScheduleBatch) -> None:
        if self.control is not None:
            self.control.check_same_tokens(batch)
            if not self.control.is_leader:
                return  # batch log lines come from TP0 only
        self.log_batch(batch)

    def handle(self, msg: Any) -> None:
        sched = self.scheduler
        if isinstance(msg, TokenizedGenerateReqInput):
            req = Req(
                msg.rid,
                msg.input_ids,
                msg.sampling_params,
                origin_input_text=msg.input_text,
                return_logprob=msg.return_logprob,
                logprob_start_len=msg.logprob_start_len,
                top_logprobs_num=msg.top_logprobs_num,
                stream=msg.stream,
                attention=msg.attention_options,
                return_hidden_states=msg.return_hidden_states,
                probe=msg.probe_options,
            )
            self.send_state[req.rid] = _SendState()
            sched.add_request(req)
        elif isinstance(msg, AbortReq):
            sched.drain()  # the overlap schedule's in-flight requests are in no queue meanwhile
            if msg.abort_all:
                rids = [r.rid for r in sched.waiting_queue + sched.running_batch.reqs]
                if sched.chunked_req is not None:
                    rids.append(sched.chunked_req.rid)
            else:
                rids = [msg.rid]
            for rid in rids:
                sched.abort_request(rid)
        elif isinstance(msg, FlushCacheReq):
            sched.drain()
            send_msg(self.send_to_tokenizer, self.flush_cache())
        elif isinstance(msg, GetLoadReq):
            send_msg(self.send_to_tokenizer, self.get_load(msg.check_memory))
        elif isinstance(msg, HealthCheckReq):
            send_msg(self.send_to_tokenizer, HealthCheckResp(ok=True))
        elif isinstance(msg, GetSchedulerStatsReq):
            load = self.get_load(check_memory=False)
            running = load.num_reqs - load.num_waiting_reqs
            stats = self.stats.snapshot(
                running, load.num_waiting_reqs, load.num_tokens, load.token_usage
            )
            send_msg(self.send_to_tokenizer, stats)
        else:
            logger.error("scheduler got an unknown message %r", type(msg).__name__)

    # ---- control ------------------------------------------------------------------------------
    def flush_cache(self) -> FlushCacheResp:
        sched = self.scheduler
        if not sched.is_idle():
            return FlushCacheResp(False, "Cannot flush the cache while requests are running")
        cache = sched.tree_cache
        cache.evict(cache.evictable_size())
        cache.reset()
        try:
            sched.check_memory()
        except RuntimeError as e:
            return FlushCacheResp(False, str(e))
        return FlushCacheResp(True, "Cache flushed")

    def get_load(self, check_memory: bool) -> GetLoadResp:
        sched = self.scheduler
        running = len(sched.running_batch.reqs) + (1 if sched.chunked_req is not None else 0)
        waiting = len(sched.waiting_queue)
        used = (
            sched.max_total_num_tokens
            - sched.allocator.available_size()
            - sched.tree_cache.evictable_size()
        )
        error = None
        if check_memory and sched.is_idle():
            try:
                sched.check_memory()
            except RuntimeError as e:
                error = str(e)
        return GetLoadResp(0, running + waiting, waiting, used, sched.token_usage(), error)

    # ---- outputs ------------------------------------------------------------------------------
    def flush_outputs(self) -> None:
        if not self.pending:
            return
        reqs, seen = [], set()
        for req in self.pending:
            if id(req) not in seen:
                seen.add(id(req))
                reqs.append(req)
        self.pending.clear()
        started = time.perf_counter() if self.scheduler.clock.enabled else 0.0
        out = BatchTokenIDOut([], [], [], [], [], [], [], [], [], [], [])
        for req in reqs:
            state = self.send_state.get(req.rid)
            if state is None:
                continue
            finished = req.finished()
            new_tokens = len(req.output_ids) - state.sent_ids
            if not finished:
                # Non-streaming requests get everything at the end (plus, for metrics, their
                # first token); streams every N tokens.
                first = state.sent_ids == 0
                if req.stream:
                    if new_tokens < self.stream_interval and not first:
                        continue
                elif not (first and new_tokens > 0 and self.report_first_token):
                    continue
            self._append(out, req, state)
            if finished:
                del self.send_state[req.rid]
                self.scheduler.output.finished_reqs.pop(req.rid, None)
        if out.rids:
            out.profile = self.scheduler.clock.stamp()
            if out.profile is not None:
                out.profile.samples[OUTPUT_MESSAGE] = time.perf_counter() - started
            send_msg(self.send_to_detokenizer, out)

    @staticmethod
    def _append(out: BatchTokenIDOut, req: Req, state: _SendState) -> None:
        sp = req.sampling_params
        out.rids.append(req.rid)
        out.new_output_ids.append(req.output_ids[state.sent_ids :])
        state.sent_ids = len(req.output_ids)
        out.finished_reasons.append(req.finished_reason.to_json() if req.finished() else None)
        options = None
        if not state.options_sent:
            state.options_sent = True
            options = DetokenizeOptions(
                skip_special_tokens=sp.skip_special_tokens,
                spaces_between_special_tokens=sp.spaces_between_special_tokens,
                no_stop_trim=sp.no_stop_trim,
                stop=list(sp.stop or []),
            )
        out.detokenize_options.append(options)
        out.prompt_tokens.append(len(req.origin_input_ids))
        out.completion_tokens.append(len(req.output_ids))
        out.cached_tokens.append(req.cached_tokens)
        if req.attention is not None:
            # Sent records leave the scheduler; the tokenizer manager holds the one copy kept.
            out.attention_records.append(req.attention_records)
            req.attention_records = []
        else:
            out.attention_records.append(None)
        out.attention_prompt.append(take_prompt_records(req))
        # Probe records leave the scheduler as attention records do.
        out.probe_records.append(req.probe_records if req.probe is not None else None)
        req.probe_records = []
        if req.return_hidden_states:
            out.hidden_states.append(req.hidden_states[state.sent_hidden :])
            state.sent_hidden = len(req.hidden_states)
        else:
            out.hidden_states.append(None)
        if req.return_logprob:
            lo = state.sent_out_logprobs
            out.output_token_logprobs.append(req.output_token_logprobs[lo:])
            out.output_top_logprobs.append(
                req.output_top_logprobs[lo:] if req.top_logprobs_num > 0 else []
            )
            state.sent_out_logprobs = len(req.output_token_logprobs)
            if req.input_logprobs_done and not state.sent_input_logprobs:
                state.sent_input_logprobs = True
                out.input_token_logprobs.append(list(req.input_token_logprobs))
                out.input_top_logprobs.append(list(req.input_top_logprobs))
            else:
                out.input_token_logprobs.append(None)
                out.input_top_logprobs.append(None)
        else:
            for lst in (
                out.output_token_logprobs,
                out.output_top_logprobs,
                out.input_token_logprobs,
                out.input_top_logprobs,
            ):
                lst.append(None)

    # ---- logging ------------------------------------------------------------------------------
    def log_batch(self, batch: ScheduleBatch) -> None:
        sched = self.scheduler
        if batch.forward_mode.is_extend():
            info = sched.last_batch_info
            self.stats.on_prefill(info.get("new_token", 0), info.get("cached_token", 0))
            logger.info(
                "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, "
                "token usage: %.2f, #running-req: %d, #queue-req: %d",
                info.get("new_seq", 0),
                info.get("new_token", 0),
                info.get("cached_token", 0),
                sched.token_usage(),
                len(sched.running_batch.reqs),
                len(sched.waiting_queue),
            )
            return
        self.decode_steps += 1
        self.decode_tokens_since_log += len(batch.reqs)
        self.stats.on_decode(len(batch.reqs))
        if self.decode_steps % self.decode_log_interval:
            return
        now = time.perf_counter()
        throughput = self.decode_tokens_since_log / max(now - self.last_decode_log, 1e-9)
        self.last_decode_log, self.decode_tokens_since_log = now, 0
        num_tokens = sum(r.seqlen for r in sched.running_batch.reqs)
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, "
            "gen throughput (token/s): %.2f, #queue-req: %d",
            len(sched.running_batch.reqs),
            num_tokens,
            sched.token_usage(),
            throughput,
            len(sched.waiting_queue),
        )


def run_scheduler_process(
    server_args: Any,
    port_args: Any,
    pipe: Any,
    parent_pid: int,
    placement: Optional[RankPlacement] = None,
    heartbeat: Any = None,
) -> None:
    """Process entry for one TP rank: load, report readiness through `pipe`, then serve until
    the parent exits (or TP rank 0 stops the group). Only TP rank 0 opens the ZMQ sockets.
    `heartbeat` is the shared array the main process reads for /health (None: kept local)."""
    startup = StartupTimer(since_process_start=True)
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank = TpRank(placement or RankPlacement(), server_args)
    configure_child_logging(server_args.log_level, rank.tag)
    set_process_name(f"sglang-{rank.tag.replace(' ', '')}")
    try:
        rank.setup()
    except ParallelConfigError as e:
        logger.error("%s", e)
        pipe.send({"status": "error", "error": str(e)})
        raise SystemExit(1)
    p = rank.placement
    error = None
    startup.mark("rank setup")
    try:
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.hf_transformers_utils import get_tokenizer
        from sglang.srt.model_executor.model_runner import build_model_runner

        model_config = ModelConfig.from_server_args(server_args)
        # The launcher checks the same once the ranks are spawned; a rank that reads the config
        # first must refuse here, in one line, before the TP rendezvous and the model's layers
        # (which would fail on an uneven split with a traceback, or on a peer the launcher ended).
        check_parallel_model(model_config, server_args.tp_size, server_args.pp_size)
        startup.mark("model config")
        runner = build_model_runner(server_args, model_config, p.tp_rank, p.tp_size)
        startup.extend(runner.startup.phases)
        startup.restart()
        tokenizer = None
        if not server_args.skip_tokenizer_init:
            # Every rank needs it: stop strings decide when requests finish.
            tokenizer = get_tokenizer(
                server_args.tokenizer_path,
                tokenizer_mode=server_args.tokenizer_mode,
                trust_remote_code=server_args.trust_remote_code,
            )
            startup.mark("tokenizer")
        scheduler = make_scheduler(server_args, runner, tokenizer, p.tp_size)
        if server_args.enable_step_profile:
            scheduler.clock = StepClock(True, runner.synchronize)
        recv, to_detok, to_tok = None, NullSocket(), NullSocket()
        if p.is_leader:
            ctx = zmq.Context(2)
            recv = ctx.socket(zmq.PULL)
            recv.bind(port_args.scheduler_input_ipc_name)
            to_detok = ctx.socket(zmq.PUSH)
            to_detok.connect(port_args.detokenizer_ipc_name)
            to_tok = ctx.socket(zmq.PUSH)
            to_tok.connect(port_args.tokenizer_ipc_name)
    except Exception as e:  # any load failure is reported to the parent verbatim
        if isinstance(e, (ModelLoadError, ParallelConfigError)):
            # A refusal worded for the user (a model it cannot load, a split it cannot make):
            # one line, as the launching process words the same checks, not a traceback.
            logger.error("Scheduler failed to start: %s", e)
        else:
            logger.error("Scheduler failed to start:\n%s", traceback.format_exc())
        error = f"{type(e).__name__}: {e}"
    error = rank.agree_on_startup(error)
    if error is not None:
        pipe.send({"status": "error", "error": error})
        raise SystemExit(1)
    startup.mark("scheduler")
    logger.info(startup.line(total=process_age()))
    pipe.send(
        {
            "status": "ready",
            "startup_phases": startup.phases,
            "max_total_num_tokens": scheduler.max_total_num_tokens,
            "max_running_requests": scheduler.max_running_requests,
            "max_req_input_len": min(scheduler.context_len - 1, scheduler.max_total_num_tokens - 1),
            "context_len": scheduler.context_len,
            # /get_model_info: the quantization and kernel in use (model_loader/loader.py).
            "quantization": getattr(scheduler.model_runner.model, "quant_info", None),
            "kv_cache_dtype": str(scheduler.model_runner.kv_dtype).removeprefix("torch."),
        }
    )
    control = ControlPlane(p) if p.tp_size > 1 else None
    if control is not None and p.is_leader:
        control.install_sigterm()
    proc = SchedulerProcess(
        scheduler,
        recv,
        to_detok,
        to_tok,
        stream_interval=server_args.stream_interval,
        decode_log_interval=server_args.decode_log_interval,
        parent_pid=parent_pid,
        report_first_token=server_args.enable_metrics,
        control=control,
        heartbeat=Heartbeat(heartbeat),
    )
    proc.watchdog = Watchdog(proc.heartbeat, server_args.watchdog_timeout, f"scheduler {rank.tag}")
    proc.watchdog.start()
    scheduler.before_forward = fault_hook_from_env()
    try:
        proc.event_loop()
    except Exception as e:
        peer = describe_peer_failure(e, rank.tag) if control is not None else None
        if peer is not None and control.stop_reason is not None:
            return  # told to stop, and the other ranks were stopped first: nothing went wrong
        if peer is not None:
            logger.error(peer)
        else:
            logger.error("Scheduler hit an exception:\n%s", traceback.format_exc())
        raise SystemExit(1)
