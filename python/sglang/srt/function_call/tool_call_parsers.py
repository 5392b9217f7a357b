"""`--tool-call-parser`: find the tool calls a model writes in its own format (`tool_choice` "auto").

Formats, by upstream's parser names:
- `hermes`, `qwen25` (alias `qwen`): Hermes-style blocks, as Qwen 2.5 / 3 write them,
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; text outside them is content.
  A block that is no call to one of the tools stays in the content as written.
- `llama3`: the output is `{"name": ..., "parameters": {...}}` (after an optional
  `<|python_tag|>`), several calls separated by `;`; an output that does not open with a call is
  all content.
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` after any content.
The same detectors also read the JSON array a `tool_choice: "required"` grammar forces
(function_call_parser.py). Streaming and the whole answer share them (base_format_detector.py).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from sglang.srt.function_call.base_format_detector import (
    NO,
    OK,
    PARTIAL,
    BaseFormatDetector,
    CallObject,
    ToolCallItem,
    match_literal,
    parse_whole,
    partial_suffix,
    skip_ws,
)


class HermesDetector(BaseFormatDetector):
    """`<tool_call>{...}</tool_call>` blocks among content; the closing tag may be missing."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, names: set[str]) -> None:
        super().__init__(names)
        self.block_at = 0

    def _parse(self, finished: bool, out: list[str], items: list[ToolCallItem]) -> None:
        text = self.text
        while True:
            if self.state == "content":
                k = text.find(self.START, self.sent)
                if k < 0:
                    hold = 0 if finished else partial_suffix(text, self.sent, self.START)
                    self._release(len(text) - hold, out)
                    if finished:
                        self._finish(out)
                    return
                self._release(k, out)
                self.block_at, self.call, self.state = k, None, "block"
            if self.state == "block":
                if self.call is None:
                    i = skip_ws(text, self.block_at + len(self.START))
                    if i >= len(text) and not finished:
                        return
                    if i >= len(text) or text[i] != "{":
                        self.state = "rejected"
                        continue
                    self.call = CallObject(i, len(self.calls), self.names, ("arguments",))
                self._step(self.call, finished, items)
                if self.call.waiting:
                    return
                if self.call.state == "rejected":
                    self.state = "rejected"
                    continue
                if self.call.end is None:  # broken at the end of the answer
                    self.sent = len(text)
                    return
                self.state = "closing"
            if self.state == "closing":
                assert self.call is not None and self.call.end is not None
                status, pos = match_literal(text, self.call.end, self.END)
                if status == PARTIAL and not finished:
                    return
                self.sent = pos if status == OK else self.call.end
                if status == PARTIAL:
                    self.sent = len(text)  # a closing tag cut off by the end: markup
                self.state = "content"
                continue
            # rejected: the block is content up to its closing tag
            e = text.find(self.END, self.block_at + len(self.START))
            if e >= 0:
                self._release_all(e + len(self.END), out)
                self.state = "content"
                continue
            hold = 0 if finished else partial_suffix(text, self.sent, self.END)
            self._release_all(len(text) - hold, out)
            if finished:
                self._finish(out)
            return


