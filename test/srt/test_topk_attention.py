"""The capture math against references: a dense float64 softmax, and HF transformers eager.

Part 1 drives `AttentionCapture` directly on the torch_native backend's real pools (random
non-contiguous KV slots, cached prefixes, extend and decode, GQA/MHA/MQA, sliding windows) and
checks every record against dense float64 softmax rows: positions form a valid top-k, scores
match, layer subsets are means of the chosen layers, excluded sinks are never ranked and their
mass is reported, per-layer lists are each layer's own top-k.

Part 2 runs the engine in-process (ModelRunner + Scheduler) on tiny Llama, Qwen2 and Qwen3
models and on SmolLM2, and compares every generated token's report with
`attentions[layer][0, :, -1, :]` of HF eager attention (head mean, layer mean) in float32: last
layer, all layers and a subset; mixed batches (requests that ask beside requests that do not),
chunked prefill, a prefix-cache hit, retraction under a dry KV pool; the generated tokens are the
same with and without the feature.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from test_torch_native_backend import MAX_CONTEXT, NUM_ROWS, make_case, make_layer

from sglang.srt.attention_capture import (
    AttentionCapture,
    AttentionRequest,
    CaptureSpec,
    result_to_records,
)
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.test.attention_reference import assert_valid_topk, layer_mean
from sglang.test.runners import HFRunner, SRTRunner, cpu_threads_hint, make_tiny_model

cpu_threads_hint()
TOL = 1e-4

# ------------------------------------------------------------------ part 1: dense reference


def dense_rows(case, num_layers: int, window: int = -1) -> list[torch.Tensor]:
    """Per request: [num_layers, seq_len] float64 head-mean probabilities of its last query."""
    hq, hkv, d = case.hq, case.hkv, case.d
    group, scale = hq // hkv, d**-0.5
    out, start = [], 0
    for r in case.reqs:
        last = start + r.extend_len - 1
        start += r.extend_len
        rows = []
        for layer in range(num_layers):
            q = case.q[layer][last].view(hq, d).double()
            k = r.k[layer].to(case.q[layer].dtype).double().repeat_interleave(group, dim=1)
            s = torch.einsum("hd,jhd->hj", q, k) * scale
            j = torch.arange(r.seq_len)
            allowed = j <= r.seq_len - 1
            if window > 0:
                allowed &= (r.seq_len - 1 - j) < window
            s = s.masked_fill(~allowed, float("-inf"))
            rows.append(torch.softmax(s, dim=-1).mean(0))
        out.append(torch.stack(rows))
    return out


def run_capture(case, requests, batch_rows, num_layers, captured=None, window=-1, max_k=16):
    captured = tuple(range(num_layers)) if captured is None else captured
    cap = AttentionCapture(
        captured, num_layers, NUM_ROWS, MAX_CONTEXT, max_k, case.hq, device="cpu"
    )
    cap.begin(CaptureSpec(batch_rows, requests), case.fb)
    for layer_id in range(num_layers):
        layer = make_layer(case, layer_id, window)
        _out, lse = case.backend.forward(
            case.q[layer_id], case.k[layer_id], case.v[layer_id], layer, case.fb, return_lse=True
        )
        if cap.wants_layer(layer_id):
            cap.record(layer, case.q[layer_id], lse, case.fb)
    return result_to_records(cap.finish())


HEADS = [(8, 2), (4, 4), (4, 1)]


@pytest.mark.parametrize("hq,hkv", HEADS, ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE], ids=["extend", "decode"])
def test_capture_matches_dense_softmax(hq: int, hkv: int, mode: ForwardMode) -> None:
    if mode.is_extend():
        prefix, ext = [0, 5, 17, 30], [7, 3, 1, 12]
    else:
        prefix, ext = [9, 20, 3, 40], [1, 1, 1, 1]
    case = make_case(3, hq=hq, hkv=hkv, d=16, prefix_lens=prefix, extend_lens=ext, mode=mode,
                     num_layers=3, page_size=2)  # fmt: skip
    requests = [
        AttentionRequest(top_k=5, layers=(2,)),
        AttentionRequest(top_k=8, layers=(0, 1, 2)),
        AttentionRequest(top_k=3, layers=(0, 2), exclude_sink=2),
        AttentionRequest(top_k=16, layers=(1,)),  # k above some contexts: all positions listed
    ]
    rows = [0, 1, 2, 3]
    records = run_capture(case, requests, rows, num_layers=3)
    refs = dense_rows(case, 3)
    for i, (req, rec) in enumerate(zip(requests, records)):
        ref = layer_mean(refs[i], req.layers)
        assert_valid_topk(rec.positions, rec.scores, ref, req.top_k, exclude=req.exclude_sink,
                          excluded_mass=rec.excluded_mass, tol=1e-5, label=f"row {i}")  # fmt: skip


def test_masked_rows_and_per_layer_lists() -> None:
    """Only the listed batch rows capture; per-layer lists are each layer's own top-k."""
    case = make_case(5, hq=8, hkv=2, d=16, prefix_lens=[4, 0, 11], extend_lens=[6, 9, 2],
                     num_layers=3)  # fmt: skip
    req = AttentionRequest(top_k=4, layers=(0, 2), aggregation="none", exclude_sink=1)
    records = run_capture(case, [req], [2], num_layers=3, captured=(0, 2))
    assert len(records) == 1 and records[0].positions == [] and set(records[0].layers) == {0, 2}
    ref = dense_rows(case, 3)[2]
    for layer, (pos, scores, excluded) in records[0].layers.items():
        assert_valid_topk(pos, scores, ref[layer], 4, exclude=1, excluded_mass=excluded,
                          tol=1e-5, label=f"layer {layer}")  # fmt: skip


