"""Incremental tool-call parsing: the call-object scanner all formats share, and the detector base.

A detector is fed a chat answer as it is generated (`feed(new_text, finished)`) and hands back the
content it can release and the tool-call deltas found so far, the way the OpenAI API streams them:
a call's first delta carries its name (and empty arguments), later ones the argument text as it
arrives. The non-streamed answer runs the same detector over the whole text in one feed, so both
agree on what is content and what is a call.

Every format wraps JSON objects `{"name": ..., "<arguments key>": {...}}`. A call is committed
(its first delta sent) as soon as its name is complete and is one of the request's tools; its
arguments object is then streamed as the model writes it, character for character, so the
concatenated fragments are exactly the object's JSON text. Objects written in another key order
(or with arguments that are no object) are sent whole once they close. A call that never closes
(cut off by max_tokens, or malformed) is `broken`: streamed, what was sent stays sent; the whole
answer then falls back to plain content.

Content is the text outside calls, except whitespace just before a call (and trailing whitespace
when the message holds calls): trailing whitespace is held back until the text that follows shows
whether a call comes next, and a tail that may be the start of a call marker is held back too.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple, Optional

WS = " \t\r\n"
OK, PARTIAL, NO = "ok", "partial", "no"
# The rest of a JSON string after its opening quote, up to and including the closing quote.
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"')


class ToolCallItem(NamedTuple):
    """One tool-call delta: the call's index in the message, its name on the call's first delta
    (None after that), and the arguments text this delta adds."""

    index: int
    name: Optional[str]
    arguments: str


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


def match_literal(text: str, i: int, literal: str) -> tuple[str, int]:
    """(OK, index past it) when `literal` follows text[i:] after whitespace; (PARTIAL, i) when
    the text ends inside it; (NO, i) when something else follows."""
    i = skip_ws(text, i)
    got = text[i : i + len(literal)]
    if not literal.startswith(got):
        return NO, i
    if len(got) < len(literal):
        return PARTIAL, i
    return OK, i + len(literal)


def partial_suffix(text: str, start: int, marker: str) -> int:
    """Length of the longest end of text[start:] that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if marker.startswith(text[len(text) - n :]):
            return n
    return 0


class ValueScanner:
    """Where a JSON object, array or string ends; resumes where the last call stopped, so a long
    value streamed a token at a time is scanned once. `depth=1` finds the end of the container
    the scan starts inside."""

    def __init__(self, start: int, depth: int = 0) -> None:
        self.pos = start
        self.depth = depth
        self.in_str = False
        self.esc = False
        self.end: Optional[int] = None

    def advance(self, text: str) -> Optional[int]:
        if self.end is not None:
            return self.end
        for j in range(self.pos, len(text)):
            c = text[j]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 0:
                        self.end = j + 1
                        return self.end
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.end = j + 1
                    return self.end
        self.pos = len(text)
        return None


