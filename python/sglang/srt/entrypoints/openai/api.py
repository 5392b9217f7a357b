"""HTTP routes of the OpenAI-compatible API: POST /v1/completions and /v1/chat/completions.

The HTTP server calls `register_openai_routes(app, tokenizer_manager)` once at startup. Bodies are
parsed here rather than by FastAPI so every client mistake (malformed JSON or a lone surrogate:
http_body.py; a field the policy refuses: request_fields.py; a failed pydantic check; a ValueError
from conversion or from the TokenizerManager) becomes the docs/compat.md error body with status
400 instead of FastAPI's 422; the request models are published in /openapi.json all the same.
Streams are primed up to their first event before the response starts, so a request the engine
rejects still gets a 400 rather than a broken 200 stream.
A request the server fails answers with its error's status (500, or 503 with Retry-After: see
managers/request_errors.py); one whose client disconnected is dropped without a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from sglang.srt.entrypoints.http_body import json_body, read_json_object
from sglang.srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    format_validation_error,
)
from sglang.srt.entrypoints.openai.serving_base import error_body
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from sglang.srt.entrypoints.request_fields import policy_for, screen_fields
from sglang.srt.managers.request_errors import (
    ClientDisconnected,
    RequestFailed,
    error_headers,
)
from sglang.srt.managers.step_profile import timed_chunks

logger = logging.getLogger(__name__)


def error_response(message: str, code: int = 400) -> JSONResponse:
    return JSONResponse(error_body(message, code), status_code=code)


def register_openai_routes(app: FastAPI, tokenizer_manager: Any) -> None:
    """Add the OpenAI completion routes to `app`, serving through `tokenizer_manager`."""
    completions = OpenAIServingCompletion(tokenizer_manager)
    chat = OpenAIServingChat(tokenizer_manager)

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def openai_v1_completions(raw_request: Request) -> Response:
        return await serve(completions, CompletionRequest, raw_request, "/v1/completions")

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def openai_v1_chat_completions(raw_request: Request) -> Response:
        return await serve(chat, ChatCompletionRequest, raw_request, "/v1/chat/completions")


async def serve(
    serving: Any, model_cls: type[BaseModel], raw_request: Request, route: str
) -> Response:
    """Parse, screen (request_fields.py), validate and run one request against a serving object."""
    try:
        body = await read_json_object(raw_request)
        request = model_cls.model_validate(screen_fields(body, policy_for(route)))
    except ValidationError as exc:
        return error_response(format_validation_error(exc))
    except ValueError as exc:  # BodyError, or a field the policy refuses
        return error_response(str(exc))

    try:
        result = await serving.create(request, raw_request)
        if isinstance(result, BaseModel):
            return Response(content=result.model_dump_json(), media_type="application/json")
        first = await anext(result)
    except ValueError as exc:
        return error_response(str(exc))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it: client closed request
    except RequestFailed as exc:
        body = error_body(str(exc), exc.status_code, exc.err_type)
        return JSONResponse(body, status_code=exc.status_code, headers=error_headers(exc))
    except Exception as exc:
        logger.exception("OpenAI request failed")
        return error_response(f"{type(exc).__name__}: {exc}", 500)
    profile = getattr(serving.tokenizer_manager, "step_profile", None)
    chunks = timed_chunks(_resume(first, result), profile)
    return StreamingResponse(chunks, media_type="text/event-stream")


async def _resume(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        yield first
        async for line in rest:
            yield line
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
