"""Data parallelism: one controller process in front of `--dp` independent scheduler replicas.

The controller binds the socket the TokenizerManager sends to and owns request routing:
- generation requests go to one replica, chosen by `--load-balance-method` (`LoadBalancer`):
  `round_robin`, or the replica with the fewest `total_requests` / `total_tokens`, estimated from
  the replicas' last load reports (polled every `LOAD_POLL_S` while requests arrive) plus what was
  sent to them since;
- aborts go to every replica (a replica without the rid ignores it);
- control messages (flush, load, health, metrics gauges) go to every replica; the controller
  gathers one answer per replica (each replica answers on its own socket, in order) and sends the
  TokenizerManager a single combined answer. `GetLoadsReq` is the per-replica form behind
  `/get_load` (`get_loads`).
Outputs do not pass through here: every replica's TP rank 0 pushes to the shared detokenizer.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from sglang.srt.managers.io_struct import (
    AbortReq,
    FlushCacheReq,
    FlushCacheResp,
    GetLoadReq,
    GetLoadResp,
    GetSchedulerStatsReq,
    HealthCheckReq,
    HealthCheckResp,
    SchedulerStats,
    TokenizedGenerateReqInput,
    recv_all_nowait,
    send_msg,
)

logger = logging.getLogger(__name__)

LOAD_POLL_S = 0.05  # how often replica loads are refreshed while requests arrive
ACTIVE_WINDOW_S = 2.0  # keep polling this long after the last request
PARENT_CHECK_MS = 1000


@dataclass
class GetLoadsReq:
    """Each replica's load (`/get_load`, `Engine.get_load`)."""

    check_memory: bool = False


@dataclass
class GetLoadsResp:
    loads: list[GetLoadResp]


async def get_loads(tokenizer_manager: Any, check_memory: bool = False) -> list[GetLoadResp]:
    """One `GetLoadResp` per DP rank (a single one without data parallelism)."""
    if tokenizer_manager.server_args.dp_size == 1:
        return [await tokenizer_manager.get_load(check_memory)]
    resp = await tokenizer_manager._request(GetLoadsReq(check_memory), GetLoadsResp)
    return resp.loads


# ---------------------------------------------------------------------------------- balancing


class LoadBalancer:
    """Picks a replica per request. Estimates are last report + what was sent since its poll."""

    def __init__(self, method: str, dp_size: int) -> None:
        self.method = method
        self.dp_size = dp_size
        self.next_rr = 0
        self.reported = [0] * dp_size  # load in the last report (requests or tokens)
        self.sent = [0] * dp_size  # everything sent so far, in the method's unit
        self.sent_at_report = [0] * dp_size  # `sent` when the last reported poll went out

    def cost(self, req: TokenizedGenerateReqInput) -> int:
        return len(req.input_ids) if self.method == "total_tokens" else 1

    def estimate(self, i: int) -> int:
        return self.reported[i] + self.sent[i] - self.sent_at_report[i]

    def pick(self, req: TokenizedGenerateReqInput) -> int:
        if self.method == "round_robin":
            choice = self.next_rr
        else:
            # Ties go to the replica next in round-robin order, so equal loads still alternate.
            choice = min(
                range(self.dp_size),
                key=lambda i: (self.estimate(i), (i - self.next_rr) % self.dp_size),
            )
        self.next_rr = (choice + 1) % self.dp_size
        self.sent[choice] += self.cost(req)
        return choice

    def on_report(self, i: int, load: GetLoadResp, sent_when_polled: int) -> None:
        # NOTE: a replica reads requests and polls from one socket in order, so the report
        # covers exactly what was sent before the poll.
        self.reported[i] = load.num_tokens if self.method == "total_tokens" else load.num_reqs
        self.sent_at_report[i] = sent_when_polled


# ---------------------------------------------------------------------------------- gathering


@dataclass
class _Gather:
    request: Any  # what the TokenizerManager sent; None for the controller's own load poll
    answers: list[Any]
    sent_when_polled: list[int] = field(default_factory=list)

    def done(self) -> bool:
        return all(a is not None for a in self.answers)


def combine(request: Any, answers: list[Any]) -> Any:
    """The single answer the TokenizerManager expects for `request`, from one per replica."""
    if isinstance(request, GetLoadsReq):
        return GetLoadsResp([dataclasses.replace(a, dp_rank=i) for i, a in enumerate(answers)])
    if isinstance(request, GetLoadReq):
        errors = [f"DP{i}: {a.memory_error}" for i, a in enumerate(answers) if a.memory_error]
        return GetLoadResp(
            0,
            sum(a.num_reqs for a in answers),
            sum(a.num_waiting_reqs for a in answers),
            sum(a.num_tokens for a in answers),
            sum(a.token_usage for a in answers) / len(answers),
            "; ".join(errors) or None,
        )
    if isinstance(request, FlushCacheReq):
        failed = [f"DP{i}: {a.message}" for i, a in enumerate(answers) if not a.success]
        return FlushCacheResp(not failed, "; ".join(failed) or answers[0].message)
    if isinstance(request, HealthCheckReq):
        return HealthCheckResp(ok=all(a.ok for a in answers))
    if isinstance(request, GetSchedulerStatsReq):
        n = len(answers)
        return SchedulerStats(
            num_running_reqs=sum(a.num_running_reqs for a in answers),
            num_queue_reqs=sum(a.num_queue_reqs for a in answers),
            num_used_tokens=sum(a.num_used_tokens for a in answers),
            token_usage=sum(a.token_usage for a in answers) / n,
            gen_throughput=sum(a.gen_throughput for a in answers),
            cache_hit_rate=sum(a.cache_hit_rate for a in answers) / n,
        )
    raise TypeError(f"no way to combine answers to {type(request).__name__}")


