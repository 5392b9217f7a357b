"""Shared machinery of the OpenAI serving classes: request fan-out, sampling params, usage, SSE.

Owns the boundary with the TokenizerManager for the OpenAI routes: one `GenerateReqInput` per
choice (an `n`-way or multi-prompt request becomes several single requests run concurrently, choice
index = prompt index * n + copy), the mapping from OpenAI sampling fields to the native
`sampling_params` names, and the translation of `meta_info` into OpenAI finish reasons and usage.

Every output dict crossing in from `generate_request` is the native `/generate` shape; in streams
`text` and the per-token lists in `meta_info` are cumulative, so deltas are computed here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from sglang.srt.entrypoints.openai.protocol import (
    ErrorResponse,
    PromptTokensDetails,
    UsageInfo,
    RequestBase,
)
from sglang.srt.managers.layer_probes import PROBE_FIELDS, openai_extras
from sglang.srt.managers.request_errors import ClientDisconnected, RequestFailed
from sglang.srt.sampling.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"
# Prompts longer than this (characters) are rendered and tokenized in a worker thread.
PLAN_OFFLOAD_CHARS = 4096

# OpenAI field -> native sampling_params field, for fields copied without change.
_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "no_stop_trim": "no_stop_trim",
    "logit_bias": "logit_bias",
    "regex": "regex",
    "json_schema": "json_schema",
    "ebnf": "ebnf",
    "stop": "stop",
}

_ATTENTION_FIELDS = (
    "attention_tokens_top_k",
    "attention_layers",
    "attention_layer_aggregation",
    "attention_exclude_sink",
    "attention_prompt_positions",
    "attention_heads",
    "attention_head_aggregation",
    "attention_spans",
    "attention_stats",
)
# Fields that are a 400 without return_attention_tokens, so they are passed on alone.
_NEEDS_REPORT = (
    "attention_prompt_positions",
    "attention_heads",
    "attention_head_aggregation",
    "attention_spans",
    "attention_stats",
)


class Finish(NamedTuple):
    reason: str | None
    matched: int | str | None


def sse(payload: Any) -> str:
    """One server-sent event carrying a pydantic model or a plain dict."""
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


def error_body(message: str, code: int = 400, err_type: str | None = None) -> dict[str, Any]:
    if err_type is None:
        err_type = "BadRequestError" if code < 500 else "InternalServerError"
    return ErrorResponse(message=message, type=err_type, code=code).model_dump()


def sampling_params_for(request: RequestBase, max_new_tokens: int | None) -> dict[str, Any]:
    """Native sampling_params for one choice, checked with the same rules as `/generate`.

    Raises ValueError (HTTP 400) for out-of-range values; None-valued fields are left out so the
    engine's defaults apply.
    """
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for src, dst in _SAMPLING_FIELDS.items():
        value = getattr(request, src)
        if value is not None:
            params[dst] = value
    if request.seed is not None:
        params["sampling_seed"] = request.seed
    SamplingParams.from_dict(dict(params)).verify()
    return params


def choice_requests(
    request: RequestBase,
    prompts: list[dict[str, Any]],
    sampling_params: list[dict[str, Any]],
    base_rid: str,
    *,
    return_logprob: bool,
    logprob_start_len: int,
    top_logprobs_num: int,
) -> list[dict[str, Any]]:
    """GenerateReqInput kwargs for every choice: prompt-major, `n` copies of each prompt.

    `prompts[i]` is `{"text": ...}` or `{"input_ids": ...}`. With a seed, copy j samples with
    seed + j so the n choices differ yet stay reproducible.
    """
    n = request.n
    total = len(prompts) * n
    rids = _choice_rids(request.rid, base_rid, total)
    out = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            params = dict(sampling_params[p])
            if j and params.get("sampling_seed") is not None:
                params["sampling_seed"] = params["sampling_seed"] + j
            kwargs: dict[str, Any] = {
                **prompt,
                "sampling_params": params,
                "rid": rids[p * n + j],
                "stream": request.stream,
                "return_logprob": return_logprob,
                "logprob_start_len": logprob_start_len,
                "top_logprobs_num": top_logprobs_num,
                "return_text_in_logprobs": True,
                "return_hidden_states": request.return_hidden_states,
            }
            kwargs.update(attention_kwargs(request))
            kwargs.update(
                {n: getattr(request, n) for n in PROBE_FIELDS if getattr(request, n) is not None}
            )
            out.append(kwargs)
    return out


def attention_kwargs(request: RequestBase) -> dict[str, Any]:
    """The fork's attention-token fields, present only when the client asked for the report."""
    if not request.return_attention_tokens:
        # Passed on alone so that the tokenizer manager refuses them (400: they need the report).
        return {
            name: getattr(request, name)
            for name in _NEEDS_REPORT
            if getattr(request, name) not in (None, False)
        }
    out: dict[str, Any] = {"return_attention_tokens": True}
    for name in _ATTENTION_FIELDS:
        value = getattr(request, name)
        if value is not None:
            out[name] = value
    return out


