"""FP8 weight checkpoints and checkpoint k/v scales against HF transformers (float32, CPU).

A tiny random Llama is quantized by the test to float8 e4m3 in each producer's exact layout and
config (python/sglang/test/fp8_checkpoints.py): `quant_method: fp8` with block scales
(`weight_scale_inv`, a block size leaving partial blocks), and llm-compressor's compressed-tensors
FP8 with per-channel and per-tensor `weight_scale`. HF runs a twin folder holding the dequantized
weights: greedy tokens identical, logprobs within 1e-4 on the dense path (weights dequantized at
load), attention tokens a valid top-k of HF's rows. Checkpoint k/v scales with a float8 KV cache
are checked against HF whose cache rounds K/V with the same per-layer scales. Also: the
`--quantization` values, refusals, the start-up log and the model's quantization info (what
/get_model_info returns; test_hub_ids.py reads it from a server).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import DynamicCache

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.model_loader import ModelLoadError
from sglang.test.attention_reference import assert_valid_topk, layer_mean
from sglang.test.fp8_checkpoints import write_fp8
from sglang.test.runners import (
    HFRunner,
    SRTRunner,
    assert_greedy_matches,
    cpu_threads_hint,
    make_tiny_model,
)

STEPS = 12
PROMPTS = [[1, 5, 9, 33, 100, 7], [1, 400, 3, 3, 17], [1] + list(range(40, 75))]
FORMS = {
    "fp8-block": dict(form="fp8-block", block=(48, 32)),  # partial 48-row blocks on 64/160 rows
    "ct-channel": dict(form="ct-channel"),
    "ct-tensor": dict(form="ct-tensor"),
}
KV_SCALES = {0: (0.5, 2.0), 1: (0.25, 0.75), 2: (1.5, 0.125)}

cpu_threads_hint()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module", params=list(FORMS))
def form(request, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    quantized, reference = str(root / "quantized"), str(root / "reference")
    write_fp8(tiny, quantized, reference, **FORMS[request.param])
    hf = HFRunner(reference)
    return request.param, quantized, hf, [hf.greedy(p, STEPS) for p in PROMPTS]


def test_dense_path_equals_hf(form, caplog):
    name, quantized, hf, refs = form
    with caplog.at_level(logging.INFO, logger="sglang.srt.model_loader.loader"):
        srt = SRTRunner(quantized, dtype="float32")
    line = next(r.getMessage() for r in caplog.records if "Quantization:" in r.getMessage())
    assert "FP8 e4m3" in line and "dequantized to the model dtype at load" in line, line
    assert "21 float8 weight tensors" in line, line  # 7 per layer x 3 layers
    info = srt.model_runner.model.quant_info
    assert info["bits"] == 8 and info["method"] == (
        "fp8" if name == "fp8-block" else "compressed-tensors"
    )
    assert info["group_size"] == ([48, 32] if name == "fp8-block" else name.removeprefix("ct-"))
    logits = srt.prefill_logits(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        diff = (logits[i] - hf.prefill_logits(prompt)).abs().max().item()
        assert diff < 1e-4, f"{name}: prefill logits differ by {diff}"
    outs = srt.generate(PROMPTS, STEPS, return_logprob=True)
    assert_greedy_matches(outs, refs, f"{name} dense", tol=1e-4)


def test_attention_tokens_valid_topk(form):
    name, quantized, hf, _ = form
    if name != "fp8-block":
        pytest.skip("one form suffices: the attention path does not depend on the scale layout")
    srt = SRTRunner(quantized, dtype="float32", return_attention_tokens=True,
                    attention_capture_layers="all", attention_tokens_top_k=8)  # fmt: skip
    opt = AttentionRequest(top_k=8, layers=(0, 1, 2))
    req = srt.make_req(PROMPTS[2], 4, attention=opt, temperature=0.0, ignore_eos=True)
    srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    ref, rows = hf.greedy_with_attention(PROMPTS[2], 4)
    assert req.output_ids == ref.output_ids
    for t, rec in enumerate(req.attention_records):
        assert_valid_topk(rec.positions, rec.scores, layer_mean(rows[t], opt.layers), 8,
                          label=f"{name} token {t}")  # fmt: skip


class LayerScaleCache(DynamicCache):
    """HF cache that returns K/V as a float8 pool with per-layer scales gives them back:
    (x / scale) saturated, cast to float8, widened, times scale."""

    def __init__(self, dtype: torch.dtype, scales: dict[int, tuple[float, float]], **kw) -> None:
        super().__init__(**kw)
        self.fp8, self.scales = dtype, scales

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        limit = torch.finfo(self.fp8).max
        k_scale, v_scale = self.scales[layer_idx]
        k, v = (
            (x / s).clamp(-limit, limit).to(self.fp8).to(x.dtype) * s
            for x, s in ((key_states, k_scale), (value_states, v_scale))
        )
        return super().update(k, v, layer_idx, *args, **kwargs)


@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
def test_checkpoint_kv_scales_with_fp8_kv_cache(tiny, tmp_path, kv):
    """k/v scales from the checkpoint: stored = K / k_scale in float8, read = float8 * k_scale;
    greedy tokens, logprobs and attention tokens equal HF with the same rounding."""
    write_fp8(tiny, str(tmp_path / "q"), str(tmp_path / "r"), "ct-tensor", kv_scales=KV_SCALES)
    hf = HFRunner(str(tmp_path / "r"))
    srt = SRTRunner(str(tmp_path / "q"), dtype="float32", kv_cache_dtype=kv,
                    return_attention_tokens=True, attention_capture_layers="all",
                    attention_tokens_top_k=8)  # fmt: skip
    layers = [m for m in srt.model_runner.model.modules() if isinstance(m, RadixAttention)]
    assert {m.layer_id: (m.k_scale, m.v_scale) for m in layers} == KV_SCALES
    assert srt.model_runner.model.quant_info["kv_scales"] == "checkpoint"
    opt = AttentionRequest(top_k=8, layers=(0, 1, 2))
    reqs = [srt.make_req(p, 8, return_logprob=True, attention=opt, temperature=0.0,
                         ignore_eos=True) for p in PROMPTS]  # fmt: skip
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv]
    for i, (req, prompt) in enumerate(zip(reqs, PROMPTS)):
        cache = LayerScaleCache(dtype, KV_SCALES, config=hf.model.config)
        ref, rows = hf.greedy_with_attention(prompt, 8, cache=cache)
        assert req.output_ids == ref.output_ids, f"{kv} request {i}: greedy tokens differ"
        lps = [lp for lp, _ in req.output_token_logprobs]
        diff = max(abs(a - b) for a, b in zip(lps, ref.output_logprobs))
        assert diff < 2e-3, f"{kv} request {i}: logprob diff {diff}"
        for t, rec in enumerate(req.attention_records):
            assert_valid_topk(rec.positions, rec.scores, layer_mean(rows[t], opt.layers), 8,
                              tol=2e-3, label=f"{kv} request {i} token {t}")  # fmt: skip


def test_flags_and_refusals(tiny, tmp_path):
    from sglang.srt.configs.model_config import ModelConfig

    block, ct = str(tmp_path / "block"), str(tmp_path / "ct")
    write_fp8(tiny, block, str(tmp_path / "r1"), "fp8-block", block=(32, 32))
    write_fp8(tiny, ct, str(tmp_path / "r2"), "ct-channel")
    assert ModelConfig(block, device="cpu", quantization="fp8").quantization == "fp8"
    assert ModelConfig(ct, device="cpu", quantization="compressed-tensors").quant_config
    with pytest.raises(ModelLoadError, match="--quantization fp8 needs a FP8 checkpoint"):
        ModelConfig(ct, device="cpu", quantization="fp8")
    with pytest.raises(ModelLoadError, match="quantizing at load time is not supported"):
        ModelConfig(tiny, device="cpu", quantization="fp8")
    with pytest.raises(ModelLoadError, match="cannot fake quantized weights"):
        SRTRunner(block, load_format="dummy")
    changes = [
        (block, {"activation_scheme": "static"}, "static activation scales"),
        (block, {"fmt": "e5m2"}, "only e4m3"),
        (ct, {"format": "pack-quantized"}, "only float-quantized"),
    ]
    for folder, change, message in changes:
        _check_refused(folder, lambda qc, change=change: qc.update(change), message)
    group = ("config_groups", "group_0")

    def int4(qc):
        qc[group[0]][group[1]]["weights"].update(num_bits=4, type="int")

    def static_acts(qc):
        qc[group[0]][group[1]]["input_activations"]["dynamic"] = False

    _check_refused(ct, int4, "only 8-bit float")
    _check_refused(ct, static_acts, "static input activation scales")


def _check_refused(folder: str, change, message: str) -> None:
    from sglang.srt.configs.model_config import ModelConfig

    path = f"{folder}/config.json"
    original = open(path).read()
    config = json.loads(original)
    change(config["quantization_config"])
    open(path, "w").write(json.dumps(config))
    try:
        with pytest.raises(ModelLoadError, match=message):
            ModelConfig(folder, device="cpu")
    finally:
        open(path, "w").write(original)


def greedy_on_this_rank(folders: list[str], prompts: list[list[int]], steps: int) -> list:
    """Per folder: greedy ids and logprobs on this TP rank's shards (SGLANG_FP8_MATMUL from
    the environment, which spawned ranks inherit)."""
    results = []
    for folder in folders:
        outs = SRTRunner(folder, dtype="float32").generate(prompts, steps, return_logprob=True)
        results.append([(o.output_ids, o.output_logprobs) for o in outs])
    return results


def test_tp2_matches_hf(tiny, tmp_path):
    """Two gloo ranks on the dense path: the dequantized weights shard like dense ones (q/k/v and
    gate/up stacked per rank, o_proj and down_proj split by input columns)."""
    from sglang.test.tp_runners import run_tp_group

    folders, refs = [], []
    for name in ("fp8-block",):  # after dequantization the scale layout no longer matters
        folders.append(str(tmp_path / name))
        write_fp8(tiny, folders[-1], str(tmp_path / f"{name}-ref"), **FORMS[name])
        hf = HFRunner(str(tmp_path / f"{name}-ref"))
        refs.append([hf.greedy(p, STEPS) for p in PROMPTS[:2]])
    ranks = run_tp_group(2, greedy_on_this_rank, folders, PROMPTS[:2], STEPS)
    assert ranks[0] == ranks[1], "TP ranks disagree"
    for outs, ref in zip(ranks[0], refs):
        for (ids, lps), want in zip(outs, ref):
            assert ids == want.output_ids, "TP 2 greedy tokens differ from HF"
            assert max(abs(a - b) for a, b in zip(lps, want.output_logprobs)) < 1e-4