class JsonArrayDetector(BaseFormatDetector):
    """Calls in a JSON array (or one object) after `marker`: Mistral's `[TOOL_CALLS] [...]`, and
    with no marker the array a `required` grammar forces. A call that is not one to the tools
    makes the rest of the answer content."""

    def __init__(self, names: set[str], marker: Optional[str], arg_keys: tuple[str, ...]) -> None:
        super().__init__(names, "content" if marker else "open")
        self.marker = marker
        self.arg_keys = arg_keys
        self.in_array = False

    def _parse(self, finished: bool, out: list[str], items: list[ToolCallItem]) -> None:
        text = self.text
        while True:
            if self.state == "content":
                k = text.find(self.marker, self.sent) if self.marker else -1
                if k < 0:
                    hold = (
                        0
                        if finished or not self.marker
                        else partial_suffix(text, self.sent, self.marker)
                    )
                    self._release(len(text) - hold, out)
                    if finished:
                        self._finish(out)
                    return
                self._release(k, out)
                self.pos, self.state = k + len(self.marker or ""), "open"
            if self.state in ("open", "element"):
                i = skip_ws(text, self.pos)
                if i >= len(text) and not finished:
                    return
                c = text[i] if i < len(text) else ""
                if self.state == "open" and c == "[":
                    self.in_array, self.pos, self.state = True, i + 1, "element"
                    continue
                if c != "{":
                    self.state = "plain"
                    continue
                self.call = CallObject(i, len(self.calls), self.names, self.arg_keys)
                self.state = "call"
            if self.state == "call":
                if not self._advance_call(
                    finished, items, "separator" if self.in_array else "content"
                ):
                    return
                continue
            if self.state == "separator":
                comma, after_comma = match_literal(text, self.pos, ",")
                close, after_close = match_literal(text, self.pos, "]")
                if comma == OK:
                    self.pos, self.state = after_comma, "element"
                elif close == OK:
                    self.sent = self.pos = after_close
                    self.in_array, self.state = False, "content"
                elif comma == PARTIAL and not finished:
                    return
                else:
                    self.state = "content"  # text after an unclosed array is content
                continue
            # plain: from here on everything is content
            self._release_all(len(text), out)
            if finished:
                self._finish(out)
            return


class Llama32Detector(BaseFormatDetector):
    """`<|python_tag|>`-optional `{"name": ..., "parameters": {...}}` calls separated by `;`."""

    TAG = "<|python_tag|>"
    ARG_KEYS = ("parameters", "arguments")

    def __init__(self, names: set[str]) -> None:
        super().__init__(names, "start")

    def _parse(self, finished: bool, out: list[str], items: list[ToolCallItem]) -> None:
        text = self.text
        while True:
            if self.state == "start":
                i = skip_ws(text, 0)
                if text.startswith(self.TAG, i):
                    i = skip_ws(text, i + len(self.TAG))
                elif self.TAG.startswith(text[i:]) and not finished:
                    return  # may still become the tag
                if i >= len(text) and not finished:
                    return
                self.pos, self.state = i, "next"
            if self.state == "next":
                i = skip_ws(text, self.pos)
                if i < len(text) and text[i] == "{":
                    self.call = CallObject(i, len(self.calls), self.names, self.ARG_KEYS)
                    self.state = "call"
                elif i >= len(text) and not finished:
                    return
                else:
                    self.state = "plain"
                    continue
            if self.state == "call":
                if not self._advance_call(finished, items, "separator"):
                    return
                continue
            if self.state == "separator":
                status, after = match_literal(text, self.pos, ";")
                if status == PARTIAL and not finished:
                    return
                if status == OK:
                    self.sent = self.pos = after
                    self.state = "next"
                    continue
                self.state = "plain" if status == NO else "done"
                continue
            if self.state == "done":
                self._finish(out)
                return
            # plain: the rest is content (everything, when no call came first)
            self._release_all(len(text), out)
            if finished:
                self._finish(out)
            return


# Upstream's --tool-call-parser names for the formats built here.
TOOL_CALL_PARSERS: dict[str, Any] = {
    "hermes": HermesDetector,
    "qwen25": HermesDetector,
    "qwen": HermesDetector,
    "llama3": Llama32Detector,
    "mistral": lambda names: JsonArrayDetector(names, "[TOOL_CALLS]", ("arguments",)),
}


def make_detector(parser: str, names: set[str]) -> BaseFormatDetector:
    if parser not in TOOL_CALL_PARSERS:
        raise ValueError(
            f"unknown tool-call parser {parser!r}; choose from {sorted(TOOL_CALL_PARSERS)}"
        )
    return TOOL_CALL_PARSERS[parser](names)


def parse_tool_calls(
    parser: str, text: str, tool_names: set[str]
) -> tuple[Optional[str], list[tuple[str, Any]]]:
    """(content left, [(name, arguments)]) of a finished answer; no calls: all of it content."""
    found = parse_whole(make_detector(parser, tool_names), text)
    if found is None:
        return text, []
    content, calls = found
    return content, [(name, json.loads(args)) for name, args in calls]
