"""Head selection, span mass and attention statistics against HF float32 eager attention.

A tiny random Llama (4 query heads, 2 KV heads, 3 layers, SmolLM2's tokenizer and chat template)
is compared, per generated token, with `output_attentions[layer][0, h, -1, :]` of HF eager:
per-head top-k lists (`attention_head_aggregation` "none", with layer means and per layer), the
mean and the maximum over chosen heads, span mass (the sum of the aggregated HF row over each
span) and the statistics (entropy, sink / prompt / completion mass, mean distance of the HF row).

In-process (ModelRunner + Scheduler): a mixed batch (plain requests beside every option) and
TP 2 over gloo (heads held by either rank, spans). Through a server with chunked prefill (16):
`/generate` (with a prefix-cache hit), `/v1/completions` and `/v1/chat/completions` (streaming
and not, `attention_spans: "messages"`), and `Engine` (chunked, a prefix hit); every validation
rule is a 400 naming the field.
"""

from __future__ import annotations

import random

import openai
import pytest
import requests
import torch

from test_topk_attention import run_reqs

from sglang.attention_tokens import merge_stream_chunks, to_bertviz, to_rows
from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.attention_capture.config import STAT_NAMES
from sglang.srt.attention_capture.records import result_to_records
from sglang.test.attention_reference import assert_valid_topk
from sglang.test.runners import HFRunner, SRTRunner, cpu_threads_hint, make_tiny_text_model
from sglang.test.test_utils import running_server
from sglang.test.tp_runners import run_tp_group

cpu_threads_hint()
TOL = 1e-4
STEPS = 5
ALL = (0, 1, 2)


def rand_prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 40000) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return make_tiny_text_model(str(tmp_path_factory.mktemp("tiny-heads")))


@pytest.fixture(scope="module")
def hf(folder) -> HFRunner:
    return HFRunner(folder)


# ------------------------------------------------------------------ references from HF rows


def aggregated(rows: torch.Tensor, layers, heads=None, how: str = "mean") -> torch.Tensor:
    """[ctx] reference row from HF [num_layers, H, ctx] rows: heads within a layer, then layers."""
    per_layer = rows[list(layers)][:, list(heads) if heads is not None else slice(None)]
    return (per_layer.amax(1) if how == "max" else per_layer.mean(1)).mean(0)


def check_stats(entry_stats: dict, ref: torch.Tensor, prompt_len: int, label: str) -> None:
    q = ref.shape[0] - 1
    j = torch.arange(ref.shape[0], dtype=torch.float64)
    p = ref[ref > 0]
    want = {
        "entropy": float(-(p * p.log()).sum()),
        "sink_mass": float(ref[0]),
        "prompt_mass": float(ref[:prompt_len].sum()),
        "completion_mass": float(ref[prompt_len:].sum()),
        "mean_distance": float((ref * (q - j)).sum()),
    }
    for name, value in want.items():
        tol = TOL * max(1.0, abs(value))
        assert abs(entry_stats[name] - value) <= tol, f"{label} {name}: {entry_stats[name]} {value}"


def check_record(opt: AttentionRequest, rec, rows: torch.Tensor, prompt_len: int, label: str):
    """One AttentionRecord against HF per-head rows [num_layers, H, ctx] of its token."""
    topk = dict(exclude=opt.exclude_sink, tol=TOL)
    if opt.per_head and opt.per_layer:
        assert sorted(rec.layer_heads) == list(opt.layers)
        for layer, heads in rec.layer_heads.items():
            assert sorted(heads) == list(opt.heads)
            for h, (pos, val, excl) in heads.items():
                assert_valid_topk(pos, val, rows[layer, h], opt.top_k, excluded_mass=excl, **topk,
                                  label=f"{label} layer {layer} head {h}")  # fmt: skip
    elif opt.per_head:
        assert sorted(rec.heads) == list(opt.heads)
        for h, (pos, val, excl) in rec.heads.items():
            ref = aggregated(rows, opt.layers, (h,))
            assert_valid_topk(pos, val, ref, opt.top_k, excluded_mass=excl, **topk,
                              label=f"{label} head {h}")  # fmt: skip
    else:
        ref = aggregated(rows, opt.layers, opt.heads, opt.head_aggregation)
        if opt.per_layer:
            for layer, (pos, val, excl) in rec.layers.items():
                one = aggregated(rows, (layer,), opt.heads, opt.head_aggregation)
                assert_valid_topk(pos, val, one, opt.top_k, excluded_mass=excl, **topk,
                                  label=f"{label} layer {layer}")  # fmt: skip
        else:
            assert_valid_topk(rec.positions, rec.scores, ref, opt.top_k,
                              excluded_mass=rec.excluded_mass, **topk, label=label)  # fmt: skip
        if opt.spans:
            want = [float(ref[a:b].sum()) for _, a, b in opt.spans]
            assert rec.span_mass == pytest.approx(want, abs=TOL), f"{label} span mass"
        if opt.stats:
            names = ("entropy", "sink_mass", "prompt_mass", "completion_mass", "mean_distance")
            check_stats(dict(zip(names, rec.stats)), ref, prompt_len, label)


