"""`sdpa_with_lse` (layers/attention/torch_native_backend.py) against direct float64 math.

The backend's one softmax-attention primitive: output and the log-sum-exp of the masked, scaled
scores, for float32 and bf16, with per-head and broadcast masks.
"""

from __future__ import annotations

import math

import pytest
import torch

from sglang.srt.layers.attention.torch_native_backend import sdpa_with_lse

F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def _math_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale + mask.double()
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v.double()), lse


def _random_mask(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Additive mask mixing -inf, 0 and finite biases; every row keeps at least one key."""
    allowed = torch.rand(shape, generator=gen) < 0.6
    allowed[..., 0] = True
    bias = torch.randn(shape, generator=gen) * 0.5
    return torch.where(allowed, bias, torch.tensor(float("-inf"))).to(dtype)


@pytest.mark.parametrize("mask_heads", [1, 3], ids=["broadcast-heads", "per-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_sdpa_with_lse_matches_math(dtype: torch.dtype, mask_heads: int) -> None:
    gen = torch.Generator().manual_seed(43)
    b, h, lq, lk, d = 2, 3, 6, 11, 32
    q = torch.randn(b, h, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, h, lk, d, generator=gen).to(dtype)
    v = torch.randn(b, h, lk, d, generator=gen).to(dtype)
    mask = _random_mask(gen, (b, mask_heads, lq, lk), dtype)
    scale = 1 / math.sqrt(d)
    out, lse = sdpa_with_lse(q, k, v, mask, scale)
    ref_out, ref_lse = _math_sdpa(q, k, v, mask, scale)
    assert out.shape == (b, h, lq, d) and out.dtype == dtype
    assert lse.shape == (b, h, lq) and lse.dtype == torch.float32
    tol = F32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)


def test_sdpa_with_lse_scale_is_applied_before_mask() -> None:
    """The mask is added to the scaled scores, not scaled itself (a bias shifts the LSE 1:1)."""
    gen = torch.Generator().manual_seed(47)
    q = torch.randn(1, 2, 4, 16, generator=gen)
    k = torch.randn(1, 2, 5, 16, generator=gen)
    v = torch.randn(1, 2, 5, 16, generator=gen)
    zero = torch.zeros(1, 1, 4, 5)
    out0, lse0 = sdpa_with_lse(q, k, v, zero, 0.7)
    out1, lse1 = sdpa_with_lse(q, k, v, zero + 2.5, 0.7)
    torch.testing.assert_close(lse1, lse0 + 2.5, **F32_TOL)
    torch.testing.assert_close(out1, out0, **F32_TOL)
