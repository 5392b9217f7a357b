"""Engine: the offline entry point, and the process launcher the HTTP server shares.

`launch_subprocesses` starts the scheduler processes (one per TP rank, per DP replica, plus the
data parallel controller under `--dp`; see rank_launcher.py) and the detokenizer (spawn context,
daemon, and each child exits on its own when its parent disappears), creates the main-process
`TokenizerManager`, and returns a `Subprocesses` handle that watches the children: if one dies
unexpectedly, its `on_death` callback runs with a message that says which and how. The handle
also reads each scheduler's heartbeat: `scheduler_stall` says which one has been stuck in a step
with work pending for longer than `--watchdog-timeout` (what `/health` reports).

`Engine(**server_args_fields)` runs a TokenizerManager on a private event loop in a background
thread, so `generate` (blocking) and `async_generate` (from any event loop) both work.
Both return the same dicts as `/generate` (see tokenizer_manager.py for the exact shapes).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.port_args import PortArgs
from sglang.srt.server_args import ServerArgs, check_gpu_extra

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0


class Subprocesses:
    """The scheduler and detokenizer processes of one server, and a watcher for their deaths."""

    def __init__(
        self,
        procs: dict[str, mp.process.BaseProcess],
        port_args: PortArgs,
        heartbeats: Optional[dict[str, Any]] = None,
    ) -> None:
        self.procs = procs
        self.port_args = port_args
        self.heartbeats = heartbeats or {}
        self.stopping = False
        self.on_death: Optional[Callable[[str], None]] = None
        self._watcher: Optional[threading.Thread] = None

    def start_watch(self, on_death: Callable[[str], None]) -> None:
        self.on_death = on_death
        self._watcher = threading.Thread(target=self._watch, name="sglang-child-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: (name, p) for name, p in self.procs.items()}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if self.stopping:
            return
        name, proc = by_sentinel[ready[0]]
        proc.join(timeout=1)
        code = proc.exitcode
        how = (
            f"was killed by signal {-code}"
            if code is not None and code < 0
            else f"exited with code {code}"
        )
        msg = f"The {name} process {how}; the server cannot continue (see its log above)."
        logger.error(msg)
        if self.on_death is not None:
            self.on_death(msg)

    def scheduler_stall(self, timeout: float) -> Optional[str]:
        """Why /health must fail: a scheduler stuck in one step with work pending, or None."""
        from sglang.srt.managers.scheduler_watchdog import stall_seconds

        for name, shared in self.heartbeats.items():
            stall = stall_seconds(shared)
            if stall > timeout:
                return (
                    f"the {name} has not finished a step for {stall:.1f} s with work pending "
                    f"(--watchdog-timeout {timeout:g})"
                )
        return None

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        self.port_args.cleanup()


def launch_subprocesses(
    server_args: ServerArgs, wait_ready: bool = True
) -> tuple[Any, Subprocesses, Any]:
    """Start the children and the TokenizerManager.

    Children: one scheduler per TP rank this node runs (times `--dp` replicas, plus the data
    parallel controller), then the detokenizer. Returns (tokenizer_manager, subprocesses,
    readiness readers). With `wait_ready` the call blocks until every rank has loaded the model
    (RuntimeError with the first error otherwise); else the caller finishes with
    `wait_scheduler_ready(tm, procs, readers)`.
    """
    from sglang.srt.entrypoints.rank_launcher import start_scheduler_ranks
    from sglang.srt.managers.detokenizer_manager import run_detokenizer_process
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.model_loader.hub import resolve_server_paths

    if server_args.node_rank > 0:
        raise ValueError(
            "nodes with --node-rank > 0 run model ranks only: start them with "
            "`python -m sglang.launch_server`, not the Engine"
        )
    check_gpu_extra(server_args)  # CUDA without Triton: one error before any child
    resolve_server_paths(server_args)  # hub ids: one download, one error, before any child
    port_args = PortArgs.init_new(server_args)
    ctx = mp.get_context("spawn")
    parent = os.getpid()
    heartbeats: dict[str, Any] = {}
    try:
        children, readers = start_scheduler_ranks(server_args, port_args, ctx, parent, heartbeats)
    except BaseException:
        port_args.cleanup()
        raise
    detokenizer = ctx.Process(
        target=run_detokenizer_process,
        args=(server_args, port_args, parent),
        name="sglang-detokenizer",
        daemon=True,
    )
    detokenizer.start()
    procs = Subprocesses({**children, "detokenizer": detokenizer}, port_args, heartbeats)
    try:
        tm = TokenizerManager(server_args, port_args)
    except BaseException:
        procs.shutdown()
        raise
    if wait_ready:
        wait_scheduler_ready(tm, procs, readers)
    return tm, procs, readers


def wait_scheduler_ready(tm: Any, procs: Subprocesses, readers: Any) -> dict[str, Any]:
    """Block until every rank reports; on failure stop everything and raise RuntimeError."""
    from sglang.srt.entrypoints.rank_launcher import wait_ranks_ready

    info, error = wait_ranks_ready(readers, procs.procs, READY_TIMEOUT_S)
    if info is None:
        tm.close()
        procs.shutdown()
        raise RuntimeError(f"Failed to start the engine: {error}")
    tm.set_scheduler_info(info)
    return info


class Engine:
    """Offline engine: `sglang.Engine(model_path=..., **server_args_fields)`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("log_level", "error")
        self.server_args = ServerArgs(**kwargs)
        logging.basicConfig(level=getattr(logging, self.server_args.log_level.upper(), 40))
        self.tokenizer_manager, self._procs, _ = launch_subprocesses(self.server_args)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sglang-engine-loop", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._procs.start_watch(self._on_child_death)
        atexit.register(self.shutdown)

    def _on_child_death(self, msg: str) -> None:
        self._loop.call_soon_threadsafe(self.tokenizer_manager.set_dead, msg)

    # ---- requests ------------------------------------------------------------------------------
    @staticmethod
    def _make_input(
        prompt: Optional[Union[str, list[str]]],
        sampling_params: Optional[Union[dict, list[dict]]],
        input_ids: Optional[Union[list[int], list[list[int]]]],
        stream: bool,
        kwargs: dict[str, Any],
    ) -> GenerateReqInput:
        """The request; refused kwargs raise as on /generate (request_fields.py): ValueError for
        upstream fields not implemented here, TypeError for names no version knows."""
        from sglang.srt.entrypoints.request_fields import screen_engine_kwargs

        return GenerateReqInput(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            stream=stream,
            **screen_engine_kwargs(kwargs),
        )

    def _generate_request(
        self,
        prompt: Optional[Union[str, list[str]]],
        sampling_params: Optional[Union[dict, list[dict]]],
        input_ids: Optional[Union[list[int], list[list[int]]]],
        stream: bool,
        kwargs: dict[str, Any],
    ) -> AsyncIterator[Any]:
        """The tokenizer manager's generator for one generate call (sync and async share it)."""
        return self.tokenizer_manager.generate_request(
            self._make_input(prompt, sampling_params, input_ids, stream, kwargs)
        )

    def generate(
        self,
        prompt: Optional[Union[str, list[str]]] = None,
        sampling_params: Optional[Union[dict, list[dict]]] = None,
        input_ids: Optional[Union[list[int], list[list[int]]]] = None,
        return_logprob: Union[bool, list[bool]] = False,
        logprob_start_len: Union[int, list[int]] = -1,
        top_logprobs_num: Union[int, list[int]] = 0,
        stream: bool = False,
        **kwargs: Any,
    ) -> Union[dict, list[dict], Iterator[dict]]:
        """Same dicts as /generate; a list for list input; an iterator of dicts when streaming."""
        kwargs.update(
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
        )
        agen = self._generate_request(prompt, sampling_params, input_ids, stream, kwargs)
        if stream:
            return self._sync_stream(agen)
        return self._run(_first(agen))

    async def async_generate(
        self,
        prompt: Optional[Union[str, list[str]]] = None,
        sampling_params: Optional[Union[dict, list[dict]]] = None,
        input_ids: Optional[Union[list[int], list[list[int]]]] = None,
        return_logprob: Union[bool, list[bool]] = False,
        logprob_start_len: Union[int, list[int]] = -1,
        top_logprobs_num: Union[int, list[int]] = 0,
        stream: bool = False,
        **kwargs: Any,
    ) -> Union[dict, list[dict], AsyncIterator[dict]]:
        """Awaitable dict (or list); with stream=True an async iterator of dicts."""
        kwargs.update(
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
        )
        agen = self._generate_request(prompt, sampling_params, input_ids, stream, kwargs)
        if stream:
            return self._async_stream(agen)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_first(agen), self._loop))

    def _run(self, coro: Any) -> Any:
        if self._closed:
            coro.close()
            raise RuntimeError("the engine has been shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _sync_stream(self, agen: AsyncIterator[dict]) -> Iterator[dict]:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                # An abandoned iterator aborts its request (the generator's finally sends it).
                self._run(agen.aclose())

    async def _async_stream(self, agen: AsyncIterator[dict]) -> AsyncIterator[dict]:
        try:
            while True:
                fut = asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop)
                try:
                    yield await asyncio.wrap_future(fut)
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop)
                )

    # ---- control -------------------------------------------------------------------------------
    def flush_cache(self) -> bool:
        return self._run(self.tokenizer_manager.flush_cache()).success

    def get_load(self, check_memory: bool = False) -> list[Any]:
        """One GetLoadResp per DP rank (`dp_rank`, `num_reqs`, `num_tokens`, ...)."""
        from sglang.srt.managers.data_parallel_controller import get_loads

        return self._run(get_loads(self.tokenizer_manager, check_memory))

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self._loop.call_soon_threadsafe(self.tokenizer_manager.abort_request, rid, abort_all)

    def get_server_info(self) -> dict[str, Any]:
        info = self.server_args.to_dict()
        info.update(
            max_total_num_tokens=self.tokenizer_manager.max_total_num_tokens,
            max_req_input_len=self.tokenizer_manager.max_req_input_len,
        )
        return info

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._procs.shutdown()
        try:
            asyncio.run_coroutine_threadsafe(self.tokenizer_manager.aclose(), self._loop).result(5)
        except Exception:  # the loop may already be gone; the sockets die with the process
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        atexit.unregister(self.shutdown)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


async def _first(agen: AsyncIterator[Any]) -> Any:
    """The one item a non-streaming generate_request yields."""
    result = None
    async for item in agen:
        result = item
    return result