def call_of(obj: Any, names: set[str], arg_keys: tuple[str, ...]) -> Optional[tuple[str, Any]]:
    """(name, arguments) of a parsed call object, or None if it is no call to one of the tools."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args: Any = {}
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return obj["name"], args if isinstance(args, (dict, list)) else {}


class CallObject:
    """One call object being generated, from its `{` at `start`.

    States: head (before the name is complete), args_head (up to the arguments value), args
    (streaming the arguments), tail (to the object's closing brace), whole (another shape: wait
    for the object to close), and the ends: done, rejected (not a call: never committed), broken
    (committed but never closed properly)."""

    def __init__(self, start: int, index: int, names: set[str], arg_keys: tuple[str, ...]) -> None:
        self.start = start
        self.index = index
        self.names = names
        self.arg_keys = arg_keys
        self.state = "head"
        self.name: Optional[str] = None  # set when committed
        self.pos = start
        self.args_at = 0
        self.arguments = ""  # the arguments text sent so far
        self.scan: Optional[ValueScanner] = None
        self.end: Optional[int] = None  # index past the closing brace, once known

    @property
    def waiting(self) -> bool:
        return self.state not in ("done", "rejected", "broken")

    def step(self, text: str, finished: bool) -> list[ToolCallItem]:
        out: list[ToolCallItem] = []
        if self.state == "head":
            self._head(text, out)
        if self.state == "args_head":
            self._args_head(text)
        if self.state == "args":
            self._args(text, out)
        if self.state == "tail":
            self._tail(text)
        if self.state == "whole":
            self._whole(text, out)
        if finished and self.waiting:
            self.state = "broken" if self.name is not None else "rejected"
        return out

    def _fallback(self) -> None:
        self.state, self.scan = "whole", ValueScanner(self.start)

    def _head(self, text: str, out: list[ToolCallItem]) -> None:
        pos = self.start
        for literal in ("{", '"name"', ":", '"'):
            status, pos = match_literal(text, pos, literal)
            if status == PARTIAL:
                return
            if status == NO:
                return self._fallback()
        m = _STRING_REST.match(text, pos)
        if m is None:
            return  # the name is still being written
        try:
            name = json.loads(text[pos - 1 : m.end()])
        except json.JSONDecodeError:
            name = None
        if name not in self.names:
            self.state = "rejected"
            return
        self.name, self.pos, self.state = name, m.end(), "args_head"
        out.append(ToolCallItem(self.index, name, ""))

    def _args_head(self, text: str) -> None:
        status, pos = match_literal(text, self.pos, ",")
        if status != OK:
            return None if status == PARTIAL else self._fallback()
        keys = [match_literal(text, pos, json.dumps(k)) for k in self.arg_keys]
        found = [p for s, p in keys if s == OK]
        if not found:
            return None if any(s == PARTIAL for s, _ in keys) else self._fallback()
        status, pos = match_literal(text, found[0], ":")
        if status != OK:
            return None if status == PARTIAL else self._fallback()
        v = skip_ws(text, pos)
        if v >= len(text):
            return None
        if text[v] not in "{[":
            return self._fallback()
        self.args_at, self.scan, self.state = v, ValueScanner(v), "args"

    def _args(self, text: str, out: list[ToolCallItem]) -> None:
        assert self.scan is not None
        end = self.scan.advance(text)
        piece = text[self.args_at + len(self.arguments) : len(text) if end is None else end]
        if piece:
            self.arguments += piece
            out.append(ToolCallItem(self.index, None, piece))
        if end is not None:
            self.state, self.scan = "tail", ValueScanner(end, depth=1)

    def _closed(self, text: str) -> tuple[bool, Optional[tuple[str, Any]]]:
        """(whether the object has closed, the call it parses to when it has)."""
        assert self.scan is not None
        self.end = self.scan.advance(text)
        if self.end is None:
            return False, None
        try:
            obj = json.loads(text[self.start : self.end])
        except json.JSONDecodeError:
            return True, None
        return True, call_of(obj, self.names, self.arg_keys)

    def _tail(self, text: str) -> None:
        closed, call = self._closed(text)
        if closed:
            self.state = "done" if call is not None and call[0] == self.name else "broken"

    def _whole(self, text: str, out: list[ToolCallItem]) -> None:
        closed, call = self._closed(text)
        if not closed:
            return
        if call is None or (self.name is not None and call[0] != self.name):
            self.state = "broken" if self.name is not None else "rejected"
            return
        if self.name is None:
            self.name = call[0]
            out.append(ToolCallItem(self.index, self.name, ""))
        self.arguments = json.dumps(call[1], ensure_ascii=False)
        out.append(ToolCallItem(self.index, None, self.arguments))
        self.state = "done"


class BaseFormatDetector:
    """Feed the answer text as it grows; subclasses parse their format in `_parse`, which
    releases content with `_release` and steps `CallObject`s for the calls."""

    def __init__(self, names: set[str], state: str = "content") -> None:
        self.names = set(names)
        self.state = state  # the subclass's parsing state
        self.pos = 0  # where the subclass expects its next token
        self.call: Optional[CallObject] = None  # the call being generated
        self.text = ""
        self.sent = 0  # text[:sent] has been released as content or consumed by calls
        self.calls: list[CallObject] = []  # committed calls, in order
        self.broken = False

    def feed(self, new_text: str, finished: bool) -> tuple[str, list[ToolCallItem]]:
        """(content to release, tool-call deltas) after `new_text`; `finished` at the end."""
        self.text += new_text
        content: list[str] = []
        items: list[ToolCallItem] = []
        self._parse(finished, content, items)
        return "".join(content), merge_items(items)

    def _parse(self, finished: bool, content: list[str], items: list[ToolCallItem]) -> None:
        raise NotImplementedError

    def _step(self, call: CallObject, finished: bool, items: list[ToolCallItem]) -> None:
        """Advance `call`, record it once committed, and note a broken one."""
        items.extend(call.step(self.text, finished))
        if call.name is not None and call not in self.calls:
            self.calls.append(call)
        if call.state == "broken":
            self.broken = True

    def _advance_call(self, finished: bool, items: list[ToolCallItem], after: str) -> bool:
        """Step the current call of a format whose calls follow one another; False while it
        waits for text. A call that is not one (or never closes) makes the rest plain content;
        a complete one moves the parse to state `after`, past the call."""
        assert self.call is not None
        self._step(self.call, finished, items)
        if self.call.waiting:
            return False
        if self.call.state == "rejected" or self.call.end is None:
            self.state = "plain"
        else:
            self.pos = self.sent = self.call.end
            self.state = after
        return True

    def _release(self, upto: int, out: list[str]) -> None:
        """Release text[sent:upto] as content, holding back its trailing whitespace."""
        keep = self.text[self.sent : upto].rstrip(WS)
        if keep:
            out.append(keep)
            self.sent += len(keep)

    def _release_all(self, upto: int, out: list[str]) -> None:
        if upto > self.sent:
            out.append(self.text[self.sent : upto])
            self.sent = upto

    def _finish(self, out: list[str]) -> None:
        """End of the answer: held whitespace is content only in a message without calls."""
        if not self.calls:
            self._release_all(len(self.text), out)
        self.sent = len(self.text)

    @property
    def has_calls(self) -> bool:
        """Whether the message holds complete calls (finish_reason "tool_calls")."""
        return bool(self.calls) and not self.broken


def merge_items(items: list[ToolCallItem]) -> list[ToolCallItem]:
    """Consecutive argument fragments of one call joined; a call's opening delta stays alone
    (name and empty arguments, as OpenAI sends it)."""
    merged: list[ToolCallItem] = []
    for item in items:
        last = merged[-1] if merged else None
        if last and last.index == item.index and item.name is None and last.name is None:
            merged[-1] = last._replace(arguments=last.arguments + item.arguments)
        else:
            merged.append(item)
    return merged


def parse_whole(
    detector: BaseFormatDetector, text: str
) -> Optional[tuple[Optional[str], list[tuple[str, str]]]]:
    """(content or None, [(name, arguments JSON)]) of a finished answer, or None when it holds
    no complete calls (then the whole text is content)."""
    content, _ = detector.feed(text, True)
    if not detector.has_calls:
        return None
    return content or None, [(c.name or "", c.arguments) for c in detector.calls]
