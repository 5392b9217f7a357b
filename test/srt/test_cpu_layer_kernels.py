"""The CPU layer kernels (sgl_kernel.cpu_layer) against their references.

RMSNorm (plain and with the fused residual add), rotary embedding and SiLU-and-mul must give the
`sgl_kernel.ref` results bit for bit in bfloat16 (every rounding step reproduced) and within a
float32 unit or two in float32 (the mean's summation order and exp's last bit). Decode attention
read from the paged pool must equal a float64 softmax attention over the gathered keys, with GQA,
sliding windows, soft-capping, int32 and int64 slot tables, non-contiguous query rows and the
store of the step's new K/V; and the torch_native backend must give the same result through the
kernel as through its PyTorch path. A tiny Llama decodes the same greedy tokens either way.
"""

from __future__ import annotations

import pytest
import torch

from sgl_kernel import cpu_layer, ref
from sglang.test.decode_steps import greedy_steps

pytestmark = pytest.mark.skipif(
    not cpu_layer.usable(torch.ones(1)), reason="CPU layer kernels cannot be built here"
)

DTYPES = [torch.float32, torch.bfloat16]


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, ulps: float = 4.0) -> None:
    """Bitwise for bfloat16; float32 within a few units in the last place."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if dtype == torch.bfloat16:
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    else:
        tol = ulps * torch.finfo(torch.float32).eps * b.abs().clamp_min(1e-30)
        assert ((a - b).abs() <= tol).all(), (a - b).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (3, 33), (2, 5, 64)])
def test_rmsnorm_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    n = shape[-1]
    x = (torch.randn(shape) * 3).to(dtype)
    residual = torch.randn(shape).to(dtype)
    weight = (1 + torch.randn(n) * 0.1).to(dtype)
    _close(cpu_layer.rmsnorm(x, weight, 1e-5)[0], ref.rmsnorm(x, weight, 1e-5), dtype)
    out, res = cpu_layer.rmsnorm(x, weight, 1e-5, residual)
    ref_out, ref_res = ref.fused_add_rmsnorm(x, residual, weight, 1e-5)
    assert torch.equal(res, ref_res)
    _close(out, ref_out, dtype)
    # A float32 weight on a bfloat16 input promotes the product, as PyTorch does.
    w32 = weight.float()
    _close(cpu_layer.rmsnorm(x, w32, 1e-6)[0], ref.rmsnorm(x, w32, 1e-6), torch.float32)
    # Rows read through a stride (a slice of a wider tensor).
    wide = torch.randn(4, n + 8).to(dtype)
    _close(
        cpu_layer.rmsnorm(wide[:, :n], weight, 1e-5)[0],
        ref.rmsnorm(wide[:, :n], weight, 1e-5),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,heads,head_dim,rot", [(1, 9, 64, 64), (5, 3, 64, 64), (4, 2, 32, 16)]
)
def test_rotary_matches_reference(
    dtype: torch.dtype, tokens: int, heads: int, head_dim: int, rot: int
) -> None:
    torch.manual_seed(1)
    # q as the model has it: a slice of the fused QKV projection's output.
    qkv = torch.randn(tokens, heads * head_dim + 40).to(dtype)
    x = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    positions = torch.randint(0, 5000, (tokens,))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    cos, sin = ref.rotary_cos_sin(positions, inv_freq)
    got = cpu_layer.apply_rotary_emb(x, cos, sin)
    assert torch.equal(got, ref.apply_rotary_emb(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 1536), (6, 100)])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, rows: int, d: int) -> None:
    torch.manual_seed(2)
    x = (torch.randn(rows, 2 * d) * 4).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0]).to(dtype)
    _close(cpu_layer.silu_and_mul(x), ref.silu_and_mul(x), dtype, ulps=8.0)


def _attention_f64(q, k_buf, v_buf, rtt, req_idx, seq_lens, hkv, scale, window, cap):
    """Float64 softmax attention of each request's last position over its gathered keys."""
    d = k_buf.shape[-1]
    hq = q.shape[-1] // d
    group = hq // hkv
    outs, lses = [], []
    for b in range(q.shape[0]):
        length = int(seq_lens[b])
        slots = rtt[req_idx[b], :length].long()
        k = k_buf[slots].double().transpose(0, 1).repeat_interleave(group, 0)
        v = v_buf[slots].double().transpose(0, 1).repeat_interleave(group, 0)
        s = (q[b].view(hq, d).double()[:, None, :] * k).sum(-1) * scale
        if cap > 0:
            s = torch.tanh(s / cap) * cap
        j = torch.arange(length)
        if window > 0:
            s = s.masked_fill(~(length - 1 - j < window), float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append((torch.exp(s - lse[:, None])[:, :, None] * v).sum(1).reshape(-1))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rtt_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "bs,hq,hkv,d,window,cap",
    # head_dim 64 / 128 / 256 take the AVX-512 bodies where the CPU has them (query heads of a
    # group in register tiles of 4 / 2 / 1: groups of 5 and 8 leave partial tiles), 16 and 32
    # the portable loops.
    [
        (1, 9, 3, 64, 0, 0.0),
        (5, 8, 2, 32, 0, 0.0),
        (3, 4, 4, 16, 7, 0.0),
        (4, 6, 2, 64, 0, 30.0),
        (3, 10, 2, 64, 9, 0.0),
        (2, 16, 2, 128, 0, 0.0),
        (2, 4, 2, 256, 5, 20.0),
    ],
)
def test_decode_attention_matches_float64(dtype, rtt_dtype, bs, hq, hkv, d, window, cap) -> None:
    torch.manual_seed(3)
    slots = 400
    k_buf = torch.randn(slots, hkv, d).to(dtype)
    v_buf = torch.randn(slots, hkv, d).to(dtype)
    rtt = torch.randperm(slots)[: 8 * 40].view(8, 40).to(rtt_dtype)
    req_idx = torch.tensor([7, 2, 5, 0, 1][:bs])
    seq_lens = torch.tensor([40, 1, 17, 33, 9][:bs])
    qkv = torch.randn(bs, (hq + 2 * hkv) * d + 3).to(dtype)  # q, k, v: strided slices
    q = qkv[:, : hq * d]
    k_new, v_new = qkv[:, hq * d : (hq + hkv) * d], qkv[:, (hq + hkv) * d : (hq + 2 * hkv) * d]
    loc = rtt[req_idx, seq_lens - 1].long()
    out, lse = cpu_layer.decode_attention(
        q,
        k_buf,
        v_buf,
        rtt,
        req_idx,
        seq_lens,
        hkv,
        0.125,
        window,
        cap,
        new_kv=(k_new, v_new, loc),
        return_lse=True,
    )
    assert torch.equal(k_buf[loc].reshape(bs, -1), k_new)
    assert torch.equal(v_buf[loc].reshape(bs, -1), v_new)
    want_out, want_lse = _attention_f64(
        q, k_buf, v_buf, rtt, req_idx, seq_lens, hkv, 0.125, window, cap
    )
    assert out.dtype == dtype and out.shape == (bs, hq * d)
    out_tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's one rounding
    assert (out.double() - want_out).abs().max() < out_tol
    assert (lse.double() - want_lse).abs().max() < 1e-5
    again, no_lse = cpu_layer.decode_attention(
        q, k_buf, v_buf, rtt, req_idx, seq_lens, hkv, 0.125, window, cap
    )
    assert no_lse is None and torch.equal(again, out)


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory) -> str:
    from sglang.test.served_tiny import make_tiny_served_model

    return make_tiny_served_model(str(tmp_path_factory.mktemp("tiny")), num_layers=3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_decode_same_with_and_without_kernels(tiny_model_path: str, dtype: str) -> None:
    """A tiny Llama's decode (norms, rotary, SiLU, pool attention) through the kernels and
    through PyTorch: the same greedy tokens, logits within float32 noise (bf16: its rounding)."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import build_model_runner
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=tiny_model_path, dtype=dtype, max_total_tokens=1024)
    runner = build_model_runner(args, ModelConfig.from_server_args(args))
    prompts = [[1, 5, 9, 13, 2, 7, 11, 3, 4], [3, 4, 8], [6] * 20]
    try:
        with_kernels = greedy_steps(runner, prompts, 10)
        cpu_layer.set_enabled(False)
        without = greedy_steps(runner, prompts, 10)
    finally:
        cpu_layer.set_enabled(True)
    assert with_kernels[0] == without[0]
    # bf16: the kernels' float32 softmax vs the fused SDPA's bf16 probabilities move a logit by a
    # unit or two of bf16's 8-bit mantissa at the logits' scale.
    scale = without[1].abs().max().item()
    tol = 1e-4 if dtype == "float32" else 4 * 2**-8 * scale
    diff = (with_kernels[1] - without[1]).abs().max().item()
    assert diff < tol, diff


def test_decode_attention_threads_give_the_same_result(monkeypatch) -> None:
    """Requests x KV heads are independent tasks: OpenMP threads change nothing in the output."""
    torch.manual_seed(4)
    bs, hq, hkv, d, slots = 6, 8, 2, 32, 4096
    k_buf, v_buf = torch.randn(slots, hkv, d), torch.randn(slots, hkv, d)
    rtt = torch.randperm(slots)[: bs * 600].view(bs, 600).to(torch.int32)
    req_idx, seq_lens = torch.arange(bs), torch.tensor([600, 1, 333, 599, 17, 480])
    q = torch.randn(bs, hq * d)
    args = (q, k_buf, v_buf, rtt, req_idx, seq_lens, hkv, 0.2)
    monkeypatch.setattr(cpu_layer, "PARALLEL_MIN_WORK", 1 << 62)
    one = cpu_layer.decode_attention(*args, return_lse=True)
    monkeypatch.setattr(cpu_layer, "PARALLEL_MIN_WORK", 0)
    many = cpu_layer.decode_attention(*args, return_lse=True)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
