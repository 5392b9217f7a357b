"""`/v1/chat/completions`: chat messages to prompt ids, and engine outputs to chat responses.

Owns message rendering (the tokenizer's chat template with `add_generation_prompt`, or the
`--chat-template` override, plus `chat_template_kwargs` and `continue_final_message`), the chat
logprobs object and the `chat.completion.chunk` stream, whose first chunk per choice carries
`role: assistant`. Rendering and tokenizing long conversations runs in a worker thread.

`response_format` `json_object` / `json_schema` becomes the native `json_schema` constraint
(constrained/); with `regex`, `ebnf` or `json_schema` also in the body it is refused (one
constraint per request).

`tool_choice` "required" or a named function forces a call with a JSON schema
(function_call/function_call_parser.py): the answer carries `message.tool_calls` and
`finish_reason: "tool_calls"`; streamed, the calls come in one delta when the output is complete.

Not supported yet, so refused with 400 rather than answered with unconstrained text: `tools`
with `tool_choice` "auto" (or unset, upstream's default with tools), which needs a parser of the
model's tool-call format. With `tool_choice: "none"` the tools are not shown to the model, as
upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from sglang.srt.entrypoints.openai.chat_template import ChatTemplate, load_chat_template
from sglang.srt.entrypoints.openai.protocol import (
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    DeltaMessage,
    TopLogprob,
    now,
    random_id,
)
from sglang.srt.reasoning_parser import ReasoningParser
from sglang.srt.function_call.function_call_parser import (
    forced_call_schema,
    openai_calls,
    parse_forced_calls,
    tool_functions,
)
from sglang.srt.function_call.tool_call_parsers import parse_tool_calls
from sglang.srt.entrypoints.openai.serving_base import (
    ServingBase,
    StreamCursor,
    choice_requests,
    finish_of,
    sampling_params_for,
    token_text,
    usage_of,
)


class ChatPlan(NamedTuple):
    id: str
    created: int
    reqs: list[dict[str, Any]]
    prompt_ids: list[int]


class OpenAIServingChat(ServingBase):
    def __init__(self, tokenizer_manager: Any, template: ChatTemplate | None = None) -> None:
        super().__init__(tokenizer_manager)
        args = getattr(tokenizer_manager, "server_args", None)
        if template is None:
            template = load_chat_template(getattr(args, "chat_template", None))
        self.template = template
        self.reasoning_parser: str | None = getattr(args, "reasoning_parser", None)
        self.tool_call_parser: str | None = getattr(args, "tool_call_parser", None)

    # ------------------------------------------------------------ conversion

    def render_prompt(self, request: ChatCompletionRequest) -> str:
        """The chat-templated prompt text for the request's messages."""
        messages = [m.to_template_dict() for m in request.messages]
        if request.continue_final_message and messages[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs the last message to be from assistant")
        tools = request.tools if request.tool_choice != "none" else None
        return self.template.render(
            self.tokenizer,
            messages,
            add_generation_prompt=True,
            continue_final_message=request.continue_final_message,
            tools=tools,
            template_kwargs=request.chat_template_kwargs,
        )

    def prompt_chars(self, request: ChatCompletionRequest) -> int:
        return sum(len(m.text()) for m in request.messages)

    def plan(self, request: ChatCompletionRequest) -> ChatPlan:
        """Validate and convert; raises ValueError (HTTP 400) for requests we cannot serve."""
        _check_unsupported(request, self.tool_call_parser)
        if request.tools and request.tool_choice != "none":
            tool_functions(request.tools)  # a malformed tool is a 400 before generating
        if request.top_logprobs and not request.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        prompt_ids = self.tokenizer.encode(self.render_prompt(request), add_special_tokens=False)

        max_new = request.max_completion_tokens
        if max_new is None:
            max_new = request.max_tokens
        if max_new is None and self.context_len:
            # Unbounded by the client: whatever room the context leaves (too long prompts are
            # rejected by the manager's length check).
            max_new = max(self.context_len - len(prompt_ids), 0)
        params = sampling_params_for(request, max_new)
        schema = _response_format_schema(request)
        source = "response_format"
        forced = forced_call_schema(request.tools, request.tool_choice)
        if forced is not None:
            if schema is not None:
                raise ValueError("a tool_choice that forces a call cannot have a response_format")
            schema, source = forced, "tool_choice"
        if schema is not None:
            others = [k for k in ("json_schema", "regex", "ebnf") if params.get(k) is not None]
            if others:
                raise ValueError(
                    f"{source} cannot be combined with {', '.join(others)}: "
                    "one constraint per request"
                )
            params["json_schema"] = schema
        extra_stops = self.template.stop_token_ids(self.tokenizer)
        if extra_stops:
            params["stop_token_ids"] = sorted(
                set(params.get("stop_token_ids") or []) | set(extra_stops)
            )

        rid = random_id("chatcmpl")
        reqs = choice_requests(
            request,
            [{"input_ids": prompt_ids}],
            [params],
            rid,
            return_logprob=request.logprobs,
            logprob_start_len=-1,
            top_logprobs_num=request.top_logprobs or 0,
        )
        return ChatPlan(rid, now(), reqs, prompt_ids)

    # ------------------------------------------------------------ responses

    def build_response(
        self, request: ChatCompletionRequest, plan: ChatPlan, finals: list[dict[str, Any]]
    ) -> ChatCompletionResponse:
        choices = []
        for index, out in enumerate(finals):
            meta = out.get("meta_info", {})
            finish = finish_of(meta)
            logprobs = None
            if request.logprobs:
                lps = meta.get("output_token_logprobs") or []
                logprobs = self.logprobs(lps, meta.get("output_top_logprobs"))
            message = ChatCompletionMessage(content=out.get("text", ""))
            if self.separates_reasoning(request):
                thought, answer = ReasoningParser(self.reasoning_parser).parse_non_stream(
                    out.get("text", "")
                )
                message = ChatCompletionMessage(content=answer, reasoning_content=thought)
            reason = finish.reason
            found = self.tool_calls(request, out.get("text", ""), reason)
            if found is not None:
                message = ChatCompletionMessage(content=found[0], tool_calls=found[1])
                reason = "tool_calls"
            choices.append(
                ChatCompletionResponseChoice(
                    index=index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=reason,
                    matched_stop=finish.matched,
                    **self.extras(request, meta),
                )
            )
        return ChatCompletionResponse(
            id=plan.id,
            created=plan.created,
            model=self.model_name(request),
            choices=choices,
            usage=usage_of(finals, request.n, self.enable_cache_report),
        )

    def separates_reasoning(self, request: ChatCompletionRequest) -> bool:
        return self.reasoning_parser is not None and request.separate_reasoning

    def parses_tool_calls(self, request: ChatCompletionRequest) -> bool:
        """Whether the output may hold tool calls (forced, or "auto" with a parser)."""
        if not request.tools or request.tool_choice == "none":
            return False
        return request.tool_choice not in (None, "auto") or self.tool_call_parser is not None

    def tool_calls(
        self, request: ChatCompletionRequest, text: str, reason: str | None
    ) -> tuple[str | None, list[dict[str, Any]]] | None:
        """(content, tool_calls) of a finished answer that holds calls, else None."""
        if reason is None or not self.parses_tool_calls(request):
            return None
        if request.tool_choice in (None, "auto"):
            names = set(tool_functions(request.tools))
            content, pairs = parse_tool_calls(self.tool_call_parser, text, names)
            return (content, openai_calls(pairs)) if pairs else None
        if reason != "stop":
            return None  # a forced call cut off by max_tokens does not parse
        calls = parse_forced_calls(text, request.tool_choice)
        return (None, calls) if calls is not None else None

    def logprobs(self, lps: list[Any], tops: list[Any] | None) -> ChoiceLogprobs:
        tops = list(tops or [])
        content = []
        for i, entry in enumerate(lps):
            text = token_text(entry, self.tokenizer)
            top = tops[i] if i < len(tops) and tops[i] else []
            content.append(
                ChatCompletionTokenLogprob(
                    token=text,
                    logprob=entry[0],
                    bytes=list(text.encode("utf-8")),
                    top_logprobs=[
                        TopLogprob(
                            token=(t_text := token_text(t, self.tokenizer)),
                            logprob=t[0],
                            bytes=list(t_text.encode("utf-8")),
                        )
                        for t in top
                    ],
                )
            )
        return ChoiceLogprobs(content=content)

    def stream(
        self, request: ChatCompletionRequest, plan: ChatPlan, raw_request: Any
    ) -> AsyncIterator[str]:
        model = self.model_name(request)

        def chunk(choice: ChatCompletionResponseStreamChoice) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(
                id=plan.id, created=plan.created, model=model, choices=[choice]
            )

        def on_output(index: int, out: dict[str, Any], cursor: StreamCursor) -> list[Any]:
            meta = out.get("meta_info", {})
            chunks = []
            if not cursor.started:
                cursor.started = True
                delta = DeltaMessage(role="assistant", content="")
                chunks.append(chunk(ChatCompletionResponseStreamChoice(index=index, delta=delta)))
            piece = self.text_delta(cursor, out)
            finish = finish_of(meta)
            reason = finish.reason
            if buffering:
                # Calls are sent whole once the output is complete; without calls, the text.
                found = self.tool_calls(request, out.get("text", ""), reason)
                piece = out.get("text", "") if reason is not None else ""
                if found is not None:
                    chunks.append(chunk(_tool_call_delta(index, *found)))
                    reason, piece = "tool_calls", ""
            thought = None
            if parsers is not None:
                parser = parsers.setdefault(index, ReasoningParser(self.reasoning_parser))
                thought, piece = parser.parse_stream_chunk(out.get("text", ""), reason is not None)
            logprobs = None
            if request.logprobs:
                lps, tops = cursor.new_logprobs(meta)
                if lps:
                    logprobs = self.logprobs(lps, tops)
            extras: dict[str, Any] = {}
            if request.return_attention_tokens:
                extras["attention_tokens"] = cursor.attention_delta(meta.get("attention_tokens"))
            if piece or thought or logprobs or reason or extras.get("attention_tokens"):
                chunks.append(
                    chunk(
                        ChatCompletionResponseStreamChoice(
                            index=index,
                            delta=DeltaMessage(
                                content=piece or None, reasoning_content=thought or None
                            ),
                            logprobs=logprobs,
                            finish_reason=reason,
                            matched_stop=finish.matched,
                            **extras,
                        )
                    )
                )
            if finish.reason is not None and request.return_hidden_states:
                hidden = self.extras(request, meta).get("hidden_states")
                delta = DeltaMessage(hidden_states=hidden)
                chunks.append(chunk(ChatCompletionResponseStreamChoice(index=index, delta=delta)))
            return chunks

        buffering = self.parses_tool_calls(request)
        parsers: dict[int, ReasoningParser] | None = (
            {} if self.separates_reasoning(request) and not buffering else None
        )
        on_usage = self.usage_chunk_builder(request, plan, model, ChatCompletionStreamResponse)
        return self.stream_events(plan.reqs, raw_request, on_output, on_usage)


def _tool_call_delta(
    index: int, content: str | None, calls: list[dict[str, Any]]
) -> ChatCompletionResponseStreamChoice:
    """One delta carrying the content and every call whole, each call with its `index`."""
    tool_calls = [{"index": i, **call} for i, call in enumerate(calls)]
    delta = DeltaMessage(content=content, tool_calls=tool_calls)
    return ChatCompletionResponseStreamChoice(index=index, delta=delta)


def _response_format_schema(request: ChatCompletionRequest) -> str | None:
    """The JSON schema (text) that `response_format` asks for, or None for plain text."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return '{"type": "object"}'
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ValueError("response_format of type 'json_schema' needs json_schema.schema")
    return json.dumps(fmt.json_schema.schema_)


def _check_unsupported(request: ChatCompletionRequest, parser: str | None) -> None:
    """400 for what would otherwise be answered without the constraint the client asked for."""
    choice = request.tool_choice
    if (
        choice is not None
        and choice not in ("auto", "none", "required")
        and not isinstance(choice, dict)
    ):
        raise ValueError(
            f"tool_choice must be 'none', 'auto', 'required' or an object, got {choice!r}"
        )
    if request.tools and choice in (None, "auto") and parser is None:
        raise ValueError(
            "tools with tool_choice 'auto' are not supported yet without --tool-call-parser "
            "(the model's own tool-call format is not parsed); send tool_choice 'required' or "
            "a named function (enforced with a grammar), or 'none'"
        )
