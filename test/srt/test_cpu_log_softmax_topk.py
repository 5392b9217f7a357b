"""The CPU log_softmax top-n kernel (sgl-kernel/sgl_kernel/cpu_log_softmax_topk.py) against PyTorch.

The logit lens takes its top-n log-probabilities from it, so it must equal
`torch.log_softmax(logits[rows], -1).topk(n)`: the same columns in the same order and values
within float32 rounding of the log-sum-exp. Checked on both code paths (AVX-512 where the CPU
has it, portable C) over vocabularies that are not a multiple of the vector width, row-strided
logits (a view of a padded head's output), rows listed in any order or twice, n from 1 to the
whole row, rows holding -inf, and ties (the lower column first).
"""

from __future__ import annotations

import pytest
import torch

from sgl_kernel import cpu_log_softmax_topk as lst

needs_kernel = pytest.mark.skipif(not lst.available(), reason="kernel unavailable")
ISAS = ["auto", "scalar"]


def _check(logits: torch.Tensor, rows: list[int], n: int, isa: str) -> None:
    values, ids = lst.log_softmax_topk(logits, rows, n, isa=isa)
    ref_values, ref_ids = lst.log_softmax_topk_torch(logits, rows, n)
    assert ids.dtype == torch.int32 and values.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=2e-5)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vocab", [1, 15, 17, 1000, 49155])
def test_matches_torch(isa: str, vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g) * 8
    for n in sorted({1, min(5, vocab), min(20, vocab), vocab if vocab <= 64 else 64}):
        _check(logits, [3, 0, 5, 3], n, isa)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_strided_rows_and_infinities(isa: str) -> None:
    g = torch.Generator().manual_seed(1)
    padded = torch.randn(5, 49216, generator=g) * 5
    padded[1, 100:40000] = float("-inf")
    padded[2, :] = float("-inf")
    padded[2, 7] = 3.0  # a single finite value: log-probability 0
    logits = padded[:, :49152]
    assert logits.stride(0) == 49216
    _check(logits, [4, 1, 0, 1], 5, isa)
    # The rest of row 2 ties at -inf (PyTorch orders those ties as it likes): the top alone.
    values, ids = lst.log_softmax_topk(logits, [2], 3, isa=isa)
    assert ids[0, 0].item() == 7 and values[0, 0].item() == 0.0
    assert values[0, 1:].tolist() == [float("-inf")] * 2


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_ties_lower_column_first(isa: str) -> None:
    logits = torch.zeros(2, 300)
    logits[1, 250:] = 1.0
    values, ids = lst.log_softmax_topk(logits, [0, 1], 4, isa=isa)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert ids[1].tolist() == [250, 251, 252, 253]
    expect = -torch.log(torch.tensor(300.0))
    torch.testing.assert_close(values[0], expect.expand(4), rtol=0, atol=1e-6)


def test_torch_path_and_checks() -> None:
    logits = torch.randn(3, 200)
    values, ids = lst.log_softmax_topk(logits, [2, 0], lst.MAX_N + 1)  # above MAX_N: PyTorch
    ref_values, ref_ids = lst.log_softmax_topk_torch(logits, [2, 0], lst.MAX_N + 1)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)
    with pytest.raises(ValueError):
        lst.log_softmax_topk(logits, [0], 0)
    with pytest.raises(ValueError):
        lst.log_softmax_topk(logits, [0], 201)
    with pytest.raises(IndexError):
        lst.log_softmax_topk(logits, [3], 5)
    empty_values, empty_ids = lst.log_softmax_topk(logits, [], 5)
    assert empty_values.shape == (0, 5) and empty_ids.shape == (0, 5)
