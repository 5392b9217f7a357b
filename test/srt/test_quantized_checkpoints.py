"""AWQ and GPTQ int4 checkpoints against HF transformers on the dequantized weights (float32, CPU).

A tiny random Llama is quantized by the test and written in each format's exact on-disk packing
(python/sglang/test/quantized_checkpoints.py), next to a dense twin holding the dequantized
weights that HF runs as the reference. Two int4 matmuls are checked: `dequant` (weights
dequantized per forward, the exact path: logits within 1e-4, identical greedy tokens, logprobs
within 1e-4) and `int4pack` (PyTorch's CPU int4 GEMM, which rounds differently: its measured
logit difference is printed and must stay under 1e-3, greedy tokens identical). Also: the
`--quantization` flag values, the Marlin log line, refusals, and that weights stay 4-bit.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.layers.linear import LinearBase
from sglang.srt.model_loader import ModelLoadError
from sglang.test.attention_reference import assert_valid_topk, layer_mean
from sglang.test.quantized_checkpoints import write_quantized
from sglang.test.tp_runners import run_tp_group
from sglang.test.runners import (
    HFRunner,
    SRTRunner,
    assert_greedy_matches,
    cpu_threads_hint,
    make_tiny_model,
)

STEPS = 16
PROMPTS = [[1, 5, 9, 33, 100, 7], [1, 400, 3, 3, 17], [1] + list(range(40, 75)), [1, 2]]
VARIANTS = {
    "awq-g32": dict(method="awq", group_size=32),
    "gptq-g32-sym": dict(method="gptq", group_size=32, sym=True),
    "gptq-actorder-asym": dict(method="gptq", group_size=32, desc_act=True, sym=False),
    # q/k/v with different act-order permutations (separate matmuls), v2 zero points, and one
    # group per row (group_size -1).
    "gptq-v2-unshared-g-1": dict(
        method="gptq",
        group_size=-1,
        desc_act=True,
        sym=False,
        checkpoint_format="gptq_v2",
        share_perms=False,
    ),
}

cpu_threads_hint()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    quantized, reference = str(root / "quantized"), str(root / "reference")
    write_quantized(tiny, quantized, reference, **VARIANTS[request.param])
    hf = HFRunner(reference)
    refs = [hf.greedy(p, STEPS) for p in PROMPTS]
    return request.param, quantized, hf, refs


def test_dequant_path_equals_hf(variant, monkeypatch):
    name, quantized, hf, refs = variant
    monkeypatch.setenv("SGLANG_INT4_MATMUL", "dequant")
    srt = SRTRunner(quantized)
    logits = srt.prefill_logits(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        diff = (logits[i] - hf.prefill_logits(prompt)).abs().max().item()
        assert diff < 1e-4, f"{name}: prefill logits differ by {diff}"
    outs = srt.generate(PROMPTS, STEPS, return_logprob=True)
    assert_greedy_matches(outs, refs, f"{name} dequant", tol=1e-4)


def test_int4pack_path_close_to_hf(variant, monkeypatch):
    name, quantized, hf, refs = variant
    monkeypatch.setenv("SGLANG_INT4_MATMUL", "int4pack")
    srt = SRTRunner(quantized)
    kinds = {
        type(part).__name__
        for layer in srt.model_runner.model.modules()
        if isinstance(layer, LinearBase)
        for part in layer.quant_method.method.parts
    }
    assert kinds == {"PackedInt4"}, f"{name}: expected the CPU int4 kernel everywhere, got {kinds}"
    logits = srt.prefill_logits(PROMPTS)
    diff = max((logits[i] - hf.prefill_logits(p)).abs().max().item() for i, p in enumerate(PROMPTS))
    print(f"\n{name}: int4pack prefill logits max |diff| vs HF float32 = {diff:.2e}")
    assert diff < 1e-3, f"{name}: int4pack logits differ by {diff}"
    outs = srt.generate(PROMPTS, STEPS, return_logprob=True)
    assert_greedy_matches(outs, refs, f"{name} int4pack", tol=1e-3)


def test_weights_stay_4bit(tiny, tmp_path, monkeypatch):
    write_quantized(tiny, str(tmp_path / "q"), str(tmp_path / "r"), method="awq")
    for matmul in ("int4pack", "dequant"):
        monkeypatch.setenv("SGLANG_INT4_MATMUL", matmul)
        runner = SRTRunner(str(tmp_path / "q")).model_runner
        model = runner.model
        dense = int4 = 0
        for layer in model.modules():
            if isinstance(layer, LinearBase):
                assert layer.get_parameter("qweight").numel() == 0  # placeholder only
                assert not hasattr(layer, "weight")
                dense += layer.input_size * layer.output_size * 4  # what float32 would take
                int4 += sum(t.numel() * t.element_size() for t in layer.buffers())
        # Codes take 1/8 of float32; scales, zeros and group ids add the rest (group size 32).
        assert int4 < 0.3 * dense, f"{matmul}: int4 layers take {int4} bytes vs {dense} dense"
        assert runner.weight_bytes >= int4  # the KV pool budget counts the packed weights


def test_attention_tokens_valid_topk(variant, monkeypatch):
    """Attention tokens captured on the int4 model are a valid top-k of HF's attention rows."""
    name, quantized, hf, _ = variant
    monkeypatch.setenv("SGLANG_INT4_MATMUL", "dequant")
    srt = SRTRunner(quantized, return_attention_tokens=True,
                    attention_capture_layers="all", attention_tokens_top_k=8)  # fmt: skip
    opt = AttentionRequest(top_k=8, layers=(0, 1, 2))
    prompt = PROMPTS[2]
    req = srt.make_req(prompt, 4, attention=opt, temperature=0.0, ignore_eos=True)
    srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    ref, rows = hf.greedy_with_attention(prompt, 4)
    assert req.output_ids == ref.output_ids, f"{name}: greedy tokens differ"
    for t, rec in enumerate(req.attention_records):
        assert_valid_topk(rec.positions, rec.scores, layer_mean(rows[t], opt.layers), 8,
                          label=f"{name} token {t}")  # fmt: skip