def _choice_rids(rid: str | list[str] | None, base: str, total: int) -> list[str]:
    if isinstance(rid, list):
        if len(rid) != total:
            raise ValueError(f"rid has {len(rid)} entries but the request makes {total} choices")
        return list(rid)
    stem = rid or base
    return [stem] if total == 1 else [f"{stem}-{i}" for i in range(total)]


def make_generate_req(kwargs: dict[str, Any]) -> Any:
    # Imported here so this layer loads (and is testable) without the process pipeline.
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(**kwargs)
    # A stream's outputs carry only what is new (tokenizer_manager.py): chunks cost O(new).
    obj.stream_deltas = bool(obj.stream)
    return obj


async def fan_out(
    tokenizer_manager: Any, reqs: list[dict[str, Any]], raw_request: Any = None
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Run one `generate_request` per choice concurrently, yielding (choice index, output).

    The first exception from any choice cancels the rest and propagates; closing or cancelling
    this generator cancels every choice still running (the manager aborts them).
    """
    if len(reqs) == 1:
        async for out in tokenizer_manager.generate_request(
            make_generate_req(reqs[0]), raw_request
        ):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, kwargs: dict[str, Any]) -> None:
        try:
            obj = make_generate_req(kwargs)
            async for out in tokenizer_manager.generate_request(obj, raw_request):
                queue.put_nowait((index, out))
            queue.put_nowait((index, done))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, kw)) for i, kw in enumerate(reqs)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_final(
    tokenizer_manager: Any, reqs: list[dict[str, Any]], raw_request: Any = None
) -> list[dict[str, Any]]:
    """The last output of every choice, in choice order."""
    finals: list[dict[str, Any] | None] = [None] * len(reqs)
    async for index, out in fan_out(tokenizer_manager, reqs, raw_request):
        finals[index] = out
    missing = [i for i, out in enumerate(finals) if out is None]
    if missing:
        raise RuntimeError(f"generate_request returned no output for choice(s) {missing}")
    return finals  # type: ignore[return-value]


def finish_of(meta: dict[str, Any]) -> Finish:
    """OpenAI finish_reason and the matched stop (token id or string) from native meta_info."""
    fr = meta.get("finish_reason")
    if not fr:
        return Finish(None, None)
    kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    if kind == "stop":
        return Finish("stop", fr.get("matched") if isinstance(fr, dict) else None)
    return Finish(kind, None)


def usage_of(finals: list[dict[str, Any]], n: int, enable_cache_report: bool) -> UsageInfo:
    """Usage over all choices; each prompt's tokens count once however many copies ran."""
    metas = [out.get("meta_info", {}) for out in finals]
    prompt = sum(int(m.get("prompt_tokens", 0)) for m in metas[:: max(n, 1)])
    completion = sum(int(m.get("completion_tokens", 0)) for m in metas)
    details = None
    if enable_cache_report:
        details = PromptTokensDetails(
            cached_tokens=sum(int(m.get("cached_tokens", 0) or 0) for m in metas)
        )
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


def token_text(entry: list[Any] | tuple[Any, ...], tokenizer: Any) -> str:
    """Text of a `[logprob, token_id, text]` entry, decoding the id when the text is missing."""
    text = entry[2] if len(entry) > 2 else None
    if text is None:
        return tokenizer.decode([entry[1]]) if tokenizer is not None else ""
    return text


class ServingBase:
    """Holds the TokenizerManager and the server settings both routes read."""

    def __init__(self, tokenizer_manager: Any) -> None:
        self.tokenizer_manager = tokenizer_manager
        args = getattr(tokenizer_manager, "server_args", None)
        self.served_model_name = getattr(args, "served_model_name", None) or "default"
        self.enable_cache_report = bool(getattr(args, "enable_cache_report", False))

    @property
    def tokenizer(self) -> Any:
        return self.tokenizer_manager.tokenizer

    @property
    def context_len(self) -> int | None:
        tm = self.tokenizer_manager
        value = getattr(tm, "context_len", None)
        if value is None:
            value = getattr(getattr(tm, "server_args", None), "context_length", None)
        return value

    def prompt_chars(self, request: Any) -> int:
        return 0

    def model_name(self, request: RequestBase) -> str:
        return request.model or self.served_model_name

    async def create(self, request: Any, raw_request: Any = None) -> Any:
        """The response model, or for `stream` an iterator of SSE lines ending in [DONE].

        Subclasses provide `plan`, `stream` and `build_response`, and `prompt_chars` when `plan`
        tokenizes: long prompts are then planned in a worker thread, off the event loop."""
        if request.stream_options and request.stream_options.continuous_usage_stats:
            raise ValueError("stream_options.continuous_usage_stats is not supported yet")
        if self.prompt_chars(request) > PLAN_OFFLOAD_CHARS:
            plan = await asyncio.to_thread(self.plan, request)
        else:
            plan = self.plan(request)
        if request.stream:
            return self.stream(request, plan, raw_request)
        finals = await collect_final(self.tokenizer_manager, plan.reqs, raw_request)
        return self.build_response(request, plan, finals)

    def usage_chunk_builder(self, request: Any, plan: Any, model: str, chunk_cls: type) -> Any:
        """With include_usage, a function building the last chunk (no choices, usage); else None."""
        if not request.include_usage:
            return None

        def build(finals: list[dict[str, Any]]) -> Any:
            usage = usage_of(finals, request.n, self.enable_cache_report)
            return chunk_cls(id=plan.id, created=plan.created, model=model, choices=[], usage=usage)

        return build

    async def stream_events(
        self,
        reqs: list[dict[str, Any]],
        raw_request: Any,
        on_output: Callable[[int, dict[str, Any], StreamCursor], list[Any]],
        on_usage: Callable[[list[dict[str, Any]]], Any] | None,
    ) -> AsyncIterator[str]:
        """SSE lines for a streamed request, always ending with `data: [DONE]`.

        `on_output(index, output, cursor)` returns the chunks for one engine output; `on_usage`
        (set when the client asked for include_usage) builds the trailing usage chunk.
        NOTE: an error before the first event propagates (the route answers with its status);
        after it, the error travels as an error event `{"error": {...}}` (as upstream) followed
        by [DONE]. A disconnected client gets nothing more.
        """
        cursors = [StreamCursor() for _ in reqs]
        sent = False
        try:
            async for index, out in fan_out(self.tokenizer_manager, reqs, raw_request):
                cursors[index].final = out
                for chunk in on_output(index, out, cursors[index]):
                    sent = True
                    yield sse(chunk)
            if on_usage is not None:
                finals = [c.final or {} for c in cursors]
                sent = True
                yield sse(on_usage(finals))
        except ClientDisconnected:
            if not sent:
                raise
            return
        except ValueError as exc:
            if not sent:
                raise
            yield sse({"error": error_body(str(exc), 400)})
        except RequestFailed as exc:
            if not sent:
                raise
            yield sse({"error": error_body(str(exc), exc.status_code, exc.err_type)})
        except Exception as exc:
            if not sent:
                raise
            yield sse({"error": error_body(f"{type(exc).__name__}: {exc}", 500)})
        yield SSE_DONE

    def text_delta(self, cursor: StreamCursor, out: dict[str, Any]) -> str:
        # Streams run with stream_deltas (make_generate_req): the output's text is the delta.
        return out.get("text", "")

    def extras(self, request: RequestBase, meta: dict[str, Any]) -> dict[str, Any]:
        """Choice-level extras the client asked for: hidden states and attention tokens.

        As upstream, the OpenAI routes return only the last token's hidden state (the one that
        produced the final token), or [] when a single token was generated; the full list is in
        native /generate's meta_info.hidden_states."""
        out: dict[str, Any] = {}
        if request.return_hidden_states and meta.get("hidden_states") is not None:
            entries = meta["hidden_states"]
            out["hidden_states"] = entries[-1] if entries and meta["completion_tokens"] > 1 else []
        if request.return_attention_tokens and meta.get("attention_tokens") is not None:
            out["attention_tokens"] = meta["attention_tokens"]
        out.update(openai_extras(meta))
        return out


class StreamCursor:
    """Per-choice state of a stream: whether its first chunk and header went out, the last output."""

    __slots__ = (
        "char_offset",
        "started_attention",
        "started",
        "final",
    )

    def __init__(self) -> None:
        self.char_offset = 0  # completions text_offset of the next token
        self.started_attention = False
        self.started = False
        self.final: dict[str, Any] | None = None

    @staticmethod
    def new_logprobs(meta: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """This output's new token logprobs (a stream_deltas output holds only those)."""
        return meta.get("output_token_logprobs") or [], meta.get("output_top_logprobs") or []

    def attention_delta(self, report: dict[str, Any] | None) -> dict[str, Any] | None:
        """This chunk's attention entries; header fields only in the first chunk.

        A streamed native output's report holds only the entries new since the previous output
        (tokenizer_manager.py), with or without --stream-output."""
        if not report:
            return None
        new = report.get("content") or []
        first = not self.started_attention
        self.started_attention = True
        if not new and not first:
            return None
        if first:
            return {**report, "content": new}
        return {"content": new}
