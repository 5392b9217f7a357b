"""Attention tokens through the real server (SmolLM2, float32), driven by the official `openai` client.

The server runs with `--return-attention-tokens --attention-capture-layers 0,14,29`. Checked:
reports on /v1/completions, /v1/chat/completions and /generate against HF transformers eager
attention on the same GGUF weights (mean over the selected layers, the last layer alone, per-layer
lists with an excluded sink; chosen heads per layer and per head, their maximum, span mass, the
statistics and prompt rows); streaming chunks (OpenAI, and a long native stream) carry exactly
their tokens' entries, each sent once, and add up to the non-streaming report; the field is
absent when not asked; n=2; stop-string trimming drops the entries of trimmed tokens; concurrent
mixed batches give the same reports as requests alone and the same text as without the feature;
every validation error is a 400 that says what to change, and the server stays healthy.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from sglang.attention_tokens import merge_stream_chunks
from sglang.srt.hf_transformers_utils import get_tokenizer
from sglang.srt.model_loader import resolve_model_path
from sglang.test.attention_reference import assert_valid_topk, layer_mean
from sglang.test.runners import HFRunner, cpu_threads_hint
from sglang.test.test_utils import DEFAULT_MODEL_NAME_FOR_TEST, running_server

cpu_threads_hint()
CAPTURED = [0, 14, 29]
MAX_K = 10
PROMPT = "The capital city of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOL = 1e-4


@pytest.fixture(scope="module")
def server():
    # --gguf-dequantize: HF dequantizes the GGUF, so the exact path is the one compared to it.
    args = ["--max-total-tokens", "4096", "--dtype", "float32", "--gguf-dequantize",
            "--return-attention-tokens",
            "--attention-tokens-top-k", str(MAX_K),
            "--attention-capture-layers", ",".join(map(str, CAPTURED))]  # fmt: skip
    with running_server(other_args=args) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(resolve_model_path(DEFAULT_MODEL_NAME_FOR_TEST))


@pytest.fixture(scope="module")
def hf():
    path = resolve_model_path(DEFAULT_MODEL_NAME_FOR_TEST)
    return HFRunner(os.path.dirname(path), gguf_file=os.path.basename(path))


def report_of(choice) -> dict:
    return choice.model_dump()["attention_tokens"]


def check_against_hf(report: dict, prompt_ids: list[int], hf: HFRunner, tok, k: int) -> None:
    """Every entry of `report` against HF eager rows for the same prompt and greedy tokens."""
    content = report["content"]
    ref, rows = hf.greedy_with_attention(prompt_ids, len(content))
    assert [e["token_id"] for e in content] == ref.output_ids
    sink = report["exclude_sink"]
    n = len(prompt_ids)
    ids = prompt_ids + ref.output_ids
    for t, entry in enumerate(content):
        assert entry["position"] == n + t and entry["token"] == tok.decode([entry["token_id"]])
        lists = entry["layers"] if "layers" in entry else {"mean": entry["top_attention"]}
        for name, items in lists.items():
            ref_row = layer_mean(rows[t], report["layers"] if name == "mean" else [int(name)])
            mass = entry["captured_mass"] if name == "mean" else entry["captured_mass"][name]
            assert abs(mass - sum(x["score"] for x in items)) < 1e-6
            excluded = entry.get("excluded_mass")
            if isinstance(excluded, dict):
                excluded = excluded[name]
            for x in items:
                assert x["token_id"] == ids[x["position"]]
                assert x["source"] == ("prompt" if x["position"] < n else "completion")
                assert x["token"] == tok.decode([x["token_id"]])
            assert_valid_topk([x["position"] for x in items], [x["score"] for x in items],
                              ref_row, k, exclude=sink, excluded_mass=excluded, tol=TOL,
                              label=f"token {t} {name}")  # fmt: skip


def test_completions_mean_and_last_layer_match_hf(client, tok, hf):
    prompt_ids = tok.encode(PROMPT)
    for extra, k in (({}, MAX_K), ({"attention_layers": [29], "attention_tokens_top_k": 4}, 4)):
        resp = client.completions.create(
            model="m", prompt=PROMPT, max_tokens=8, temperature=0,
            extra_body={"return_attention_tokens": True, **extra},
        )  # fmt: skip
        report = report_of(resp.choices[0])
        assert report["layers"] == extra.get("attention_layers", CAPTURED)
        assert report["top_k"] == k and report["prompt_tokens"] == len(prompt_ids)
        assert report["layer_aggregation"] == "mean" and report["head_aggregation"] == "mean"
        assert len(report["content"]) == resp.usage.completion_tokens == 8
        check_against_hf(report, prompt_ids, hf, tok, k)


def test_generate_per_layer_with_sink_matches_hf(server, tok, hf):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0},
            "return_attention_tokens": True, "top_k_attention": 5, "attention_layers": [0, -1],
            "attention_layer_aggregation": "none", "attention_exclude_sink": 1}  # fmt: skip
    report = requests.post(f"{server}/generate", json=body, timeout=120).json()["meta_info"][
        "attention_tokens"
    ]
    assert report["layers"] == [0, 29] and report["layer_aggregation"] == "none"
    assert all(set(e["layers"]) == {"0", "29"} for e in report["content"])
    check_against_hf(report, tok.encode(PROMPT), hf, tok, 5)


def test_heads_spans_stats_and_prompt_rows_match_hf(server, tok, hf):
    """Issue 14's options on the default model, each entry against HF eager float32: per-head
    lists (per layer, so against `output_attentions[layer][0, h]` itself), the max over chosen
    heads, span mass and the five statistics (sums over the HF row), and prompt rows against the
    prefill attentions; top-k valid within 1e-4."""
    from test_attention_heads_spans import check_report
    from test_attention_prompt import check_prompt_content

    ids = tok.encode(PROMPT)
    spans = [{"name": "start", "start": 0, "end": 2}, {"name": "rest", "start": 2, "end": len(ids)}]
    cases = [
        {"attention_heads": [0, 4, 8], "attention_head_aggregation": "none",
         "attention_layer_aggregation": "none", "attention_tokens_top_k": 4},
        {"attention_heads": [1, 2, 7], "attention_head_aggregation": "max"},
        {"attention_spans": spans, "attention_stats": True, "attention_prompt_positions": "all"},
    ]  # fmt: skip
    for fields in cases:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 3, "temperature": 0,
                "ignore_eos": True}, "return_attention_tokens": True, **fields}  # fmt: skip
        report = requests.post(f"{server}/generate", json=body, timeout=120).json()["meta_info"][
            "attention_tokens"
        ]
        assert len(report["content"]) == 3
        check_report(report, ids, hf, f"default model {list(fields)}")
    assert list(report["content"][0]["span_mass"]) == ["start", "rest"]
    check_prompt_content(report, ids, hf, tok, range(len(ids)), MAX_K)


def stream_chat(client, **kwargs) -> tuple[str, list[dict]]:
    text, chunks = "", []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0].model_dump()
        text += choice["delta"].get("content") or ""
        if choice.get("attention_tokens"):
            chunks.append(choice["attention_tokens"])
    return text, chunks


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="m", messages=QUESTION, max_tokens=12, temperature=0,
                  extra_body={"return_attention_tokens": True, "attention_tokens_top_k": 3})  # fmt: skip
    full = client.chat.completions.create(**kwargs)
    report = report_of(full.choices[0])
    text, chunks = stream_chat(client, **kwargs)
    assert text == full.choices[0].message.content
    assert "top_k" in chunks[0] and all(set(c) == {"content"} for c in chunks[1:])
    assert {k: v for k, v in chunks[0].items() if k != "content"} == {
        k: v for k, v in report.items() if k != "content"
    }
    streamed = [e for c in chunks for e in c["content"]]
    assert len(streamed) == len(report["content"]) == full.usage.completion_tokens
    for a, b in zip(streamed, report["content"]):
        assert a["token_id"] == b["token_id"] and a["position"] == b["position"]
        assert [x["position"] for x in a["top_attention"]] == [
            x["position"] for x in b["top_attention"]
        ]
        for x, y in zip(a["top_attention"], b["top_attention"]):
            assert abs(x["score"] - y["score"]) < 1e-6


def test_native_stream_sends_each_entry_once(server):
    """A long /generate stream: every chunk carries only its new tokens' entries (never the
    history again), the text stays cumulative (no --stream-output), and the entries add up to
    the non-streamed report."""
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 96, "temperature": 0,
            "ignore_eos": True}, "return_attention_tokens": True, "attention_tokens_top_k": 2}  # fmt: skip
    full = requests.post(f"{server}/generate", json=body, timeout=300).json()
    chunks = []
    with requests.post(f"{server}/generate", json={**body, "stream": True}, stream=True,
                       timeout=300) as resp:  # fmt: skip
        for line in resp.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert len(chunks) > 10, "expected a stream of many chunks"
    entries = [e for c in chunks for e in c["meta_info"]["attention_tokens"]["content"]]
    # Sent once each: as many entries in the whole stream as tokens generated, in order.
    assert len(entries) == full["meta_info"]["completion_tokens"] == 96
    assert [e["position"] for e in entries] == [e["position"] for e in
                                                 full["meta_info"]["attention_tokens"]["content"]]  # fmt: skip
    for a, b in zip(entries, full["meta_info"]["attention_tokens"]["content"]):
        assert a["token_id"] == b["token_id"]
        assert [x["position"] for x in a["top_attention"]] == [
            x["position"] for x in b["top_attention"]
        ]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "text is cumulative"
    assert texts[-1] == full["text"]
    assert merge_stream_chunks(chunks)["content"] == entries


def test_absent_when_not_requested(client, server):
    resp = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4)
    assert "attention_tokens" not in resp.choices[0].model_dump()
    text, chunks = stream_chat(client, model="m", messages=QUESTION, max_tokens=4)
    assert text and not chunks
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}
    meta = requests.post(f"{server}/generate", json=body, timeout=60).json()["meta_info"]
    assert "attention_tokens" not in meta


def test_n2_and_stop_string_trimming(client, tok):
    resp = client.chat.completions.create(
        model="m", messages=QUESTION, max_tokens=16, temperature=0.8, seed=7, n=2,
        extra_body={"return_attention_tokens": True, "attention_tokens_top_k": 2},
    )  # fmt: skip
    eos = set(tok.all_special_ids)
    for choice in resp.choices:
        content = report_of(choice)["content"]
        shown = "".join(e["token"] for e in content if e["token_id"] not in eos)
        assert shown == choice.message.content
    # The stop string " Paris" is cut from the text; its token's entry goes with it.
    kwargs = dict(model="m", messages=QUESTION, max_tokens=16, temperature=0, stop=[" Paris"],
                  extra_body={"return_attention_tokens": True, "attention_tokens_top_k": 2})  # fmt: skip
    full = client.chat.completions.create(**kwargs)
    content = report_of(full.choices[0])["content"]
    assert full.choices[0].message.content == "The capital of France is"
    assert "".join(e["token"] for e in content) == "The capital of France is"
    text, chunks = stream_chat(client, **kwargs)
    assert text == "The capital of France is"
    assert [e["token_id"] for c in chunks for e in c["content"]] == [e["token_id"] for e in content]


def test_concurrent_mixed_batch_matches_alone(client):
    prompts = [PROMPT, "Once upon a time", "1, 2, 3,", "def add(a, b):", "Hello", "Paris is"]

    def ask(i: int):
        extra = {"return_attention_tokens": True, "attention_tokens_top_k": 3} if i % 2 else {}
        r = client.completions.create(model="m", prompt=prompts[i], max_tokens=8, temperature=0,
                                      extra_body=extra)  # fmt: skip
        return r.choices[0].text, r.choices[0].model_dump().get("attention_tokens")

    alone = [ask(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, range(len(prompts))))
    for i, ((text_a, rep_a), (text_b, rep_b)) in enumerate(zip(alone, together)):
        assert text_a == text_b, f"request {i}: text changed in a batch"
        assert (rep_a is None) == (rep_b is None) == (i % 2 == 0)
        if rep_a is None:
            continue
        for a, b in zip(rep_a["content"], rep_b["content"], strict=True):
            assert [x["position"] for x in a["top_attention"]] == [
                x["position"] for x in b["top_attention"]
            ]
            for x, y in zip(a["top_attention"], b["top_attention"]):
                assert abs(x["score"] - y["score"]) < 1e-5


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"attention_tokens_top_k": MAX_K + 1}, "--attention-tokens-top-k"),
        ({"attention_tokens_top_k": 0}, "between 1 and"),
        ({"attention_layers": [5]}, "does not capture"),
        ({"attention_layers": [30]}, "does not capture"),
        ({"attention_exclude_sink": -1}, ">= 0"),
        ({"attention_layer_aggregation": "max"}, "'mean' or 'none'"),
        ({"attention_layers": "last"}, "attention_layers"),
    ],
)
def test_validation_errors_are_400(client, server, extra, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2,
                                       extra_body={"return_attention_tokens": True, **extra})  # fmt: skip
    assert info.value.status_code == 400 and needle in info.value.message
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 2},
            "return_attention_tokens": True, **extra}  # fmt: skip
    if extra.get("attention_layer_aggregation") != "max":  # the OpenAI schema owns that message
        r = requests.post(f"{server}/generate", json=body, timeout=60)
        assert r.status_code == 400 and needle in r.json()["message"]
    assert requests.get(f"{server}/health", timeout=10).status_code == 200
