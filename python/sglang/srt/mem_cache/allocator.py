"""Free lists of KV slots: who may write which rows of the KV pool.

The scheduler asks an allocator for slots when it extends or decodes a batch and the prefix
caches give slots back when requests finish or tree nodes are evicted. Slots are int64 indices into
the KV pool (memory_pool.py); slot 0 (page 0 when paged) is the pool's padding page and is never
handed out.

Allocation policy (deterministic, tests assert it exactly), the same for slots and pages:
  * the free list starts ascending (1, 2, ..., N) and `alloc` always takes from its front;
  * `free` appends the freed ids to a separate release list and does not touch the free list;
  * when an allocation needs more ids than the free list holds but the two lists together have
    enough, the release list is merged in and the whole free list re-sorted ascending first;
  * an allocation that cannot be satisfied returns None and changes nothing (no merge either).
So freed ids are reused only once the ascending sweep over the free list runs dry, which keeps
`free` O(1)-ish (no sort per finished request).
"""

from __future__ import annotations

import torch


class TokenToKVPoolAllocator:
    """Allocator for page size 1: slots 1..size are usable."""

    def __init__(self, size: int, device: str | torch.device, page_size: int = 1) -> None:
        if page_size != 1:
            raise ValueError("TokenToKVPoolAllocator is for page_size 1; use create_allocator")
        if size <= 0:
            raise ValueError(f"allocator size must be positive, got {size}")
        self.page_size = 1
        self.num_pages = size
        self.size = size
        self.device = torch.device(device)
        self._grouping = False
        self._group: list[torch.Tensor] = []
        self.free_pages = torch.empty(0, dtype=torch.int64, device=self.device)
        self.release_pages = torch.empty(0, dtype=torch.int64, device=self.device)
        self.clear()

    # ---- free-list core (ids are pages; for page size 1 a page is a slot) ----------------------
    def clear(self) -> None:
        self.free_pages = torch.arange(1, self.num_pages + 1, dtype=torch.int64, device=self.device)
        self.release_pages = torch.empty(0, dtype=torch.int64, device=self.device)
        self._grouping = False
        self._group = []

    def available_size(self) -> int:
        """Free tokens (not pages)."""
        return (len(self.free_pages) + len(self.release_pages)) * self.page_size

    def _merge_released(self) -> None:
        merged = torch.cat([self.free_pages, self.release_pages])
        self.free_pages = torch.sort(merged).values
        self.release_pages = self.release_pages[:0]

    def _take_pages(self, num_pages: int) -> torch.Tensor | None:
        if num_pages > len(self.free_pages) + len(self.release_pages):
            return None
        if num_pages > len(self.free_pages):
            self._merge_released()
        taken = self.free_pages[:num_pages]
        self.free_pages = self.free_pages[num_pages:]
        return taken

    def _release(self, indices: torch.Tensor) -> None:
        self.release_pages = torch.cat([self.release_pages, indices])

    def free(self, indices: torch.Tensor) -> None:
        """Return slots to the allocator (deferred until `free_group_end` inside a group)."""
        if indices.numel() == 0:
            return
        indices = indices.to(device=self.device, dtype=torch.int64).reshape(-1)
        if self._grouping:
            self._group.append(indices)
        else:
            self._release(indices)

    def free_group_begin(self) -> None:
        """Batch the following frees into one (cheaper when many requests finish together)."""
        self._grouping = True
        self._group = []

    def free_group_end(self) -> None:
        self._grouping = False
        group, self._group = self._group, []
        if group:
            self.free(torch.cat(group))

    # ---- allocation ---------------------------------------------------------------------------
    def alloc(self, need_size: int) -> torch.Tensor | None:
        return self._take_pages(need_size)

    def alloc_extend(
        self,
        prefix_lens: list[int],
        seq_lens: list[int],
        last_loc: list[int],
        extend_num_tokens: int,
    ) -> torch.Tensor | None:
        """Slots for every request's new tokens, concatenated in request order."""
        _check_extend_total(prefix_lens, seq_lens, extend_num_tokens)
        return self.alloc(extend_num_tokens)

    def alloc_decode(self, seq_lens: list[int], last_loc: list[int]) -> torch.Tensor | None:
        """One slot per request (its token at position seq_len - 1)."""
        return self.alloc(len(seq_lens))


