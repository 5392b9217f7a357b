"""Parity with HuggingFace transformers (float32, CPU, eager) for GPT-2, GPT-NeoX (Pythia), Phi-3
and OLMo 2, attention tokens included.

Each architecture is a tiny random-weight checkpoint with a large init (peaky attention) built by
`make_tiny_model` and loaded by our loader from safetensors; the tiny Phi-3 has a sliding window
of 16, shorter than most sequences here. Compared with HF: prefill logits (1e-4), 32 greedy
tokens (identical) and their logprobs (1e-4) at batch 1 and in a mixed batch, with chunked prefill
(prompt logprobs too) and after a prefix-cache hit; every generated token's attention tokens (last
layer, all-layer mean, a subset, per-layer lists with an excluded sink) are a valid top-k of HF's
eager head-mean rows with scores within 1e-4. Tensor parallelism 2 (real gloo group) gives HF's
tokens and TP 1's attention tokens (OLMo 2 also with one KV head, replicated on both ranks). Config variants (untied GPT-2 head with per-layer attention
scaling, sequential-residual NeoX) are checked on prefill logits and incremental HF greedy decoding.
GPT-2's context length cannot exceed its learned position table; checkpoints in older layouts
(GPT-2 without the `transformer.` prefix, saved mask/rotary buffers) load; int4 checkpoints of
these architectures are refused.

The reference for a generated sequence is one HF eager forward over prompt + our tokens (teacher
forcing): at each step HF's argmax must be our token, so HF's own greedy decoding would produce
the same sequence, and the same forward gives its logprobs and attention rows (full rows, zeros
outside a sliding window). It agrees with HF's incremental decoding to float rounding (~1e-7) at
a thirtieth of the cost.
"""

from __future__ import annotations

import logging
import random
import zlib

import pytest
import torch
from test_tensor_parallel import run_models
from test_topk_attention import check_records

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.resolve import ModelLoadError
from sglang.test.runners import (
    GenOutput,
    HFRunner,
    SRTRunner,
    assert_greedy_matches,
    cpu_threads_hint,
    make_tiny_model,
)
from sglang.test.tp_runners import run_tp_group

ARCHS = ["gpt2", "gpt_neox", "phi3", "olmo2"]
STEPS = 32
TOL = 1e-4
INIT = 0.2  # large init: attention rows are peaky, so a wrong top-k shows
LAYERS = (0, 1, 2)

cpu_threads_hint()