_CONTROL_TYPES = (GetLoadsReq, GetLoadReq, FlushCacheReq, HealthCheckReq, GetSchedulerStatsReq)


class DataParallelController:
    def __init__(
        self, server_args: Any, port_args: Any, replica_port_args: list[Any], parent_pid: int
    ) -> None:
        self.dp_size = server_args.dp_size
        self.parent_pid = parent_pid
        self.balancer = LoadBalancer(server_args.load_balance_method, self.dp_size)
        self.ctx = zmq.Context(2)
        self.recv_from_tokenizer = self.ctx.socket(zmq.PULL)
        self.recv_from_tokenizer.bind(port_args.scheduler_input_ipc_name)
        self.send_to_tokenizer = self.ctx.socket(zmq.PUSH)
        self.send_to_tokenizer.connect(port_args.tokenizer_ipc_name)
        self.to_replica: list[zmq.Socket] = []
        self.from_replica: list[zmq.Socket] = []
        self.poller = zmq.Poller()
        self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)
        for rp in replica_port_args:
            push = self.ctx.socket(zmq.PUSH)
            push.connect(rp.scheduler_input_ipc_name)
            pull = self.ctx.socket(zmq.PULL)
            pull.bind(rp.tokenizer_ipc_name)  # the replica's control answers come here
            self.poller.register(pull, zmq.POLLIN)
            self.to_replica.append(push)
            self.from_replica.append(pull)
        self.waiting: list[collections.deque[_Gather]] = [
            collections.deque() for _ in range(self.dp_size)
        ]
        self.gathers: collections.deque[_Gather] = collections.deque()
        self.last_request = float("-inf")
        self.last_poll = float("-inf")
        self.polling = False

    # ---- loop ----------------------------------------------------------------------------------
    def event_loop(self) -> None:
        while True:
            for msg in recv_all_nowait(self.recv_from_tokenizer):
                self.handle(msg)
            for i, sock in enumerate(self.from_replica):
                for answer in recv_all_nowait(sock):
                    self.on_answer(i, answer)
            self.maybe_poll_loads()
            active = time.monotonic() - self.last_request < ACTIVE_WINDOW_S
            if not self.poller.poll(LOAD_POLL_S * 1000 if active else PARENT_CHECK_MS):
                if os.getppid() != self.parent_pid:
                    logger.info("parent process exited; data parallel controller stops")
                    return

    def handle(self, msg: Any) -> None:
        if isinstance(msg, TokenizedGenerateReqInput):
            self.last_request = time.monotonic()
            send_msg(self.to_replica[self.balancer.pick(msg)], msg)
        elif isinstance(msg, AbortReq):
            for sock in self.to_replica:
                send_msg(sock, msg)
        elif isinstance(msg, _CONTROL_TYPES):
            forward = GetLoadReq(msg.check_memory) if isinstance(msg, GetLoadsReq) else msg
            self.fan_out(_Gather(msg, [None] * self.dp_size), forward)
        else:
            logger.error("data parallel controller got an unknown message %r", type(msg).__name__)

    def fan_out(self, gather: _Gather, msg: Any) -> None:
        self.gathers.append(gather)
        for i, sock in enumerate(self.to_replica):
            self.waiting[i].append(gather)
            send_msg(sock, msg)

    def on_answer(self, i: int, answer: Any) -> None:
        if not self.waiting[i]:
            logger.error("DP%d sent an unexpected %s", i, type(answer).__name__)
            return
        gather = self.waiting[i].popleft()
        gather.answers[i] = answer
        if gather.request is None:
            self.balancer.on_report(i, answer, gather.sent_when_polled[i])
        # Answers go back in request order (the TokenizerManager matches them first-in first-out).
        while self.gathers and self.gathers[0].done():
            done = self.gathers.popleft()
            if done.request is None:
                self.polling = False
            else:
                send_msg(self.send_to_tokenizer, combine(done.request, done.answers))

    def maybe_poll_loads(self) -> None:
        if self.balancer.method == "round_robin" or self.polling:
            return
        now = time.monotonic()
        if now - self.last_request > ACTIVE_WINDOW_S or now - self.last_poll < LOAD_POLL_S:
            return
        self.polling, self.last_poll = True, now
        gather = _Gather(None, [None] * self.dp_size, list(self.balancer.sent))
        self.fan_out(gather, GetLoadReq(check_memory=False))


def run_data_parallel_controller_process(
    server_args: Any, port_args: Any, replica_port_args: list[Any], parent_pid: int
) -> None:
    """Process entry; exits when its parent does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=getattr(logging, server_args.log_level.upper(), logging.INFO),
        format="[%(asctime)s DP controller] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )
    controller = DataParallelController(server_args, port_args, replica_port_args, parent_pid)
    logger.info(
        "routing requests to %d replicas (%s)", server_args.dp_size, server_args.load_balance_method
    )
    controller.event_loop()
