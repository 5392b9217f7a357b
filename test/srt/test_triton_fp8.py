"""FP8 under Triton: the FP8 weight GEMM against its torch definition, and the engine with float8
layers, checkpoint k/v scales and the Triton attention backend against HF transformers.

`sgl_kernel.fp8_gemm.fp8_linear` is checked against float64 matmuls on the dequantized weights
rounded to the activation dtype (block, per-channel and per-tensor scales, partial tiles, bias,
every finite e4m3 value). The engine loads an FP8 checkpoint (python/sglang/test/fp8_checkpoints.py)
with `SGLANG_FP8_MATMUL=triton` (float8 weights in memory, the kernel for every linear layer) and
checkpoint k/v scales into a float8 KV cache read by the Triton attention kernels: greedy tokens
and logprobs equal HF float32 on the dequantized weights with the same K/V rounding; and the
same float8 layers on two gloo TP ranks (CPU interpreter only).

Runs on CUDA when present, else on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 and
SGLANG_TRITON_INTERPRET_OK=1 are set here before anything imports the kernels).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not HAS_CUDA:
    if os.environ.get("TRITON_INTERPRET", "1") in ("", "0"):
        pytest.skip("no CUDA device and TRITON_INTERPRET=0", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit runs
    os.environ["SGLANG_TRITON_INTERPRET_OK"] = "1"  # lets --device cpu pick the triton backend

from sgl_kernel.fp8_gemm import fp8_linear  # noqa: E402
from test_fp8_checkpoints import KV_SCALES, LayerScaleCache  # noqa: E402

from sglang.srt.layers.linear import LinearBase  # noqa: E402
from sglang.srt.layers.quantization.fp8_linear import Fp8Method  # noqa: E402
from sglang.test.fp8_checkpoints import write_fp8  # noqa: E402
from sglang.test.runners import HFRunner, SRTRunner, make_tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
FP8 = torch.float8_e4m3fn


def reference(x, q, scale, block_in, bias):
    """float64 matmul on q * scale rounded to x's dtype (the kernel's weight values)."""
    per_column = scale.float().repeat_interleave(block_in, 1)[:, : q.shape[1]]
    weight = (q.float() * per_column).to(x.dtype).double()
    out = x.double() @ weight.T
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m,n,k,block_in",
    [(1, 96, 160, 128), (37, 80, 200, 64), (5, 64, 96, 96)],  # block, block, per-channel
    ids=["decode-block128", "prefill-block64", "channel"],
)
def test_fp8_gemm_matches_reference(m, n, k, block_in, dtype):
    gen = torch.Generator().manual_seed(m * n + k)
    q = (torch.randn(n, k, generator=gen) * 40).clamp(-448, 448).to(FP8)
    scale = torch.rand(n, -(-k // block_in), generator=gen) * 0.02 + 1e-3
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    out = fp8_linear(x.to(DEV), q.to(DEV), scale.to(DEV), block_in, bias.to(DEV)).cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    want = reference(x, q, scale, block_in, bias)
    # Only the float32 accumulation order differs, plus the 16-bit roundings (Triton's
    # interpreter casts float32 to bfloat16 by truncation, up to one unit in the last place).
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    err = ((out.double() - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"{dtype} {m}x{n}x{k}: relative error {err}"


def test_every_e4m3_value_and_per_tensor_scale():
    """All 254 finite e4m3 codes (subnormals included), one per-tensor scale, no bias."""
    codes = torch.arange(256, dtype=torch.uint8)
    q = codes.view(FP8)
    q = q[torch.isfinite(q.float())].reshape(1, -1).repeat(16, 1).contiguous()  # [16, 254]
    scale = torch.full((16, 1), 0.375)
    x = torch.eye(q.shape[1])[:20]  # picks single weights: exact products
    out = fp8_linear(x.to(DEV), q.to(DEV), scale.to(DEV), q.shape[1]).cpu()
    assert torch.equal(out, (q.float() * 0.375)[:, :20].T)


def test_engine_with_float8_layers_kv_scales_and_triton_attention(tmp_path, monkeypatch):
    tiny = make_tiny_model("llama", str(tmp_path / "tiny"), max_position_embeddings=256)
    # 48-column blocks leave partial scale blocks on the 64- and 160-column inputs.
    quantized, dense = str(tmp_path / "q"), str(tmp_path / "r")
    write_fp8(tiny, quantized, dense, "fp8-block", block=(48, 48), kv_scales=KV_SCALES)
    monkeypatch.setenv("SGLANG_FP8_MATMUL", "triton")
    srt = SRTRunner(quantized, device=DEV.type, dtype="float32", attention_backend="triton",
                    kv_cache_dtype="fp8_e4m3", max_total_tokens=1024, max_running_requests=4,
                    triton_attention_num_kv_splits=2)  # fmt: skip
    layers = [m for m in srt.model_runner.model.modules() if isinstance(m, LinearBase)]
    assert layers and all(isinstance(layer.quant_method, Fp8Method) for layer in layers)
    assert all(layer.weight.dtype == FP8 for layer in layers)
    assert srt.model_runner.model.quant_info["kernel"].startswith("triton")
    hf = HFRunner(dense)
    prompts = [[1, 5, 9, 33, 100, 7], [1] + list(range(40, 60))]
    outs = srt.generate(prompts, 6, return_logprob=True)
    for i, (out, prompt) in enumerate(zip(outs, prompts)):
        cache = LayerScaleCache(torch.float8_e4m3fn, KV_SCALES, config=hf.model.config)
        ref = hf.greedy_with_attention(prompt, 6, cache=cache)[0]
        assert out.output_ids == ref.output_ids, f"request {i}: greedy tokens differ"
        diff = max(abs(a - b) for a, b in zip(out.output_logprobs, ref.output_logprobs))
        assert diff < 1e-3, f"request {i}: logprobs differ by {diff}"


@pytest.mark.skipif(HAS_CUDA, reason="the gloo TP group runs on CPU tensors (interpreter)")
def test_tp2_float8_layers_match_hf(tmp_path, monkeypatch):
    """Two gloo ranks with float8 layers on the kernel: block scales split with the input columns
    of o_proj / down_proj (16-column blocks), a per-channel scale column kept whole."""
    from test_fp8_checkpoints import greedy_on_this_rank

    from sglang.test.tp_runners import run_tp_group

    monkeypatch.setenv("SGLANG_FP8_MATMUL", "triton")  # spawned ranks inherit it
    tiny = make_tiny_model("llama", str(tmp_path / "tiny"), max_position_embeddings=256)
    prompt = [1, 5, 9, 33, 100, 7]
    folders, refs = [], []
    for name, kw in (("block", dict(form="fp8-block", block=(16, 16))),
                     ("channel", dict(form="ct-channel"))):  # fmt: skip
        folders.append(str(tmp_path / name))
        write_fp8(tiny, folders[-1], str(tmp_path / f"{name}-ref"), **kw)
        refs.append(HFRunner(str(tmp_path / f"{name}-ref")).greedy(prompt, 4))
    ranks = run_tp_group(2, greedy_on_this_rank, folders, [prompt], 4)
    assert ranks[0] == ranks[1], "TP ranks disagree"
    for [(ids, lps)], ref in zip(ranks[0], refs):
        assert ids == ref.output_ids, "TP 2 greedy tokens differ from HF"
        assert max(abs(a - b) for a, b in zip(lps, ref.output_logprobs)) < 1e-3
