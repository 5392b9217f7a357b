"""The real server on SmolLM2, launched once and driven with the official `openai` client.

Covers chat and completions (streaming and not), usage (with `--enable-cache-report`),
`stream_options.include_usage`, `n=2`, logprobs (chat `top_logprobs`, completions `logprobs=k`),
echo, stop strings, length finish, any model name, `extra_body` extras (hidden states, with
`--enable-return-hidden-states`), 400s raised as
`openai.BadRequestError` with the server healthy afterwards, and Prometheus `/metrics`
(`--enable-metrics`).
Greedy chat answers are checked against HuggingFace transformers' greedy answer on the same GGUF
(`hf_greedy_chat`), not against a string typed into the test.
"""

from __future__ import annotations

import re

import openai
import pytest
import requests

from sglang.test.runners import hf_greedy_chat
from sglang.test.test_utils import DEFAULT_MODEL_NAME_FOR_TEST, running_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital city of France is"
COUNT_PROMPT = "Count: 1, 2, 3, 4, 5,"  # greedy: " 6, 7, 8, 9, ..."

METRIC_NAMES = (
    "num_running_reqs",
    "num_queue_reqs",
    "num_used_tokens",
    "token_usage",
    "gen_throughput",
    "cache_hit_rate",
    "prompt_tokens_total",
    "generation_tokens_total",
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
)


@pytest.fixture(scope="module")
def server():
    # --gguf-dequantize: answers are compared with HF's greedy ones on the dequantized GGUF.
    args = ["--max-total-tokens", "4096", "--enable-metrics", "--enable-cache-report"]
    args.append("--gguf-dequantize")
    args.append("--enable-return-hidden-states")
    with running_server(other_args=args) as url:
        yield url


@pytest.fixture(scope="module")
def answer() -> str:
    """The oracle of the greedy chat answers: HuggingFace transformers' greedy answer on the same
    GGUF (float32). For SmolLM2 it reads "The capital of France is Paris."."""
    return hf_greedy_chat(QUESTION, 32, DEFAULT_MODEL_NAME_FOR_TEST)[1]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0) as c:
        yield c


def chat(client, **kwargs):
    kwargs.setdefault("model", DEFAULT_MODEL_NAME_FOR_TEST)
    kwargs.setdefault("messages", QUESTION)
    return client.chat.completions.create(**kwargs)


def complete(client, **kwargs):
    kwargs.setdefault("model", DEFAULT_MODEL_NAME_FOR_TEST)
    kwargs.setdefault("prompt", PROMPT)
    return client.completions.create(**kwargs)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^sglang:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"sglang:{name} missing from /metrics"
    return float(match.group(1))


# ---------------------------------------------------------------------------- chat


def test_chat_answer_and_usage(client, answer):
    resp = chat(client, temperature=0, max_tokens=32, model="any-model-name")
    assert resp.object == "chat.completion" and resp.id
    assert resp.model == "any-model-name"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == answer
    assert choice.finish_reason == "stop"
    usage = resp.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None  # --enable-cache-report


