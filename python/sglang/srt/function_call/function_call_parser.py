"""Forced tool calls: `tool_choice` "required" or a named function, enforced with a JSON schema.

The chat route asks this module for the schema that constrains the output (constrained/), so the
model can only write a call that parses, and then turns the finished text into OpenAI
`tool_calls`: for "required" the output is a JSON array of `{"name", "parameters"}` objects, one
per call, each name one of the request's tools and its parameters that tool's schema; for a named
function the output is that function's arguments object. `tool_choice` "auto" reads the model's
own format instead (tool_call_parsers.py, `--tool-call-parser`).
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Optional


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


def forced_call_schema(tools: list[dict[str, Any]] | None, tool_choice: Any) -> Optional[str]:
    """The JSON schema (text) that makes the output a call, or None when no call is forced."""
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
    return json.dumps({"type": "array", "minItems": 1, "items": {"anyOf": calls}})


def parse_forced_calls(text: str, tool_choice: Any) -> Optional[list[dict[str, Any]]]:
    """OpenAI tool_calls from a forced call's output; None when it does not parse (the output
    was cut off by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    name = named_function(tool_choice)
    if name is not None:
        return openai_calls([(name, value)])
    return openai_calls([(call["name"], call["parameters"]) for call in value])


def openai_calls(pairs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` entries for (name, arguments) pairs, each with a fresh id."""
    return [
        {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": fname, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        for fname, args in pairs
    ]
