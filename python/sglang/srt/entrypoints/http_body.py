"""HTTP request bodies: the size cap, JSON parsing, and the request schemas in /openapi.json.

- `BodySizeLimit` (ASGI middleware) answers 413 before a route sees a body larger than
  `SGLANG_MAX_REQUEST_BODY_BYTES` (default 32 MiB): at once when Content-Length says so, or as soon
  as a chunked body passes the cap. The rest of the body is read and dropped (up to 4x the cap) so
  the client, still sending, gets the 413 instead of a reset connection.
- `read_json_object` parses a body into a dict or raises `BodyError` (HTTP 400) for invalid UTF-8,
  malformed JSON, NaN/Infinity, nesting too deep, a non-object, and lone UTF-16 surrogates
  (`"\\ud800"`), which Python's json accepts but no tokenizer can encode. Bodies over 1 MiB are
  parsed in a worker thread so a big request does not stall the event loop.
- `json_body(model)` is a route's `openapi_extra` declaring `model` as its request body;
  `install_openapi(app)` adds every declared model to the schema's components. Routes parse bodies
  themselves (for the errors above and the field policy of request_fields.py), so FastAPI does not
  see the models as parameters.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from typing import Any, Callable

from starlette.exceptions import HTTPException

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_BODY_BYTES = int(os.environ.get("SGLANG_MAX_REQUEST_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))
# Bodies this large are parsed off the event loop (json.loads of 30 MB takes ~0.3 s).
PARSE_OFFLOAD_BYTES = 1024 * 1024
# A refused body is drained up to this many bytes; beyond it the connection is just closed.
DRAIN_FACTOR = 4


class BodyError(ValueError):
    """A body that is not a JSON object this server can read (HTTP 400)."""


def too_large_message(limit: int) -> str:
    return (
        f"The request body is larger than {limit} bytes (SGLANG_MAX_REQUEST_BODY_BYTES); "
        "send a smaller request"
    )


class BodySizeLimit:
    """Pure ASGI middleware: 413 for bodies over `max_bytes` (0 disables the cap)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = _content_length(headers.get(b"content-length"))
        if declared is not None and declared > self.max_bytes:
            # With `Expect: 100-continue` the client waits for us and sends nothing on a 413.
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive, self.max_bytes * DRAIN_FACTOR)
            await _send_413(send, self.max_bytes)
            return
        seen = 0

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body"):
                        await _drain(receive, self.max_bytes * DRAIN_FACTOR - seen)
                    # Raised inside the route; the app's HTTPException handler answers it.
                    raise HTTPException(413, too_large_message(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)


def _content_length(raw: bytes | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


async def _drain(receive: Callable, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def _send_413(send: Callable, limit: int) -> None:
    body = json.dumps(_error(too_large_message(limit), 413, "RequestTooLargeError")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error(message: str, code: int, err_type: str) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": code}


# ------------------------------------------------------------------------------- parsing


async def read_json_object(request: Any) -> dict[str, Any]:
    """The request's body as a dict; BodyError (HTTP 400) when it is not one we can serve."""
    raw = await request.body()
    if len(raw) > PARSE_OFFLOAD_BYTES:
        return await asyncio.to_thread(parse_json_object, raw)
    return parse_json_object(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"The request body is not valid UTF-8 ({e.reason} at byte {e.start})")
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise BodyError("Malformed JSON body: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers beyond Python's digit cap
        raise BodyError(f"Malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise BodyError("The request body must be a JSON object")
    # Only an escape can produce a lone surrogate: skip the walk for bodies without one.
    if "\\ud" in text or "\\uD" in text:
        where = _lone_surrogate(body, "")
        if where is not None:
            raise BodyError(
                f"{where or 'body'}: contains a lone UTF-16 surrogate escape (like \\ud800), "
                "which is not valid Unicode text"
            )
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            found = _lone_surrogate(key, sub)
            if found is None:
                found = _lone_surrogate(item, sub)
            if found is not None:
                return found.encode("utf-8", "backslashreplace").decode()
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------------------- OpenAPI

_SCHEMAS: dict[str, Any] = {}
_REF = "#/components/schemas/{model}"


def json_body(model: Any, name: str | None = None) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model` (a pydantic model or TypeAdapter)."""
    if hasattr(model, "model_json_schema"):
        schema = model.model_json_schema(ref_template=_REF)
        name = name or model.__name__
    else:
        schema = model.json_schema(ref_template=_REF)
        name = name or schema.get("title", "Body")
    for def_name, definition in schema.pop("$defs", {}).items():
        _SCHEMAS.setdefault(def_name, definition)
    _SCHEMAS[name] = schema
    ref = {"$ref": _REF.format(model=name)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install_openapi(app: Any) -> None:
    """Make `app.openapi()` include the models declared with `json_body`."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in _SCHEMAS.items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
