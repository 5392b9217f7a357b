"""The attention viewer the server serves with --return-attention-tokens (docs/attention_tokens.md).

Owns two routes, registered only with the flag (without it both are the usual 404):
`GET /attention`, the page (python/sglang/viewer/: the renderer shared with
`sglang.attention_tokens.render_html`, plus the request form), and `POST /attention/tokens`, the
text of each prompt token for the page's heat map: the chat route's rendering and tokenization of
`messages`, or the completions route's tokenization of `prompt`, so positions match the report's.
Everything else the page does goes through the public OpenAI streaming routes.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from sglang.attention_tokens import viewer_page
from sglang.srt.entrypoints.http_body import read_json_object
from sglang.srt.entrypoints.openai.api import error_response
from sglang.srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    format_validation_error,
)
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat

PAGE_PATH = "/attention"


class PromptTokensRequest(BaseModel):
    """Exactly one of `messages` (as the chat route takes them) or `prompt` (one string)."""

    model_config = ConfigDict(extra="forbid")

    messages: Optional[list[ChatMessage]] = None
    prompt: Optional[str] = None


def register_attention_viewer(app: FastAPI, tokenizer_manager: Any, server_args: Any) -> None:
    """Add the viewer's routes when the server runs with --return-attention-tokens."""
    if not getattr(server_args, "return_attention_tokens", False):
        return
    page = viewer_page()
    chat = OpenAIServingChat(tokenizer_manager)

    @app.get(PAGE_PATH, include_in_schema=False)
    async def attention_page() -> Response:
        return HTMLResponse(page)

    @app.post(PAGE_PATH + "/tokens", include_in_schema=False)
    async def attention_prompt_tokens(request: Request) -> Response:
        try:
            body = PromptTokensRequest.model_validate(await read_json_object(request))
        except ValidationError as exc:
            return error_response(format_validation_error(exc))
        except ValueError as exc:
            return error_response(str(exc))
        if (body.messages is None) == (body.prompt is None):
            return error_response("send exactly one of 'messages' and 'prompt'")
        tokenizer = tokenizer_manager.tokenizer
        if tokenizer is None:
            return error_response("this server runs with --skip-tokenizer-init: it cannot tokenize")
        try:
            ids = _prompt_ids(chat, tokenizer, body.messages or body.prompt)
        except ValueError as exc:
            return error_response(str(exc))
        tokens = tokenizer.batch_decode([[i] for i in ids])
        return JSONResponse({"ids": ids, "tokens": tokens})


def _prompt_ids(chat: OpenAIServingChat, tokenizer: Any, what: Union[list, str]) -> list[int]:
    if isinstance(what, str):  # the completions route hands the text to the tokenizer manager
        return list(tokenizer.encode(what))
    request = ChatCompletionRequest(messages=what)
    return list(tokenizer.encode(chat.render_prompt(request), add_special_tokens=False))
