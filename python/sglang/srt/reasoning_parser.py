"""`--reasoning-parser`: split a reasoning model's think block from its answer (chat only).

`deepseek-r1`: the chat template opens the think block in the prompt, so the output is reasoning
up to the first `</think>` and the answer after it. `qwen3`: the output is reasoning only when it
starts with `<think>` (thinking can be switched off in the template); otherwise it is all answer.
An output cut off before `</think>` is all reasoning. Both parts are stripped of surrounding
whitespace, as upstream.

Streaming re-parses the cumulative text at every chunk and sends what each part gained; a tail
that could still become a tag (`</thi`) is held back until the next chunk settles it.
"""

from __future__ import annotations

from typing import Optional

THINK_START = "<think>"
THINK_END = "</think>"
# Parser name -> whether the output starts inside the think block.
REASONING_PARSERS = {"deepseek-r1": True, "qwen3": False}


class ReasoningParser:
    def __init__(self, model_type: str) -> None:
        if model_type not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {model_type!r}; choose from {sorted(REASONING_PARSERS)}"
            )
        self.force_reasoning = REASONING_PARSERS[model_type]
        self.sent_reasoning = 0
        self.sent_content = 0

    def parse_non_stream(self, text: str) -> tuple[Optional[str], str]:
        """(reasoning or None, answer) of a finished output."""
        body = text.lstrip()
        if body.startswith(THINK_START):
            body = body[len(THINK_START) :]
        elif not self.force_reasoning:
            return None, text
        reasoning, sep, content = body.partition(THINK_END)
        return reasoning.strip(), content.strip() if sep else ""

    def parse_stream_chunk(self, text: str, finished: bool) -> tuple[str, str]:
        """(new reasoning, new answer) since the last call, from the cumulative `text`.

        Parts are only left-stripped here (what was sent cannot be taken back), so streamed
        reasoning may keep whitespace that `parse_non_stream` trims before `</think>`."""
        if not finished:
            text = text[: len(text) - _partial_tag_len(text)]
        body = text.lstrip()
        if body.startswith(THINK_START):
            body = body[len(THINK_START) :]
        elif not self.force_reasoning:
            body = ""
            reasoning, content = "", text
        if body or self.force_reasoning or text.lstrip().startswith(THINK_START):
            reasoning, sep, content = body.partition(THINK_END)
            reasoning, content = reasoning.lstrip(), content.lstrip()
        new_r, new_c = reasoning[self.sent_reasoning :], content[self.sent_content :]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return new_r, new_c


def _partial_tag_len(text: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of a think tag."""
    for n in range(min(len(THINK_END) - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(tag.startswith(tail) and n < len(tag) for tag in (THINK_START, THINK_END)):
            return n
    return 0
