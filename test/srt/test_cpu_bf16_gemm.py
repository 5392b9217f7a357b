"""The CPU bf16-weight GEMM (sgl_kernel/cpu_gemm.py) and its use by bf16 models on CPU.

The kernel widens bf16 weights to float32 and accumulates in float32, so its float32 output equals
float32 arithmetic on the same bf16 values (up to summation order), and its bf16 output is that
value rounded once. Checked on awkward shapes (columns not a multiple of the block, odd K, row
counts around the register tile and the row chunk), strided input, bias, and across thread
counts (the split is over output blocks, so the result does not depend on it). Then a bf16 tiny
model: its linear layers and LM head are packed, and its greedy tokens and logprobs match the
same model on PyTorch's own bf16 matmul. A row's result does not depend on the other rows of
the call. The float32-weight entry (the same loop with plain
loads) against float64 arithmetic, and a float32 tiny model packed (`SGLANG_CPU_F32_GEMM=1`)
against the same model on PyTorch's float32 matmul (`=0`): same greedy tokens, logprobs within
1e-5; an unknown value of the variable is refused.
"""

from __future__ import annotations

import pytest
import torch

from sgl_kernel import cpu_gemm

pytestmark = pytest.mark.skipif(
    not cpu_gemm.available(), reason=f"kernel unavailable: {cpu_gemm.unavailable_reason()}"
)


