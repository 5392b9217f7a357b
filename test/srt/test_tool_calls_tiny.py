"""Tool calls on a tiny random model with Qwen 2.5's chat template, streamed the way OpenAI does.

One server for the module: a tiny random Llama whose tokenizer_config.json carries the real Qwen
2.5 chat template, `--tool-call-parser hermes`, and `--dp 2`, so the forced-call requests (sent
concurrently) are compiled and constrained on both data-parallel replicas. Random weights write
junk, so only the grammar makes a call parse: `required` and named-function calls must parse and
validate against the tool's schema (jsonschema), streamed and not. Streams are read with the
official openai client's accumulating `chat.completions.stream()`, and their raw chunks checked
for OpenAI's delta shape: a call's first delta has index, id, type and name with empty arguments,
later ones only argument fragments, and no call markup in `delta.content`.

`auto` is checked on hand-written Qwen-style outputs through the parsers (stream and whole agree,
arguments validate) and once over HTTP with an EBNF grammar making the model write such an output;
tool results (`role: tool`) are rendered by the Qwen template.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from sglang.srt.function_call.base_format_detector import parse_whole
from sglang.srt.function_call.tool_call_parsers import make_detector
from sglang.srt.hf_transformers_utils import get_tokenizer
from sglang.test.chat_templates import QWEN25_CHAT_TEMPLATE, make_tiny_chat_model
from sglang.test.test_utils import running_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"enum": ["UTC", "CET", "PST"]}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MESSAGES = [{"role": "user", "content": "What's the weather like in Paris?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_chat_model(str(tmp_path_factory.mktemp("tiny-qwen")), QWEN25_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def client(model):
    args = [
        "--max-total-tokens",
        "8192",
        "--tool-call-parser",
        "hermes",
        "--constrained-json-disable-any-whitespace",  # random weights would pad with spaces
        "--dp",
        "2",
    ]
    with running_server(model, other_args=args) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=300)


def _validate(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _check_chunks(chunks: list[Any]) -> None:
    """OpenAI's delta shape: per call one opening delta, then argument fragments only."""
    opened: set[int] = set()
    fragments = 0
    for chunk in chunks:
        for choice in chunk.choices:
            assert not choice.delta.content, choice.delta.content  # no markup or JSON leaks
            for tc in choice.delta.tool_calls or []:
                if tc.index not in opened:
                    opened.add(tc.index)
                    assert tc.id.startswith("call_") and tc.type == "function"
                    assert tc.function.name in SCHEMAS and tc.function.arguments == ""
                else:
                    assert tc.id is None and tc.function.name is None
                    fragments += 1
    assert opened and fragments > len(opened), "arguments did not arrive incrementally"


def _forced(client: openai.OpenAI, tool_choice: Any, stream: bool, seed: int) -> None:
    kw: dict[str, Any] = dict(
        model="default",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=200,
        temperature=1.0,
        seed=seed,
        # One call: a random model might otherwise keep adding calls to the array.
        parallel_tool_calls=False,
    )
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        return _validate(choice.message.tool_calls)
    with client.chat.completions.stream(**kw) as events:
        chunks = [e.chunk for e in events if e.type == "chunk"]
        final = events.get_final_completion().choices[0]
    _check_chunks(chunks)
    assert final.finish_reason == "tool_calls"
    _validate(final.message.tool_calls)
    for call in final.message.tool_calls:  # the client's own parse of the accumulated text
        assert call.function.parsed_arguments == json.loads(call.function.arguments)
    if tool_choice == NAMED:
        assert [c.function.name for c in final.message.tool_calls] == ["get_weather"]


def test_forced_calls_parse_and_validate(client):
    jobs = [
        (choice, stream, seed)
        for choice in ("required", NAMED)
        for stream in (False, True)
        for seed in range(3)
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: both DP replicas get some
        for fut in [pool.submit(_forced, client, *job) for job in jobs]:
            fut.result()


# What a Qwen 2.5 model writes for calls (the template's own format), with text before them.
QWEN_OUTPUT = (
    "Let me check both.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 2}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n'
    "</tool_call>"
)


@pytest.mark.parametrize("parser", ["hermes", "qwen25", "qwen"])
def test_auto_hand_written_output_parses_streamed_and_whole(parser):
    names = set(SCHEMAS)
    content, calls = parse_whole(make_detector(parser, names), QWEN_OUTPUT)
    assert content == "Let me check both."
    assert [n for n, _ in calls] == ["get_weather", "get_time"]
    for name, args in calls:
        jsonschema.validate(json.loads(args), SCHEMAS[name])
    # Token-sized pieces: the same content and calls, no markup in the content.
    detector, streamed, args_by_call = make_detector(parser, names), "", {}
    for start in range(0, len(QWEN_OUTPUT), 3):
        piece, items = detector.feed(QWEN_OUTPUT[start : start + 3], start + 3 >= len(QWEN_OUTPUT))
        streamed += piece
        for item in items:
            args_by_call[item.index] = args_by_call.get(item.index, "") + item.arguments
    assert streamed == content and detector.has_calls
    assert [json.loads(a) for a in args_by_call.values()] == [json.loads(a) for _, a in calls]


QWEN_EBNF = (
    'root ::= "Checking. <tool_call>\\n" '
    '"{\\"name\\": \\"get_time\\", \\"arguments\\": {\\"timezone\\": \\"UTC\\"}}" '
    '"\\n</tool_call>"'
)


def test_auto_over_http_streams_content_then_call(client):
    kw: dict[str, Any] = dict(
        model="default", messages=MESSAGES, tools=TOOLS, max_tokens=64, temperature=0
    )
    with client.chat.completions.stream(extra_body={"ebnf": QWEN_EBNF}, **kw) as events:
        chunks = [e.chunk for e in events if e.type == "chunk"]
        final = events.get_final_completion().choices[0]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Checking." and final.finish_reason == "tool_calls"
    assert [
        (c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls
    ] == [("get_time", {"timezone": "UTC"})]
    whole = client.chat.completions.create(extra_body={"ebnf": QWEN_EBNF}, **kw).choices[0]
    assert whole.message.content == "Checking." and whole.finish_reason == "tool_calls"
    assert json.loads(whole.message.tool_calls[0].function.arguments) == {"timezone": "UTC"}


def test_tool_results_rendered_by_the_qwen_template(client, model):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'},
    }
    messages = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    resp = client.chat.completions.create(
        model="default", messages=messages, tools=[TIME], max_tokens=4, temperature=0
    )
    # The prompt the server built is the template's rendering, arguments as an object.
    tokenizer = get_tokenizer(model)
    decoded = [dict(m) for m in messages]
    decoded[1] = {**decoded[1], "tool_calls": [{**call, "function": {**call["function"]}}]}
    decoded[1]["tool_calls"][0]["function"]["arguments"] = {"timezone": "UTC"}
    text = tokenizer.apply_chat_template(
        decoded, tools=[TIME], tokenize=False, add_generation_prompt=True
    )
    assert '{"name": "get_time", "arguments": {"timezone": "UTC"}}' in text
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>" in text
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert resp.usage.prompt_tokens == len(ids)
