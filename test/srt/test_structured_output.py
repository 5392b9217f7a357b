"""Structured output (constrained decoding with xgrammar) through every route, on the default model.

One server for the module (attention tokens on, small KV pool). Every output is checked with a
real validator: `jsonschema` for JSON schemas, `re.fullmatch` for regexes. The 5 schemas x 4
prompts go out at once, spread over chat `response_format` (official openai client),
`/v1/completions` and `/generate`, streamed and not, together with one schema sent through all
six route x stream combinations, so constrained and unconstrained requests share batches.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest
import requests

from sglang.test.test_utils import running_server

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "city": {"type": "string", "maxLength": 20},
                },
                "required": ["name", "city"],
            }
        },
        "required": ["person"],
    },
    "array": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["colors"],
    },
    "enum": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "string", "enum": ["low", "high"]},
        },
        "required": ["sentiment", "confidence"],
    },
    "numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["age", "score"],
    },
    "pattern": {
        "type": "object",
        "properties": {
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        },
        "required": ["zip", "code"],
    },
}
PROMPTS = [
    "Describe a person as JSON.",
    "Give me an example answer in JSON.",
    "Reply with a JSON object about the weather in Paris.",
    "Output JSON for a short review of a movie.",
]
ROUTES = ["chat", "completions", "generate"]
ONE_SCHEMA = "nested"  # the schema sent through all six route x stream combinations
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def server():
    # qwen3 splits only outputs that open with <think>: the other tests' answers stay content.
    args = [
        "--max-total-tokens",
        "8192",
        "--return-attention-tokens",
        "--reasoning-parser",
        "qwen3",
        "--tool-call-parser",
        "qwen25",
    ]
    with running_server(other_args=args) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", timeout=300)


def _chat(client: openai.OpenAI, prompt: str, constraint: dict, stream: bool) -> str:
    """A JSON schema goes as `response_format`, a regex or EBNF grammar in `extra_body`."""
    messages = [{"role": "user", "content": prompt}]
    kw: dict[str, Any] = dict(model="default", messages=messages, max_tokens=MAX_TOKENS)
    if "json_schema" in constraint:
        schema = json.loads(constraint["json_schema"])
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        kw["response_format"] = fmt
    else:
        kw["extra_body"] = constraint
    if not stream:
        return client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    parts = client.chat.completions.create(temperature=0, stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)


def _completions(client: openai.OpenAI, prompt: str, constraint: dict, stream: bool) -> str:
    kw = dict(model="default", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        return client.completions.create(extra_body=constraint, **kw).choices[0].text
    parts = client.completions.create(stream=True, extra_body=constraint, **kw)
    return "".join(c.choices[0].text for c in parts if c.choices)


def _generate(url: str, prompt: str, constraint: dict, stream: bool) -> str:
    sp = {"max_new_tokens": MAX_TOKENS, "temperature": 0, **constraint}
    body = {"text": prompt, "sampling_params": sp, "stream": stream}
    resp = requests.post(f"{url}/generate", json=body, timeout=300, stream=stream)
    resp.raise_for_status()
    if not stream:
        return resp.json()["text"]
    text = ""
    for line in resp.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            text = json.loads(line[6:])["text"]  # native streams carry the text so far
    return text


def _run(url: str, client: openai.OpenAI, route: str, prompt: str, constraint: dict, stream: bool):
    if route == "chat":
        return _chat(client, prompt, constraint, stream)
    if route == "completions":
        return _completions(client, prompt, constraint, stream)
    return _generate(url, prompt, constraint, stream)


def test_schemas_validate_on_every_route(server, client):
    jobs = []
    for s, (name, schema) in enumerate(SCHEMAS.items()):
        for p, prompt in enumerate(PROMPTS):
            k = s * len(PROMPTS) + p
            route, stream = ROUTES[k % 3], bool((k // 3) % 2)
            jobs.append((name, route, stream, prompt, {"json_schema": json.dumps(schema)}))
    # One schema through every route, streamed and not (the spread above covers each route and
    # stream mode, but each schema only on some of the six).
    one = {"json_schema": json.dumps(SCHEMAS[ONE_SCHEMA])}
    jobs += [(ONE_SCHEMA, r, st, PROMPTS[0], one) for r in ROUTES for st in (False, True)]
    # Unconstrained requests in the same batches: they must come back as plain text.
    plain = [("plain", "generate", False, prompt, {}) for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs) + len(plain)) as pool:
        futs = [pool.submit(_run, server, client, r, pr, c, st) for _, r, st, pr, c in jobs + plain]
        outs = [f.result() for f in futs]
    for (name, route, stream, _, _), text in zip(jobs, outs):
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            pytest.fail(f"{name} via {route} (stream={stream}): {text!r}: {e}")
    assert {(r, st) for _, r, st, _, _ in jobs} == {(r, st) for r in ROUTES for st in (0, 1)}
    # They ran unconstrained: greedy text, not forced into JSON (none of them starts with "{").
    assert all(isinstance(t, str) and not t.lstrip().startswith("{") for t in outs[len(jobs) :])


def test_json_object_response_format(client):
    for stream in (False, True):
        kw = dict(
            model="default",
            messages=[{"role": "user", "content": 'Name a fruit as JSON: {"fruit": "..."}'}],
            response_format={"type": "json_object"},
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = client.chat.completions.create(**kw).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        # json_object bounds no string's length, so the model may run out of max_tokens inside
        # one; a finished answer must be a JSON object, a cut one must still start as one.
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert text.lstrip().startswith("{"), text


@pytest.mark.parametrize("stream", [False, True])
def test_regex_full_match(server, client, stream):
    pattern = r"(\+1 )?[0-9]{3}-[0-9]{3}-[0-9]{4}"
    for route in ROUTES:
        text = _run(server, client, route, "Call me at", {"regex": pattern}, stream)
        assert re.fullmatch(pattern, text), (route, text)


def test_ebnf_grammar(server, client):
    grammar = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no" | "maybe"'
    for route in ROUTES:
        for stream in (False, True):
            text = _run(server, client, route, "Is the sky blue?", {"ebnf": grammar}, stream)
            assert re.fullmatch(r"The answer is (yes|no|maybe)\.", text), (route, stream, text)


def test_n_samples_and_logprobs_follow_the_grammar(server):
    sp = {"regex": "(cat|dog|bird)s?", "max_new_tokens": 8, "temperature": 1.0, "n": 3}
    body = {"text": "A pet:", "sampling_params": sp, "return_logprob": True}
    outs = requests.post(f"{server}/generate", json=body, timeout=300).json()
    assert len(outs) == 3
    for out in outs:
        assert re.fullmatch("(cat|dog|bird)s?", out["text"]), out["text"]
        lps = out["meta_info"]["output_token_logprobs"]
        assert lps and all(lp[0] is not None and lp[0] <= 0 for lp in lps)


def test_attention_tokens_on_constrained_output(server):
    schema = json.dumps(SCHEMAS["enum"])
    body = {
        "text": "The movie was wonderful. Sentiment as JSON:",
        "sampling_params": {"json_schema": schema, "max_new_tokens": MAX_TOKENS, "temperature": 0},
        "return_attention_tokens": True,
    }
    out = requests.post(f"{server}/generate", json=body, timeout=300).json()
    jsonschema.validate(json.loads(out["text"]), SCHEMAS["enum"])
    # One entry per sampled token: the capture sees the tokens the grammar let through.
    entries = out["meta_info"]["attention_tokens"]["content"]
    assert len(entries) == out["meta_info"]["completion_tokens"]


BAD = [
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", json.dumps({"type": "object", "properties": 3}), "properties"),
    ("regex", "[0-9", "Regex parsing error"),
    ("ebnf", "root ::= missing", 'Rule "missing" is not defined'),
]


@pytest.mark.parametrize("field,value,needle", BAD)
def test_bad_constraint_is_400_on_every_route(server, client, field, value, needle):
    for stream in (False, True):
        sp = {field: value, "max_new_tokens": 4}
        resp = requests.post(
            f"{server}/generate", json={"text": "x", "sampling_params": sp, "stream": stream}
        )
        assert resp.status_code == 400 and needle in resp.json()["message"], resp.text
        with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
            client.completions.create(
                model="default", prompt="x", max_tokens=4, stream=stream, extra_body={field: value}
            )
    if field == "json_schema" and value.startswith('{"'):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(value)}}
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
                client.chat.completions.create(
                    model="default",
                    messages=[{"role": "user", "content": "x"}],
                    response_format=fmt,
                    stream=stream,
                )
    assert requests.get(f"{server}/health", timeout=30).status_code == 200


def test_two_constraints_are_400(server):
    sp = {"regex": "a", "json_schema": "{}"}
    resp = requests.post(f"{server}/generate", json={"text": "x", "sampling_params": sp})
    assert resp.status_code == 400 and "only one of" in resp.text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
        },
    },
}
TOOLS = {"get_weather": WEATHER, "get_time": TIME}


def _accumulated_stream(client: openai.OpenAI, kw: dict[str, Any]) -> tuple[str, Any]:
    """(content of the deltas, final choice) as the openai client's stream() accumulates
    the incremental tool-call deltas."""
    with client.chat.completions.stream(**kw) as events:
        chunks = [e.chunk for e in events if e.type == "chunk"]
        final = events.get_final_completion().choices[0]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), final


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_parse_and_validate(client, choice, stream):
    tool_choice = (
        "required"
        if choice == "required"
        else {"type": "function", "function": {"name": "get_time"}}
    )
    kw = dict(
        model="default",
        messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    if stream:
        content, final = _accumulated_stream(client, kw)
        calls, finish = final.message.tool_calls or [], final.finish_reason
        assert not content
    else:
        msg = client.chat.completions.create(**kw).choices[0]
        calls, finish = msg.message.tool_calls or [], msg.finish_reason
    assert finish == "tool_calls" and calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        schema = TOOLS[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    if choice == "named":
        assert [c.function.name for c in calls] == ["get_time"]


def test_tool_choice_errors(client):
    base = dict(model="default", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    bad = [
        (
            dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
            "nope",
        ),
        (dict(tool_choice="required"), "no tools"),
    ]
    for extra, needle in bad:
        with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
            client.chat.completions.create(**base, **extra)


THINK_GRAMMAR = (
    'root ::= "<think>" ("I think so" | "Not sure") "</think>" "Answer: " ("yes" | "no")'
)


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_split(client, stream):
    kw = dict(
        model="default",
        messages=[{"role": "user", "content": "Is water wet?"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ebnf": THINK_GRAMMAR},
    )
    if stream:
        deltas = [
            c.choices[0].delta
            for c in client.chat.completions.create(stream=True, **kw)
            if c.choices
        ]
        thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        answer = "".join(d.content or "" for d in deltas)
    else:
        msg = client.chat.completions.create(**kw).choices[0].message
        thought, answer = getattr(msg, "reasoning_content", None), msg.content
    assert thought in ("I think so", "Not sure"), thought
    assert re.fullmatch("Answer: (yes|no)", answer), answer
    kw["extra_body"] = {"ebnf": THINK_GRAMMAR, "separate_reasoning": False}
    whole = client.chat.completions.create(**kw).choices[0].message
    assert whole.content.startswith("<think>") and getattr(whole, "reasoning_content", None) is None


@pytest.mark.parametrize(
    "kind,text,expected",
    [
        ("deepseek-r1", "Let me see.\n</think>\n\nIt is 4.", ("Let me see.", "It is 4.")),
        ("deepseek-r1", "cut off before the end", ("cut off before the end", "")),
        ("qwen3", "<think>\nhmm</think>Four.", ("hmm", "Four.")),
        ("qwen3", "No think block, a < b.", (None, "No think block, a < b.")),
    ],
)
def test_reasoning_parser_stream_matches_whole(kind, text, expected):
    from sglang.srt.reasoning_parser import ReasoningParser

    assert ReasoningParser(kind).parse_non_stream(text) == expected
    parser, thought, answer = ReasoningParser(kind), "", ""
    for end in range(1, len(text) + 1):  # one character per chunk: every tag gets split
        r, c = parser.parse_stream_chunk(text[:end], end == len(text))
        thought, answer = thought + r, answer + c
    assert (thought.strip() or None, answer) == (expected[0] or None, expected[1])


# What a Qwen 2.5 model writes for a call; the grammar makes the default model write it.
QWEN_CALL = (
    'root ::= "Checking. <tool_call>\\n" '
    '"{\\"name\\": \\"get_time\\", \\"arguments\\": {\\"timezone\\": \\"UTC\\"}}" '
    '"\\n</tool_call>"'
)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_calls_parsed_from_the_output(client, stream):
    kw = dict(
        model="default",
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=[WEATHER, TIME],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ebnf": QWEN_CALL},
    )
    if stream:
        content, final = _accumulated_stream(client, kw)
        calls, finish = final.message.tool_calls, final.finish_reason
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        calls, content = choice.message.tool_calls, choice.message.content
        finish = choice.finish_reason
    assert finish == "tool_calls" and content == "Checking."
    got = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert got == [("get_time", {"timezone": "UTC"})]
    assert all(c.id.startswith("call_") for c in calls)


HAND_WRITTEN = [
    (
        "qwen25",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
        None,
        [("f", {"a": 1})],
    ),
    ("qwen25", 'Hi <tool_call>{"name": "g", "arguments": {}}</tool_call>', "Hi", [("g", {})]),
    ("qwen25", "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
    (
        "llama3",
        '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}',
        None,
        [("f", {}), ("g", {})],
    ),
    ("llama3", "Plain answer.", "Plain answer.", []),
    (
        "mistral",
        'Sure. [TOOL_CALLS] [{"name": "g", "arguments": {"b": "x"}}]',
        "Sure.",
        [("g", {"b": "x"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "nope", "arguments": {}}]',
        '[TOOL_CALLS] [{"name": "nope", "arguments": {}}]',
        [],
    ),
]


@pytest.mark.parametrize("parser,text,content,calls", HAND_WRITTEN)
def test_tool_call_parsers_on_hand_written_outputs(parser, text, content, calls):
    from sglang.srt.function_call.tool_call_parsers import parse_tool_calls

    assert parse_tool_calls(parser, text, {"f", "g"}) == (content, calls)


def test_stop_string_ends_a_constrained_output(server):
    sp = {"regex": "[0-9]{3}-[0-9]{4}", "stop": "-", "max_new_tokens": 16, "temperature": 0}
    out = requests.post(
        f"{server}/generate", json={"text": "Call", "sampling_params": sp}, timeout=300
    ).json()
    assert re.fullmatch("[0-9]{3}", out["text"]), out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "-"}
