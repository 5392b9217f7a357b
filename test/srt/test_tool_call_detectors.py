"""Tool-call detectors (function_call/): streamed pieces give what the whole answer gives.

Every format's detector is fed hand-written model outputs whole and in pieces of 1, 2 and 7
characters (so every marker and JSON token is split somewhere). Streamed, the content joined is
the whole answer's content, the calls are the same (name once, on the call's first delta, then
argument fragments that join to the arguments JSON), and no piece of content ever holds call
markup. No model, no server.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest

from sglang.srt.function_call.base_format_detector import BaseFormatDetector, parse_whole
from sglang.srt.function_call.function_call_parser import (
    forced_call_schema,
    forced_detector,
    tool_call_deltas,
)
from sglang.srt.function_call.tool_call_parsers import make_detector

NAMES = {"f", "g"}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in sorted(NAMES)]
MARKUP = ("<tool_call", "</tool_call", "[TOOL_CALLS", '{"name"')


def _stream(det: BaseFormatDetector, text: str, size: int) -> tuple[str, list[tuple[str, Any]]]:
    content, calls = "", []
    for start in range(0, len(text), size):
        piece, items = det.feed(text[start : start + size], start + size >= len(text))
        assert not any(m in piece for m in MARKUP) or not det.calls, piece
        content += piece
        for item in items:
            if item.name is not None:
                assert item.index == len(calls) and item.arguments == ""
                calls.append([item.name, ""])
            else:
                calls[item.index][1] += item.arguments
    return content, [(n, json.loads(a)) for n, a in calls]


# (parser, output, content, [(name, arguments)]) with no calls meaning all of it is content.
CASES: list[tuple[str, str, Optional[str], list[tuple[str, Any]]]] = [
    (
        "hermes",
        'Checking. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
        "Checking.",
        [("f", {"a": 1})],
    ),
    # The end tag inside a string does not end the block; a missing last end tag is tolerated.
    (
        "qwen25",
        '<tool_call>{"name": "g", "arguments": {"s": "</tool_call>"}}</tool_call>\n'
        '<tool_call>{"name": "f", "arguments": {"b": [1, {"c": null}]}}',
        None,
        [("g", {"s": "</tool_call>"}), ("f", {"b": [1, {"c": None}]})],
    ),
    # Another key order is sent whole when the object closes; text between calls is content.
    (
        "qwen",
        'A <tool_call>{"arguments": {"x": "y"}, "name": "f"}</tool_call> then B',
        "A then B",
        [("f", {"x": "y"})],
    ),
    # A block that is no call to a tool stays content as written; the next block still parses.
    (
        "hermes",
        'X <tool_call>{"name": "nope", "arguments": {}}</tool_call> <tool_call>{"name": "g", '
        '"arguments": {}}</tool_call>',
        'X <tool_call>{"name": "nope", "arguments": {}}</tool_call>',
        [("g", {})],
    ),
    ("hermes", "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    ("hermes", "a < b and <tool is not a tag  ", "a < b and <tool is not a tag  ", []),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
    (
        "llama3",
        '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"q": "r"}}',
        None,
        [("f", {}), ("g", {"q": "r"})],
    ),
    ("llama3", " Plain answer. ", " Plain answer. ", []),
    ("llama3", '{"name": "zz", "parameters": {}}', '{"name": "zz", "parameters": {}}', []),
    (
        "mistral",
        'Sure. [TOOL_CALLS] [{"name": "g", "arguments": {"b": "x"}}, {"name": "f", '
        '"arguments": {}}]',
        "Sure.",
        [("g", {"b": "x"}), ("f", {})],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "nope", "arguments": {}}]',
        '[TOOL_CALLS] [{"name": "nope", "arguments": {}}]',
        [],
    ),
]


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_streamed_pieces_give_the_whole_answer(parser, text, content, calls):
    found = parse_whole(make_detector(parser, NAMES), text)
    if not calls:
        assert found is None
    else:
        assert found is not None and found[0] == content
        assert [(n, json.loads(a)) for n, a in found[1]] == calls
    for size in (1, 2, 7):
        got = _stream(make_detector(parser, NAMES), text, size)
        assert got == ((content or "") if calls else text, calls), (size, got)


def test_cut_off_call_is_broken_and_the_answer_plain():
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": '
    assert parse_whole(make_detector("hermes", NAMES), text) is None
    det = make_detector("hermes", NAMES)
    content, calls = "", []
    for ch in text:
        piece, items = det.feed(ch, False)
        content, calls = content + piece, calls + items
    det.feed("", True)
    # Streamed, what was sent stays sent: the name and the arguments so far.
    assert content == "Hi" and calls[0].name == "f" and det.broken and not det.has_calls
    assert "".join(c.arguments for c in calls) == '{"a": '


def test_forced_required_array_and_named_function():
    required = forced_detector(TOOLS, "required")
    text = ' [ {"name": "g", "parameters": {"k": [1, 2]}} , {"name":"f","parameters":{}} ] '
    assert _stream(required, text, 3) == ("", [("g", {"k": [1, 2]}), ("f", {})])
    assert required.has_calls
    named = forced_detector(TOOLS, {"type": "function", "function": {"name": "f"}})
    assert _stream(named, '{"a": "b"}', 2) == ("", [("f", {"a": "b"})])
    cut = forced_detector(TOOLS, {"type": "function", "function": {"name": "f"}})
    cut.feed('{"a": ', True)
    assert cut.broken and not cut.has_calls


def test_parallel_tool_calls_false_allows_one_call():
    assert json.loads(forced_call_schema(TOOLS, "required", False))["maxItems"] == 1
    assert "maxItems" not in json.loads(forced_call_schema(TOOLS, "required"))


def test_openai_delta_shape():
    det = make_detector("hermes", NAMES)
    _, items = det.feed('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', True)
    chunks = tool_call_deltas(items)
    # The opening delta goes alone; a chunk never carries one call twice.
    first = chunks[0][0]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "f", "arguments": ""}
    assert chunks[1] == [{"index": 0, "function": {"arguments": '{"a": 1}'}}]
