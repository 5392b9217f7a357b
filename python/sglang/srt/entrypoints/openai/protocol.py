"""Pydantic models for the OpenAI-compatible routes: request bodies, responses, stream chunks, errors.

Owns the wire format of `/v1/completions` and `/v1/chat/completions` (docs/compat.md,
docs/attention_tokens.md).
The serving classes parse bodies into the request models and build responses from the response
models; nothing here talks to the engine.

Requests accept any `model` string and take the SGLang extras (`top_k`, `rid`, the attention-token
fields, ...) at the top level, which is where the openai client's `extra_body` puts them. Unknown
fields are dropped here; before validation the route screens the body with request_fields.py
(upstream fields this server does not implement, misspellings). Range checks on sampling values
are left to `SamplingParams.verify` so the native and OpenAI routes reject the same values with the
same words; `n` and `top_logprobs` carry OpenAI's documented maxima (128 and 20).

Responses omit optional extras (`matched_stop`, `hidden_states`, `attention_tokens`, usage details)
when they are None, while standard nullable fields (`logprobs`, `finish_reason`) stay as `null`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from sglang.srt.sampling.sampling_params import MAX_N


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------- errors


class ErrorResponse(BaseModel):
    object: Literal["error"] = "error"
    message: str
    type: str = "BadRequestError"
    param: Optional[str] = None
    code: int = 400


def format_validation_error(exc: ValidationError) -> str:
    """One `field.path: message` per problem instead of pydantic's multi-line dump; the names
    pydantic gives union members ("str", "list[int]", a model's name) are left out of the path."""
    parts: list[str] = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if not _union_member(p)) or "body"
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if f"{where}: {message}" not in parts:
            parts.append(f"{where}: {message}")
    return "; ".join(parts) or str(exc)


def _union_member(part: Any) -> bool:
    if not isinstance(part, str):
        return False
    return "[" in part or part in ("str", "int", "float", "bool", "none") or part[:1].isupper()


# ---------------------------------------------------------------- serialisation helper


class _WireModel(BaseModel):
    """Base for response models: keys in `_omit_if_none` vanish from the JSON when None."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_absent_extras(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_if_none:
            if key in data and data[key] is None:
                del data[key]
        return data


# ---------------------------------------------------------------- shared request parts


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class RequestBase(BaseModel):
    """Fields common to both routes: OpenAI sampling knobs plus the SGLang and fork extras."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: Optional[str] = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None

    # SGLang extras (`extra_body`)
    top_k: int = -1
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    return_hidden_states: bool = False
    rid: Optional[Union[str, list[str]]] = None

    # This fork's attention-token report (docs/attention_tokens.md)
    return_attention_tokens: bool = False
    attention_tokens_top_k: Optional[int] = Field(
        default=None, validation_alias=AliasChoices("attention_tokens_top_k", "top_k_attention")
    )
    attention_layers: Optional[list[int]] = None
    attention_layer_aggregation: Optional[Literal["mean", "none"]] = None
    attention_exclude_sink: Optional[int] = None
    attention_heads: Optional[list[int]] = None
    attention_head_aggregation: Optional[Literal["mean", "max", "none"]] = None
    # A list of {"name", "start", "end"}, or "messages" on the chat route.
    attention_spans: Optional[Union[list[dict[str, Any]], str]] = None
    attention_stats: Optional[bool] = None
    # A list of prompt positions or "all"; checked by the tokenizer manager (400 naming it).
    attention_prompt_positions: Optional[Any] = None
    # Layer probes (docs/request_fields.md); checked by the tokenizer manager, 400 naming the field.
    hidden_states_layers: Optional[Any] = None
    hidden_states_format: Optional[Any] = None
    logit_lens: Optional[Any] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---------------------------------------------------------------- completions request


class CompletionRequest(RequestBase):
    prompt: Union[list[list[int]], list[int], list[str], str]
    max_tokens: Optional[int] = Field(default=16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and (
            not value or any(isinstance(p, list) and not p for p in value)
        ):
            raise ValueError("prompt must not be empty")
        return value


# ---------------------------------------------------------------- chat request


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Optional[str] = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content part type {value!r} is not supported; only 'text' is")
        return value

    @model_validator(mode="after")
    def _has_text(self) -> ContentPart:
        if self.text is None:
            raise ValueError("a text content part needs its text")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None

    @field_validator("role", mode="before")
    @classmethod
    def _lower_role(cls, value: Any) -> Any:
        # Upstream matches roles case-insensitively ("User" is "user").
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        # Only an assistant turn that made tool calls may come without content (as upstream).
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined by newlines, None as empty."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    def to_template_dict(self) -> dict[str, Any]:
        # Templates predate the "developer" role; it plays the system role for them.
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class ChatCompletionRequest(RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=0)
    max_completion_tokens: Optional[int] = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    continue_final_message: bool = False
    # With --reasoning-parser: the think block goes to reasoning_content (reasoning_parser.py).
    separate_reasoning: bool = True


# ---------------------------------------------------------------- usage


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(_WireModel):
    _omit_if_none = frozenset({"prompt_tokens_details"})

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


# ---------------------------------------------------------------- completions response


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


_CHOICE_EXTRAS = frozenset(
    {"matched_stop", "hidden_states", "attention_tokens", "hidden_states_layers", "logit_lens"}
)


class CompletionResponseChoice(_WireModel):
    _omit_if_none = _CHOICE_EXTRAS

    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    matched_stop: Optional[Union[int, str]] = None
    hidden_states: Optional[list[Any]] = None
    attention_tokens: Optional[dict[str, Any]] = None
    hidden_states_layers: Optional[dict[str, list[Any]]] = None
    logit_lens: Optional[list[Any]] = None


class CompletionResponse(_WireModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(CompletionResponseChoice):
    pass


class CompletionStreamResponse(_WireModel):
    _omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None


# ---------------------------------------------------------------- chat response


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[ChatCompletionTokenLogprob]] = None


class ChatCompletionMessage(_WireModel):
    _omit_if_none = frozenset({"tool_calls", "reasoning_content"})

    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatCompletionResponseChoice(_WireModel):
    _omit_if_none = _CHOICE_EXTRAS

    index: int
    message: ChatCompletionMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Optional[Union[int, str]] = None
    hidden_states: Optional[list[Any]] = None
    attention_tokens: Optional[dict[str, Any]] = None
    hidden_states_layers: Optional[dict[str, list[Any]]] = None
    logit_lens: Optional[list[Any]] = None


class ChatCompletionResponse(_WireModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(_WireModel):
    _omit_if_none = frozenset(
        {"role", "content", "hidden_states", "tool_calls", "reasoning_content"}
    )

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    # Sent alone in a chunk after the finishing one, as upstream (return_hidden_states).
    hidden_states: Optional[list[Any]] = None


class ChatCompletionResponseStreamChoice(_WireModel):
    _omit_if_none = _CHOICE_EXTRAS

    index: int
    delta: DeltaMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Optional[Union[int, str]] = None
    attention_tokens: Optional[dict[str, Any]] = None
    hidden_states_layers: Optional[dict[str, list[Any]]] = None
    logit_lens: Optional[list[Any]] = None


class ChatCompletionStreamResponse(_WireModel):
    _omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None
