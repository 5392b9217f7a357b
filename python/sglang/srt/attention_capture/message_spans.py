"""`attention_spans: "messages"` on the chat route: one prompt span per chat message.

Owns the mapping from a conversation to token ranges of its rendered prompt. Message i's span
runs from the end of messages[:i]'s rendering to the end of messages[:i+1]'s (each rendered by
the same chat template without the generation prompt), so it holds the message's role header, its
content and its end marker; the generation prompt after the last message belongs to no span.
Spans are named "<index>:<role>". A template whose renderings of the shorter conversations are not
token prefixes of the full prompt (one that rewrites earlier turns, or a boundary inside a token)
gets a 400 rather than approximate spans. No tensors here.
"""

from __future__ import annotations

from typing import Any, Callable


def message_spans(
    messages: list[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], str],
    encode: Callable[[str], list[int]],
    prompt_ids: list[int],
) -> list[dict[str, Any]]:
    """[{name, start, end}] of every message; `render(messages[:i])` renders without the
    generation prompt, `encode` tokenizes as the prompt was tokenized. Raises ValueError."""
    spans, start = [], 0
    for i, message in enumerate(messages):
        ids = encode(render(messages[: i + 1]))
        end = len(ids)
        if ids != prompt_ids[:end] or end <= start:
            raise ValueError(
                f"attention_spans 'messages': this chat template's rendering of messages 0..{i} "
                "is not a token prefix of the prompt, so message spans cannot be exact; give "
                "attention_spans as a list of {name, start, end} instead"
            )
        spans.append({"name": f"{i}:{message['role']}", "start": start, "end": end})
        start = end
    return spans