@pytest.mark.parametrize("window", [4, 9])
def test_sliding_window_scores_zero_outside_window(window: int) -> None:
    case = make_case(7, hq=4, hkv=2, d=8, prefix_lens=[12, 3], extend_lens=[5, 1], num_layers=1)
    req = AttentionRequest(top_k=30, layers=(0,))
    records = run_capture(case, [req, req], [0, 1], num_layers=1, window=window, max_k=32)
    for i, rec in enumerate(records):
        ref = dense_rows(case, 1, window)[i][0]
        assert_valid_topk(rec.positions, rec.scores, ref, 30, tol=1e-5, label=f"row {i}")
        seq = case.reqs[i].seq_len
        inside = {p for p, s in zip(rec.positions, rec.scores) if s > 0}
        assert inside <= set(range(max(0, seq - window), seq))


def test_bf16_scores_match_their_own_softmax() -> None:
    """In bf16 the score is the probability the kernel used: exp(q.K - lse) on the bf16 values."""
    case = make_case(9, hq=8, hkv=2, d=16, prefix_lens=[10, 0], extend_lens=[4, 8],
                     q_dtype=torch.bfloat16, pool_dtype=torch.bfloat16, num_layers=2)  # fmt: skip
    req = AttentionRequest(top_k=6, layers=(0, 1))
    records = run_capture(case, [req, req], [0, 1], num_layers=2)
    refs = dense_rows(case, 2)
    for i, rec in enumerate(records):
        assert_valid_topk(rec.positions, rec.scores, layer_mean(refs[i], (0, 1)), 6, tol=2e-3,
                          label=f"bf16 row {i}")  # fmt: skip


# ------------------------------------------------------------------ part 2: HF eager parity

STEPS = 6


def rand_prompts(n: int, seed: int, lo: int = 5, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def check_records(req, hf_rows: list[torch.Tensor], label: str) -> None:
    opt = req.attention
    assert len(req.attention_records) == len(req.output_ids), (
        f"{label}: {len(req.attention_records)} records for {len(req.output_ids)} tokens"
    )
    for t, rec in enumerate(req.attention_records):
        rows = hf_rows[t]
        if opt.per_layer:
            assert sorted(rec.layers) == list(opt.layers)
            for layer, (pos, scores, excl) in rec.layers.items():
                assert_valid_topk(pos, scores, rows[layer], opt.top_k, exclude=opt.exclude_sink,
                                  excluded_mass=excl, tol=TOL,
                                  label=f"{label} token {t} layer {layer}")  # fmt: skip
        else:
            assert_valid_topk(rec.positions, rec.scores, layer_mean(rows, opt.layers), opt.top_k,
                              exclude=opt.exclude_sink, excluded_mass=rec.excluded_mass,
                              tol=TOL, label=f"{label} token {t}")  # fmt: skip


def run_reqs(srt: SRTRunner, prompts, options, steps: int = STEPS):
    reqs = [
        srt.make_req(p, steps, attention=o, temperature=0.0, ignore_eos=True)
        for p, o in zip(prompts, options)
    ]
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    srt.scheduler.check_memory()
    return reqs


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request):
    path = make_tiny_model(request.param, seed=3)
    return request.param, path, HFRunner(path)


