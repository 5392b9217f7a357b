"""Parity with HuggingFace transformers (float32, CPU, eager) for every supported architecture.

Tiny random-weight checkpoints are built and saved by the test, loaded by our loader from
safetensors, and compared on: prefill logits (1e-4 max abs), 32 greedy tokens (identical) and
their logprobs (1e-4), at batch sizes 1, 4 and 16 with prompts of different lengths, after a
radix-cache hit, and with chunked prefill splitting prompts mid-way.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from sglang.test.runners import (
    HFRunner,
    SRTRunner,
    assert_greedy_matches,
    cpu_threads_hint,
    make_tiny_model,
)

ARCHS = ["llama", "llama_tied", "mistral", "qwen2", "qwen3"]
STEPS = 32
TOL = 1e-4

cpu_threads_hint()


def prompts_for(n: int, seed: int, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tmp_path_factory):
    folder = make_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    hf = HFRunner(folder)
    # crc32, not hash(): str hashes are salted per process, so the prompts would change every run.
    prompts = prompts_for(16, seed=zlib.crc32(request.param.encode()) % 1000)
    refs = [hf.greedy(p, STEPS) for p in prompts]
    return request.param, folder, hf, prompts, refs


def test_prefill_logits(arch_setup):
    arch, folder, hf, prompts, _ = arch_setup
    srt = SRTRunner(folder)
    logits = srt.prefill_logits(prompts[:4])
    for i, p in enumerate(prompts[:4]):
        diff = (logits[i] - hf.prefill_logits(p)).abs().max().item()
        assert diff < TOL, f"{arch}: prefill logits differ by {diff}"


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_greedy_batches(arch_setup, bs):
    arch, folder, _, prompts, refs = arch_setup
    srt = SRTRunner(folder)
    outs = srt.generate(prompts[:bs], STEPS, return_logprob=True)
    assert_greedy_matches(outs, refs[:bs], f"{arch} bs={bs}")


def test_radix_cache_hit(arch_setup):
    arch, folder, hf, prompts, refs = arch_setup
    srt = SRTRunner(folder)
    srt.generate(prompts[:2], STEPS, return_logprob=True)
    # The same prompts again hit the cache fully; extended prompts hit it partly.
    again = srt.generate(prompts[:2], STEPS, return_logprob=True)
    assert all(o.cached_tokens == len(p) - 1 for o, p in zip(again, prompts[:2]))
    assert_greedy_matches(again, refs[:2], f"{arch} full hit")
    longer = [p + [7, 8, 9] for p in prompts[:2]]
    outs = srt.generate(longer, STEPS, return_logprob=True)
    assert all(o.cached_tokens >= len(p) for o, p in zip(outs, prompts[:2]))
    assert_greedy_matches(outs, [hf.greedy(p, STEPS) for p in longer], f"{arch} partial hit")


def test_chunked_prefill(arch_setup):
    arch, folder, _, prompts, refs = arch_setup
    srt = SRTRunner(folder, chunked_prefill_size=7)
    chunks: list[int] = []
    srt.scheduler.on_batch = lambda b: chunks.append(sum(1 for r in b.reqs if r.is_chunked))
    outs = srt.generate(prompts[:4], STEPS, return_logprob=True)
    assert any(chunks), "no prompt was split into chunks"
    assert_greedy_matches(outs, refs[:4], f"{arch} chunked")


def test_prompt_logprobs(arch_setup):
    arch, folder, hf, prompts, _ = arch_setup
    srt = SRTRunner(folder, chunked_prefill_size=9)
    outs = srt.generate(prompts[:3], 2, return_logprob=True, logprob_start_len=0)
    for o, p in zip(outs, prompts[:3]):
        ref = hf.prompt_logprobs(p)
        assert o.input_logprobs[0] is None and len(o.input_logprobs) == len(p)
        diff = max(abs(a - b) for a, b in zip(o.input_logprobs[1:], ref))
        assert diff < TOL, f"{arch}: prompt logprob diff {diff}"


def test_lse_matches_reference(arch_setup):
    """The backend's log-sum-exp (the attention-capture contract) equals a dense reference."""
    _, folder, _, prompts, _ = arch_setup
    srt = SRTRunner(folder)
    captured = []

    class Probe:
        """Stands in for the runner's AttentionCapture: records what layer 0 hands over."""

        def begin(self, spec, fb):
            pass

        def finish(self):
            return None

        def abort(self):
            pass

        def wants_layer(self, layer_id):
            return layer_id == 0

        def record(self, layer, q, lse, fb):
            captured.append((layer, q.clone(), lse.clone(), fb))

    from sglang.srt.managers.schedule_batch import ScheduleBatch

    sched = srt.scheduler
    reqs = [srt.make_req(p, 1) for p in prompts[:3]]
    for r in reqs:
        r.sampling_params.normalize()
        r.init_next_round_input()
    batch = ScheduleBatch(
        reqs, sched.req_to_token_pool, sched.allocator, sched.tree_cache, 512, "cpu"
    )
    wb = batch.prepare_for_extend()
    srt.model_runner.attention_capture = Probe()
    wb.attention_capture = "capture spec"  # any spec makes the runner call the capture
    srt.model_runner.forward(wb)
    layer, q, lse, fb = captured[0]
    k_buf = fb.token_to_kv_pool.get_key_buffer(0)
    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
    start = 0
    for r, n in zip(reqs, fb.extend_seq_lens_cpu):
        slots = sched.req_to_token_pool.req_to_token[r.req_pool_idx, :n]
        keys = k_buf[slots].repeat_interleave(hq // hkv, dim=1)  # [n, hq, d]
        qs = q[start : start + n].view(n, hq, d)
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * layer.scaling
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        ref = torch.logsumexp(scores.masked_fill(~causal, float("-inf")), -1).T
        assert (lse[start : start + n] - ref).abs().max() < 1e-4
        start += n
