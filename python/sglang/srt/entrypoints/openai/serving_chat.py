"""`/v1/chat/completions`: chat messages to prompt ids, and engine outputs to chat responses.

Owns message rendering (the tokenizer's chat template with `add_generation_prompt`, or the
`--chat-template` override, plus `chat_template_kwargs` and `continue_final_message`), the chat
logprobs object and the `chat.completion.chunk` stream, whose first chunk per choice carries
`role: assistant`. Rendering and tokenizing long conversations runs in a worker thread.

`response_format` `json_object` / `json_schema` becomes the native `json_schema` constraint
(constrained/); with `regex`, `ebnf` or `json_schema` also in the body it is refused (one
constraint per request).

`tool_choice` "required" or a named function forces a call with a JSON schema
(function_call/function_call_parser.py); "auto" (or unset, upstream's default with tools) reads
the model's own call format with `--tool-call-parser` and is refused with 400 without it. The
answer carries `message.tool_calls` and `finish_reason: "tool_calls"`; streamed, each call's
deltas come as the model writes it (name first, then argument fragments), through the same
detector the whole answer uses (function_call/base_format_detector.py). With a reasoning parser
the think block is split off first and calls are read from the rest. With `tool_choice: "none"`
the tools are not shown to the model, as upstream.
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
from sglang.srt.function_call.base_format_detector import BaseFormatDetector, parse_whole
from sglang.srt.function_call.function_call_parser import (
    forced_call_schema,
    forced_detector,
    openai_calls,
    template_messages,
    tool_call_deltas,
    tool_functions,
)
from sglang.srt.function_call.tool_call_parsers import make_detector
from sglang.srt.managers.layer_probes import openai_extras
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
        messages = template_messages([m.to_template_dict() for m in request.messages])
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

    def message_spans(
        self, request: ChatCompletionRequest, prompt_ids: list[int]
    ) -> list[dict[str, Any]]:
        """`attention_spans: "messages"`: one span per message (attention_capture/message_spans.py)."""
        from sglang.srt.attention_capture.message_spans import message_spans

        tools = request.tools if request.tool_choice != "none" else None
        return message_spans(
            [m.to_template_dict() for m in request.messages],
            lambda msgs: self.template.render(
                self.tokenizer,
                msgs,
                add_generation_prompt=False,
                tools=tools,
                template_kwargs=request.chat_template_kwargs,
            ),
            lambda text: self.tokenizer.encode(text, add_special_tokens=False),
            prompt_ids,
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
        if request.attention_spans == "messages":
            request.attention_spans = self.message_spans(request, prompt_ids)

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
        parallel = request.parallel_tool_calls is not False
        forced = forced_call_schema(request.tools, request.tool_choice, parallel)
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
            thought, answer = None, out.get("text", "")
            if self.separates_reasoning(request):
                parser = ReasoningParser(self.reasoning_parser)
                thought, answer = parser.parse_non_stream(answer)
            message = ChatCompletionMessage(content=answer, reasoning_content=thought)
            reason = finish.reason
            detector = self.tool_detector(request)
            found = parse_whole(detector, answer) if detector and reason else None
            if found is not None:
                message.content, message.tool_calls = found[0], openai_calls(found[1])
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
        # A forced call's grammar starts the output with the call: there is no think block.
        forced = request.tools and request.tool_choice not in (None, "auto", "none")
        return self.reasoning_parser is not None and request.separate_reasoning and not forced

    def tool_detector(self, request: ChatCompletionRequest) -> BaseFormatDetector | None:
        """A fresh reader of the answer's tool calls (forced, or "auto" with a parser)."""
        if not request.tools or request.tool_choice == "none":
            return None
        if request.tool_choice not in (None, "auto"):
            return forced_detector(request.tools, request.tool_choice)
        if self.tool_call_parser is None:
            return None
        return make_detector(self.tool_call_parser, set(tool_functions(request.tools)))

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
            thought = None
            if separate:
                texts[index] = texts.get(index, "") + piece  # the parser reads the text so far
                parser = parsers.setdefault(index, ReasoningParser(self.reasoning_parser))
                thought, piece = parser.parse_stream_chunk(texts[index], reason is not None)
            calls: list[Any] = [None]
            if index not in detectors:
                detectors[index] = self.tool_detector(request)
            detector = detectors[index]
            if detector is not None:
                piece, items = detector.feed(piece, reason is not None)
                calls = tool_call_deltas(items) or calls
                if reason is not None and detector.has_calls:
                    reason = "tool_calls"
            # Calls opened in this step get chunks of their own before the last one.
            delta = DeltaMessage(content=piece or None, reasoning_content=thought or None)
            for batch in calls[:-1]:
                delta.tool_calls = batch
                chunks.append(chunk(ChatCompletionResponseStreamChoice(index=index, delta=delta)))
                delta = DeltaMessage()
            delta.tool_calls = calls[-1]
            has_delta = bool(delta.content or delta.reasoning_content or delta.tool_calls)
            logprobs = None
            if request.logprobs:
                lps, tops = cursor.new_logprobs(meta)
                if lps:
                    logprobs = self.logprobs(lps, tops)
            extras: dict[str, Any] = {}
            if request.return_attention_tokens:
                extras["attention_tokens"] = cursor.attention_delta(meta.get("attention_tokens"))
            extras.update(openai_extras(meta, stream=True))
            if has_delta or logprobs or reason or any(extras.values()):
                chunks.append(
                    chunk(
                        ChatCompletionResponseStreamChoice(
                            index=index,
                            delta=delta,
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

        separate = self.separates_reasoning(request)
        parsers: dict[int, ReasoningParser] = {}
        texts: dict[int, str] = {}
        detectors: dict[int, BaseFormatDetector | None] = {}
        on_usage = self.usage_chunk_builder(request, plan, model, ChatCompletionStreamResponse)
        return self.stream_events(plan.reqs, raw_request, on_output, on_usage)


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
