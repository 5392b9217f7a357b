"""RadixAttention prefix cache: a radix tree from token-id prefixes to KV slots.

The scheduler matches each admitted request against the tree (a hit costs only index writes into
ReqToTokenPool), locks the matched path while the request runs, hands the request's KV to the tree
when it finishes (or after each chunked-prefill chunk), and evicts least-recently-used unlocked
leaves when the allocator runs short. Slots owned by the tree are freed only by `evict`.

NOTE (sizes): every non-root node is either evictable (lock_ref == 0) or protected (lock_ref > 0)
and `evictable_size() + protected_size() == total_size()`. Locks always cover a node and all its
ancestors, so an unlocked node never has a locked descendant.

NOTE (pages): with page_size > 1 keys are cut to whole pages, children are keyed by their first
page, and every node holds a whole number of pages, so the tree owns whole pages only.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
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


@dataclass(eq=False)
class TreeNode:
    """One edge of the radix tree: `key` tokens whose KV lives in `value` slots."""

    id: int  # creation order; breaks LRU ties deterministically
    key: list[int]
    value: torch.Tensor  # int64 slots, len(value) == len(key)
    parent: TreeNode | None
    children: dict[Any, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0  # logical clock, larger = more recent

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


class RadixCache(BasePrefixCache):
    def __init__(
        self,
        req_to_token_pool: ReqToTokenPool | None,
        token_to_kv_pool_allocator: TokenToKVPoolAllocator,
        page_size: int = 1,
    ) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        self.device = token_to_kv_pool_allocator.device
        self.reset()

    # ---- bookkeeping --------------------------------------------------------------------------
    def reset(self) -> None:
        self._clock = 0
        self._next_id = 0
        self.root_node = self._new_node([], self._empty(), None)
        # NOTE: the root holds no tokens and a permanent lock, so it is never an eviction candidate.
        self.root_node.lock_ref = 1
        self._evictable = 0
        self._protected = 0

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _new_node(self, key: list[int], value: torch.Tensor, parent: TreeNode | None) -> TreeNode:
        node = TreeNode(id=self._next_id, key=key, value=value, parent=parent)
        self._next_id += 1
        node.last_access = self._tick()
        return node

    def _child_key(self, key: list[int]) -> Any:
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _aligned(self, n: int) -> int:
        return n - n % self.page_size

    def _match_len(self, a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return self._aligned(n)

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first n tokens; returns the new upper node holding them."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        upper = self._new_node(child.key[:n], child.value[:n], parent)
        # The upper half inherits locks (a lock on child covers its ancestors) and recency.
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        parent.children[self._child_key(child.key)] = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        return upper

    def _walk(self, key: list[int]) -> tuple[TreeNode, list[torch.Tensor], int]:
        """Follow `key` down the tree, splitting where the match ends inside a node.

        Touches every matched node (root to leaf, so deeper nodes end up more recent).
        Returns the deepest matched node, the matched values in order, and the matched length.
        """
        node, values, matched = self.root_node, [], 0
        while matched < len(key):
            rest = key[matched:]
            child = node.children.get(self._child_key(rest))
            if child is None:
                break
            child.last_access = self._tick()
            n = self._match_len(child.key, rest)
            split = n < len(child.key)
            if split:
                child = self._split(child, n)
            values.append(child.value)
            node, matched = child, matched + n
            if split:
                break
        return node, values, matched

    # ---- public API ---------------------------------------------------------------------------
    def match_prefix(self, key: list[int]) -> MatchResult:
        key = key[: self._aligned(len(key))]
        node, values, _ = self._walk(key)
        indices = torch.cat(values) if values else self._empty()
        return MatchResult(device_indices=indices, last_node=node)

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        if len(key) != len(value):
            raise ValueError(f"insert: {len(key)} tokens but {len(value)} slots")
        aligned = self._aligned(len(key))
        key = list(key[:aligned])
        node, _, matched = self._walk(key)
        if matched < aligned:
            # The tree keeps its own copy: callers pass views of req_to_token rows.
            new_value = value[matched:aligned].to(device=self.device, dtype=torch.int64).clone()
            leaf = self._new_node(key[matched:], new_value, node)
            node.children[self._child_key(leaf.key)] = leaf
            self._evictable += len(leaf.key)
        return matched

    def inc_lock_ref(self, node: TreeNode | None) -> int:
        delta = 0
        while node is not None and node is not self.root_node:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
                delta -= len(node.key)
            node.lock_ref += 1
            node = node.parent
        return delta

    def dec_lock_ref(self, node: TreeNode | None) -> int:
        delta = 0
        while node is not None and node is not self.root_node:
            if node.lock_ref <= 0:
                raise AssertionError(f"dec_lock_ref on unlocked {node}")
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
                delta += len(node.key)
            node.lock_ref -= 1
            node = node.parent
        return delta

    def evict(self, num_tokens: int) -> int:
        """Remove LRU unlocked leaves until `num_tokens` slots are freed or nothing is left.

        Whole leaves are freed, so the result may exceed `num_tokens`.
        """
        if num_tokens <= 0:
            return 0
        heap = [(n.last_access, n.id, n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed, released = 0, []
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            released.append(node.value)
            freed += len(node.key)
            del parent.children[self._child_key(node.key)]
            self._evictable -= len(node.key)
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        if released:
            # One free call; with page size 1 the release list records the eviction order.
            self.token_to_kv_pool_allocator.free(torch.cat(released))
        return freed

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return sum(len(n.key) for n in self._nodes())

    # ---- request hooks ------------------------------------------------------------------------
    def cache_owned_len(self, req: CacheReq) -> int:
        return self._aligned(len(req.prefix_indices))

    def cache_finished_req(self, req: CacheReq) -> None:
        if req.req_pool_idx is None:
            return  # never got a row: nothing was written to the pool
        pool = self._req_pool()
        n = committed_kv_len(req)
        token_ids = (req.origin_input_ids + req.output_ids)[:n]
        kv = pool.req_to_token[req.req_pool_idx, :n].to(torch.int64, copy=True)
        aligned = self._aligned(n)
        new_prefix_len = self.insert(token_ids[:aligned], kv[:aligned])
        # Slots in [own_start, new_prefix_len) duplicate what the tree already had; [aligned, n)
        # is the unaligned tail the tree cannot hold. Both are whole pages owned by this request.
        own_start = self.cache_owned_len(req)
        self.token_to_kv_pool_allocator.free(
            torch.cat([kv[own_start:new_prefix_len], kv[aligned:]])
        )
        pool.free(req.req_pool_idx)
        self.dec_lock_ref(req.last_node)

    def cache_unfinished_req(self, req: CacheReq) -> None:
        """Cache `req.fill_ids`'s KV after a prefill chunk; the request keeps its row.

        Afterwards `req.prefix_indices` covers all of `fill_ids`: the tree's slots for the
        page-aligned part, then the request's own slots for the unaligned tail (page_size > 1 only),
        which the next extend continues filling. `req.last_node` holds the lock on the tree part.
        """
        assert req.req_pool_idx is not None, "cache_unfinished_req needs a request row"
        pool = self._req_pool()
        row, token_ids = req.req_pool_idx, req.fill_ids
        n = len(token_ids)
        kv = pool.req_to_token[row, :n].to(torch.int64, copy=True)
        aligned = self._aligned(n)
        new_prefix_len = self.insert(token_ids[:aligned], kv[:aligned])
        own_start = self.cache_owned_len(req)
        self.token_to_kv_pool_allocator.free(kv[own_start:new_prefix_len])

        new_indices, new_node = self.match_prefix(token_ids[:aligned])
        assert len(new_indices) == aligned, (len(new_indices), aligned)
        # The freed duplicates must no longer be referenced: point the row at the tree's slots.
        pool.req_to_token[row, own_start:aligned] = new_indices[own_start:]
        self.inc_lock_ref(new_node)
        self.dec_lock_ref(req.last_node)
        req.prefix_indices = torch.cat([new_indices, kv[aligned:]])
        req.last_node = new_node

    # ---- debugging ----------------------------------------------------------------------------
    def pretty_print(self) -> str:
        lines = [
            f"RadixCache(page_size={self.page_size}, evictable={self._evictable}, "
            f"protected={self._protected})"
        ]
        top = reversed(self._sorted_children(self.root_node))
        stack: list[tuple[TreeNode, int]] = [(c, 1) for c in top]
        while stack:
            node, depth = stack.pop()
            head = node.key[:8]
            more = "..." if len(node.key) > 8 else ""
            lines.append(
                f"{'  ' * depth}id={node.id} len={len(node.key)} key={head}{more} "
                f"slots={node.value[:8].tolist()}{more} lock={node.lock_ref} t={node.last_access}"
            )
            stack.extend((c, depth + 1) for c in reversed(self._sorted_children(node)))
        text = "\n".join(lines)
        print(text)
        return text

    # ---- helpers ------------------------------------------------------------------------------
    def _req_pool(self) -> ReqToTokenPool:
        if self.req_to_token_pool is None:
            raise RuntimeError("request hooks need a ReqToTokenPool")
        return self.req_to_token_pool

    @staticmethod
    def _sorted_children(node: TreeNode) -> list[TreeNode]:
        return sorted(node.children.values(), key=lambda c: c.id)

    def _nodes(self) -> list[TreeNode]:
        """Every non-root node."""
        out, stack = [], list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _leaves(self) -> list[TreeNode]:
        return [n for n in self._nodes() if not n.children]