class PagedTokenToKVPoolAllocator(TokenToKVPoolAllocator):
    """Allocator handing out whole pages of `page_size` consecutive slots.

    `size` is rounded down to whole pages; pages 1..num_pages are usable (page p holds slots
    p * page_size .. p * page_size + page_size - 1) and page 0 is the pool's padding page.

    NOTE: every page has exactly one owner, the prefix tree or one request. A request fills its own
    last page token by token (`alloc_extend`/`alloc_decode` continue it), and the tree only stores
    whole pages. Hence the free rule: `free(indices)` frees every page that contains any of the
    given slots, and callers free whole-page tails of what they own.
    """

    def __init__(self, size: int, device: str | torch.device, page_size: int) -> None:
        if page_size <= 1:
            raise ValueError(f"paged allocator needs page_size > 1, got {page_size}")
        num_pages = size // page_size
        if num_pages <= 0:
            raise ValueError(f"allocator size {size} holds no page of {page_size}")
        self.page_size = page_size
        self.num_pages = num_pages
        self.size = num_pages * page_size
        self.device = torch.device(device)
        self._grouping = False
        self._group = []
        self.clear()

    def _release(self, indices: torch.Tensor) -> None:
        pages = torch.unique(torch.div(indices, self.page_size, rounding_mode="floor"))
        super()._release(pages)

    def _page_slots(self, pages: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.page_size, dtype=torch.int64, device=self.device)
        return (pages.unsqueeze(1) * self.page_size + offsets).reshape(-1)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """`need_size` slots taken from ceil(need_size / page_size) fresh pages."""
        pages = self._take_pages(-(-need_size // self.page_size))
        if pages is None:
            return None
        return self._page_slots(pages)[:need_size]

    def alloc_extend(
        self,
        prefix_lens: list[int],
        seq_lens: list[int],
        last_loc: list[int],
        extend_num_tokens: int,
    ) -> torch.Tensor | None:
        """New tokens first fill the rest of each request's last partial page, then fresh pages.

        `last_loc[i]` is the slot of request i's token at position prefix_lens[i] - 1; it is only
        read when that page is partially filled (prefix_lens[i] % page_size != 0).
        """
        _check_extend_total(prefix_lens, seq_lens, extend_num_tokens)
        p = self.page_size
        # Per request: (first slot continuing its page, how many continue it, how many are fresh).
        plan: list[tuple[int, int, int]] = []
        need_pages = 0
        for pre, seq, last in zip(prefix_lens, seq_lens, last_loc, strict=True):
            ext = seq - pre
            in_page = pre % p
            cont = min(ext, p - in_page) if in_page else 0
            if cont and (last < p or last % p != in_page - 1):
                raise ValueError(
                    f"last_loc {last} does not end a partial page holding {in_page} tokens "
                    f"(prefix_len {pre}, page_size {p})"
                )
            fresh = ext - cont
            need_pages += -(-fresh // p)
            plan.append((last + 1, cont, fresh))
        pages = self._take_pages(need_pages)
        if pages is None:
            return None
        page_ids = pages.tolist()
        out: list[int] = []
        k = 0
        for start, cont, fresh in plan:
            out.extend(range(start, start + cont))
            while fresh > 0:
                base, n = page_ids[k] * p, min(p, fresh)
                out.extend(range(base, base + n))
                k += 1
                fresh -= n
        return torch.tensor(out, dtype=torch.int64, device=self.device)

    def alloc_decode(self, seq_lens: list[int], last_loc: list[int]) -> torch.Tensor | None:
        return self.alloc_extend([s - 1 for s in seq_lens], seq_lens, last_loc, len(seq_lens))


def _check_extend_total(prefix_lens: list[int], seq_lens: list[int], total: int) -> None:
    if len(prefix_lens) != len(seq_lens):
        raise ValueError(f"{len(prefix_lens)} prefix_lens for {len(seq_lens)} seq_lens")
    if any(s < pre for pre, s in zip(prefix_lens, seq_lens)):
        raise ValueError(f"seq_lens {seq_lens} shorter than prefix_lens {prefix_lens}")
    want = sum(seq_lens) - sum(prefix_lens)
    if want != total:
        raise ValueError(f"extend_num_tokens {total} != sum(seq_lens - prefix_lens) {want}")


def create_allocator(
    size: int, page_size: int, device: str | torch.device
) -> TokenToKVPoolAllocator:
    if page_size == 1:
        return TokenToKVPoolAllocator(size, device)
    return PagedTokenToKVPoolAllocator(size, device, page_size)