def _reference(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    out = x.double() @ w.double().T
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("m", [1, 3, 8, 9, 17, 65, 130])
@pytest.mark.parametrize("n,k", [(32, 16), (45, 33), (96, 576), (200, 7)])
def test_float32_output_matches_float32_arithmetic(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    packed = cpu_gemm.pack_bf16(w)
    y = cpu_gemm.linear_bf16w(x, packed, n, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = _reference(x, w.float(), bias)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * k)


@pytest.mark.parametrize("m", [1, 8, 40])
def test_bf16_output_is_the_float32_result_rounded(m):
    g = torch.Generator().manual_seed(m)
    n, k = 77, 130
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    packed = cpu_gemm.pack_bf16(w)
    y = cpu_gemm.linear_bf16w(x, packed, n)
    assert y.dtype == torch.bfloat16
    exact = cpu_gemm.linear_bf16w(x.float(), packed, n)
    # Rounding once from float32: equal to PyTorch's rounding of the same float32 values.
    assert torch.equal(y, exact.bfloat16())
    ref = _reference(x.float(), w.float(), None).float().bfloat16()
    ulp = (ref.float().abs() * 2**-7).clamp_min(1e-6)
    assert ((y.float() - ref.float()).abs() <= ulp).all()


def test_strided_and_batched_input():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 24, generator=g).bfloat16()
    packed = cpu_gemm.pack_bf16(w)
    wide = torch.randn(2, 5, 64, generator=g)
    x = wide[..., 10:34]  # rows 64 apart, 24 wide
    y = cpu_gemm.linear_bf16w(x, packed, 40)
    assert y.shape == (2, 5, 40)
    ref = _reference(x.reshape(-1, 24), w.float(), None).view(2, 5, 40)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_result_does_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 200, generator=g).bfloat16()
    x = torch.randn(33, 200, generator=g).bfloat16()
    packed = cpu_gemm.pack_bf16(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemm.linear_bf16w(x, packed, 300)
        torch.set_num_threads(2)
        two = cpu_gemm.linear_bf16w(x, packed, 300)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_compiled_code_sees_an_opaque_operator():
    w = torch.randn(48, 16).bfloat16()
    packed = cpu_gemm.pack_bf16(w)
    x = torch.randn(4, 16).bfloat16()
    out = torch.ops.sgl_kernel.cpu_linear_bf16w(x, packed, 48, None)
    assert torch.equal(out, cpu_gemm.linear_bf16w(x, packed, 48))
    fake = torch.library.opcheck(
        torch.ops.sgl_kernel.cpu_linear_bf16w.default, (x, packed, 48, None)
    )
    assert all(v == "SUCCESS" for v in fake.values())


def _run(folder: str, prompts: list[list[int]], dtype: str = "bfloat16"):
    from sglang.srt.layers.cpu_weight_layout import PackedCpuWeight
    from sglang.test.runners import SRTRunner

    srt = SRTRunner(folder, dtype=dtype, max_total_tokens=512)
    packed = sum(isinstance(m, PackedCpuWeight) for m in srt.model_runner.model.modules())
    return packed, srt.generate(prompts, max_new_tokens=12, return_logprob=True)


def test_bf16_model_packs_its_weights_and_matches_torch_matmul(tmp_path, monkeypatch):
    from sglang.test.runners import make_tiny_model

    folder = make_tiny_model("llama", str(tmp_path / "tiny"))
    prompts = [[1, 17, 33, 250, 7], [1, 400, 12, 12, 99, 3, 64]]
    packed, ours = _run(folder, prompts)
    # 3 layers x (qkv, o, gate_up, down) and the LM head.
    assert packed == 3 * 4 + 1
    monkeypatch.setenv("SGLANG_CPU_WEIGHT_LAYOUT", "row")
    packed, torch_out = _run(folder, prompts)
    assert packed == 0
    for a, b in zip(ours, torch_out):
        assert a.output_ids == b.output_ids
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 0.05


@pytest.mark.parametrize("m", [1, 5, 8, 65])
@pytest.mark.parametrize("n,k", [(45, 33), (96, 576), (200, 7)])
def test_float32_weights_match_float64_arithmetic(m, n, k):
    g = torch.Generator().manual_seed(m * 7 + n + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    packed = cpu_gemm.pack_f32(w)
    assert packed.dtype == torch.float32
    y = cpu_gemm.linear_bf16w(x, packed, n, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert torch.allclose(y.double(), _reference(x, w, bias), rtol=1e-5, atol=1e-5 * k)
    with pytest.raises(ValueError):
        cpu_gemm.pack_f32(w.bfloat16())


def test_float32_model_packed_matches_torch_matmul(tmp_path, monkeypatch):
    from sglang.srt.layers.cpu_weight_layout import pack_f32_wanted
    from sglang.test.runners import make_tiny_model

    folder = make_tiny_model("llama", str(tmp_path / "tiny"))
    prompts = [[1, 17, 33, 250, 7], [1, 400, 12, 12, 99, 3, 64]]
    monkeypatch.setenv("SGLANG_CPU_F32_GEMM", "1")
    packed, ours = _run(folder, prompts, "float32")
    assert packed == 3 * 4 + 1
    monkeypatch.setenv("SGLANG_CPU_F32_GEMM", "0")
    packed, torch_out = _run(folder, prompts, "float32")
    assert packed == 0
    for a, b in zip(ours, torch_out):
        assert a.output_ids == b.output_ids
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 1e-5
    monkeypatch.setenv("SGLANG_CPU_F32_GEMM", "yes")
    with pytest.raises(ValueError, match="SGLANG_CPU_F32_GEMM"):
        pack_f32_wanted()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_does_not_depend_on_the_other_rows(dtype):
    """Each output is one float32 chain over k in order, whatever the tile's row count: a row
    alone (m = 1), in a partial tile or in a full one gives the same bits."""
    g = torch.Generator().manual_seed(5)
    n, k = 70, 200
    w = torch.randn(n, k, generator=g).to(dtype)
    packed = cpu_gemm.pack_bf16(w) if dtype == torch.bfloat16 else cpu_gemm.pack_f32(w)
    x = torch.randn(19, k, generator=g)
    together = cpu_gemm.linear_bf16w(x, packed, n)
    for i in (0, 8, 17, 18):  # full tiles of 8 rows, then a tile of 3
        assert torch.equal(cpu_gemm.linear_bf16w(x[i : i + 1], packed, n)[0], together[i])
        assert torch.equal(cpu_gemm.linear_bf16w(x[i : i + 2], packed, n)[0], together[i])
