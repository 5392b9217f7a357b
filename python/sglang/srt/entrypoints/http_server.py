"""The HTTP server: FastAPI routes over a TokenizerManager, served by uvicorn on uvloop.

Owns the native routes (docs/compat.md: health, model/server info, load, `/generate` with SSE,
flush, abort, models, tokenize, `/metrics` with --enable-metrics), the error body and status
mapping (validation -> 400, missing API key -> 401, unknown route 404, body over the cap 413),
and the startup sequence: start the
children, serve HTTP at once (health answers 503), wait for the model, run the warm-up
generation, then log how long each start-up phase took (startup_timing.py) and the ready line,
and answer 200.
OpenAI routes come from `sglang.srt.entrypoints.openai.api.register_openai_routes` when present,
the attention viewer's (`GET /attention`, with --return-attention-tokens) from attention_viewer.py.
If a child process dies or the model fails to load, the server stops with a non-zero exit code;
how requests in flight end then, and on SIGTERM, is http_lifecycle.py's. Failed requests answer
with the status their error carries (request_errors.py: 500, or 503 with Retry-After); a client
that disconnected gets nothing built for it and no traceback is logged.
On nodes with `--node-rank > 0` the command runs only model ranks (`rank_launcher.run_worker_node`).
Request bodies are read by http_body.py (size cap, JSON, the schemas in /openapi.json) and
screened by request_fields.py / native_protocol.py (docs/request_fields.md); long prompts are
tokenized and detokenized off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglang.srt.entrypoints.attention_viewer import PAGE_PATH as VIEWER_PAGE_PATH
from sglang.srt.entrypoints.attention_viewer import register_attention_viewer
from sglang.srt.entrypoints.http_body import (
    BodyError,
    BodySizeLimit,
    install_openapi,
    json_body,
    read_json_object,
)
from sglang.srt.entrypoints.http_lifecycle import DrainingServer, on_child_death
from sglang.srt.entrypoints.native_protocol import (
    AbortRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
    parse_generate_body,
)
from sglang.srt.entrypoints.openai.protocol import format_validation_error
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.request_errors import ClientDisconnected, error_headers, error_status
from sglang.srt.managers.step_profile import timed_chunks
from sglang.srt.server_args import ServerArgs
from sglang.srt.startup_timing import StartupTimer, format_phases, process_age

logger = logging.getLogger(__name__)

READY_LINE = "The server is fired up and ready to roll!"
WARMUP_PROMPT = "The capital city of France is"
# A scrape waits this long for the scheduler's gauges before serving the previous values.
METRICS_STATS_TIMEOUT_S = 5.0


def error_body(message: str, status: int = 400, err_type: str = "BadRequestError") -> dict:
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": status}


class ServerState:
    """What the routes share: the tokenizer manager, readiness, the exit code to leave with."""

    def __init__(self, server_args: ServerArgs, tokenizer_manager: Any) -> None:
        self.server_args = server_args
        self.tm = tokenizer_manager
        self.ready = False
        self.exit_code = 0
        self.uvicorn_server: Any = None
        self.startup_task: Optional[asyncio.Task] = None
        self.procs: Any = None  # engine.Subprocesses: heartbeats for /health
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.accepting = True  # False once SIGTERM draining began

    def unhealthy_reason(self) -> Optional[str]:
        if not self.ready:
            return "the server is starting"
        if self.tm.dead_reason is not None:
            return self.tm.dead_reason
        if not self.accepting:
            return "the server is shutting down"
        if self.procs is not None:
            return self.procs.scheduler_stall(self.server_args.watchdog_timeout)
        return None

    def fail(self, message: str, log: bool = True) -> None:
        """Stop serving and exit non-zero (called from any thread)."""
        if log:
            logger.error(message)
        self.exit_code = 1
        if self.uvicorn_server is not None:
            self.uvicorn_server.should_exit = True


def build_app(state: ServerState, lifespan: Any = None) -> Any:
    app = FastAPI(lifespan=lifespan)
    args, tm = state.server_args, state.tm

    def bad_request(message: str, status: int = 400) -> JSONResponse:
        err_type = "BadRequestError" if status == 400 else "ServiceUnavailableError"
        return JSONResponse(error_body(message, status, err_type), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(_describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes (404), wrong methods (405) and bodies over the cap (413) keep their
        # status but carry the OpenAI error body like every other error.
        err_type = _HTTP_ERROR_TYPES.get(exc.status_code) or _err_type(exc.status_code)
        body = error_body(str(exc.detail), exc.status_code, err_type)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    if args.api_key:

        @app.middleware("http")
        async def _check_api_key(request: Request, call_next: Any) -> Any:
            # The viewer page holds no data; its own requests carry the key.
            open_path = request.url.path.startswith("/health") or (
                request.method == "GET" and request.url.path == VIEWER_PAGE_PATH
            )
            if not open_path:
                if request.headers.get("authorization") != f"Bearer {args.api_key}":
                    body = error_body(
                        "Unauthorized: missing or wrong API key", 401, "AuthenticationError"
                    )
                    return JSONResponse(body, status_code=401)
            return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        reason = state.unhealthy_reason()
        if reason is None:
            return Response(status_code=200)
        return Response(content=reason + "\n", status_code=503)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        if state.unhealthy_reason() is not None:
            return Response(status_code=503)
        obj = GenerateReqInput(
            input_ids=[0] if tm.tokenizer is None else None,
            text=WARMUP_PROMPT if tm.tokenizer is not None else None,
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            rid=f"HEALTH_CHECK_{time.time_ns()}",
        )
        try:
            async for _ in tm.generate_request(obj, request):
                pass
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as e:
            logger.error("health_generate failed: %s", e)
            return Response(status_code=503)
        return Response(status_code=200)

    def model_info() -> dict[str, Any]:
        return {
            "model_path": args.model_path,
            "tokenizer_path": args.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            # Additions (docs/quantization.md): the weights' quantization and matmul kernel
            # (null for dense weights) and the KV cache's element dtype.
            "quantization": getattr(tm, "quantization_info", None),
            "kv_cache_dtype": getattr(tm, "kv_cache_dtype", None),
        }

    def server_info() -> dict[str, Any]:
        from sglang import __version__

        info = args.to_dict()
        info.update(
            max_total_num_tokens=tm.max_total_num_tokens,
            max_req_input_len=tm.max_req_input_len,
            context_len=tm.context_len,
            version=__version__,
        )
        return info

    for path in ("/get_model_info", "/model_info"):
        app.add_api_route(path, model_info, methods=["GET"])
    for path in ("/get_server_info", "/server_info"):
        app.add_api_route(path, server_info, methods=["GET"])

    async def get_load(check_memory: bool = False) -> Any:
        """Each DP rank's load; with `?check_memory=true` an idle rank also verifies its KV
        accounting and reports `memory_error` (null when free + evictable + locked == total)."""
        from sglang.srt.managers.data_parallel_controller import get_loads

        loads = await get_loads(tm, check_memory)
        if not check_memory:
            return [load.to_json() for load in loads]
        return [{**load.to_json(), "memory_error": load.memory_error} for load in loads]

    for path in ("/get_load", "/v1/loads"):
        app.add_api_route(path, get_load, methods=["GET"])

    async def flush_cache() -> Response:
        resp = await tm.flush_cache()
        status = 200 if resp.success else 400
        return Response(content=resp.message + "\n", status_code=status)

    app.add_api_route("/flush_cache", flush_cache, methods=["GET", "POST"])

    async def step_profile(reset: bool = False) -> Any:
        """Per-stage time of every served step (--enable-step-profile; docs/step_profile.md)."""
        store = getattr(tm, "step_profile", None)
        if store is None:
            return bad_request("/step_profile needs a server started with --enable-step-profile")
        summary = store.summary()
        if reset:
            store.reset()
        return summary

    app.add_api_route("/step_profile", step_profile, methods=["GET"])

    @app.post("/abort_request", openapi_extra=json_body(AbortRequest))
    async def abort_request(request: Request) -> Response:
        body = await _json_body(request, AbortRequest)
        if isinstance(body, JSONResponse):
            return body
        tm.abort_request(body.rid, body.abort_all)
        return Response(status_code=200)

    @app.post("/generate", openapi_extra=json_body(GenerateRequest))
    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            obj = parse_generate_body(body)
        except ValueError as e:
            return bad_request(str(e))
        gen = tm.generate_request(obj, request)
        try:
            first = await gen.__anext__()
        except ValueError as e:
            return bad_request(str(e))
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it: client closed request
        except RuntimeError as e:
            status = error_status(e, 503)
            body = error_body(str(e), status, _err_type(status))
            return JSONResponse(body, status_code=status, headers=error_headers(e))
        except StopAsyncIteration:
            return bad_request("the request produced no output", 500)
        if not obj.stream:
            await gen.aclose()
            return JSONResponse(first)
        chunks = timed_chunks(_sse(first, gen), getattr(tm, "step_profile", None))
        return StreamingResponse(chunks, media_type="text/event-stream")

    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    def model_card(model_id: Optional[str] = None) -> Any:
        if model_id is not None and model_id != args.served_model_name:
            served = args.served_model_name
            message = f"The model {model_id!r} does not exist; this server serves {served!r}"
            return JSONResponse(error_body(message, 404, "NotFoundError"), status_code=404)
        return {
            "id": args.served_model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sglang",
            "root": args.served_model_name,
            "max_model_len": tm.context_len,
        }

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", model_card, methods=["GET"])

    if getattr(tm, "metrics", None) is not None:

        @app.get("/metrics")
        async def metrics() -> Response:
            try:
                stats = await asyncio.wait_for(tm.get_scheduler_stats(), METRICS_STATS_TIMEOUT_S)
                tm.metrics.set_scheduler_stats(stats)
            except (asyncio.TimeoutError, RuntimeError) as e:
                logger.warning("/metrics: scheduler gauges unavailable (%s)", e or "timeout")
            body, content_type = tm.metrics.render()
            return Response(content=body, media_type=content_type)

    @app.post("/v1/tokenize", openapi_extra=json_body(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        body = await _json_body(request, TokenizeRequest)
        if isinstance(body, JSONResponse):
            return body
        if tm.tokenizer is None:
            return bad_request("this server runs with --skip-tokenizer-init: it cannot tokenize")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt

        def encode() -> list[list[int]]:
            return [
                tm.tokenizer.encode(p, add_special_tokens=body.add_special_tokens) for p in prompts
            ]

        tokens = await _maybe_offload(encode, sum(map(len, prompts)))
        if isinstance(body.prompt, str):
            out = {"tokens": tokens[0], "count": len(tokens[0])}
        else:
            out = {"tokens": tokens, "count": [len(t) for t in tokens]}
        return JSONResponse({**out, "max_model_len": tm.context_len})

    @app.post("/v1/detokenize", openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        body = await _json_body(request, DetokenizeRequest)
        if isinstance(body, JSONResponse):
            return body
        if tm.tokenizer is None:
            return bad_request("this server runs with --skip-tokenizer-init: it cannot detokenize")
        single = not body.tokens or isinstance(body.tokens[0], int)
        lists = [body.tokens] if single else body.tokens
        vocab = tm.model_config.vocab_size
        if any(t < 0 or t >= vocab for ids in lists for t in ids):
            return bad_request(f"tokens: token ids must be in [0, {vocab})")
        texts = await _maybe_offload(
            lambda: [tm.tokenizer.decode(ids) for ids in lists], sum(map(len, lists))
        )
        return JSONResponse({"text": texts[0] if single else texts})

    try:
        from sglang.srt.entrypoints.openai.api import register_openai_routes
    except ImportError:
        register_openai_routes = None
    if register_openai_routes is not None:
        register_openai_routes(app, tm)
        register_attention_viewer(app, tm, args)
    install_openapi(app)
    # Outermost, so an oversized body is refused before anything reads it.
    app.add_middleware(BodySizeLimit)
    return app


async def _json_body(request: Any, model: Any = None) -> Any:
    """The body as a dict (or validated `model`), or the 400 JSONResponse to answer instead."""
    try:
        body = await read_json_object(request)
        return body if model is None else model.model_validate(body)
    except BodyError as e:
        return JSONResponse(error_body(str(e)), status_code=400)
    except ValidationError as e:
        return JSONResponse(error_body(format_validation_error(e)), status_code=400)


_HTTP_ERROR_TYPES = {
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
}
# Work on this many prompt characters or token ids runs in a worker thread, off the event loop.
_OFFLOAD_SIZE = 4096


async def _maybe_offload(fn: Any, size: int) -> Any:
    return await asyncio.to_thread(fn) if size > _OFFLOAD_SIZE else fn()


def _err_type(status: int) -> str:
    if status == 503:
        return "ServiceUnavailableError"
    return "BadRequestError" if status < 500 else "InternalServerError"


async def _sse(first: Any, gen: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        yield b"data: " + json.dumps(first).encode() + b"\n\n"
        async for out in gen:
            yield b"data: " + json.dumps(out).encode() + b"\n\n"
    except ClientDisconnected:
        return  # aborted; there is no one to send the end of the stream to
    except (ValueError, RuntimeError) as e:
        status = error_status(e, 400 if isinstance(e, ValueError) else 500)
        body = error_body(str(e), status, _err_type(status))
        yield b"data: " + json.dumps({"error": body}).encode() + b"\n\n"
    finally:
        # On client disconnect Starlette cancels us; closing the generator aborts the request.
        await gen.aclose()
    yield b"data: [DONE]\n\n"


def _describe_validation(exc: Any) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


async def _startup(state: ServerState, procs: Any, reader: Any, startup: StartupTimer) -> None:
    """Wait for the scheduler, warm up, log the start-up phase times, declare the server ready."""
    from sglang.srt.entrypoints.engine import wait_scheduler_ready

    try:
        info = await asyncio.to_thread(wait_scheduler_ready, state.tm, procs, reader)
    except RuntimeError as e:
        state.fail(str(e))
        return
    model_phases = format_phases(info.get("startup_phases") or [])
    startup.mark(f"wait for the model process ({model_phases})")
    procs.start_watch(lambda msg: on_child_death(state, msg))
    if not state.server_args.skip_server_warmup:
        obj = GenerateReqInput(
            text=WARMUP_PROMPT if state.tm.tokenizer is not None else None,
            input_ids=[0, 1, 2] if state.tm.tokenizer is None else None,
            sampling_params={"max_new_tokens": 8, "temperature": 0.0},
        )
        try:
            async for _ in state.tm.generate_request(obj):
                pass
        except Exception as e:
            state.fail(f"Warm-up generation failed: {type(e).__name__}: {e}")
            return
        startup.mark("warm-up")
    logger.info(startup.line(total=process_age()))
    state.ready = True
    logger.info(READY_LINE)


def launch_server(server_args: ServerArgs) -> int:
    """Run the server until SIGTERM/SIGINT or a fatal error; returns the process exit code."""
    import uvicorn

    from sglang.srt.entrypoints.engine import launch_subprocesses

    logging.basicConfig(
        level=getattr(logging, server_args.log_level.upper(), logging.INFO),
        format="[%(asctime)s] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )
    startup = StartupTimer(since_process_start=True)
    tm, procs, reader = launch_subprocesses(server_args, wait_ready=False)
    startup.mark("start processes and tokenizer")
    state = ServerState(server_args, tm)
    state.procs = procs

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.startup_task = asyncio.create_task(_startup(state, procs, reader, startup))
        yield
        state.startup_task.cancel()

    try:
        app = build_app(state, lifespan)

        config = uvicorn.Config(
            app,
            host=server_args.host,
            port=server_args.port,
            loop="uvloop",
            log_level=(server_args.log_level_http or server_args.log_level).lower(),
            timeout_keep_alive=5,
            timeout_graceful_shutdown=3,
        )
        server = DrainingServer(config, state)
        state.uvicorn_server = server
        # uvicorn re-raises the signal that stopped it once it is done; a no-op handler lets
        # that happen without killing us before the children are stopped below.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run()
        if not server.started and state.exit_code == 0:
            state.exit_code = 1  # e.g. the port was taken
    finally:
        procs.shutdown()
    return state.exit_code


def main_from_argv(argv: Optional[list[str]] = None) -> None:
    from sglang.srt.distributed.placement import ParallelConfigError
    from sglang.srt.layers.attention import TritonMissingError
    from sglang.srt.model_loader.resolve import ModelLoadError
    from sglang.srt.server_args import check_gpu_extra, prepare_server_args

    server_args = prepare_server_args(argv)
    try:
        check_gpu_extra(server_args)
        if server_args.node_rank > 0:
            from sglang.srt.entrypoints.rank_launcher import run_worker_node

            code = run_worker_node(server_args)
        else:
            code = launch_server(server_args)
    except ParallelConfigError as e:
        logger.error("%s", e)
        code = 1
    except (ModelLoadError, TritonMissingError) as e:
        # A model that cannot be used is a bad --model-path, a GPU without Triton a bad install:
        # one line and exit 2, like argparse.
        print(f"python -m sglang.launch_server: error: {e}", file=sys.stderr, flush=True)
        code = 2
    # Skip interpreter teardown hooks that could wait on half-closed sockets.
    logging.shutdown()
    os._exit(code)
