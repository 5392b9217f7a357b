"""The no-sharing prefix cache used with --disable-radix-cache.

Nothing is shared between requests: a match is always empty, and a finished request's slots go
straight back to the allocator. It still serves chunked prefill, where a request must keep the KV
of its earlier chunks as its own "prefix" between scheduler rounds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    CacheReq,
    MatchResult,
    committed_kv_len,
)

if TYPE_CHECKING:
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool


class ChunkCache(BasePrefixCache):
    def __init__(
        self,
        req_to_token_pool: ReqToTokenPool,
        token_to_kv_pool_allocator: TokenToKVPoolAllocator,
        page_size: int = 1,
    ) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        self.device = token_to_kv_pool_allocator.device

    def match_prefix(self, key: list[int]) -> MatchResult:
        return MatchResult(torch.empty(0, dtype=torch.int64, device=self.device), None)

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        # Nothing is kept, so nothing was already present; the caller still owns `value`.
        return 0

    def cache_finished_req(self, req: CacheReq) -> None:
        if req.req_pool_idx is None:
            return
        pool = self.req_to_token_pool
        kv = pool.req_to_token[req.req_pool_idx, : committed_kv_len(req)]
        self.token_to_kv_pool_allocator.free(kv.to(torch.int64, copy=True))
        pool.free(req.req_pool_idx)

    def cache_unfinished_req(self, req: CacheReq) -> None:
        assert req.req_pool_idx is not None, "cache_unfinished_req needs a request row"
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        req.prefix_indices = row[: len(req.fill_ids)].to(torch.int64, copy=True)

    def evict(self, num_tokens: int) -> int:
        return 0

    def inc_lock_ref(self, node: Any) -> int:
        return 0

    def dec_lock_ref(self, node: Any) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass

    def pretty_print(self) -> str:
        text = "ChunkCache(holds nothing)"
        print(text)
        return text
