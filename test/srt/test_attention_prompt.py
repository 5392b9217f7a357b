"""Prompt attention (`attention_prompt_positions`) against HF float32 eager prefill attentions.

One server on a tiny random-weight Llama with the default model's tokenizer, every layer captured,
`--chunked-prefill-size 16` (the test prompt takes three chunks) and `--attention-prompt-max-len
48`. Each `prompt_content` entry is checked as a top-k of HF's `output_attentions` row of its
query position (head mean, layer mean or per layer, sink excluded) within 1e-4, through
/generate, /v1/completions and /v1/chat/completions (streaming and not) and Engine; a prefix-cache
hit recomputes only from the first asked position; "all" on a short prompt; the 400s.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests
import torch

from sglang.test.attention_reference import assert_valid_topk
from sglang.test.runners import HFRunner, chat_prompt_ids, cpu_threads_hint
from sglang.test.served_tiny import served_tiny_fixtures

cpu_threads_hint()
MAX_K, MAX_LEN, LAYERS = 6, 48, 3
ARGS = ["--max-total-tokens", "8192", "--dtype", "float32", "--return-attention-tokens",
        "--attention-tokens-top-k", str(MAX_K), "--attention-capture-layers", "all",
        "--chunked-prefill-size", "16", "--attention-prompt-max-len", str(MAX_LEN)]  # fmt: skip
LONG = (
    "The committee met on a grey morning to discuss the harbour, the bridge, the tolls, the "
    "ferries and the old lighthouse, and then it adjourned"
)
SHORT = "One two three four five"
QUESTION = [{"role": "user", "content": "Name three rivers of France and one of Spain."}]
TOL = 1e-4


model_dir, server, client, tok, hf = served_tiny_fixtures("tiny-prompt", LAYERS, ARGS)


@torch.no_grad()
def prefill_rows(hf: HFRunner, ids: list[int]) -> torch.Tensor:
    """[layers, n, n] float64 head-mean eager attentions of the whole prompt."""
    out = hf.model(torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0].double().mean(0) for a in out.attentions])


def check_prompt_content(report: dict, ids: list[int], hf: HFRunner, tok, positions, k: int):
    """Every prompt_content entry is a valid top-k of the HF row at its query position."""
    rows = prefill_rows(hf, ids)
    entries = report["prompt_content"]
    assert [e["position"] for e in entries] == sorted(set(positions))
    sink = report["exclude_sink"]
    for e in entries:
        p = e["position"]
        assert e["token_id"] == ids[p] and e["token"] == tok.decode([ids[p]])
        lists = e["layers"] if "layers" in e else {"mean": e["top_attention"]}
        for name, items in lists.items():
            layers = report["layers"] if name == "mean" else [int(name)]
            ref = rows[layers, p, : p + 1].mean(0)
            mass = e["captured_mass"] if name == "mean" else e["captured_mass"][name]
            assert abs(mass - sum(x["score"] for x in items)) < 1e-6
            excluded = e.get("excluded_mass")
            if isinstance(excluded, dict):
                excluded = excluded[name]
            for x in items:
                assert x["source"] == "prompt" and x["token_id"] == ids[x["position"]]
            assert_valid_topk([x["position"] for x in items], [x["score"] for x in items], ref,
                              k, exclude=sink, excluded_mass=excluded, tol=TOL,
                              label=f"query {p} {name}")  # fmt: skip


def native(server: str, body: dict) -> requests.Response:
    return requests.post(f"{server}/generate", json=body, timeout=180)


def test_generate_chunked_mean_and_sink(server, tok, hf):
    ids = tok.encode(LONG)
    assert len(ids) > 32, "the prompt must span three 16-token chunks"
    positions = [0, 5, 15, 16, 17, 31, len(ids) - 1]
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_attention_tokens": True, "attention_prompt_positions": positions,
            "attention_layers": [0, 2], "attention_exclude_sink": 1}  # fmt: skip
    report = native(server, body).json()["meta_info"]["attention_tokens"]
    assert len(report["content"]) == 3 and report["layers"] == [0, 2]
    check_prompt_content(report, ids, hf, tok, positions, MAX_K)


def test_completions_per_layer_streaming_and_not(client, tok, hf):
    ids = tok.encode(LONG)
    positions = [2, 20, 32]
    kwargs = dict(model="m", prompt=LONG, max_tokens=4, temperature=0,
                  extra_body={"return_attention_tokens": True, "attention_tokens_top_k": 3,
                              "attention_layer_aggregation": "none",
                              "attention_prompt_positions": positions})  # fmt: skip
    report = client.completions.create(**kwargs).choices[0].model_dump()["attention_tokens"]
    assert all(set(e["layers"]) == {"0", "1", "2"} for e in report["prompt_content"])
    check_prompt_content(report, ids, hf, tok, positions, 3)
    chunks = [c.choices[0].model_dump().get("attention_tokens")
              for c in client.completions.create(stream=True, **kwargs) if c.choices]  # fmt: skip
    chunks = [c for c in chunks if c]
    assert chunks[0]["prompt_content"] == report["prompt_content"]
    assert all("prompt_content" not in c for c in chunks[1:]), "sent once"


def test_chat_streaming_equals_non_streaming(client, tok, hf):
    ids = chat_prompt_ids(tok, QUESTION)
    kwargs = dict(model="m", messages=QUESTION, max_tokens=5, temperature=0,
                  extra_body={"return_attention_tokens": True,
                              "attention_prompt_positions": [1, len(ids) - 1]})  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0].model_dump()["attention_tokens"]
    assert full["prompt_tokens"] == len(ids)
    check_prompt_content(full, ids, hf, tok, [1, len(ids) - 1], MAX_K)
    chunks = []
    for c in client.chat.completions.create(stream=True, **kwargs):
        if c.choices and c.choices[0].model_dump().get("attention_tokens"):
            chunks.append(c.choices[0].model_dump()["attention_tokens"])
    assert "prompt_content" in chunks[0] and all("prompt_content" not in c for c in chunks[1:])
    for a, b in zip(chunks[0]["prompt_content"], full["prompt_content"], strict=True):
        assert a["position"] == b["position"]
        assert [x["position"] for x in a["top_attention"]] == [
            x["position"] for x in b["top_attention"]
        ]


def test_prefix_hit_recomputes_from_first_asked_position(server, tok, hf):
    ids = tok.encode(LONG)
    plain = {"text": LONG, "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    native(server, plain)  # the whole prompt is now in the prefix cache
    for positions, cached in (([4, 30], 4), ([30, 32], 30)):
        body = {**plain, "return_attention_tokens": True, "attention_prompt_positions": positions}
        meta = native(server, body).json()["meta_info"]
        assert meta["cached_tokens"] == cached
        check_prompt_content(meta["attention_tokens"], ids, hf, tok, positions, MAX_K)
    # Without prompt positions the whole cached prefix is reused (all but the last token).
    meta = native(server, {**plain, "return_attention_tokens": True}).json()["meta_info"]
    assert (
        meta["cached_tokens"] == len(ids) - 1 and "prompt_content" not in meta["attention_tokens"]
    )


def test_all_on_short_prompt_native_stream(server, tok, hf):
    ids = tok.encode(SHORT)
    body = {"text": SHORT, "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "return_attention_tokens": True, "attention_prompt_positions": "all", "stream": True}  # fmt: skip
    chunks = []
    with requests.post(f"{server}/generate", json=body, stream=True, timeout=180) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:])["meta_info"]["attention_tokens"])
    assert "prompt_content" in chunks[0] and all("prompt_content" not in c for c in chunks[1:])
    check_prompt_content(chunks[0], ids, hf, tok, list(range(len(ids))), MAX_K)


def test_engine(model_dir, tok, hf):
    import sglang as sgl

    engine = sgl.Engine(model_path=model_dir, max_total_tokens=8192, dtype="float32",
                        return_attention_tokens=True, attention_tokens_top_k=MAX_K,
                        attention_capture_layers="all", chunked_prefill_size=16,
                        attention_prompt_max_len=MAX_LEN)  # fmt: skip
    try:
        ids = tok.encode(LONG)
        out = engine.generate(LONG, {"max_new_tokens": 2, "temperature": 0},
                              return_attention_tokens=True, attention_prompt_positions=[3, 17, 32])  # fmt: skip
        check_prompt_content(out["meta_info"]["attention_tokens"], ids, hf, tok, [3, 17, 32], MAX_K)
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"return_attention_tokens": False}, "needs return_attention_tokens"),
        ({"attention_prompt_positions": [0, 99]}, "out of range"),
        ({"attention_prompt_positions": [-1]}, "out of range"),
        ({"attention_prompt_positions": []}, "non-empty list"),
        ({"attention_prompt_positions": ["3"]}, "integer positions"),
        ({"attention_prompt_positions": "first"}, "non-empty list"),
        ({"text": LONG * 2, "attention_prompt_positions": "all"}, "--attention-prompt-max-len"),
    ],
)
def test_validation_errors_are_400(server, client, extra, needle):
    body = {"text": SHORT, "sampling_params": {"max_new_tokens": 2},
            "return_attention_tokens": True, "attention_prompt_positions": [0], **extra}  # fmt: skip
    r = native(server, body)
    assert r.status_code == 400 and needle in r.json()["message"], r.text
    fields = {k: v for k, v in body.items() if k.startswith(("attention", "return"))}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt=body["text"], max_tokens=2, extra_body=fields)
    assert info.value.status_code == 400 and needle in info.value.message
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_in_process_batch_gemma2_sliding_window_softcap():
    """One extend batch of three requests (prompt rows; plain capture; none) on tiny Gemma 2
    (soft-capped scores, sliding windows of 8): rows at flat offsets past other requests' tokens,
    masked by the window, against HF."""
    from sglang.srt.attention_capture import AttentionRequest
    from sglang.srt.attention_capture.prompt import apply_prompt_positions
    from sglang.test.runners import SRTRunner, make_tiny_model

    path = make_tiny_model("gemma2", seed=5, max_position_embeddings=256)
    srt = SRTRunner(path, return_attention_tokens=True, attention_capture_layers="all",
                    attention_tokens_top_k=MAX_K, chunked_prefill_size=64)  # fmt: skip
    prompts = [[(i * 37 + s) % 500 + 3 for i in range(n)] for s, n in ((0, 21), (5, 30), (9, 26))]
    opt = AttentionRequest(top_k=4, layers=(0, 1, 2, 3), exclude_sink=1)
    reqs = [
        srt.make_req(prompts[0], 2, attention=opt, temperature=0.0),
        srt.make_req(prompts[1], 2, attention=apply_prompt_positions(opt, "all", 30, MAX_LEN),
                     temperature=0.0),
        srt.make_req(prompts[2], 2, temperature=0.0),
    ]  # fmt: skip
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    assert not reqs[0].prompt_attention_records and len(reqs[0].attention_records) == 2
    rows = prefill_rows(HFRunner(path), prompts[1])
    assert [p for p, _ in reqs[1].prompt_attention_records] == list(range(30))
    for p, rec in reqs[1].prompt_attention_records:
        assert_valid_topk(rec.positions, rec.scores, rows[:, p, : p + 1].mean(0), 4, exclude=1,
                          excluded_mass=rec.excluded_mass, tol=TOL, label=f"gemma2 query {p}")  # fmt: skip