# ------------------------------------------------------------------ in-process engine


def options_for(prompt_len: int) -> list:
    spans = (("head", 0, 3), ("middle", 3, prompt_len - 2), ("all", 0, prompt_len))
    return [
        AttentionRequest(top_k=5, layers=ALL, heads=(1, 3)),
        AttentionRequest(top_k=5, layers=(0, 2), heads=(0, 2, 3), head_aggregation="max"),
        None,  # does not ask, in the same batches
        AttentionRequest(top_k=4, layers=(1, 2), heads=(0, 3), head_aggregation="none"),
        AttentionRequest(
            top_k=3,
            layers=(0, 2),
            aggregation="none",
            heads=(1, 2),
            head_aggregation="none",
            exclude_sink=1,
        ),  # fmt: skip
        AttentionRequest(top_k=5, layers=ALL, spans=spans, stats=True),
        AttentionRequest(
            top_k=5,
            layers=(2,),
            aggregation="none",
            heads=(2,),
            spans=spans,
            stats=True,
            exclude_sink=2,
        ),  # fmt: skip
        AttentionRequest(top_k=6, layers=ALL),  # the plain head mean beside the others
    ]


def run_in_process(folder: str, prompts, options, **server_kwargs) -> list:
    srt = SRTRunner(folder, return_attention_tokens=True, attention_capture_layers="all",
                    attention_tokens_top_k=8, **server_kwargs)  # fmt: skip
    return run_reqs(srt, prompts, options, STEPS)


def check_reqs(reqs, prompts, options, hf: HFRunner, label: str) -> None:
    for i, (req, prompt, opt) in enumerate(zip(reqs, prompts, options)):
        ref, rows = hf.greedy_with_attention(prompt, STEPS, per_head=True)
        assert req.output_ids == ref.output_ids, f"{label} {i}: tokens"
        if opt is None:
            assert req.attention_records == []
            continue
        assert len(req.attention_records) == STEPS
        for t, rec in enumerate(req.attention_records):
            check_record(opt, rec, rows[t], len(prompt), f"{label} request {i} token {t}")


def test_mixed_batch_against_hf(folder, hf) -> None:
    prompts = rand_prompts(8, seed=1, lo=12, hi=30)
    n = min(len(p) for p in prompts)
    options = options_for(n)
    check_reqs(run_in_process(folder, prompts, options), prompts, options, hf, "mixed")


