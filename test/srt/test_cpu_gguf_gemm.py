"""The CPU GGUF GEMM (sgl_kernel/cpu_gemm_gguf.py) on real GGUF blocks against float64.

Weights are random rows quantized by gguf-py (our Q4_K writer for Q4_K) and decoded by
layers/quantization/gguf.py. Two references: float64 on the dequantized weights and the kernel's
own activation quantization replayed in float32 (torch rounds half to even like the kernel), which
the kernel must meet to float32 rounding, so any layout or integer-sum error shows; and float64 on
the plain activations, whose difference is the activation rounding, logged and bounded. Shapes
have output columns off the 16-column tile, batch 1 / 3 / 17 (row tiles of 4), both activation
dtypes, both activation modes; the AVX-512, AVX2 and C paths must agree bit for bit.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sgl_kernel import cpu_build, cpu_gemm_gguf
from sglang.srt.layers.quantization.gguf import decode_blocks
from sglang.test.gguf_checkpoints import quantize

pytestmark = pytest.mark.skipif(
    not cpu_gemm_gguf.available(),
    reason=f"kernel unavailable: {cpu_gemm_gguf.unavailable_reason()}",
)
log = logging.getLogger(__name__)
QTYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K"]


def _weight(qtype: str, n: int, k: int, seed: int):
    """(packed, dequantized float64 [n, k]) of a random weight stored as `qtype`."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05 + rng.standard_normal((n, 1)) * 0.01).astype(np.float32)
    codes, scale, bias = decode_blocks(quantize(w, qtype), qtype)
    fmt = cpu_gemm_gguf.FORMATS[qtype]
    packed = cpu_gemm_gguf.pack(codes, scale, bias if fmt.has_min else None, qtype)
    dense = codes.double().view(n, -1, 32) * scale.double().unsqueeze(-1)
    return packed, (dense + bias.double().unsqueeze(-1)).view(n, k)


def _replayed(x: torch.Tensor, act: str) -> torch.Tensor:
    """The activations as the kernel quantizes them (float32 steps, round half to even)."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q1 = torch.round(xb * inv).clamp(-127, 127)
    if act == "int8":
        return (q1.double() * d.double()).reshape(x.shape)
    q2 = torch.round((xb - q1 * d) * inv * 254).clamp(-127, 127)
    e = d / 254
    return ((q1.double() * 254 + q2.double()) * e.double()).reshape(x.shape)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64(qtype, m, dtype):
    n, k = (45, 256) if qtype == "Q4_K" else (45, 96)
    packed, w = _weight(qtype, n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3).to(dtype)
    bias = torch.randn(n, generator=g)
    exact = x.double() @ w.T + bias.double()
    span = float(exact.abs().max())
    for act, bound in (("int8x2", 2e-4), ("int8", 3e-2)):
        y = cpu_gemm_gguf.linear_gguf(x, packed, n, qtype, bias, act=act)
        assert y.dtype == dtype and y.shape == (m, n)
        replay = _replayed(x, act) @ w.T + bias.double()
        out_ulp = 2**-8 if dtype == torch.bfloat16 else 1e-6
        assert float((y.double() - replay).abs().max()) <= out_ulp * span + 1e-6
        err = float((y.double() - exact).abs().max()) / span
        log.warning("%s m=%d %s %s: max error %.2e of max |y|", qtype, m, dtype, act, err)
        assert err < bound + out_ulp


@pytest.mark.parametrize("qtype", QTYPES)
def test_code_paths_agree_bit_for_bit(qtype):
    flags = cpu_build.cpu_flags()
    isas = ["scalar"] + (["avx2"] if "avx2" in flags else [])
    if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        isas.append("avx512")
    if cpu_gemm_gguf.amx_usable():  # AMX tiles: 16 rows each, so 9 and 40 rows are padded
        isas.append("amx")
    n, k = (200, 512) if qtype == "Q4_K" else (200, 160)
    packed, _ = _weight(qtype, n, k, seed=11)
    for m in (9, 40):
        x = torch.randn(m, k) * torch.rand(m, 1) * 4
        for act in ("int8x2", "int8"):
            outs = [cpu_gemm_gguf.linear_gguf(x, packed, n, qtype, isa=i, act=act) for i in isas]
            for isa, out in zip(isas[1:], outs[1:]):
                assert torch.equal(out, outs[0]), (qtype, m, act, isa)


def test_amx_default_and_pin():
    """The default path (AMX from 32 rows where the CPU has it, AVX-512 otherwise) gives the pinned
    paths' bits; a pin to AMX where it cannot run is an error, not a quiet fallback."""
    assert cpu_gemm_gguf.isa_name() != "amx"  # the name of the default is its vector path
    packed, _ = _weight("Q4_1", 70, 96, seed=3)
    for m in (9, 33, 40, 64):
        x = torch.randn(m, 96)
        auto = cpu_gemm_gguf.linear_gguf(x, packed, 70, "Q4_1")
        assert torch.equal(auto, cpu_gemm_gguf.linear_gguf(x, packed, 70, "Q4_1", isa="scalar"))
    if cpu_gemm_gguf.amx_usable():
        assert cpu_gemm_gguf.isa_name("amx") == "amx"
    else:
        with pytest.raises(RuntimeError, match="AMX"):
            cpu_gemm_gguf.isa_code("amx")


def test_bf16_output_is_the_float32_output_rounded_once():
    packed, _ = _weight("Q4_1", 33, 64, seed=5)
    x = torch.randn(5, 64).bfloat16()
    y = cpu_gemm_gguf.linear_gguf(x, packed, 33, "Q4_1")
    ref = cpu_gemm_gguf.linear_gguf(x.float(), packed, 33, "Q4_1")
    assert torch.equal(y, ref.bfloat16())


def test_strided_input_and_thread_count():
    packed, _ = _weight("Q8_0", 70, 64, seed=9)
    wide = torch.randn(2, 6, 100)
    x = wide[..., 20:84]
    y = cpu_gemm_gguf.linear_gguf(x, packed, 70, "Q8_0")
    assert y.shape == (2, 6, 70)
    assert torch.equal(y, cpu_gemm_gguf.linear_gguf(x.contiguous(), packed, 70, "Q8_0"))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemm_gguf.linear_gguf(x, packed, 70, "Q8_0")
        torch.set_num_threads(2)
        two = cpu_gemm_gguf.linear_gguf(x, packed, 70, "Q8_0")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_compiled_code_sees_an_opaque_operator():
    packed, _ = _weight("Q4_0", 48, 64, seed=2)
    x = torch.randn(4, 64).bfloat16()
    out = torch.ops.sgl_kernel.cpu_linear_gguf(x, packed, 48, "Q4_0", None)
    assert torch.equal(out, cpu_gemm_gguf.linear_gguf(x, packed, 48, "Q4_0"))
    checks = torch.library.opcheck(
        torch.ops.sgl_kernel.cpu_linear_gguf.default, (x, packed, 48, "Q4_0", None)
    )
    assert all(v == "SUCCESS" for v in checks.values())


def test_pack_refuses_scales_float16_cannot_hold():
    codes = torch.zeros(16, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not exact"):
        cpu_gemm_gguf.pack(codes, torch.full((16, 1), 0.1), None, "Q8_0")
