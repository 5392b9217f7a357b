"""Reasoning split on a tiny random model whose chat template opens a think block, under TP 2.

One server for the module: a tiny random Llama whose chat template ends the generation prompt
with `<think>\\n` (as DeepSeek-R1's does), `--reasoning-parser deepseek-r1`, `--tool-call-parser
hermes`, and `--tp 2`, so the EBNF constraints that make the random model write a think block run
on both tensor-parallel ranks. Checked with the official openai client: `message.reasoning_content`
and `delta.reasoning_content` hold the thought, `content` the answer; `separate_reasoning: false`
keeps it all in `content`; an answer cut off inside the think block is all reasoning; a think block
followed by a Hermes-style call gives reasoning, then the call.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from sglang.test.chat_templates import THINK_CHAT_TEMPLATE, make_tiny_chat_model
from sglang.test.test_utils import running_server

# The template already wrote "<think>\n": the output continues inside the think block.
THINK = 'root ::= "Water is a liquid" "." "\\n</think>\\n\\n" "Answer: " ("yes" | "no")'
THINK_THEN_CALL = (
    'root ::= "Need the time.</think>\\n<tool_call>\\n" '
    '"{\\"name\\": \\"get_time\\", \\"arguments\\": {\\"timezone\\": \\"UTC\\"}}" '
    '"\\n</tool_call>"'
)
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
    },
}
MESSAGES = [{"role": "user", "content": "Is water wet?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = make_tiny_chat_model(str(tmp_path_factory.mktemp("tiny-think")), THINK_CHAT_TEMPLATE)
    args = [
        "--max-total-tokens",
        "8192",
        "--reasoning-parser",
        "deepseek-r1",
        "--tool-call-parser",
        "hermes",
        "--tp",
        "2",
    ]
    with running_server(folder, other_args=args) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=300)


def _chat(client: openai.OpenAI, stream: bool, **kw: Any) -> tuple[Any, Any, Any, Any]:
    """(reasoning, content, tool calls, finish_reason), streamed deltas joined."""
    kw = dict(model="default", messages=MESSAGES, temperature=0, **kw)
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        msg = choice.message
        reasoning = getattr(msg, "reasoning_content", None)
        return reasoning, msg.content, msg.tool_calls, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) or None
    content = "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    return reasoning, content, calls, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_think_block_split_into_reasoning_content(client, stream):
    reasoning, content, _, finish = _chat(client, stream, max_tokens=64, extra_body={"ebnf": THINK})
    assert reasoning is not None and reasoning.strip() == "Water is a liquid."
    assert content in ("Answer: yes", "Answer: no") and finish == "stop"


def test_separate_reasoning_false_keeps_it_in_content(client):
    body = {"ebnf": THINK, "separate_reasoning": False}
    for stream in (False, True):
        reasoning, content, _, _ = _chat(client, stream, max_tokens=64, extra_body=body)
        assert reasoning is None
        assert content.startswith("Water is a liquid.\n</think>\n\nAnswer: "), content


@pytest.mark.parametrize("stream", [False, True])
def test_cut_off_inside_the_think_block_is_all_reasoning(client, stream):
    reasoning, content, _, finish = _chat(client, stream, max_tokens=6)
    assert finish == "length" and reasoning and not content


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_then_tool_call(client, stream):
    reasoning, content, calls, finish = _chat(
        client, stream, max_tokens=64, tools=[TIME], extra_body={"ebnf": THINK_THEN_CALL}
    )
    assert reasoning.strip() == "Need the time." and not content and finish == "tool_calls"
    args = "".join(c.function.arguments or "" for c in calls)
    assert [c.function.name for c in calls if c.function.name] == ["get_time"]
    assert json.loads(args) == {"timezone": "UTC"}
