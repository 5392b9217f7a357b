"""`--tool-call-parser`: find the tool calls a model wrote in its own format (`tool_choice` "auto").

Formats, by upstream's parser names:
- `qwen25` (Qwen 2.5 / 3, Hermes-style): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  blocks; the text outside them is the message content.
- `llama3`: the whole output is `{"name": ..., "parameters": {...}}` (after an optional
  `<|python_tag|>`), several calls separated by `;`.
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` after any content.
An output in which no complete call parses is left as plain content (no tool_calls).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

TOOL_CALL_PARSERS = ("llama3", "mistral", "qwen25")
_QWEN_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _call(obj: Any, names: set[str], args_key: str) -> Optional[tuple[str, Any]]:
    """(name, arguments) of one parsed call object, or None if it is not a call to a tool."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    return obj["name"], args if isinstance(args, (dict, list)) else {}


def parse_tool_calls(
    parser: str, text: str, tool_names: set[str]
) -> tuple[Optional[str], list[tuple[str, Any]]]:
    """(content left, [(name, arguments)]); no calls means the text is all content."""
    if parser == "qwen25":
        calls = []
        for block in _QWEN_BLOCK.findall(text):
            try:
                call = _call(json.loads(block), tool_names, "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = _QWEN_BLOCK.sub("", text).strip() if calls else text
        return content or None, calls
    if parser == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        calls = []
        for part in filter(None, (p.strip() for p in body.split(";"))):
            try:
                call = _call(json.loads(part), tool_names, "parameters")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return (None, calls) if calls else (text, [])
    if parser == "mistral":
        content, sep, rest = text.partition("[TOOL_CALLS]")
        if not sep:
            return text, []
        try:
            items = json.loads(rest.strip())
        except json.JSONDecodeError:
            return text, []
        calls = [
            _call(item, tool_names, "arguments")
            for item in (items if isinstance(items, list) else [items])
        ]
        if not calls or None in calls:
            return text, []
        return content.strip() or None, calls
    raise ValueError(f"unknown tool-call parser {parser!r}; choose from {TOOL_CALL_PARSERS}")
