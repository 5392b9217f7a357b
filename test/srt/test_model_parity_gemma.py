"""Parity with HuggingFace transformers (float32, CPU, eager) for Gemma 2, Gemma 3 and per-layer
sliding windows (Qwen2/Qwen3 with `max_window_layers`).

Tiny random-weight checkpoints with peaky attention (initializer range 0.3) and a window of 8 on
some layers only (runners.TINY_CONFIGS); every prompt is longer than the window, and Gemma 2's
attention and final soft-caps are small enough that the scores and logits reach them. Checked:
each layer's window equals HF's, prefill logits (1e-4), 32 greedy tokens (identical) with their
logprobs (1e-4) at batch 1 and in a mixed batch, chunked prefill, a prefix-cache hit, and
attention tokens (last layer, all-layer mean, per-layer lists) as a valid top-k of HF eager
head-mean rows within 1e-4, the soft-capped probabilities for Gemma 2; Gemma 2 under tensor
parallelism 2 (gloo on CPU) gives TP 1's tokens and attention tokens and HF's logprobs.
"""

from __future__ import annotations

import random
import zlib
from typing import Optional

import pytest
from test_tensor_parallel import run_models
from test_topk_attention import capture_runner, check_records, run_reqs

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.layers.radix_attention import sliding_window_for_layer
from sglang.test.runners import (
    HFRunner,
    SRTRunner,
    assert_greedy_matches,
    cpu_threads_hint,
    make_tiny_model,
)
from sglang.test.tp_runners import run_tp_group

ARCHS = ["gemma2", "gemma3", "qwen2_window", "qwen3_window"]
STEPS = 32
TOL = 1e-4
WINDOW = 8

cpu_threads_hint()


def prompts_for(seed: int) -> list[list[int]]:
    """Four prompts of 12-45 tokens (every one longer than the window); the last one extends the
    first, so running it after the first hits the prefix cache across a window boundary."""
    rng = random.Random(seed)
    prompts = [
        [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(12, 40))] for _ in range(3)
    ]
    return prompts + [prompts[0] + [rng.randrange(3, 512) for _ in range(5)]]


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    folder = make_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    hf = HFRunner(folder)
    prompts = prompts_for(seed=zlib.crc32(request.param.encode()) % 1000)
    refs = [hf.greedy(p, STEPS) for p in prompts]
    return request.param, folder, hf, prompts, refs


def test_layer_windows_match_hf(setup):
    arch, folder, hf, _, _ = setup
    config = hf.model.config
    hf_windows = [layer.self_attn.sliding_window or -1 for layer in hf.model.model.layers]
    ours = [sliding_window_for_layer(config, i) for i in range(config.num_hidden_layers)]
    assert ours == hf_windows, f"{arch}: windows {ours} != HF {hf_windows}"
    assert WINDOW in ours and -1 in ours, f"{arch}: the config should window some layers only"
    model = SRTRunner(folder).model_runner.model
    engine = [layer.self_attn.attn.sliding_window_size for layer in model.model.layers]
    assert engine == hf_windows


def test_prefill_logits(setup):
    arch, folder, hf, prompts, _ = setup
    logits = SRTRunner(folder).prefill_logits(prompts)
    for i, p in enumerate(prompts):
        diff = (logits[i] - hf.prefill_logits(p)).abs().max().item()
        assert diff < TOL, f"{arch}: prefill logits differ by {diff}"


def test_greedy_batch_1_and_mixed(setup):
    arch, folder, _, prompts, refs = setup
    srt = SRTRunner(folder)
    assert_greedy_matches(srt.generate(prompts[:1], STEPS, return_logprob=True), refs[:1],
                          f"{arch} bs=1")  # fmt: skip
    outs = srt.generate(prompts, STEPS, return_logprob=True)
    assert_greedy_matches(outs, refs, f"{arch} mixed batch")


def test_chunked_prefill_and_prefix_hit(setup):
    arch, folder, _, prompts, refs = setup
    srt = SRTRunner(folder, chunked_prefill_size=7)
    chunks: list[int] = []
    srt.scheduler.on_batch = lambda b: chunks.append(sum(1 for r in b.reqs if r.is_chunked))
    assert_greedy_matches(srt.generate(prompts[:1], STEPS, return_logprob=True), refs[:1],
                          f"{arch} chunked")  # fmt: skip
    assert any(chunks), "no prompt was split into chunks"
    # The last prompt extends the first, now cached: its new tokens' windows reach into the hit.
    (hit,) = srt.generate(prompts[3:], STEPS, return_logprob=True)
    assert hit.cached_tokens >= len(prompts[0]), f"{arch}: no prefix-cache hit"
    assert_greedy_matches([hit], refs[3:], f"{arch} prefix hit")


def capture_options(num_layers: int) -> list[Optional[AttentionRequest]]:
    """Per prompt: the last layer, the all-layer mean, no capture (in the same batches), and
    per-layer lists with the sink excluded."""
    every = tuple(range(num_layers))
    return [
        AttentionRequest(top_k=5, layers=(num_layers - 1,)),
        AttentionRequest(top_k=8, layers=every),
        None,
        AttentionRequest(top_k=4, layers=every, aggregation="none", exclude_sink=1),
    ]


def test_attention_tokens_against_hf_eager(setup):
    arch, folder, hf, prompts, _ = setup
    options = capture_options(hf.model.config.num_hidden_layers)
    steps = 6
    reqs = run_reqs(capture_runner(folder, chunked_prefill_size=16), prompts, options, steps)
    for i, (req, prompt) in enumerate(zip(reqs, prompts)):
        ref, rows = hf.greedy_with_attention(prompt, steps)
        assert req.output_ids == ref.output_ids, f"{arch} request {i}: tokens"
        if options[i] is None:
            assert req.attention_records == []
        else:
            check_records(req, rows, f"{arch} request {i}")


def test_gemma2_tp2_matches_tp1_and_hf(tmp_path_factory):
    folders = {"gemma2": make_tiny_model("gemma2", str(tmp_path_factory.mktemp("tp-gemma2")))}
    prompts, steps = prompts_for(seed=5)[:2], 12
    tp1 = run_models(folders, prompts, steps)["gemma2"]
    per_rank = run_tp_group(2, run_models, folders, prompts, steps)
    assert per_rank[0] == per_rank[1], "TP ranks disagree"
    hf = HFRunner(folders["gemma2"])
    for i, (ours, ref) in enumerate(zip(per_rank[0]["gemma2"], tp1)):
        want = hf.greedy(prompts[i], steps)
        assert ours["ids"] == ref["ids"] == want.output_ids, f"TP 2 prompt {i}: tokens"
        assert max(abs(a - b) for a, b in zip(ours["out_lp"], want.output_logprobs)) < TOL
        for (pos, score), (ref_pos, ref_score) in zip(ours["attn"], ref["attn"]):
            assert pos == ref_pos, f"TP 2 prompt {i}: attention tokens differ"
            assert max(abs(a - b) for a, b in zip(score, ref_score)) < 1e-5
