"""The CPU token-bitmask kernel (sgl-kernel/sgl_kernel/cpu_token_bitmask.py) against xgrammar.

Constrained decoding masks logits with it instead of xgrammar's CPU `apply_token_bitmask_inplace`,
so it must give bit-for-bit the same logits: checked on random bitmasks made of the runs a grammar
produces (all-blocked and all-allowed words) and of random bits, all-zero and all-one rows, logits
holding -inf and the largest finite floats, vocabularies that are not a multiple of 32, logits
wider than the grammar's vocabulary, row-strided logits and any subset of rows. The PyTorch path
(used without a C compiler, or for other dtypes and strides) is held to the same reference.
"""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from sgl_kernel import cpu_token_bitmask as tb

needs_kernel = pytest.mark.skipif(
    not tb.available(), reason=f"kernel unavailable: {tb.unavailable_reason()}"
)
VOCABS = [1, 31, 32, 33, 100, 1000, 49155]


def _bitmask(g: torch.Generator, rows: int, vocab: int, extra_words: int = 0) -> torch.Tensor:
    """Random int32 bitmask rows: blocked runs, allowed runs and random words mixed."""
    words = (vocab + 31) // 32 + extra_words
    bits = torch.randint(-(2**31), 2**31, (rows, words), generator=g, dtype=torch.int64)
    kind = torch.randint(0, 3, (rows, words), generator=g)
    bits = torch.where(kind == 0, 0, torch.where(kind == 1, -1, bits))
    if rows > 2:
        bits[0] = 0  # nothing allowed
        bits[1] = -1  # everything allowed
    return bits.to(torch.int32)


def _logits(g: torch.Generator, rows: int, width: int) -> torch.Tensor:
    x = torch.randn(rows, width, generator=g) * 10
    special = torch.tensor([float("-inf"), -3.4e38, 3.4e38, -1e30, 0.0, -0.0])
    pick = torch.rand(rows, width, generator=g) < 0.05
    x[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=g)]
    return x


def _reference(logits, bitmask, rows, vocab):
    """xgrammar's documented result, from its PyTorch implementation; its CPU kernel (what
    constrained decoding ran before) must agree on every token below the vocabulary size."""
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(
        want, bitmask, vocab_size=vocab, indices=rows, backend="torch_native"
    )
    # xgrammar 0.2.9's CPU kernel corrupts the heap on vocabularies of 1 and 3 tokens, and on
    # logits wider than the vocabulary it also blocks the tokens past it in the last partial
    # word (its docs, its torch and Triton versions and the served logits, as wide as the
    # vocabulary, leave them alone).
    if vocab >= 4 and logits.dtype == torch.float32:
        cpu = logits.clone()
        xgr.apply_token_bitmask_inplace(cpu, bitmask, vocab_size=vocab, indices=rows, backend="cpu")
        assert torch.equal(cpu[:, :vocab], want[:, :vocab])
    return want


def _cases():
    for vocab in VOCABS:
        for wider in (0, 7):
            yield vocab, wider


@needs_kernel
@pytest.mark.parametrize("vocab,wider", list(_cases()))
def test_kernel_matches_xgrammar(vocab, wider):
    g = torch.Generator().manual_seed(vocab * 10 + wider)
    batch = 6
    # A bitmask with spare words past the vocabulary: they must not matter.
    bitmask = _bitmask(g, batch, vocab, extra_words=1 if wider else 0)
    logits = _logits(g, batch, vocab + wider)
    for rows in ([0, 1, 2, 3, 4, 5], [4, 0, 2], [5], []):
        got = logits.clone()
        tb.apply_token_bitmask_inplace(got, bitmask, rows, vocab)
        assert torch.equal(got, _reference(logits, bitmask, rows, vocab)), rows
        if rows:
            # All-zero rows leave only -inf below the vocabulary size.
            assert torch.isinf(got[0, :vocab]).all() == (0 in rows)
        # Past the grammar's vocabulary nothing changes.
        assert torch.equal(got[:, vocab:], logits[:, vocab:])


@needs_kernel
def test_kernel_on_row_strided_logits():
    g = torch.Generator().manual_seed(1)
    vocab = 1003
    wide = _logits(g, 4, vocab + 40)
    bitmask = _bitmask(g, 4, vocab)
    got_wide = wide.clone()
    got = got_wide[:, :vocab]  # a padded LM head's logits: row stride > vocabulary
    assert got.stride(1) == 1 and got.stride(0) == vocab + 40
    tb.apply_token_bitmask_inplace(got, bitmask, [1, 3], vocab)
    assert torch.equal(got, _reference(wide[:, :vocab], bitmask, [1, 3], vocab))
    assert torch.equal(got_wide[:, vocab:], wide[:, vocab:])


@pytest.mark.parametrize("vocab", VOCABS)
def test_torch_path_matches_xgrammar(vocab):
    g = torch.Generator().manual_seed(vocab)
    bitmask = _bitmask(g, 5, vocab)
    logits = _logits(g, 5, vocab + 3)
    for rows in ([0, 1, 2, 3, 4], [3, 1], []):
        got = logits.clone()
        tb.apply_token_bitmask_torch(got, bitmask, rows, vocab)
        assert torch.equal(got, _reference(logits, bitmask, rows, vocab))


def test_other_dtypes_and_strides_take_the_torch_path():
    g = torch.Generator().manual_seed(2)
    vocab = 77
    bitmask = _bitmask(g, 3, vocab)
    logits = _logits(g, 3, vocab)
    bf16 = logits.bfloat16()
    tb.apply_token_bitmask_inplace(bf16, bitmask, [0, 2], vocab)
    assert torch.equal(bf16, _reference(logits.bfloat16(), bitmask, [0, 2], vocab))
    cols = logits.t().contiguous().t()  # column-major: stride(1) != 1
    tb.apply_token_bitmask_inplace(cols, bitmask, [1, 2], vocab)
    assert torch.equal(cols, _reference(logits, bitmask, [1, 2], vocab))


def test_bad_indices_are_refused_before_any_write():
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    logits = torch.zeros(2, 64)
    with pytest.raises(IndexError):
        tb.apply_token_bitmask_inplace(logits, bitmask, [2], 64)
    with pytest.raises(IndexError):
        tb.apply_token_bitmask_inplace(logits, bitmask, [-1], 64)
    with pytest.raises(ValueError):
        tb.apply_token_bitmask_inplace(logits, bitmask, [0], 65)  # wider than the logits
    with pytest.raises(ValueError):
        tb.apply_token_bitmask_inplace(torch.zeros(2, 100), bitmask, [0], 100)  # > 2 words
    assert torch.equal(logits, torch.zeros(2, 64))