def capture_runner(path: str, **kwargs) -> SRTRunner:
    kwargs.setdefault("attention_capture_layers", "all")
    kwargs.setdefault("attention_tokens_top_k", 10)
    return SRTRunner(path, return_attention_tokens=True, **kwargs)


def test_tiny_models_mixed_batch_against_hf(tiny) -> None:
    arch, path, hf = tiny
    prompts = rand_prompts(6, seed=11)
    options = [
        AttentionRequest(top_k=5, layers=(2,)),  # last layer
        AttentionRequest(top_k=8, layers=(0, 1, 2)),  # all layers
        None,  # does not ask, runs in the same batches
        AttentionRequest(top_k=4, layers=(0, 2)),  # a subset
        AttentionRequest(top_k=3, layers=(0, 1, 2), aggregation="none", exclude_sink=1),
        AttentionRequest(top_k=8, layers=(1,), exclude_sink=3),
    ]
    reqs = run_reqs(capture_runner(path), prompts, options)
    plain = SRTRunner(path).generate(prompts, STEPS)
    for i, (req, prompt) in enumerate(zip(reqs, prompts)):
        ref, rows = hf.greedy_with_attention(prompt, STEPS)
        assert req.output_ids == ref.output_ids == plain[i].output_ids, f"{arch} {i}: tokens"
        if options[i] is None:
            assert req.attention_records == []
        else:
            check_records(req, rows, f"{arch} request {i}")


def test_chunked_prefill_prefix_hit_and_retraction(tiny) -> None:
    arch, path, hf = tiny
    opt = AttentionRequest(top_k=6, layers=(0, 2))
    # Chunked prefill: entry 0 comes from the last chunk's last position.
    long_prompts = rand_prompts(2, seed=12, lo=40, hi=60)
    srt = capture_runner(path, chunked_prefill_size=16)
    for req, prompt in zip(run_reqs(srt, long_prompts, [opt, opt]), long_prompts):
        check_records(req, hf.greedy_with_attention(prompt, STEPS)[1], f"{arch} chunked")
    # Prefix hit: the second request reuses the first one's cached KV.
    srt = capture_runner(path)
    base = rand_prompts(1, seed=13, lo=30, hi=31)[0]
    run_reqs(srt, [base], [opt])
    (hit,) = run_reqs(srt, [base + [7, 8, 9]], [opt])
    assert hit.cached_tokens >= 16, "no prefix-cache hit"
    check_records(hit, hf.greedy_with_attention(base + [7, 8, 9], STEPS)[1], f"{arch} hit")
    # Retraction: requests preempted and re-prefilled keep one record per token.
    prompts = rand_prompts(8, seed=14, lo=15, hi=25)
    tight = capture_runner(path, max_total_tokens=240, schedule_conservativeness=0.05,
                           attention_capture_layers="last")  # fmt: skip
    reqs = run_reqs(tight, prompts, [AttentionRequest(top_k=5, layers=(2,))] * 8, steps=30)
    assert tight.scheduler.num_retractions > 0, "the pool never ran dry"
    for i in (0, 3, 7):
        ref, rows = hf.greedy_with_attention(prompts[i], 30)
        assert reqs[i].output_ids == ref.output_ids
        check_records(reqs[i], rows, f"{arch} retracted batch {i}")


