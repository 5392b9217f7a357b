"""The cache-aware policy's approximate radix tree: the text each worker (tenant) was sent, at
character level, shared between tenants so one walk finds the worker holding the longest prefix.

A node belongs to a set of tenants, each with its last access time; a tenant that owns a node owns
its ancestors too (insertion marks the whole path, eviction removes leaves first), so the deepest
matched node names the workers that hold the whole matched prefix. Each tenant's size is the
number of characters on its nodes; `evict` trims every tenant to a bound, least recently used
leaves first. Only the router's event loop touches the tree, so it takes no locks.
"""

from __future__ import annotations

import heapq
import time
from typing import Iterable, Optional


class Node:
    __slots__ = ("children", "text", "tenants", "parent")

    def __init__(self, text: str, parent: Optional[Node]) -> None:
        self.children: dict[str, Node] = {}
        self.text = text
        self.tenants: dict[str, float] = {}
        self.parent = parent


def _common_len(edge: str, text: str, start: int) -> int:
    """Length of the common prefix of `edge` and `text[start:]` (binary search over C-level
    startswith calls rather than a Python loop over characters)."""
    if text.startswith(edge, start):
        return len(edge)
    lo, hi = 1, min(len(edge), len(text) - start)  # edge[0] == text[start] is known
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class Tree:
    def __init__(self) -> None:
        self.root = Node("", None)
        self.tenant_chars: dict[str, int] = {}

    def insert(self, text: str, tenant: str) -> None:
        now = time.monotonic()
        self.tenant_chars.setdefault(tenant, 0)
        node = self.root
        node.tenants[tenant] = now
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                leaf = Node(text[i:], node)
                leaf.tenants[tenant] = now
                node.children[text[i]] = leaf
                self.tenant_chars[tenant] += len(text) - i
                return
            k = _common_len(child.text, text, i)
            if k < len(child.text):
                child = self._split(child, k)
            if tenant not in child.tenants:
                self.tenant_chars[tenant] += len(child.text)
            child.tenants[tenant] = now
            node = child
            i += k

    def _split(self, child: Node, k: int) -> Node:
        parent = child.parent
        assert parent is not None
        mid = Node(child.text[:k], parent)
        mid.tenants = dict(child.tenants)
        parent.children[child.text[0]] = mid
        child.text = child.text[k:]
        child.parent = mid
        mid.children[child.text[0]] = child
        return mid

    def prefix_match(self, text: str, allowed: Iterable[str]) -> tuple[int, Optional[str]]:
        """(matched characters, tenant) for the deepest node some allowed tenant owns; among its
        owners the most recently used wins. (0, None) when no allowed tenant shares a prefix."""
        allowed = set(allowed)
        node, i = self.root, 0
        path: list[tuple[Node, int]] = []
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            k = _common_len(child.text, text, i)
            i += k
            node = child
            path.append((node, i))
            if k < len(child.text):
                break
        for node, matched in reversed(path):
            owners = [(t, ts) for t, ts in node.tenants.items() if t in allowed]
            if owners:
                return matched, max(owners, key=lambda o: o[1])[0]
        return 0, None

    def smallest_tenant(self, allowed: Iterable[str]) -> Optional[str]:
        return min(allowed, key=lambda t: self.tenant_chars.get(t, 0), default=None)

    def remove_tenant(self, tenant: str) -> None:
        stack = [self.root]
        while stack:
            node = stack.pop()
            node.tenants.pop(tenant, None)
            stack.extend(node.children.values())
        self._prune(self.root)
        self.tenant_chars.pop(tenant, None)

    def evict(self, max_chars: int) -> None:
        """Trim every tenant to at most max_chars, its least recently used leaves first."""
        for tenant, size in list(self.tenant_chars.items()):
            if size > max_chars:
                self._evict_tenant(tenant, max_chars)
        self._prune(self.root)

    def _evict_tenant(self, tenant: str, max_chars: int) -> None:
        heap: list[tuple[float, int, Node]] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            owned = [c for c in node.children.values() if tenant in c.tenants]
            if node is not self.root and not owned:
                heapq.heappush(heap, (node.tenants[tenant], id(node), node))
            stack.extend(owned)
        while self.tenant_chars[tenant] > max_chars and heap:
            _, _, node = heapq.heappop(heap)
            del node.tenants[tenant]
            self.tenant_chars[tenant] -= len(node.text)
            parent = node.parent
            if (
                parent is not None
                and parent is not self.root
                and not any(tenant in c.tenants for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))

    def _prune(self, node: Node) -> None:
        """Drop subtrees no tenant owns any more."""
        for key, child in list(node.children.items()):
            if child.tenants:
                self._prune(child)
            else:
                del node.children[key]
