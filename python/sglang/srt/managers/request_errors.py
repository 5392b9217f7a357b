"""How an accepted request can fail, and the HTTP status and headers each failure maps to.

The tokenizer manager raises these from `generate_request`; the HTTP routes (native and OpenAI)
turn them into responses without knowing where they came from:
- `RequestFailed`: the server could not serve the request. A batch that raised in the scheduler
  (500), a full queue under `--max-queued-requests` (503 with Retry-After), a dead child process
  or a server that is shutting down (503). Streams end with an error event, then `[DONE]`.
- `ClientDisconnected`: the client went away; the request was aborted and nobody reads the
  answer, so routes build no error body and log no traceback.
"""

from __future__ import annotations

from typing import Any, Optional

# Seconds a client refused for overload is told to wait before retrying.
QUEUE_FULL_RETRY_AFTER_S = 1


class RequestFailed(RuntimeError):
    """A request the server accepted but could not finish; carries its HTTP status."""

    def __init__(self, message: str, status_code: int = 500, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after

    @property
    def err_type(self) -> str:
        return "ServiceUnavailableError" if self.status_code == 503 else "InternalServerError"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class ClientDisconnected(Exception):
    """The client closed the connection; its request has been aborted."""


def from_finish_reason(reason: Optional[dict[str, Any]]) -> Optional[Exception]:
    """The error for a scheduler abort that carries a status, else None: ValueError (HTTP 400)
    for a request the scheduler found invalid (a grammar that does not compile), RequestFailed
    for a server-side failure.

    A client's own abort (`/abort_request`, disconnect) has no status and finishes normally with
    `finish_reason.type == "abort"`, as upstream."""
    if not reason or reason.get("type") != "abort":
        return None
    status = reason.get("status_code")
    if status == 400:
        return ValueError(str(reason.get("message") or "invalid request"))
    if not isinstance(status, int) or status < 500:
        return None
    retry = QUEUE_FULL_RETRY_AFTER_S if status == 503 else None
    return RequestFailed(str(reason.get("message") or "request failed"), status, retry)


def error_status(exc: BaseException, default: int = 500) -> int:
    return getattr(exc, "status_code", default)


def error_headers(exc: BaseException) -> dict[str, str]:
    return exc.headers() if isinstance(exc, RequestFailed) else {}
