"""Forced tool calls: `tool_choice` "required" or a named function, enforced with a JSON schema.

The chat route asks this module for the schema that constrains the output (constrained/), so the
model can only write a call that parses, and the detector that reads the output into OpenAI
`tool_calls`, streamed or whole: for "required" the output is a JSON array of `{"name",
"parameters"}` objects, one per call, each name one of the request's tools and its parameters
that tool's schema; for a named function the output is that function's arguments object.
`tool_choice` "auto" reads the model's own format instead (tool_call_parsers.py,
`--tool-call-parser`). Also the stream's `delta.tool_calls` entries and the messages handed to
chat templates.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Optional

from sglang.srt.function_call.base_format_detector import (
    BaseFormatDetector,
    CallObject,
    ToolCallItem,
)
from sglang.srt.function_call.tool_call_parsers import JsonArrayDetector


def tool_functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema; ValueError (HTTP 400) for a malformed tool."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError("each tool must be {'type': 'function', 'function': {...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("each tool's function needs a name")
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise ValueError(f"function {name!r}: parameters must be a JSON schema object")
        out[name] = params
    return out


def named_function(tool_choice: Any) -> Optional[str]:
    """The function a `{"type": "function", "function": {"name": ...}}` tool_choice names."""
    if not isinstance(tool_choice, dict):
        return None
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError(
            "tool_choice object must be {'type': 'function', 'function': {'name': ...}}"
        )
    return name


def forced_call_schema(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool = True
) -> Optional[str]:
    """The JSON schema (text) that makes the output a call, or None when no call is forced.
    `parallel` False (the request's `parallel_tool_calls: false`) allows one call, as upstream."""
    name = named_function(tool_choice)
    if tool_choice != "required" and name is None:
        return None
    if not tools:
        raise ValueError("tool_choice requires a tool call but the request has no tools")
    functions = tool_functions(tools)
    if name is not None:
        if name not in functions:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return json.dumps(functions[name])
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": fname}, "parameters": params},
            "required": ["name", "parameters"],
        }
        for fname, params in functions.items()
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return json.dumps(schema)


class NamedCallDetector(BaseFormatDetector):
    """A named function forced by its parameters schema: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        super().__init__({name})
        self.name = name

    def _parse(self, finished: bool, out: list[str], items: list[ToolCallItem]) -> None:
        if not self.calls:
            call = CallObject(0, 0, self.names, ())
            call.name, call.state = self.name, "args"
            self.calls.append(call)
            items.append(ToolCallItem(0, self.name, ""))
        call = self.calls[0]
        piece = self.text[len(call.arguments) :]
        if piece:
            call.arguments += piece
            items.append(ToolCallItem(0, None, piece))
        if finished:
            try:
                json.loads(self.text)
                call.state = "done"
            except json.JSONDecodeError:  # cut off by max_tokens
                call.state, self.broken = "broken", True


def forced_detector(tools: list[dict[str, Any]], tool_choice: Any) -> BaseFormatDetector:
    """The detector of a forced call's output: the named function's arguments, or for
    "required" the JSON array of `{"name", "parameters"}` objects."""
    name = named_function(tool_choice)
    if name is not None:
        return NamedCallDetector(name)
    return JsonArrayDetector(set(tool_functions(tools)), None, ("parameters",))


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def openai_calls(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` entries for (name, arguments JSON) pairs, each with a fresh id."""
    return [
        {"id": new_call_id(), "type": "function", "function": {"name": n, "arguments": a}}
        for n, a in pairs
    ]


def tool_call_deltas(items: list[ToolCallItem]) -> list[list[dict[str, Any]]]:
    """`delta.tool_calls` lists as the OpenAI API streams them, one per chunk: a call's first
    delta has its index, id, type and name with empty arguments, later ones its index and
    argument text; a chunk holds each call at most once."""
    chunks: list[list[dict[str, Any]]] = []
    for item in items:
        if item.name is not None:
            fn = {"name": item.name, "arguments": item.arguments}
            entry = {"index": item.index, "id": new_call_id(), "type": "function", "function": fn}
        else:
            entry = {"index": item.index, "function": {"arguments": item.arguments}}
        if not chunks or any(e["index"] == item.index for e in chunks[-1]):
            chunks.append([])
        chunks[-1].append(entry)
    return chunks


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls with their arguments as objects, as chat templates (Qwen's
    `arguments | tojson`) expect; OpenAI clients send them as JSON strings."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_decoded_arguments(c) for c in calls]}
        out.append(message)
    return out


def _decoded_arguments(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call  # left as the client sent it
    return {**call, "function": {**fn, "arguments": args}}