def test_static_graph_path_spans_and_stats_equal_eager() -> None:
    """The fixed-shape path CUDA graphs record, run eagerly, gives the eager path's span mass
    and statistics (rows that do not ask beside rows that do)."""
    from test_torch_native_backend import MAX_CONTEXT, NUM_ROWS, make_case, make_layer

    from sglang.srt.attention_capture import AttentionCapture, CaptureSpec
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    case = make_case(11, hq=8, hkv=2, d=16, prefix_lens=[9, 20, 3, 40, 17], extend_lens=[1] * 5,
                     mode=ForwardMode.DECODE, num_layers=2, page_size=2)  # fmt: skip
    spans = (("a", 0, 2), ("b", 1, 4), ("c", 0, 3))
    requests = [
        AttentionRequest(top_k=5, layers=(1,), spans=spans[:2], stats=True),
        AttentionRequest(top_k=4, layers=(0, 1)),
        AttentionRequest(top_k=3, layers=(0, 1), aggregation="none", spans=spans, stats=True),
    ]
    spec = CaptureSpec([3, 0, 4], requests, [30, 5, 12])
    cap = AttentionCapture((0, 1), 2, NUM_ROWS, MAX_CONTEXT, 8, case.hq, device="cpu")
    layers = [make_layer(case, i) for i in range(2)]

    def forward_layers() -> None:
        for i, layer in enumerate(layers):
            _, lse = case.backend.forward(case.q[i], case.k[i], case.v[i], layer, case.fb,
                                          return_lse=True)  # fmt: skip
            if cap.wants_layer(i):
                cap.record(layer, case.q[i], lse, case.fb)

    cap.begin(spec, case.fb)
    forward_layers()
    eager = cap.finish()
    cap.init_static(NUM_ROWS, max_width=MAX_CONTEXT)
    bs = case.fb.batch_size
    cap.load_static(spec, bs)
    shape = cap.static_shape(spec, case.fb.seq_lens_cpu)
    assert shape.reduces and spec.plain_heads
    cap.static_begin(bs, shape)
    forward_layers()
    cap.static_finish(case.fb, bs)
    static = cap.static_result(spec, case.fb.seq_lens_cpu)
    assert eager.span_mass.shape == static.span_mass.shape == (3, 3)
    torch.testing.assert_close(static.span_mass, eager.span_mass, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(static.stats, eager.stats, rtol=1e-5, atol=1e-6)
    for a, b in zip(result_to_records(static), result_to_records(eager)):
        assert a.span_mass == pytest.approx(b.span_mass) and (a.stats is None) == (b.stats is None)


TP_PROMPTS = rand_prompts(3, seed=3, lo=12, hi=20)


def _tp_run(folder: str) -> list:
    options = [options_for(12)[i] for i in (1, 4, 5)]
    reqs = run_in_process(folder, TP_PROMPTS, options)
    return [(list(r.output_ids), r.attention_records) for r in reqs]


def test_tp2_heads_and_spans(folder, hf) -> None:
    """Heads 1 and 2 sit on different ranks under TP 2 (2 heads each): max over heads, per-head
    lists across ranks and span mass equal the single-process HF reference."""
    per_rank = run_tp_group(2, _tp_run, folder)
    options = [options_for(12)[i] for i in (1, 4, 5)]
    for rank, results in enumerate(per_rank):
        for i, ((ids, records), prompt, opt) in enumerate(zip(results, TP_PROMPTS, options)):
            ref, rows = hf.greedy_with_attention(prompt, STEPS, per_head=True)
            assert ids == ref.output_ids
            for t, rec in enumerate(records):
                check_record(opt, rec, rows[t], len(prompt), f"TP rank {rank} req {i} token {t}")


# ------------------------------------------------------------------ server routes and Engine

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat today"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour of the sky."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
]
SERVER_ARGS = ["--dtype", "float32", "--max-total-tokens", "4096", "--return-attention-tokens",
               "--attention-capture-layers", "all", "--attention-tokens-top-k", "8",
               "--chunked-prefill-size", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def server(folder):
    with running_server(folder, SERVER_ARGS) as url:
        yield url


@pytest.fixture(scope="module")
def tok(folder):
    from sglang.srt.hf_transformers_utils import get_tokenizer

    return get_tokenizer(folder)


def option_of(report: dict) -> AttentionRequest:
    """The AttentionRequest a report says it was served with."""
    spans = tuple((s["name"], s["start"], s["end"]) for s in report.get("spans") or ())
    heads = report.get("heads")
    return AttentionRequest(
        top_k=report["top_k"], layers=tuple(report["layers"]),
        aggregation=report["layer_aggregation"], exclude_sink=report["exclude_sink"],
        heads=tuple(heads) if heads is not None else None,
        head_aggregation=report["head_aggregation"], spans=spans,
        stats=bool(report.get("stats")),
    )  # fmt: skip


def record_of(entry: dict, opt: AttentionRequest):
    """An AttentionRecord from a content entry (what check_record takes)."""
    from sglang.srt.attention_capture.records import AttentionRecord

    def ranked(items, excluded):
        return [x["position"] for x in items], [x["score"] for x in items], excluded or 0.0

    excl = entry.get("excluded_mass")
    rec = AttentionRecord([], [], 0.0)
    if opt.per_head and opt.per_layer:
        rec.layer_heads = {
            int(layer): {int(h): ranked(items, (excl or {}).get(layer, {}).get(h))
                         for h, items in v["heads"].items()}
            for layer, v in entry["layers"].items()
        }  # fmt: skip
    elif opt.per_head:
        rec.heads = {int(h): ranked(v, (excl or {}).get(h)) for h, v in entry["heads"].items()}
    elif opt.per_layer:
        rec.layers = {int(k): ranked(v, (excl or {}).get(k)) for k, v in entry["layers"].items()}
    else:
        rec.positions, rec.scores, rec.excluded_mass = ranked(entry["top_attention"], excl)
    if opt.spans:
        assert list(entry["span_mass"]) == [s[0] for s in opt.spans]
        rec.span_mass = list(entry["span_mass"].values())
    if opt.stats:
        rec.stats = [entry[name] for name in STAT_NAMES]
    return rec


def check_report(report: dict, prompt_ids: list[int], hf: HFRunner, label: str) -> None:
    opt = option_of(report)
    content = report["content"]
    assert report["prompt_tokens"] == len(prompt_ids)
    ref, rows = hf.greedy_with_attention(prompt_ids, len(content), per_head=True)
    assert [e["token_id"] for e in content] == ref.output_ids, f"{label}: tokens"
    for t, entry in enumerate(content):
        check_record(opt, record_of(entry, opt), rows[t], len(prompt_ids), f"{label} token {t}")


GREEDY = {"max_new_tokens": STEPS, "temperature": 0.0, "ignore_eos": True}
SPLIT = {"attention_heads": [0, 3], "attention_head_aggregation": "none",
         "attention_layer_aggregation": "none", "attention_exclude_sink": 1}  # fmt: skip
SPANS = {"attention_heads": [1, 2], "attention_spans": [{"name": "start", "start": 0, "end": 4},
         {"name": "rest", "start": 4, "end": 12}], "attention_stats": True}  # fmt: skip


def test_generate_chunked_and_prefix_hit(server, tok, hf):
    ids = tok.encode(TEXT)
    assert len(ids) > 16  # chunked prefill at 16
    for fields in (SPLIT, SPANS, SPANS):  # the repeat hits the prefix cache
        body = {"text": TEXT, "sampling_params": GREEDY, "return_attention_tokens": True, **fields}
        out = requests.post(f"{server}/generate", json=body, timeout=120).json()
        check_report(out["meta_info"]["attention_tokens"], ids, hf, f"/generate {list(fields)}")
    assert out["meta_info"]["cached_tokens"] > 0


def check_stream(chunks: list, full: dict, prompt_ids: list[int], hf: HFRunner) -> None:
    """A streamed report: the non-streamed one's header and keys, its own check against HF (the
    repeat's prefill is a prefix hit, so its numbers may differ from the first in rounding)."""
    merged = merge_stream_chunks(chunks)
    assert {k: v for k, v in merged.items() if k != "content"} == {
        k: v for k, v in full.items() if k != "content"
    }
    assert [set(e) for e in merged["content"]] == [set(e) for e in full["content"]]
    check_report(merged, prompt_ids, hf, "stream")


def test_openai_routes_streaming_and_not(server, tok, hf):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    extra = {"return_attention_tokens": True, "attention_heads": [0, 2],
             "attention_head_aggregation": "none", "ignore_eos": True}  # fmt: skip
    kw = dict(model="m", prompt=TEXT, max_tokens=STEPS, temperature=0, extra_body=extra)
    full = client.completions.create(**kw).choices[0].model_dump()["attention_tokens"]
    check_report(full, tok.encode(TEXT), hf, "completions")
    rows = to_rows(full)  # the client helpers know per-head lists
    assert {r["head"] for r in rows} == {0, 2} and len(rows) == STEPS * 2 * 8
    attention, tokens = to_bertviz(full)
    assert len(attention) == 1 and attention[0].shape == (1, 2, len(tokens), len(tokens))
    entry = full["content"][1]
    top = entry["heads"]["2"][0]
    assert attention[0][0, 1, entry["position"] - 1, top["position"]] == pytest.approx(top["score"])
    check_stream(list(client.completions.create(stream=True, **kw)), full, tok.encode(TEXT), hf)
    extra = {"return_attention_tokens": True, "attention_spans": "messages",
             "attention_stats": True, "ignore_eos": True}  # fmt: skip
    kw = dict(model="m", messages=CHAT, max_tokens=STEPS, temperature=0, extra_body=extra)
    full = client.chat.completions.create(**kw).choices[0].model_dump()["attention_tokens"]
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(text, add_special_tokens=False)
    spans = full["spans"]
    assert [s["name"] for s in spans] == ["0:system", "1:user", "2:assistant", "3:user"]
    assert spans[0]["start"] == 0 and all(a["end"] == b["start"] for a, b in zip(spans, spans[1:]))
    end_marker = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(prompt_ids[s["end"] - 2] == end_marker for s in spans)  # "<|im_end|>\n" ends each
    assert spans[-1]["end"] < len(prompt_ids)  # the generation prompt is in no span
    check_report(full, prompt_ids, hf, "chat")
    check_stream(list(client.chat.completions.create(stream=True, **kw)), full, prompt_ids, hf)


def test_engine(folder, hf, tok):
    import sglang as sgl

    engine = sgl.Engine(model_path=folder, dtype="float32", max_total_tokens=2048,
                        return_attention_tokens=True, attention_capture_layers="all",
                        attention_tokens_top_k=8, chunked_prefill_size=16)  # fmt: skip
    try:
        fields = {"attention_heads": [0, 1, 3], "attention_head_aggregation": "max"}
        out = engine.generate(TEXT, GREEDY, return_attention_tokens=True, **fields)
        check_report(out["meta_info"]["attention_tokens"], tok.encode(TEXT), hf, "Engine max")
        out = engine.generate(TEXT, GREEDY, return_attention_tokens=True, **SPANS)
        assert out["meta_info"]["cached_tokens"] > 0  # a prefix hit on the chunked prompt
        check_report(out["meta_info"]["attention_tokens"], tok.encode(TEXT), hf, "Engine spans")
        with pytest.raises(ValueError, match="attention_heads"):
            engine.generate(TEXT, GREEDY, return_attention_tokens=True, attention_heads=[4])
    finally:
        engine.shutdown()


BAD = [
    ({"attention_heads": [4]}, "attention_heads"),
    ({"attention_heads": [-1]}, "attention_heads"),
    ({"attention_heads": []}, "attention_heads"),
    ({"attention_head_aggregation": "median"}, "attention_head_aggregation"),
    (
        {"attention_heads": [0], "attention_head_aggregation": "none", "attention_stats": True},
        "attention_stats",
    ),  # fmt: skip
    (
        {"attention_head_aggregation": "max", "attention_spans": SPANS["attention_spans"]},
        "attention_spans",
    ),  # fmt: skip
    ({"attention_spans": [{"name": "x", "start": 3, "end": 999}]}, "attention_spans"),
    ({"attention_spans": [{"name": "x", "start": 3, "end": 3}]}, "attention_spans"),
    ({"attention_spans": [{"name": "x", "start": 0}]}, "attention_spans"),
    ({"attention_spans": "messages"}, "attention_spans"),
    ({"attention_stats": "yes"}, "attention_stats"),
]


def test_validation_is_400_naming_the_field(server):
    for fields, name in BAD:
        body = {"text": TEXT, "sampling_params": GREEDY, "return_attention_tokens": True, **fields}
        resp = requests.post(f"{server}/generate", json=body, timeout=60)
        assert resp.status_code == 400 and name in resp.json()["message"], (fields, resp.text)
    for fields in ({"attention_stats": True}, {"attention_heads": [1]}):
        resp = requests.post(f"{server}/v1/chat/completions", timeout=60,
                             json={"model": "m", "messages": CHAT, "max_tokens": 2, **fields})  # fmt: skip
        assert resp.status_code == 400 and "return_attention_tokens" in resp.json()["message"]
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
