"""The prefix-cache interface the scheduler programs against.

A prefix cache maps token-id prefixes to the KV slots that already hold their K/V, so an admitted
request only computes the tokens after its longest cached prefix. Two implementations exist:
`RadixCache` (radix_cache.py) and `ChunkCache` (chunk_cache.py, for --disable-radix-cache).

Protocol with the scheduler:
  * admission: `match_prefix(origin_input_ids + output_ids)` -> prefix slots and a node, then
    `inc_lock_ref(node)` so the prefix cannot be evicted while the request runs;
  * after each chunk of a chunked prefill: `cache_unfinished_req(req)`;
  * when the request finishes (or is retracted/aborted after its KV was written):
    `cache_finished_req(req)`, which also frees the request's ReqToTokenPool row;
  * when a request is retracted or aborted without caching: `release_req(req, kv_len)`;
  * under memory pressure: `evict(num_tokens)` before allocating again.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool


class CacheReq(Protocol):
    """The `Req` fields a prefix cache reads and writes (schedule_batch.Req satisfies it)."""

    origin_input_ids: list[int]
    output_ids: list[int]
    fill_ids: list[int]
    req_pool_idx: int | None
    prefix_indices: torch.Tensor
    last_node: Any


class MatchResult(NamedTuple):
    device_indices: torch.Tensor  # int64 KV slots of the matched prefix, on the pool's device
    last_node: Any  # the deepest matched node: lock it while the request uses the prefix


def committed_kv_len(req: CacheReq) -> int:
    """How many leading tokens of `origin_input_ids + output_ids` have KV in the pool.

    NOTE: the last sampled output token has no KV yet (it is the input of the next decode step).
    """
    return len(req.origin_input_ids) + max(len(req.output_ids) - 1, 0)


class BasePrefixCache(abc.ABC):
    req_to_token_pool: ReqToTokenPool | None
    token_to_kv_pool_allocator: TokenToKVPoolAllocator
    page_size: int

    @abc.abstractmethod
    def match_prefix(self, key: list[int]) -> MatchResult:
        """Longest cached prefix of `key` (page-aligned), refreshing its recency."""

    @abc.abstractmethod
    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Cache `value` (slots) for `key`; returns how long a prefix of `key` was already cached.

        The caller keeps ownership of `value[:returned_len]` (duplicates it must free itself).
        """

    @abc.abstractmethod
    def cache_finished_req(self, req: CacheReq) -> None:
        """Hand a finished request's KV to the cache, free the rest and the request's row."""

    @abc.abstractmethod
    def cache_unfinished_req(self, req: CacheReq) -> None:
        """Cache the KV of `req.fill_ids` so far and repoint the request at the cached copy."""

    @abc.abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots if possible; returns how many were freed."""

    @abc.abstractmethod
    def inc_lock_ref(self, node: Any) -> int:
        """Protect `node` and its ancestors from eviction; returns the change in evictable size."""

    @abc.abstractmethod
    def dec_lock_ref(self, node: Any) -> int:
        """Undo one `inc_lock_ref(node)`; returns the change in evictable size."""

    @abc.abstractmethod
    def evictable_size(self) -> int: ...

    @abc.abstractmethod
    def protected_size(self) -> int: ...

    @abc.abstractmethod
    def total_size(self) -> int: ...

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything cached (the caller clears the allocator alongside)."""

    @abc.abstractmethod
    def pretty_print(self) -> str:
        """Print and return a human-readable dump of the cache (debugging)."""

    def cache_owned_len(self, req: CacheReq) -> int:
        """How many leading slots of `req.prefix_indices` the cache owns (the rest: the request).

        RadixCache: the page-aligned part (an unaligned tail left by `cache_unfinished_req` is the
        request's). ChunkCache: none.
        """
        return 0

    def release_req(self, req: CacheReq, kv_len: int) -> None:
        """Drop a request without caching its KV (retraction, abort).

        Frees the slots the request owns among its first `kv_len` positions (those with KV
        written), its ReqToTokenPool row, and its lock. The request's fields are left as they are.
        """
        if req.req_pool_idx is None:
            return
        pool = self.req_to_token_pool
        assert pool is not None, "release_req needs a ReqToTokenPool"
        start = self.cache_owned_len(req)
        end = max(kv_len, len(req.prefix_indices))
        if end > start:
            self.token_to_kv_pool_allocator.free(
                pool.req_to_token[req.req_pool_idx, start:end].to(torch.int64, copy=True)
            )
        pool.free(req.req_pool_idx)
        self.dec_lock_ref(req.last_node)

    def check_invariant(self, total_slots: int | None = None) -> None:
        """Assert free + evictable + protected == total slots.

        Only meaningful when no request holds slots outside the cache (scheduler idle): running
        requests own the slots of their uncached tails.
        """
        allocator = self.token_to_kv_pool_allocator
        total = allocator.size if total_slots is None else total_slots
        free = allocator.available_size()
        evictable, protected = self.evictable_size(), self.protected_size()
        if free + evictable + protected != total:
            raise AssertionError(
                f"KV slot leak: free {free} + evictable {evictable} + protected {protected} = "
                f"{free + evictable + protected} != total {total} "
                f"({total - free - evictable - protected} slots unaccounted for)"
            )
