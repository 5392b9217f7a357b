"""Tests for the OpenAI layer: parsing, conversion to GenerateReqInput, templates, responses, SSE.

Most tests drive the routes through FastAPI's TestClient with a scripted stand-in for
`TokenizerManager.generate_request` that follows its contract (cumulative streams, native
meta_info) and builds the real `GenerateReqInput`, so malformed conversions fail here. The last
class runs the real TokenizerManager with its scheduler and detokenizer processes on SmolLM2.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sglang.srt.entrypoints.openai.api import register_openai_routes
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion

EOS = 2
PIECES = ["Hel", "lo", " world"]
ATTN = {"top_k": 1, "layers": [0], "layer_aggregation": "mean", "head_aggregation": "mean"}


class FakeTokenizerManager:
    """Scripted generate_request: emits PIECES (one per token) under the native contract."""

    def __init__(self, tokenizer: Any = None, **server_args: Any) -> None:
        self.tokenizer = tokenizer
        defaults = dict(
            served_model_name="served",
            context_length=None,
            chat_template=None,
            enable_cache_report=False,
            stream_output=False,
        )
        self.server_args = SimpleNamespace(**{**defaults, **server_args})
        self.context_len = 64
        self.calls: list[Any] = []
        self.fail_after: int | None = None

    async def generate_request(self, obj: Any, request: Any = None):
        obj.normalize_batch_and_arguments()  # the real shape checks
        self.calls.append(obj)
        prompt = obj.text if obj.text is not None else obj.input_ids
        if prompt in ("BAD", [666]):
            raise ValueError("bad prompt")
        sp = obj.sampling_params
        limit = sp["max_new_tokens"]
        pieces = PIECES[: limit if limit is not None else len(PIECES)]
        finish = {"type": "stop", "matched": EOS} if len(pieces) == len(PIECES) else None
        finish = finish or {"type": "length", "length": len(pieces)}
        ids = [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)
        steps = range(1, len(pieces) + 1) if obj.stream else [len(pieces)]
        if obj.stream and not pieces:
            steps = [0]
        for k in steps:
            if self.fail_after is not None and k > self.fail_after:
                raise RuntimeError("engine died")
            out = pieces[:k]
            # As the real one: a stream_deltas output (the OpenAI routes' streams) holds only
            # what is new since the previous output: text, ids and logprobs.
            deltas = obj.stream and (obj.stream_deltas or self.server_args.stream_output)
            new = max(k - 1, 0) if deltas else 0
            meta: dict[str, Any] = {
                "id": obj.rid,
                "finish_reason": finish if k == len(pieces) else None,
                "prompt_tokens": len(ids),
                "completion_tokens": k,
                "cached_tokens": 1,
            }
            if obj.return_logprob:
                top = obj.top_logprobs_num
                fresh = list(enumerate(out))[new:]
                meta["output_token_logprobs"] = [[-0.5, 100 + i, p] for i, p in fresh]
                meta["output_top_logprobs"] = [
                    [[-0.5, 100 + i, p], [-1.5, 7, "x"]][:top] for i, p in fresh
                ]
                if obj.logprob_start_len == 0 and not (deltas and k > 1):
                    meta["input_token_logprobs"] = [
                        [None if i == 0 else -1.0, t, chr(t) if t < 0x110000 else None]
                        for i, t in enumerate(ids)
                    ]
                    meta["input_top_logprobs"] = [None] + [
                        [[-1.0, t, chr(t)]][:top] for t in ids[1:]
                    ]
            if obj.return_attention_tokens:
                # As the real one: a stream's entries are those of the tokens new in this output.
                first = k - 1 if obj.stream and k else 0
                content = [{"token": out[i], "position": len(ids) + i} for i in range(first, k)]
                meta["attention_tokens"] = {**ATTN, "prompt_tokens": len(ids), "content": content}
            yield {"text": "".join(out[new:]), "output_ids": list(range(new, k)), "meta_info": meta}


def make_client(tm: Any) -> TestClient:
    app = FastAPI()
    register_openai_routes(app, tm)
    return TestClient(app)


def sse_events(resp: Any) -> list[Any]:
    """Parsed `data:` payloads of an SSE body; the final [DONE] stays a string."""
    assert resp.headers["content-type"].startswith("text/event-stream")
    body = resp.text
    assert body.endswith("data: [DONE]\n\n")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


class _SmolStub:
    """Tokenizer stand-in with a chat template, for route tests that need no real vocabulary."""

    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kw):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def tm() -> FakeTokenizerManager:
    return FakeTokenizerManager(tokenizer=_SmolStub())


@pytest.fixture
def client(tm: FakeTokenizerManager) -> TestClient:
    return make_client(tm)


def assert_error(resp: Any, fragment: str) -> None:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["object"] == "error" and body["type"] == "BadRequestError"
    assert body["code"] == 400 and body["param"] is None
    assert fragment in body["message"], body["message"]


# ---------------------------------------------------------------- parsing and validation


CHAT = {"model": "anything", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "route,body,fragment",
    [
        ("/v1/chat/completions", {**CHAT, "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "a", "temperature": -0.5}, "temperature"),
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "suffix": "z"}, "suffix"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "only 'text'",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ("/v1/completions", {"prompt": "BAD"}, "bad prompt"),
        ("/v1/completions", {"prompt": "BAD", "stream": True}, "bad prompt"),
        # refused until implemented (docs/request_fields.md), never answered without them
        ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": "a", "regex": "x", "ebnf": "y"}, "only one of"),
        ("/v1/completions", {"prompt": "a", "lora_path": "x"}, "lora_path"),
        ("/v1/completions", {"prompt": "a", "n": 129}, "n"),
        ("/v1/completions", {"prompt": "a", "max_token": 3}, "did you mean 'max_tokens'"),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_object"}, "regex": "x"},
            "one constraint",
        ),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "schema"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "needs content"),
        (
            "/v1/completions",
            {"prompt": "a", "stream_options": {"continuous_usage_stats": True}},
            "continuous_usage_stats",
        ),  # fmt: skip
    ],
)
def test_bad_requests_get_400_bodies(client, route, body, fragment):
    assert_error(client.post(route, json=body), fragment)


def test_malformed_json_and_non_object(client):
    assert_error(client.post("/v1/completions", content=b"{nope"), "Malformed JSON")
    assert_error(client.post("/v1/completions", json=[1, 2]), "JSON object")


def test_unknown_model_and_extra_fields_accepted(client, tm):
    body = {
        "model": "no-such-model",
        "prompt": "x",
        "whatever_vendor_field": 1,
        "return_attention_tokens": True,
        "top_k_attention": 4,
        "attention_layers": [0, 3],
        "attention_layer_aggregation": "none",
        "attention_exclude_sink": 1,
    }
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "no-such-model"
    obj = tm.calls[-1]
    assert obj.return_attention_tokens is True and obj.attention_tokens_top_k == 4
    assert obj.attention_layers == [0, 3] and obj.attention_layer_aggregation == "none"
    assert obj.attention_exclude_sink == 1
    # no model in the body: the served name
    assert client.post("/v1/completions", json={"prompt": "x"}).json()["model"] == "served"


def test_attention_alias_on_both_names():
    for key in ("attention_tokens_top_k", "top_k_attention"):
        req = ChatCompletionRequest.model_validate({**CHAT, key: 3})
        assert req.attention_tokens_top_k == 3


# ---------------------------------------------------------------- conversion


def test_completion_sampling_params_mapping(tm):
    req = CompletionRequest.model_validate(
        {
            "prompt": "hi",
            "max_tokens": 5,
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 20,
            "min_p": 0.05,
            "min_tokens": 2,
            "frequency_penalty": 0.1,
            "presence_penalty": -0.2,
            "repetition_penalty": 1.1,
            "stop": ["\n", "END"],
            "stop_token_ids": [5],
            "seed": 7,
            "logit_bias": {"50": 2.5},
            "ignore_eos": True,
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
    )
    (kw,) = OpenAIServingCompletion(tm).plan(req).reqs
    assert kw["text"] == "hi" and kw["stream"] is False
    assert kw["sampling_params"] == {
        "max_new_tokens": 5,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "min_new_tokens": 2,
        "frequency_penalty": 0.1,
        "presence_penalty": -0.2,
        "repetition_penalty": 1.1,
        "stop": ["\n", "END"],
        "stop_token_ids": [5],
        "sampling_seed": 7,
        "logit_bias": {"50": 2.5},
        "ignore_eos": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": True,
        "no_stop_trim": True,
    }
    assert kw["return_logprob"] is False and kw["logprob_start_len"] == -1
    assert "return_attention_tokens" not in kw


@pytest.mark.parametrize(
    "echo,logprobs,want",
    [(True, 1, (True, 0, 1)), (False, 3, (True, -1, 3)), (True, None, (False, -1, 0))],
)
def test_echo_and_logprobs_flags(tm, echo, logprobs, want):
    req = CompletionRequest(prompt="hi", echo=echo, logprobs=logprobs, max_tokens=0)
    (kw,) = OpenAIServingCompletion(tm).plan(req).reqs
    got = (kw["return_logprob"], kw["logprob_start_len"], kw["top_logprobs_num"])
    assert got == want and kw["sampling_params"]["max_new_tokens"] == 0


def test_prompt_forms_n_and_seeds(tm):
    serving = OpenAIServingCompletion(tm)
    reqs = serving.plan(CompletionRequest(prompt=["a", "b"], n=2, seed=10)).reqs
    assert [r["text"] for r in reqs] == ["a", "a", "b", "b"]
    assert [r["sampling_params"]["sampling_seed"] for r in reqs] == [10, 11, 10, 11]
    assert len({r["rid"] for r in reqs}) == 4
    assert serving.plan(CompletionRequest(prompt=[1, 2])).reqs[0]["input_ids"] == [1, 2]
    ids = [r["input_ids"] for r in serving.plan(CompletionRequest(prompt=[[1], [2, 3]])).reqs]
    assert ids == [[1], [2, 3]]
    assert serving.plan(CompletionRequest(prompt="a", rid="mine")).reqs[0]["rid"] == "mine"
    with pytest.raises(ValueError, match="rid"):
        serving.plan(CompletionRequest(prompt="a", n=2, rid=["x"]))


# ---------------------------------------------------------------- non-streaming responses


def test_lm_eval_loglikelihood_shape(client):
    body = {"prompt": "ab", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "abHel" and choice["finish_reason"] == "length"
    assert "matched_stop" not in choice and "hidden_states" not in choice
    lp = choice["logprobs"]
    assert lp["tokens"] == ["a", "b", "Hel"]
    assert lp["token_logprobs"] == [None, -1.0, -0.5]
    assert lp["top_logprobs"] == [None, {"b": -1.0}, {"Hel": -0.5}]
    assert lp["text_offset"] == [0, 1, 2]

    body["max_tokens"] = 0
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "ab" and choice["logprobs"]["tokens"] == ["a", "b"]
    # token-id prompts echo their decoded text
    body = {"prompt": [[104, 105]], "echo": True, "max_tokens": 0}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == "hi"


def test_completion_response_fields(client):
    data = client.post("/v1/completions", json={"prompt": ["ab", "c"], "n": 2}).json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert isinstance(data["created"], int)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    c = data["choices"][0]
    assert c["text"] == "Hello world" and c["finish_reason"] == "stop"
    assert c["matched_stop"] == EOS and c["logprobs"] is None
    assert "attention_tokens" not in c
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}


def test_chat_response_logprobs_usage_and_cache_report():
    tm = FakeTokenizerManager(tokenizer=_SmolStub(), enable_cache_report=True)
    client = make_client(tm)
    body = {**CHAT, "logprobs": True, "top_logprobs": 2, "n": 2, "max_tokens": 2}
    data = client.post("/v1/chat/completions", json=body).json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "anything" and len(data["choices"]) == 2
    c = data["choices"][1]
    assert c["index"] == 1 and c["message"] == {"role": "assistant", "content": "Hello"}
    assert c["finish_reason"] == "length" and "matched_stop" not in c
    first = c["logprobs"]["content"][0]
    assert first["token"] == "Hel" and first["logprob"] == -0.5
    assert first["bytes"] == list(b"Hel")
    assert [t["token"] for t in first["top_logprobs"]] == ["Hel", "x"]
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(tm.calls[0].input_ids)
    assert usage["completion_tokens"] == 4
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2}


def test_attention_tokens_in_choice(client):
    body = {**CHAT, "return_attention_tokens": True}
    c = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert c["attention_tokens"]["top_k"] == 1
    assert [e["token"] for e in c["attention_tokens"]["content"]] == PIECES


# ---------------------------------------------------------------- streaming


def test_completion_stream_with_usage(client):
    body = {"prompt": "ab", "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(client.post("/v1/completions", json=body))
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert [c["choices"][0]["text"] for c in chunks] == PIECES
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert chunks[-1]["choices"][0]["matched_stop"] == EOS
    assert "matched_stop" not in chunks[0]["choices"][0]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}

    events = sse_events(client.post("/v1/completions", json={"prompt": "ab", "stream": True}))
    assert all("usage" not in e for e in events[:-1])


def test_completion_stream_echo_logprobs_and_zero_tokens(client):
    body = {"prompt": "ab", "stream": True, "echo": True, "logprobs": 1, "max_tokens": 0}
    events = sse_events(client.post("/v1/completions", json=body))
    (chunk,) = events[:-1]
    choice = chunk["choices"][0]
    assert choice["text"] == "ab" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["a", "b"]

    body["max_tokens"] = 2
    chunks = sse_events(client.post("/v1/completions", json=body))[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abHello"
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == ["a", "b", "Hel", "lo"] and offsets == [0, 1, 2, 5]


def test_chat_stream_roles_n_and_attention():
    client = make_client(FakeTokenizerManager(tokenizer=_SmolStub()))
    body = {
        **CHAT,
        "stream": True,
        "n": 2,
        "logprobs": True,
        "return_attention_tokens": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(client.post("/v1/chat/completions", json=body))
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(m["delta"].get("content") or "" for m in mine) == "Hello world"
        assert mine[-1]["finish_reason"] == "stop"
        assert [m["logprobs"]["content"][0]["token"] for m in mine[1:]] == PIECES
        attn = [m["attention_tokens"] for m in mine[1:]]
        assert attn[0]["top_k"] == 1 and "top_k" not in attn[1]
        assert [a["content"][0]["token"] for a in attn] == PIECES
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6


def test_stream_chunks_are_built_from_deltas():
    """OpenAI streams ask the manager for deltas (stream_deltas), with or without
    --stream-output, and each chunk carries exactly the new text."""
    for stream_output in (False, True):
        tm = FakeTokenizerManager(tokenizer=_SmolStub(), stream_output=stream_output)
        events = sse_events(
            make_client(tm).post("/v1/completions", json={"prompt": "a", "stream": True})
        )
        assert tm.calls[0].stream_deltas
        assert [e["choices"][0]["text"] for e in events[:-1]] == PIECES


def test_error_after_stream_started_is_an_event(tm, client):
    tm.fail_after = 1
    events = sse_events(client.post("/v1/completions", json={"prompt": "ab", "stream": True}))
    assert events[0]["choices"][0]["text"] == "Hel"
    error = events[1]["error"]  # upstream's shape: the error body under "error"
    assert error["object"] == "error" and "engine died" in error["message"]
    assert error["code"] == 500 and events[2] == "[DONE]"


def test_official_openai_client(client):
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=client)
    comp = oai.completions.create(model="x", prompt="ab", max_tokens=2, n=2, logprobs=1)
    assert [c.text for c in comp.choices] == ["Hello", "Hello"]
    assert comp.choices[0].logprobs.tokens == ["Hel", "lo"] and comp.usage.total_tokens == 6
    stream = oai.completions.create(
        model="x", prompt="ab", stream=True, stream_options={"include_usage": True}
    )
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts if p.choices) == "Hello world"
    assert parts[-1].usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="x", prompt="ab", temperature=-1)
    extra = oai.completions.create(
        model="x", prompt="ab", extra_body={"top_k": 5, "return_attention_tokens": True}
    )
    assert extra.choices[0].model_extra["attention_tokens"]["top_k"] == 1


# ---------------------------------------------------------------- the real TokenizerManager


@pytest.fixture(scope="module")
def real_client():
    """Routes over the real TokenizerManager, scheduler and detokenizer on SmolLM2 (~30 s)."""
    from sglang.srt.entrypoints.engine import launch_subprocesses
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path="smollm2-135m-instruct", log_level="error", max_total_tokens=8192)
    real_tm, procs, _ = launch_subprocesses(args)
    try:
        with make_client(real_tm) as client:
            yield client
    finally:
        real_tm.close()
        procs.shutdown()


def check_loglikelihood(client: TestClient, max_tokens: int) -> None:
    prompt = "The capital of France is"  # five SmolLM2 tokens
    body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": max_tokens}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x < 0 for x in lp["token_logprobs"][1:])
    assert len(lp["tokens"]) == 5 + max_tokens


class TestRealPipeline:
    def test_chat_and_lm_eval_loglikelihood(self, real_client):
        body = {**CHAT, "messages": [{"role": "user", "content": "Capital of France?"}]}
        data = real_client.post("/v1/chat/completions", json={**body, "max_tokens": 4}).json()
        assert data["model"] == "anything" and data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 4

        check_loglikelihood(real_client, max_tokens=1)

    def test_lm_eval_loglikelihood_max_tokens_zero(self, real_client):
        check_loglikelihood(real_client, max_tokens=0)

    def test_streams_errors_and_official_client(self, real_client):
        openai = pytest.importorskip("openai")
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=real_client)
        stream = oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            n=2,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = list(stream)
        texts = ["", ""]
        for p in parts:
            for c in p.choices:
                texts[c.index] += c.delta.content or ""
        assert texts[0] == texts[1] and texts[0]
        assert parts[-1].usage.completion_tokens == 10
        resp = real_client.post("/v1/completions", json={"prompt": [1] * 9000, "max_tokens": 1})
        assert_error(resp, "context length")
        assert real_client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).is_success