def test_smollm2_against_hf_gguf() -> None:
    from sglang.srt.hf_transformers_utils import get_tokenizer
    from sglang.srt.model_loader import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    tok = get_tokenizer(path)
    texts = ["The capital city of France is", "Once upon a time, in a land far away,", "1, 2, 3,"]
    prompts = [tok.encode(t) for t in texts]
    hf = HFRunner(os.path.dirname(path), gguf_file=os.path.basename(path))
    # HF dequantizes the GGUF: compare the exact (dense) path, not the packed kernel's.
    srt = capture_runner("smollm2-135m-instruct", max_total_tokens=4096, gguf_dequantize=True)
    options = [
        AttentionRequest(top_k=10, layers=(29,)),
        AttentionRequest(top_k=10, layers=tuple(range(30))),
        AttentionRequest(top_k=5, layers=(0, 15, 29), aggregation="none", exclude_sink=1),
    ]
    reqs = run_reqs(srt, prompts, options, steps=8)
    for i, (req, prompt) in enumerate(zip(reqs, prompts)):
        ref, rows = hf.greedy_with_attention(prompt, 8)
        assert req.output_ids == ref.output_ids
        check_records(req, rows, f"smollm2 request {i}")


# ------------------------------------------------- graph mode: the static path equals the eager one


@pytest.mark.parametrize("window,aggregation", [(-1, "mean"), (6, "mean"), (-1, "none")])
def test_static_graph_path_equals_eager(window: int, aggregation: str) -> None:
    """The fixed-shape path CUDA graphs record, run eagerly, gives the eager path's results
    (per-layer lists too: aggregation "none" replays graphs as well)."""
    prefix = [9, 20, 3, 40, 17]
    case = make_case(11, hq=8, hkv=2, d=16, prefix_lens=prefix, extend_lens=[1] * 5,
                     mode=ForwardMode.DECODE, num_layers=3, page_size=2)  # fmt: skip
    requests = [
        AttentionRequest(top_k=5, layers=(2,)),
        AttentionRequest(top_k=8, layers=(0, 1, 2), exclude_sink=2, aggregation=aggregation),
        AttentionRequest(top_k=16, layers=(0, 2)),
    ]
    spec = CaptureSpec([3, 0, 4], requests)  # rows 1 and 2 do not capture
    cap = AttentionCapture((0, 1, 2), 3, NUM_ROWS, MAX_CONTEXT, 16, case.hq, device="cpu")
    layers = [make_layer(case, i, window) for i in range(3)]

    def forward_layers() -> None:
        for i, layer in enumerate(layers):
            _out, lse = case.backend.forward(
                case.q[i], case.k[i], case.v[i], layer, case.fb, return_lse=True
            )
            if cap.wants_layer(i):
                cap.record(layer, case.q[i], lse, case.fb)

    cap.begin(spec, case.fb)
    forward_layers()
    eager = cap.finish()

    cap.init_static(NUM_ROWS, max_width=MAX_CONTEXT)
    bs = case.fb.batch_size
    cap.load_static(spec, bs)
    shape = cap.static_shape(spec, case.fb.seq_lens_cpu)
    assert shape.width == 64 and shape.width >= max(case.fb.seq_lens_cpu)  # 41 -> bucket 64
    assert shape.per_layer == (aggregation == "none") and shape.layers == (0, 1, 2)
    cap.static_begin(bs, shape)
    forward_layers()
    cap.static_finish(case.fb, bs)
    static = cap.static_result(spec, case.fb.seq_lens_cpu)
    assert not cap.graph_active and not cap.active

    assert static.values.shape == eager.values.shape
    torch.testing.assert_close(static.values, eager.values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(static.excluded, eager.excluded, rtol=1e-6, atol=1e-7)
    assert (static.layer_values is None) == (aggregation == "mean")
    if aggregation == "none":
        torch.testing.assert_close(static.layer_values, eager.layer_values, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            static.layer_excluded, eager.layer_excluded, rtol=1e-6, atol=1e-7
        )
        ranked = eager.layer_values > 0
        assert torch.equal(static.layer_indices[ranked], eager.layer_indices[ranked])
    # Positions of score 0 (outside a window) tie, and ties may rank in any order.
    ranked = eager.values > 0
    assert torch.equal(static.indices[ranked], eager.indices[ranked])
    for a, b in zip(result_to_records(static), result_to_records(eager)):
        assert len(a.positions) == len(b.positions)
        assert [p for p, s in zip(a.positions, a.scores) if s > 0] == [
            p for p, s in zip(b.positions, b.scores) if s > 0
        ]
        assert a.scores == pytest.approx(b.scores, rel=1e-6, abs=1e-7)
