"""The Triton int4 GEMM (sgl_kernel.int4_gemm) against its torch definition, and the engine with
every AWQ / GPTQ layer on it against HF transformers.

Kernel cases go through the loader's own path: a random weight is quantized and packed in AWQ's or
GPTQ's on-disk layout (python/sglang/test/quantized_checkpoints.py), unpacked by awq.py / gptq.py
and repacked by int4.py's `TritonInt4`, whose matmul is compared with a float64 matmul on the
dequantized weights rounded to the activation dtype: group sizes 32/64/128 (one with a partial
last group), M = 1 and M > 1, N and K not multiples of the tiles, symmetric and asymmetric zero
points, GPTQ act order (`g_idx` read in-kernel), and an odd K straight through the kernel. The
engine then serves a GPTQ act-order checkpoint with `SGLANG_INT4_MATMUL=triton` in float32:
greedy tokens equal HF float32 on the dequantized weights and logprobs agree within 1e-4.

Runs on CUDA when present (the per-commit-1-gpu suite), else on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1 is set here before anything imports the kernel).
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
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel's @triton.jit runs

from sgl_kernel.int4_gemm import int4_linear, int4_linear_ref  # noqa: E402

from sglang.srt.layers.linear import LinearBase  # noqa: E402
from sglang.srt.layers.quantization.awq import AWQConfig  # noqa: E402
from sglang.srt.layers.quantization.gptq import GPTQConfig  # noqa: E402
from sglang.srt.layers.quantization.int4 import Int4LinearMethod, TritonInt4  # noqa: E402
from sglang.test.quantized_checkpoints import (  # noqa: E402
    _group_index,
    pack_awq,
    pack_gptq_cols,
    pack_gptq_rows,
    quantize,
    write_quantized,
)
from sglang.test.runners import HFRunner, SRTRunner, assert_greedy_matches, make_tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def checkpoint_tensors(fmt: str, n: int, k: int, group: int, sym: bool, seed: int):
    """A random W [n, k] quantized and packed as `fmt` (awq | gptq | gptq-actorder) on disk."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    if fmt == "awq":
        g_idx = torch.arange(k) // group
        codes, scales, zeros, _ = quantize(weight, g_idx, sym=False)
        tensors = {"qweight": pack_awq(codes), "qzeros": pack_awq(zeros), "scales": scales}
        return AWQConfig(group, ()), tensors
    g_idx = _group_index("l.q_proj.weight", k, group, fmt == "gptq-actorder", seed, {})
    codes, scales, zeros, _ = quantize(weight, g_idx, sym=sym, min_zero=1)
    tensors = {
        "qweight": pack_gptq_rows(codes),
        "qzeros": pack_gptq_cols(zeros - 1),  # the v1 format's zero - 1
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    return GPTQConfig(group, fmt == "gptq-actorder", sym, 1), tensors


def reference(x, weight, bias=None):
    """float64 matmul on the float32 dequantized weight rounded to x's dtype."""
    out = x.double() @ weight.to(x.dtype).double().T
    return out + bias.double() if bias is not None else out


def relative_error(out, want) -> float:
    return ((out.double() - want).abs().max() / want.abs().max()).item()


CASES = {
    "awq-g32-decode": ("awq", 1, 80, 96, 32, False),
    "awq-g64-prefill": ("awq", 37, 136, 192, 64, False),
    "awq-g128-partial-group": ("awq", 3, 64, 320, 128, False),
    "gptq-g32-sym": ("gptq", 20, 72, 128, 32, True),
    "gptq-g64-actorder-asym-decode": ("gptq-actorder", 1, 48, 256, 64, False),
    "gptq-g32-actorder-asym-prefill": ("gptq-actorder", 33, 88, 160, 32, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_loader_layout_matches_reference(case, dtype):
    fmt, m, n, k, group, sym = CASES[case]
    config, tensors = checkpoint_tensors(fmt, n, k, group, sym, seed=m + n + k)
    shard = config.unpack(tensors)
    part = TritonInt4(shard, DEV)
    # Act order, and a partial last group, read the group of each column from g_idx.
    assert (part.g_idx is not None) == (fmt == "gptq-actorder" or k % group != 0)
    assert part.codes.dtype == torch.uint8 and part.codes.shape == (n, k // 2)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    out = part(x.to(DEV)).cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    want = reference(x, shard.dequantize())
    err = relative_error(out, want)
    assert err < TOL[dtype], f"{case} {dtype}: relative error {err}"
    # The kernel's own torch definition agrees with the loader's dequantization.
    ref_out = int4_linear_ref(x.float(), part.codes.cpu(), part.scales.cpu(), part.zeros.cpu(),
                              part.group, None if part.g_idx is None else part.g_idx.cpu())  # fmt: skip
    assert relative_error(ref_out, reference(x.float(), shard.dequantize())) < 1e-6


def test_odd_k_g_idx_and_bias_through_the_kernel():
    """K = 99 (the last byte holds one code), a random group table, bias, leading dims."""
    gen = torch.Generator().manual_seed(7)
    n, k, groups = 50, 99, 5
    q = torch.randint(0, 16, (n, k + 1), generator=gen, dtype=torch.uint8)
    q[:, k] = 0
    codes = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).half()
    zeros = torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8)
    g_idx = torch.randint(0, groups, (k,), generator=gen)
    x = torch.randn(2, 3, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    args = (codes, scales, zeros, None, g_idx)
    out = int4_linear(x.to(DEV), *(a.to(DEV) if a is not None else a for a in args),
                      bias=bias.to(DEV)).cpu()  # fmt: skip
    assert out.shape == (2, 3, n)
    weight = (q[:, :k].float() - zeros.float()[:, g_idx]) * scales.float()[:, g_idx]
    assert relative_error(out, reference(x, weight, bias)) < 1e-5
    ref_out = int4_linear_ref(x, codes, scales, zeros, None, g_idx, bias)
    assert relative_error(ref_out, reference(x, weight, bias)) < 1e-6
    with pytest.raises(ValueError, match="either a contiguous group size or a g_idx"):
        int4_linear(x.to(DEV), codes.to(DEV), scales.to(DEV), zeros.to(DEV), 32, g_idx.to(DEV))


def test_engine_on_the_triton_int4_gemm(tmp_path, monkeypatch):
    tiny = make_tiny_model("llama", str(tmp_path / "tiny"), max_position_embeddings=256)
    quantized, dense = str(tmp_path / "q"), str(tmp_path / "r")
    write_quantized(tiny, quantized, dense, method="gptq", group_size=32, desc_act=True, sym=False)
    monkeypatch.setenv("SGLANG_INT4_MATMUL", "triton")
    srt = SRTRunner(quantized, device=DEV.type, dtype="float32", max_total_tokens=1024,
                    max_running_requests=4)  # fmt: skip
    methods = [
        m.quant_method.method for m in srt.model_runner.model.modules() if isinstance(m, LinearBase)
    ]
    assert methods and all(isinstance(m, Int4LinearMethod) for m in methods)
    assert all(isinstance(p, TritonInt4) for m in methods for p in m.parts)
    hf = HFRunner(dense)
    prompts = [[1, 5, 9, 33, 100, 7], [1] + list(range(40, 60))]
    refs = [hf.greedy(p, 6) for p in prompts]
    outs = srt.generate(prompts, 6, return_logprob=True)
    assert_greedy_matches(outs, refs, "gptq act-order on the triton int4 GEMM", tol=1e-4)