def test_marlin_names_run_our_int4_path(tiny, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("SGLANG_INT4_MATMUL", raising=False)
    write_quantized(tiny, str(tmp_path / "awq"), str(tmp_path / "r1"), method="awq")
    write_quantized(tiny, str(tmp_path / "gptq"), str(tmp_path / "r2"), method="gptq")
    with caplog.at_level(logging.INFO, logger="sglang.srt.model_loader.loader"):
        SRTRunner(str(tmp_path / "awq"), quantization="awq_marlin")
    line = next(r.getMessage() for r in caplog.records if "Quantization:" in r.getMessage())
    assert "AWQ 4-bit" in line and "Marlin" in line and "our own int4 path" in line
    assert "int4pack" in line
    SRTRunner(str(tmp_path / "gptq"), quantization="gptq_marlin")
    SRTRunner(str(tmp_path / "awq"), quantization="awq")
    with pytest.raises(ModelLoadError, match="--quantization awq needs a AWQ checkpoint"):
        SRTRunner(str(tmp_path / "gptq"), quantization="awq")
    with pytest.raises(ModelLoadError, match="no quantization_config"):
        SRTRunner(tiny, quantization="gptq")
    with pytest.raises(ModelLoadError, match="cannot fake quantized weights"):
        SRTRunner(str(tmp_path / "awq"), load_format="dummy")


def test_auto_dtype_on_cpu_is_bfloat16_for_int4(tiny, tmp_path):
    """The CPU int4 kernel is fast with bfloat16 activations only; float32 stays available."""
    from sglang.srt.configs.model_config import ModelConfig

    write_quantized(tiny, str(tmp_path / "q"), str(tmp_path / "r"), method="awq")
    assert ModelConfig(str(tmp_path / "q"), device="cpu").dtype == torch.bfloat16
    assert ModelConfig(str(tmp_path / "q"), device="cpu", dtype="float32").dtype == torch.float32
    assert ModelConfig(tiny, device="cpu").dtype == torch.float32  # unquantized: unchanged


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 8}, "bits=8: only 4-bit"),
        ({"version": "gemv"}, "only the GEMM packing"),
        ({"zero_point": False}, "zero_point=false"),
    ],
)
def test_unsupported_awq_variants_refused(tiny, tmp_path, change, message):
    from sglang.srt.configs.model_config import ModelConfig

    write_quantized(tiny, str(tmp_path / "q"), str(tmp_path / "r"), method="awq")
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"].update(change)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig(str(tmp_path / "q"), device="cpu")


def test_gptq_quantize_config_json_and_refusals(tiny, tmp_path):
    """AutoGPTQ's older layout (quantize_config.json beside config.json) loads; 3-bit is refused."""
    from sglang.srt.configs.model_config import ModelConfig

    write_quantized(tiny, str(tmp_path / "q"), str(tmp_path / "r"), method="gptq")
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    qc = config.pop("quantization_config")
    config_path.write_text(json.dumps(config))
    qc.pop("quant_method")
    (tmp_path / "q" / "quantize_config.json").write_text(json.dumps(qc))
    assert ModelConfig(str(tmp_path / "q"), device="cpu").quantization == "gptq"
    qc["bits"] = 3
    (tmp_path / "q" / "quantize_config.json").write_text(json.dumps(qc))
    with pytest.raises(ModelLoadError, match="bits=3: only 4-bit GPTQ"):
        ModelConfig(str(tmp_path / "q"), device="cpu")


