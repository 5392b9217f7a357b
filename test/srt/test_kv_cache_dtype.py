"""`--kv-cache-dtype`: float8 KV pools (fp8_e4m3, fp8_e5m2), bf16, and the refused fp4_e2m1.

The reference for a float8 pool is HuggingFace float32 eager attention whose KV cache rounds
every new K/V the way the format stores it (divide by the per-tensor scale, saturate, cast to
float8, widen, multiply back): the engine must give the same greedy tokens, logprobs and
attention tokens as that model, on the torch_native backend, with scales 1.0 (upstream's default
for checkpoints without them) and with other scales. Against plain float32 HF, attention-token
scores stay within 5e-2. Also: one byte per element (twice the tokens of bf16 for the same
memory), saturation instead of NaN/inf, and start-up validation (exit 2).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.server_args import ServerArgs, prepare_server_args
from sglang.test.attention_reference import assert_valid_topk, layer_mean
from sglang.test.runners import HFRunner, SRTRunner, cpu_threads_hint, make_tiny_model

cpu_threads_hint()
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
STEPS = 8


def fp8_round(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return (x / scale).clamp(-limit, limit).to(dtype).to(x.dtype) * scale


class RoundingCache(DynamicCache):
    """A transformers cache that keeps K/V as a float8 KV pool would give them back."""

    def __init__(self, dtype: torch.dtype, k_scale: float, v_scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fp8, self.k_scale, self.v_scale = dtype, k_scale, v_scale

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = fp8_round(key_states, self.fp8, self.k_scale)
        v = fp8_round(value_states, self.fp8, self.v_scale)
        return super().update(k, v, layer_idx, *args, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    path = make_tiny_model("llama", seed=3)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(6, 30))] for _ in range(4)]
    return path, HFRunner(path), prompts


def set_scales(runner: SRTRunner, k_scale: float, v_scale: float) -> None:
    for module in runner.model_runner.model.modules():
        if isinstance(module, RadixAttention):
            module.k_scale, module.v_scale = k_scale, v_scale


# ---------------------------------------------------------------------------- the pool


@pytest.mark.parametrize("kv", sorted(FP8))
def test_fp8_pool_bytes_scales_and_saturation(kv: str) -> None:
    dtype = FP8[kv]
    pool = MHATokenToKVPool(6, 1, dtype, head_num=2, head_dim=4, layer_num=2, device="cpu")
    bf16 = MHATokenToKVPool(6, 1, torch.bfloat16, head_num=2, head_dim=4, layer_num=2, device="cpu")
    assert pool.k_buffer[0].element_size() == 1
    assert 2 * pool.get_kv_size_bytes() == bf16.get_kv_size_bytes()
    layer = RadixAttention(4, 4, 0.5, 2, layer_id=1)
    assert pool.kv_scales(layer) == bf16.kv_scales(layer) == (1.0, 1.0)
    layer.k_scale, layer.v_scale = 4.0, 0.25
    assert pool.kv_scales(layer) == (4.0, 0.25)
    assert bf16.kv_scales(layer) == (1.0, 1.0)  # wider pools store K/V as they are

    k = torch.randn(3, 2, 4) * 3
    k[0, 0, 0] = 1e9  # an outlier saturates instead of becoming NaN or inf
    v = torch.randn(3, 8)
    other_layer = pool.k_buffer[0].clone()
    pool.set_kv_buffer(1, torch.tensor([1, 4, 5]), k, v, 4.0, 0.25)
    kb, vb = pool.get_kv_buffer(1)
    assert kb.dtype == vb.dtype == dtype
    assert torch.isfinite(kb[[1, 4, 5]].float()).all()
    assert torch.isfinite(vb[[1, 4, 5]].float()).all()
    assert kb[1, 0, 0].float().item() == torch.finfo(dtype).max
    assert torch.equal(kb[[1, 4, 5]].float(), fp8_round(k, dtype, 4.0) / 4.0)
    assert torch.equal(vb[[1, 4, 5]].float(), fp8_round(v.view(3, 2, 4), dtype, 0.25) / 0.25)
    assert torch.equal(pool.k_buffer[0], other_layer)  # the other layer is untouched


def test_fp8_pool_holds_twice_the_tokens_of_bf16(tiny) -> None:
    path = tiny[0]
    tokens = {}
    for kv in ("auto", "bf16", "fp8_e4m3", "fp8_e5m2"):
        # An explicit fraction: the pool is sized from memory, not capped by a CPU default.
        runner = SRTRunner(
            path, kv_cache_dtype=kv, max_total_tokens=256, mem_fraction_static=0.5
        ).model_runner
        tokens[kv] = runner.profile_max_num_token(memory_before=8 * 2**30)
    assert tokens["auto"] * 2 <= tokens["bf16"] <= tokens["auto"] * 2 + 1  # float32 model
    assert tokens["bf16"] * 2 <= tokens["fp8_e4m3"] == tokens["fp8_e5m2"] <= tokens["bf16"] * 2 + 1


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "kv,k_scale,v_scale", [("fp8_e4m3", 1.0, 1.0), ("fp8_e5m2", 1.0, 1.0), ("fp8_e4m3", 0.5, 2.0)]
)
def test_fp8_engine_equals_hf_with_fp8_rounded_cache(tiny, kv, k_scale, v_scale) -> None:
    path, hf, prompts = tiny
    srt = SRTRunner(path, kv_cache_dtype=kv, return_attention_tokens=True,
                    attention_capture_layers="all", attention_tokens_top_k=8)  # fmt: skip
    set_scales(srt, k_scale, v_scale)
    opt = AttentionRequest(top_k=8, layers=(0, 1, 2))
    reqs = [srt.make_req(p, STEPS, return_logprob=True, attention=opt, temperature=0.0,
                         ignore_eos=True) for p in prompts]  # fmt: skip
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    srt.scheduler.check_memory()
    for i, (req, prompt) in enumerate(zip(reqs, prompts)):
        cache = RoundingCache(FP8[kv], k_scale, v_scale, config=hf.model.config)
        ref, rows = hf.greedy_with_attention(prompt, STEPS, cache=cache)
        assert req.output_ids == ref.output_ids, f"{kv} request {i}: greedy tokens differ"
        lps = [lp for lp, _ in req.output_token_logprobs]
        diff = max(abs(a - b) for a, b in zip(lps, ref.output_logprobs))
        assert diff < 2e-3, f"{kv} request {i}: logprob diff {diff}"
        for t, rec in enumerate(req.attention_records):
            assert_valid_topk(rec.positions, rec.scores, layer_mean(rows[t], opt.layers), 8,
                              tol=2e-3, label=f"{kv} request {i} token {t}")  # fmt: skip


@pytest.mark.parametrize("kv", sorted(FP8))
def test_fp8_attention_tokens_within_5e2_of_float32_hf(tiny, kv) -> None:
    """Against plain float32 attention (no rounding), while the context is still HF's."""
    path, hf, prompts = tiny
    srt = SRTRunner(path, kv_cache_dtype=kv, return_attention_tokens=True,
                    attention_capture_layers="all", attention_tokens_top_k=8)  # fmt: skip
    opt = AttentionRequest(top_k=8, layers=(0, 1, 2))
    reqs = [srt.make_req(p, STEPS, attention=opt, temperature=0.0, ignore_eos=True)
            for p in prompts]  # fmt: skip
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    compared = 0
    for i, (req, prompt) in enumerate(zip(reqs, prompts)):
        ref, rows = hf.greedy_with_attention(prompt, STEPS)
        same = next((t for t, (a, b) in enumerate(zip(req.output_ids, ref.output_ids)) if a != b),
                    STEPS)  # fmt: skip
        for t in range(min(same + 1, STEPS)):  # record t's context is prompt + tokens[:t]
            rec = req.attention_records[t]
            assert_valid_topk(rec.positions, rec.scores, layer_mean(rows[t], opt.layers), 8,
                              tol=5e-2, label=f"{kv} request {i} token {t}")  # fmt: skip
            compared += 1
    assert compared >= len(prompts) * 2


# ---------------------------------------------------------------------------- flags


@pytest.mark.parametrize("value", ["fp4_e2m1", "fp8", "float16", "int8"])
def test_unsupported_kv_cache_dtype_exits_2(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        prepare_server_args(["--model-path", "m", "--device", "cpu", "--kv-cache-dtype", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "kv-cache-dtype" in err and value in err


@pytest.mark.parametrize("value", ["auto", "bf16", "bfloat16", "fp8_e4m3", "fp8_e5m2"])
def test_supported_kv_cache_dtypes_accepted(value: str) -> None:
    args = prepare_server_args(["--model-path", "m", "--device", "cpu", "--kv-cache-dtype", value])
    assert args.kv_cache_dtype == value
    with pytest.raises(ValueError, match="fp4_e2m1"):
        ServerArgs(model_path="m", device="cpu", kv_cache_dtype="fp4_e2m1")
