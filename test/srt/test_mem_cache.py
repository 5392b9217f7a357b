"""KV memory: ReqToTokenPool rows, MHATokenToKVPool buffers, and the slot/page allocators.

Slot ids are asserted exactly: the allocation policy (allocator.py docstring) is deterministic.
"""

from __future__ import annotations

import pytest
import torch

from sglang.srt.mem_cache.allocator import (
    PagedTokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    create_allocator,
)
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ids(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else t.tolist()


def t64(xs: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64, device=device)


# ---- ReqToTokenPool --------------------------------------------------------------------------
def test_req_to_token_pool_rows_lowest_first() -> None:
    pool = ReqToTokenPool(4, 16, "cpu")
    assert pool.req_to_token.shape == (4, 16)
    assert pool.req_to_token.dtype == torch.int32  # as upstream: half the bytes of int64
    assert pool.alloc(2) == [0, 1]
    assert pool.alloc(1) == [2]
    assert pool.available_size() == 1
    pool.free(0)
    assert pool.alloc(1) == [0]
    pool.free([2, 1])
    assert pool.available_size() == 3
    assert pool.alloc(4) is None  # not enough: state unchanged
    assert pool.available_size() == 3
    assert pool.alloc(2) == [1, 2]
    with pytest.raises(ValueError):
        pool.free(3)  # row 3 is free already
    pool.free(1)
    with pytest.raises(ValueError):
        pool.free(1)  # twice
    pool.clear()
    assert pool.available_size() == 4
    assert pool.alloc(4) == [0, 1, 2, 3]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (uninitialized memory may hold NaNs, which never compare equal)."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


# ---- MHATokenToKVPool ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_kv_pool_set_get_and_padding_page(device: str) -> None:
    pool = MHATokenToKVPool(
        8, 2, torch.bfloat16, head_num=3, head_dim=4, layer_num=2, device=device
    )
    assert len(pool.k_buffer) == len(pool.v_buffer) == 2
    assert pool.get_key_buffer(0).shape == (10, 3, 4)  # size + one padding page
    assert pool.get_value_buffer(1).dtype == torch.bfloat16
    # The pool is uninitialized except the padding page: compare against snapshots.
    assert pool.get_key_buffer(0)[:2].abs().sum() == 0
    before_k1 = pool.get_key_buffer(1).clone()
    before_k0 = pool.get_key_buffer(0).clone()
    k = torch.randn(3, 3, 4, device=device)  # float32 in, cast to bf16
    v = torch.randn(3, 12, device=device)  # flattened heads are accepted too
    loc = t64([2, 5, 9], device)
    pool.set_kv_buffer(1, loc, k, v)
    kb, vb = pool.get_kv_buffer(1)
    assert torch.equal(kb[loc], k.to(torch.bfloat16))
    assert torch.equal(vb[loc], v.reshape(3, 3, 4).to(torch.bfloat16))
    others = [0, 1, 3, 4, 6, 7, 8]
    assert same_bits(kb[others], before_k1[others])  # other slots untouched
    assert same_bits(pool.get_key_buffer(0), before_k0)  # other layer untouched
    # Padded tokens write into the reserved page (slots 0..page_size-1).
    pool.set_kv_buffer(0, t64([0, 0, 1], device), k, k)
    assert same_bits(pool.get_key_buffer(0)[2:], before_k0[2:])


def test_kv_pool_sizes() -> None:
    cell = MHATokenToKVPool.cell_size_bytes(3, 64, 30, torch.bfloat16)
    assert cell == 3 * 64 * 30 * 2 * 2
    pool = MHATokenToKVPool(16, 1, torch.float32, head_num=2, head_dim=8, layer_num=3, device="cpu")
    assert pool.get_kv_size_bytes() == 17 * MHATokenToKVPool.cell_size_bytes(2, 8, 3, torch.float32)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no fp8 dtype")
def test_kv_pool_fp8_roundtrip() -> None:
    pool = MHATokenToKVPool(4, 1, torch.float8_e4m3fn, 1, 2, 1, "cpu")
    k = torch.tensor([[[0.5, -2.0]]])
    pool.set_kv_buffer(0, t64([3]), k, k)
    assert pool.get_key_buffer(0).dtype == torch.float8_e4m3fn
    assert pool.get_key_buffer(0)[3].float().tolist() == [[0.5, -2.0]]


# ---- page size 1 -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_allocator_page1_exact_sequence(device: str) -> None:
    a = TokenToKVPoolAllocator(8, device)
    assert a.available_size() == 8
    assert ids(a.alloc(3)) == [1, 2, 3]  # slot 0 is the padding slot
    assert ids(a.alloc(2)) == [4, 5]
    a.free(t64([2, 1], device))
    assert a.available_size() == 5
    # Freed slots wait in the release list until the ascending free list runs dry.
    assert ids(a.alloc(2)) == [6, 7]
    a.free(t64([5], device))
    # Free list [8], release [2, 1, 5]: an alloc of 2 merges and re-sorts first.
    assert ids(a.alloc(2)) == [1, 2]
    assert ids(a.alloc(1)) == [5]
    assert ids(a.alloc(1)) == [8]
    assert a.available_size() == 0
    assert a.alloc(1) is None
    assert ids(a.alloc(0)) == []


def test_allocator_page1_oom_leaves_state_unchanged() -> None:
    a = TokenToKVPoolAllocator(6, "cpu")
    a.alloc(4)  # free list [5, 6]
    a.free(t64([3]))  # release [3]
    assert a.alloc(4) is None
    assert a.available_size() == 3
    assert a.alloc_extend([0, 2], [3, 4], [-1, 9], 5) is None
    assert a.alloc_decode([1, 1, 1, 1], [0, 0, 0, 0]) is None
    # No merge happened on the failed calls: the front of the free list is still 5, 6.
    assert ids(a.alloc(2)) == [5, 6]
    assert ids(a.alloc(1)) == [3]


def test_allocator_page1_extend_decode_and_groups() -> None:
    a = create_allocator(16, 1, "cpu")
    assert type(a) is TokenToKVPoolAllocator
    out = a.alloc_extend([0, 3], [4, 5], [-1, 7], 6)
    assert ids(out) == [1, 2, 3, 4, 5, 6]
    assert ids(a.alloc_decode([5, 6], [4, 6])) == [7, 8]
    with pytest.raises(ValueError):
        a.alloc_extend([0], [4], [-1], 3)  # wrong total
    a.free_group_begin()
    a.free(t64([1, 2]))
    a.free(t64([7]))
    assert a.available_size() == 8  # deferred
    a.free_group_end()
    assert a.available_size() == 11
    assert a.release_pages.tolist() == [1, 2, 7]
    a.clear()
    assert a.available_size() == 16
    assert ids(a.alloc(2)) == [1, 2]


# ---- paged ------------------------------------------------------------------------------------
def test_paged_allocator_rounds_and_reserves_page0() -> None:
    a = create_allocator(18, 4, "cpu")
    assert isinstance(a, PagedTokenToKVPoolAllocator)
    assert (a.num_pages, a.size, a.available_size()) == (4, 16, 16)
    assert ids(a.alloc(6)) == [4, 5, 6, 7, 8, 9]  # two whole pages (1, 2), 6 slots returned
    assert a.available_size() == 8
    a.free(t64([9]))  # any slot of a page frees the page
    assert a.available_size() == 12
    assert a.release_pages.tolist() == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_paged_extend_and_decode_continue_partial_pages(device: str) -> None:
    a = PagedTokenToKVPoolAllocator(16, device, 4)  # pages 1..4 = slots 4..19
    out = a.alloc_extend([0, 0], [5, 3], [-1, -1], 8)
    assert ids(out) == [4, 5, 6, 7, 8, 12, 13, 14]  # req0: pages 1, 2; req1: page 3
    assert a.available_size() == 4
    # Both requests continue their partial pages.
    assert ids(a.alloc_decode([6, 4], [8, 14])) == [9, 15]
    # req0 continues (slot 10); req1's page 3 is full, it takes page 4.
    assert ids(a.alloc_decode([7, 5], [9, 15])) == [10, 16]
    assert a.available_size() == 0
    # req0 extends 5 more: 1 slot continues page 2, 4 need a fresh page: none left.
    assert a.alloc_extend([7], [12], [10], 5) is None
    assert a.available_size() == 0
    a.free(t64([12, 13, 14, 15], device))  # req1's first page
    assert ids(a.alloc_extend([7], [12], [10], 5)) == [11, 12, 13, 14, 15]
    # A page-aligned prefix ignores last_loc and takes fresh pages only.
    a.free(t64([4, 5, 6, 7], device))
    assert ids(a.alloc_extend([8, 0], [9, 0], [-1, -1], 1)) == [4]


def test_paged_extend_validates_last_loc() -> None:
    a = PagedTokenToKVPoolAllocator(32, "cpu", 4)
    a.alloc_extend([0], [3], [-1], 3)  # slots 4, 5, 6
    with pytest.raises(ValueError):
        a.alloc_extend([3], [4], [5], 1)  # slot 5 does not hold position 2 of its page
    with pytest.raises(ValueError):
        a.alloc_extend([3], [4], [-1], 1)
    assert ids(a.alloc_extend([3], [4], [6], 1)) == [7]


def test_paged_free_release_and_merge_order() -> None:
    a = PagedTokenToKVPoolAllocator(16, "cpu", 4)
    a.alloc(16)
    a.free(t64([13, 18, 12]))  # pages 3 and 4, recorded sorted per call
    a.free(t64([5]))  # page 1
    assert a.release_pages.tolist() == [3, 4, 1]
    assert a.available_size() == 12
    assert ids(a.alloc(12)) == [4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]
    # Group frees deduplicate pages across calls.
    a.free_group_begin()
    a.free(t64([4, 5]))
    a.free(t64([6, 16]))
    a.free_group_end()
    assert a.release_pages.tolist() == [1, 4]
    assert a.available_size() == 8
    assert a.alloc(9) is None
    assert a.available_size() == 8