def test_bfloat16_int4pack_runs(tiny, tmp_path, monkeypatch):
    """--dtype bfloat16 uses the kernel with bf16 activations; greedy agreement is reported."""
    write_quantized(tiny, str(tmp_path / "q"), str(tmp_path / "r"), method="awq")
    monkeypatch.setenv("SGLANG_INT4_MATMUL", "int4pack")
    srt = SRTRunner(str(tmp_path / "q"), dtype="bfloat16")
    hf = HFRunner(str(tmp_path / "r"))
    outs = srt.generate(PROMPTS, STEPS)
    same = sum(
        a == b
        for o, p in zip(outs, PROMPTS)
        for a, b in zip(o.output_ids, hf.greedy(p, STEPS).output_ids)
    )
    print(f"\nawq bf16 int4pack: {same}/{STEPS * len(PROMPTS)} greedy tokens equal HF float32")
    assert all(len(o.output_ids) == STEPS for o in outs)
    assert torch.isfinite(srt.prefill_logits(PROMPTS[:1])).all()


@pytest.mark.parametrize("out_features", [80, 192])  # a partial 64-row block, full blocks only
def test_float32_prefill_dequantizes_the_packed_codes_exactly(out_features):
    """From DENSE_MIN_ROWS rows on, float32 int4pack layers unpack the kernel's codes and run a
    dense matmul: the unpacked weight must be the format's (q - zero) * scale bit for bit."""
    from sglang.srt.layers.quantization.int4 import (
        DENSE_MIN_ROWS,
        Int4Shard,
        PackedInt4,
        int4pack_layout_known,
    )

    gen = torch.Generator().manual_seed(out_features)
    shard = Int4Shard(
        q=torch.randint(0, 16, (out_features, 128), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(4, out_features, generator=gen) * 0.01).half(),
        zeros=torch.randint(0, 16, (4, out_features), generator=gen).float(),
        g_idx=torch.arange(128) // 32,
    )
    packed = PackedInt4(shard, None, 32, torch.float32)
    if not int4pack_layout_known():  # another CPU build packs differently: kernel only
        assert packed.dense is None
        return
    assert torch.equal(packed.dense_weight(), shard.dequantize())
    x = torch.randn(DENSE_MIN_ROWS, 128, generator=gen)
    assert torch.equal(packed(x), torch.nn.functional.linear(x, shard.dequantize()))


def _greedy_on_this_rank(folders: list[str], prompts: list[list[int]], steps: int) -> list:
    """Per (folder, int4 matmul): greedy ids and logprobs on this rank's shards."""
    results = []
    for folder in folders:
        for matmul in ("dequant", "int4pack"):
            os.environ["SGLANG_INT4_MATMUL"] = matmul  # read when the layers are built
            outs = SRTRunner(folder).generate(prompts, steps, return_logprob=True)
            results.append([(o.output_ids, o.output_logprobs) for o in outs])
    return results


def test_tp2_matches_hf(tiny, tmp_path):
    """Two gloo ranks: column-parallel layers split the unpacked rows, row-parallel ones the input
    columns with their g_idx; greedy tokens equal HF's, logprobs within 1e-4 (dequant) / 1e-3."""
    folders, refs = [], []
    for name in ("awq-g32", "gptq-actorder-asym"):
        folders.append(str(tmp_path / name))
        write_quantized(tiny, folders[-1], str(tmp_path / f"{name}-ref"), **VARIANTS[name])
        hf = HFRunner(str(tmp_path / f"{name}-ref"))
        refs.append([hf.greedy(p, STEPS) for p in PROMPTS[:2]])
    ranks = run_tp_group(2, _greedy_on_this_rank, folders, PROMPTS[:2], STEPS)
    assert ranks[0] == ranks[1], "TP ranks disagree"
    for run, outs in enumerate(ranks[0]):
        ref, tol = refs[run // 2], (1e-4, 1e-3)[run % 2]
        for (ids, lps), want in zip(outs, ref):
            assert ids == want.output_ids, f"run {run}: TP 2 greedy tokens differ from HF"
            assert max(abs(a - b) for a, b in zip(lps, want.output_logprobs)) < tol, run