def test_chat_stream_include_usage(client, answer):
    stream = chat(
        client, temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n2_and_length_finish(client):
    resp = chat(client, temperature=0.8, max_tokens=3, n=2, seed=1)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 6


def test_chat_logprobs(client):
    resp = chat(client, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 4
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].logprob >= tok.logprob - 1e-4  # greedy took the best


def test_chat_stop_string_and_extras(client, answer):
    assert " Paris" in answer, answer
    resp = chat(client, temperature=0, max_tokens=32, stop=[" Paris"])
    assert resp.choices[0].message.content == answer[: answer.index(" Paris")]
    assert resp.choices[0].finish_reason == "stop"
    extra = {"top_k": 1, "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 1}
    resp = chat(client, temperature=0.7, max_tokens=32, extra_body=extra)
    assert resp.choices[0].message.content == answer  # top_k=1 is greedy


# ---------------------------------------------------------------------------- completions


def test_completion_and_cache_report(client):
    resp = complete(client, temperature=0, max_tokens=8)
    assert resp.object == "text_completion"
    choice = resp.choices[0]
    assert choice.text.startswith(" Paris") and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 8
    # The same prompt again: its tokens come from the radix cache and the report says so.
    again = complete(client, temperature=0, max_tokens=8)
    assert again.choices[0].text == choice.text
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_completion_stream(client):
    expected = complete(client, temperature=0, max_tokens=8).choices[0].text
    chunks = list(
        complete(
            client, temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stream_logprobs_equal_non_stream(client):
    """Streams are built from the manager's deltas: the chunks' logprobs (echoed prompt
    included, once) add up to the non-streamed answer's, on both routes."""
    ref = complete(client, temperature=0, max_tokens=6, logprobs=2, echo=True).choices[0]
    chunks = list(complete(client, temperature=0, max_tokens=6, logprobs=2, echo=True, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == ref.logprobs.tokens
    assert [o for p in parts for o in p.text_offset] == ref.logprobs.text_offset
    got = [x for p in parts for x in p.token_logprobs]
    assert got[0] is None and ref.logprobs.token_logprobs[0] is None
    assert got[1:] == pytest.approx(ref.logprobs.token_logprobs[1:], abs=1e-6)

    ref_chat = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    stream = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2, stream=True)
    entries = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    want = ref_chat.choices[0].logprobs.content
    assert [e.token for e in entries] == [e.token for e in want]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in want], abs=1e-6)


def test_completion_stream_n2(client):
    chunks = list(complete(client, temperature=0.8, max_tokens=4, n=2, stream=True, seed=3))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert set(texts) == {0, 1} and all(texts.values())


def test_completion_stop_string(client):
    resp = complete(client, prompt=COUNT_PROMPT, temperature=0, max_tokens=16, stop=[" 8"])
    choice = resp.choices[0]
    assert choice.text == " 6, 7,"
    assert choice.finish_reason == "stop"


def test_completion_echo_logprobs(client):
    resp = complete(client, temperature=0, max_tokens=1, echo=True, logprobs=2)
    choice = resp.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    n = resp.usage.prompt_tokens + 1
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None  # the first prompt token has no context
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.top_logprobs[-1]) == 2
    # echo without logprobs only prepends the prompt.
    plain = complete(client, temperature=0, max_tokens=2, echo=True).choices[0]
    assert plain.text.startswith(PROMPT + " Paris") and plain.logprobs is None


# ---------------------------------------------------------------------------- errors


def test_bad_requests_raise_400(server, client, answer):
    bad_calls = [
        lambda: chat(client, max_tokens=-1),
        lambda: chat(client, temperature=-1),
        lambda: complete(client, temperature=-0.5),
        lambda: complete(client, prompt="hello " * 5000, max_tokens=2),
        lambda: client.post("/chat/completions", body={"model": "m"}, cast_to=object),
    ]
    for call in bad_calls:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.status_code == 400
    assert requests.get(f"{server}/health", timeout=5).status_code == 200
    assert chat(client, temperature=0, max_tokens=32).choices[0].message.content == answer


def test_attention_tokens_need_the_server_flag(server, client):
    """This server runs without --return-attention-tokens: asking is a 400 naming the flag."""
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=2, extra_body={"return_attention_tokens": True})
    assert info.value.status_code == 400 and "--return-attention-tokens" in info.value.message
    body = {"text": PROMPT, "return_attention_tokens": True}
    r = requests.post(f"{server}/generate", json=body, timeout=30)
    assert r.status_code == 400 and "--return-attention-tokens" in r.json()["message"]
    assert requests.get(f"{server}/health", timeout=5).status_code == 200
    assert "attention_tokens" not in chat(client, max_tokens=2).choices[0].model_dump()


def test_hidden_states_extra_body(client):
    """As upstream: `choices[i].hidden_states` is the last token's final hidden state (576 for
    SmolLM2); streaming sends it alone after the finishing chunk (chat: in the delta)."""
    extra = {"return_hidden_states": True}
    resp = chat(client, temperature=0, max_tokens=4, extra_body=extra)
    hidden = resp.choices[0].model_dump()["hidden_states"]
    assert len(hidden) == 576 and all(isinstance(x, float) for x in hidden)
    assert "hidden_states" not in chat(client, max_tokens=2).choices[0].model_dump()
    single = complete(client, temperature=0, max_tokens=1, extra_body=extra).choices[0]
    assert single.model_dump()["hidden_states"] == []  # one token: no decode step
    chunks = list(chat(client, temperature=0, max_tokens=4, stream=True, extra_body=extra))
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    with_hidden = [i for i, d in enumerate(deltas) if d.get("hidden_states")]
    assert with_hidden == [len(deltas) - 1] and deltas[-1]["hidden_states"] == hidden
    assert chunks[-2].choices[0].finish_reason == "length"
    chunks = list(complete(client, temperature=0, max_tokens=4, stream=True, extra_body=extra))
    assert len(chunks[-1].choices[0].model_dump()["hidden_states"]) == 576


# ---------------------------------------------------------------------------- metrics


def test_metrics(server, client):
    before = requests.get(f"{server}/metrics", timeout=10)
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert f"sglang:{name}" in before.text, name
    assert 'model_name="' in before.text
    resp = complete(client, temperature=0, max_tokens=5)
    after = requests.get(f"{server}/metrics", timeout=10).text
    prompt_delta = metric(after, "prompt_tokens_total") - metric(before.text, "prompt_tokens_total")
    gen_delta = metric(after, "generation_tokens_total") - metric(
        before.text, "generation_tokens_total"
    )
    assert prompt_delta == resp.usage.prompt_tokens
    assert gen_delta == 5
    assert metric(after, "e2e_request_latency_seconds_count") > metric(
        before.text, "e2e_request_latency_seconds_count"
    )
    assert metric(after, "time_to_first_token_seconds_count") > 0
    assert metric(after, "inter_token_latency_seconds_count") > 0
    # Idle server: nothing running or queued, nothing held; earlier repeats hit the cache.
    assert metric(after, "num_running_reqs") == 0 and metric(after, "num_queue_reqs") == 0
    assert metric(after, "num_used_tokens") == 0 and metric(after, "token_usage") == 0
    assert 0 < metric(after, "cache_hit_rate") < 1
    assert metric(after, "gen_throughput") >= 0
