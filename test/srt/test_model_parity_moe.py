"""Parity with HuggingFace transformers (float32, CPU, eager) for the mixture-of-experts models:
Mixtral, Qwen3-MoE and Qwen2-MoE, attention tokens included.

Each is a tiny random-weight checkpoint (4 experts, top 2, large init so attention is peaky and
routing is decisive) saved by HF in its per-expert layout and loaded by our loader: Mixtral with a
sliding window of 16, shorter than most sequences here; Qwen3-MoE with `norm_topk_prob` (top-k
weights renormalised); Qwen2-MoE without it, with its sigmoid-gated shared expert and a dense layer
(`mlp_only_layers`). Compared with HF as test_model_parity_archs.py does (teacher-forced
reference, same checks): prefill logits (1e-4), 32 greedy tokens and their logprobs (1e-4) at
batch 1 and in a mixed batch, chunked prefill with prompt logprobs, a prefix-cache hit, and every
generated token's attention tokens against HF's eager head-mean rows. Tensor parallelism 2 (real
gloo group, all three models; each rank holds half of every expert's intermediate dim) gives HF's
tokens and TP 1's attention tokens. Config variants (experts on every other layer, Qwen2-MoE renormalised, Mixtral
top 1) are checked on prefill logits and greedy tokens. The experts' two execution paths (grouped
by expert; dense over all experts, the CUDA-graph path) agree, routing normalises as each
architecture says, `--enable-torch-compile` decodes HF's tokens, and checkpoints missing an
expert or with a non-SiLU expert activation are refused.
"""

from __future__ import annotations

import zlib

import pytest
import torch

# The per-architecture parity tests of the dense models, collected here against this module's
# `arch` fixture (pytest resolves fixtures where a test is collected).
from test_model_parity_archs import (  # noqa: F401
    check_tp2,
    check_variant,
    prompts_for,
    test_batch1_and_mixed_batch,
    test_chunked_prefill_prompt_logprobs_and_prefix_hit,
    test_prefill_logits,
)

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.moe import FusedMoE, select_experts
from sglang.srt.model_loader.resolve import ModelLoadError
from sglang.test.runners import (
    HFRunner,
    SRTRunner,
    assert_greedy_matches,
    cpu_threads_hint,
    make_tiny_model,
)

ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe"]
INIT = 0.2

cpu_threads_hint()


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    name = request.param
    folder = make_tiny_model(name, str(tmp_path_factory.mktemp(name)), initializer_range=INIT)
    prompts = prompts_for(4, seed=zlib.crc32(name.encode()) % 1000)
    prompts.append(prompts[0] + [7, 8, 9])  # extends prompt 0: a prefix-cache hit after it
    return name, folder, HFRunner(folder), prompts


# Other branches of the configs, on logits and greedy tokens only.
VARIANTS = {
    # Experts on every other layer only, top-k weights not renormalised.
    "qwen3_moe_sparse_step2": ("qwen3_moe", dict(decoder_sparse_step=2, norm_topk_prob=False)),
    "qwen2_moe_normalised": ("qwen2_moe", dict(norm_topk_prob=True, mlp_only_layers=[])),
    "mixtral_top1": ("mixtral", dict(num_experts_per_tok=1)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants(variant, tmp_path):
    check_variant(*VARIANTS[variant], str(tmp_path), variant)


def test_tp2_matches_tp1_and_hf(tmp_path_factory):
    folders = {
        name: make_tiny_model(name, str(tmp_path_factory.mktemp(f"tp-{name}")),
                              initializer_range=INIT)
        for name in ARCHS
    }  # fmt: skip
    check_tp2(folders)


def test_grouped_and_dense_expert_paths_agree():
    """The CUDA-graph path (every expert over every token) sums the same as the grouped one,
    including experts no token chose."""
    torch.manual_seed(0)
    moe = FusedMoE(num_experts=6, hidden_size=16, intermediate_size=24)
    with torch.no_grad():
        moe.w13_weight.normal_(0, 0.3)
        moe.w2_weight.normal_(0, 0.3)
    x = torch.randn(9, 16)
    logits = torch.randn(9, 6)
    logits[:, 5] = -30.0  # expert 5 gets no token
    weights, ids = select_experts(logits, 2, renormalize=True)
    grouped = moe.forward_grouped(x, weights, ids)
    dense = moe.forward_dense(x, weights, ids)
    assert (grouped - dense).abs().max().item() < 1e-5
    # Against the definition, token by token.
    for t in range(9):
        want = sum(w * moe.expert(int(e), x[t : t + 1])[0] for w, e in zip(weights[t], ids[t]))
        assert (grouped[t] - want).abs().max().item() < 1e-5


def test_routing_normalisation():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    weights, ids = select_experts(logits, 2, renormalize=True)
    assert ids.tolist() == [[0, 1]]
    # Mixtral: a softmax over the chosen experts' logits.
    assert torch.allclose(weights, torch.softmax(logits[:, :2], -1))
    weights, _ = select_experts(logits, 2, renormalize=False)
    # Qwen MoE without norm_topk_prob: the full softmax's top-k probabilities, not summing to 1.
    assert torch.allclose(weights, torch.softmax(logits, -1)[:, :2])


def _load(folder: str) -> None:
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader import get_model

    config = ModelConfig(folder, dtype="float32", device="cpu")
    get_model(model_config=config, load_config=LoadConfig(), device="cpu")


def test_missing_expert_weight_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_tiny_model("qwen3_moe", str(tmp_path))
    path = f"{folder}/model.safetensors"
    state = load_file(path)
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises((ModelLoadError, ValueError), match="missing 1 expert weights"):
        _load(folder)


def test_non_silu_experts_refused(tmp_path):
    folder = make_tiny_model("mixtral", str(tmp_path), hidden_act="gelu")
    with pytest.raises((ModelLoadError, ValueError), match="hidden_act 'gelu' are not supported"):
        _load(folder)


def test_torch_compile_decode(tmp_path):
    """With --enable-torch-compile the decode forward is compiled around the experts (left eager:
    their row counts are data) and still gives HF's greedy tokens and logprobs."""
    folder = make_tiny_model("qwen2_moe", str(tmp_path), initializer_range=INIT)
    hf = HFRunner(folder)
    prompts = prompts_for(3, seed=4)
    srt = SRTRunner(folder, enable_torch_compile=True, torch_compile_max_bs=3)
    outs = srt.generate(prompts, 8, return_logprob=True)
    assert_greedy_matches(outs, [hf.greedy(p, 8) for p in prompts], "torch.compile")