def prompts_for(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    name = request.param
    folder = make_tiny_model(name, str(tmp_path_factory.mktemp(name)), initializer_range=INIT)
    # crc32, not hash(): str hashes are salted per process, so the prompts would change every run.
    prompts = prompts_for(4, seed=zlib.crc32(name.encode()) % 1000)
    prompts.append(prompts[0] + [7, 8, 9])  # extends prompt 0: a prefix-cache hit after it
    return name, folder, HFRunner(folder), prompts


@torch.no_grad()
def hf_reference(hf: HFRunner, prompt: list[int], output_ids: list[int]):
    """HF's greedy tokens and logprobs at each step of `output_ids` after `prompt`, its per-step
    [num_layers, context] head-mean attention rows, and its prompt logprobs (teacher forcing)."""
    ids = prompt + output_ids
    out = hf.model(torch.tensor([ids]), output_attentions=True)
    logprobs = torch.log_softmax(out.logits[0].float(), -1)
    steps = range(len(prompt) - 1, len(ids) - 1)
    greedy = [int(logprobs[i].argmax()) for i in steps]
    ref = GenOutput(greedy, [logprobs[i, t].item() for i, t in zip(steps, greedy)])
    rows = [
        torch.stack([a[0, :, i, : i + 1].double().mean(0) for a in out.attentions]) for i in steps
    ]
    prompt_lps = [logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    return ref, rows, prompt_lps


def capture_runner(folder: str, **kwargs) -> SRTRunner:
    return SRTRunner(folder, return_attention_tokens=True, attention_capture_layers="all", **kwargs)


def run(srt: SRTRunner, prompts, options, **kwargs):
    reqs = [
        srt.make_req(p, STEPS, return_logprob=True, attention=o, temperature=0.0,
                     ignore_eos=True, **kwargs)
        for p, o in zip(prompts, options)
    ]  # fmt: skip
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    srt.scheduler.check_memory()
    return reqs


def check(hf: HFRunner, reqs, label: str) -> None:
    """Greedy tokens, logprobs, attention tokens (requests that asked) and prompt logprobs
    (requests that asked) against HF."""
    for i, req in enumerate(reqs):
        ref, rows, prompt_lps = hf_reference(hf, req.origin_input_ids, list(req.output_ids))
        assert_greedy_matches([SRTRunner.to_output(req)], [ref], f"{label} request {i}")
        if req.attention is None:
            assert req.attention_records == []
        else:
            check_records(req, rows, f"{label} request {i}")
        if req.logprob_start_len == 0:
            got = [lp for lp, _ in req.input_token_logprobs]
            assert got[0] is None and len(got) == len(req.origin_input_ids)
            diff = max(abs(a - b) for a, b in zip(got[1:], prompt_lps))
            assert diff < TOL, f"{label} request {i}: prompt logprob diff {diff}"


def test_prefill_logits(arch):
    name, folder, hf, prompts = arch
    logits = SRTRunner(folder).prefill_logits(prompts[:4])
    for i, p in enumerate(prompts[:4]):
        diff = (logits[i] - hf.prefill_logits(p)).abs().max().item()
        assert diff < TOL, f"{name}: prefill logits differ by {diff}"


def test_batch1_and_mixed_batch(arch):
    name, folder, hf, prompts = arch
    srt = capture_runner(folder)
    last = AttentionRequest(top_k=6, layers=(LAYERS[-1],))
    check(hf, run(srt, prompts[:1], [last]), f"{name} bs=1")
    options = [
        last,
        AttentionRequest(top_k=8, layers=LAYERS),  # all-layer mean
        None,  # does not ask, shares the batches
        AttentionRequest(top_k=4, layers=(0, 2)),
        AttentionRequest(top_k=3, layers=LAYERS, aggregation="none", exclude_sink=1),
    ]
    check(hf, run(srt, prompts, options), f"{name} mixed batch")


def test_chunked_prefill_prompt_logprobs_and_prefix_hit(arch):
    name, folder, hf, prompts = arch
    srt = capture_runner(folder, chunked_prefill_size=7)
    chunks: list[int] = []
    srt.scheduler.on_batch = lambda b: chunks.append(sum(1 for r in b.reqs if r.is_chunked))
    mean = AttentionRequest(top_k=6, layers=LAYERS)
    reqs = run(srt, prompts[:3], [mean] * 3, logprob_start_len=0)
    assert any(chunks), "no prompt was split into chunks"
    check(hf, reqs, f"{name} chunked")
    # Prompt 0 is cached now; prompt 4 extends it.
    (hit,) = run(srt, prompts[4:], [mean])
    assert hit.cached_tokens >= len(prompts[0]), "no prefix-cache hit"
    check(hf, [hit], f"{name} prefix hit")


# Variants: the other branches of each config, on logits and greedy tokens only.
VARIANTS = {
    "gpt2_untied_layer_scaled": (
        "gpt2",
        dict(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True),
    ),
    "gpt_neox_sequential": ("gpt_neox", dict(use_parallel_residual=False, attention_bias=False)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants(variant, tmp_path):
    check_variant(*VARIANTS[variant], str(tmp_path), variant)


def check_variant(base: str, overrides: dict, folder: str, variant: str) -> None:
    """Prefill logits and 16 greedy tokens with their logprobs of `base` with config `overrides`
    against HF."""
    folder = make_tiny_model(base, folder, initializer_range=INIT, **overrides)
    hf = HFRunner(folder)
    prompts = prompts_for(2, seed=5)
    srt = SRTRunner(folder)
    logits = srt.prefill_logits(prompts)
    for i, p in enumerate(prompts):
        assert (logits[i] - hf.prefill_logits(p)).abs().max().item() < TOL, variant
    outs = srt.generate(prompts, 16, return_logprob=True)
    assert_greedy_matches(outs, [hf.greedy(p, 16) for p in prompts], variant)


def test_tp2_matches_tp1_and_hf(tmp_path_factory):
    cases = {name: (name, {}) for name in ARCHS}
    # One KV head: TP 2 replicates it, and OLMo 2's k norm must count it once.
    cases["olmo2_kv1"] = ("olmo2", {"num_key_value_heads": 1})
    folders = {
        name: make_tiny_model(arch, str(tmp_path_factory.mktemp(f"tp-{name}")),
                              initializer_range=INIT, **overrides)
        for name, (arch, overrides) in cases.items()
    }  # fmt: skip
    check_tp2(folders)


def check_tp2(folders: dict[str, str]) -> None:
    """TP 2 (real gloo group) gives the same tokens on both ranks, HF's greedy tokens and
    logprobs, and TP 1's attention tokens, for each model folder."""
    prompts = prompts_for(2, seed=9)
    steps = 12
    tp1 = run_models(folders, prompts, steps)
    per_rank = run_tp_group(2, run_models, folders, prompts, steps)
    assert per_rank[0] == per_rank[1], "TP ranks disagree"
    for name, folder in folders.items():
        hf = HFRunner(folder)
        for i, prompt in enumerate(prompts):
            ours, ref = per_rank[0][name][i], tp1[name][i]
            want = hf_reference(hf, prompt, ours["ids"])[0]
            label = f"{name} TP 2 prompt {i}"
            assert ours["ids"] == ref["ids"] == want.output_ids, f"{label}: greedy tokens differ"
            assert max(abs(a - b) for a, b in zip(ours["out_lp"], want.output_logprobs)) < TOL
            for (pos, score), (ref_pos, ref_score) in zip(ours["attn"], ref["attn"]):
                assert pos == ref_pos, f"{label}: attention tokens differ"
                assert max(abs(a - b) for a, b in zip(score, ref_score)) < 1e-5, label


def test_gpt2_context_length_beyond_learned_positions_refused(tmp_path):
    folder = make_tiny_model("gpt2", str(tmp_path), max_position_embeddings=64)
    assert ModelConfig(folder, device="cpu", context_length=64).context_len == 64
    with pytest.raises(ModelLoadError, match="exceeds the 64 learned positions"):
        ModelConfig(folder, device="cpu", context_length=65)


@pytest.mark.parametrize("name,cls", [("gpt2", "GPT2LMHeadModel"), ("olmo2", "Olmo2ForCausalLM")])
def test_int4_checkpoints_refused(name, cls, tmp_path):
    """AWQ checkpoints of these architectures fail at load with one line, not garbage."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader import get_model
    from sglang.test.quantized_checkpoints import write_quantized

    tiny = make_tiny_model(name, str(tmp_path / "tiny"))
    awq = str(tmp_path / "awq")
    write_quantized(tiny, awq, str(tmp_path / "dense"), "awq")
    config = ModelConfig(awq, dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError, match=f"int4 checkpoints of {cls} are not supported"):
        get_model(model_config=config, load_config=LoadConfig(), device="cpu")


def _legacy_checkpoint(folder: str, name: str) -> None:
    """Rewrite a saved checkpoint the way older ones are laid out: the original OpenAI GPT-2
    conversion has no `transformer.` prefix and carries causal-mask buffers; old Pythia uploads
    carry mask and rotary buffers beside the weights."""
    from safetensors.torch import load_file, save_file

    path = f"{folder}/model.safetensors"
    state = load_file(path)
    if name == "gpt2":
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        state["h.0.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
        state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    else:
        state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8).tril()
        state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
        state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox"])
def test_legacy_checkpoint_layouts_load(name, tmp_path, caplog):
    folder = make_tiny_model(name, str(tmp_path), initializer_range=INIT)
    prompts = prompts_for(2, seed=3)
    want = [HFRunner(folder).prefill_logits(p) for p in prompts]
    _legacy_checkpoint(folder, name)
    with caplog.at_level(logging.WARNING, logger="sglang.srt.models.utils"):
        logits = SRTRunner(folder).prefill_logits(prompts)
    assert "ignored" not in caplog.text, "buffers were taken for unknown weights"
    for got, ref in zip(logits, want):
        assert (got - ref).abs().max().item() < TOL, name
