"""Head selection, span mass and attention statistics against HF float32 eager attention.

A tiny random Llama (4 query heads, 2 KV heads, 3 layers, SmolLM2's tokenizer and chat template)
is compared, per generated token, with `output_attentions[layer][0, h, -1, :]` of HF eager:
per-head top-k lists (`attention_head_aggregation` "none", with layer means and per layer), the
mean and the maximum over chosen heads, span mass (the sum of the aggregated HF row over each
span) and the statistics (entropy, sink / prompt / completion mass, mean distance of the HF row).

In-process (ModelRunner + Scheduler): a mixed batch (plain requests beside every option),
chunked prefill and a prefix-cache hit, and TP 2 over gloo (heads held by either rank, spans).
Through a server with chunked prefill: `/generate`, `/v1/completions` and
`/v1/chat/completions` (streaming and not, `attention_spans: "messages"`), and `Engine`; every
validation rule is a 400 naming the field.
"""

from __future__ import annotations

import math
import random

import openai
import pytest
import requests
import torch

from sglang.attention_tokens import merge_stream_chunks
from sglang.srt.attention_capture import AttentionRequest
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
        AttentionRequest(top_k=3, layers=(0, 2), aggregation="none", heads=(1, 2),
                         head_aggregation="none", exclude_sink=1),  # fmt: skip
        AttentionRequest(top_k=5, layers=ALL, spans=spans, stats=True),
        AttentionRequest(top_k=5, layers=(2,), aggregation="none", heads=(2,), spans=spans,
                         stats=True, exclude_sink=2),  # fmt: skip
        AttentionRequest(top_k=6, layers=ALL),  # the plain head mean beside the others
    ]


def run_in_process(folder: str, prompts, options, **server_kwargs) -> list:
    srt = SRTRunner(folder, return_attention_tokens=True, attention_capture_layers="all",
                    attention_tokens_top_k=8, **server_kwargs)  # fmt: skip
    reqs = [
        srt.make_req(p, STEPS, attention=o, temperature=0.0, ignore_eos=True)
        for p, o in zip(prompts, options)
    ]
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    srt.scheduler.check_memory()
    return reqs


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


def test_chunked_prefill_and_prefix_hit(folder, hf) -> None:
    prompts = rand_prompts(3, seed=2, lo=40, hi=60)
    options = [options_for(40)[i] for i in (0, 3, 5)]
    reqs = run_in_process(folder, prompts, options, chunked_prefill_size=16)
    check_reqs(reqs, prompts, options, hf, "chunked")
    srt_prompts = [prompts[0], prompts[0] + [7, 8, 9]]
    srt = SRTRunner(folder, return_attention_tokens=True, attention_capture_layers="all",
                    attention_tokens_top_k=8)  # fmt: skip
    opt = options_for(40)[4]
    done = []
    for prompt in srt_prompts:
        req = srt.make_req(prompt, STEPS, attention=opt, temperature=0.0, ignore_eos=True)
        srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
        done.append(req)
    assert done[1].cached_tokens >= 16, "no prefix-cache hit"
    check_reqs(done[1:], srt_prompts[1:], [opt], hf, "prefix hit")


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
