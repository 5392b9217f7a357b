"""KV memory tensors: the request-row table and the per-layer K/V buffers.

`ReqToTokenPool` maps (request row, position) -> KV slot; the scheduler allocates one row per
running request and writes the slots the allocator hands out into it, and the attention backends
read it. `MHATokenToKVPool` owns the K and V tensors of every layer, indexed by slot; attention
layers write the new tokens' K/V through `set_kv_buffer` and read whole buffers. Which slots are
free is not known here: that is the allocator's job (allocator.py).
"""

from __future__ import annotations

import bisect

import torch

# Dtypes that some torch builds cannot index_put into; they are stored as raw bytes.
_BYTE_STORED_DTYPES = tuple(
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d
)


class ReqToTokenPool:
    """A table of `size` rows, each holding the KV slots of one request's positions.

    Rows are handed out lowest-index first so runs are reproducible.
    """

    def __init__(self, size: int, max_context_len: int, device: str | torch.device) -> None:
        if size <= 0 or max_context_len <= 0:
            raise ValueError(f"bad ReqToTokenPool shape ({size}, {max_context_len})")
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros(
            (size, max_context_len), dtype=torch.int64, device=self.device
        )
        self._free_rows: list[int] = []
        self._is_free: list[bool] = []
        self.clear()

    def available_size(self) -> int:
        return len(self._free_rows)

    def alloc(self, need_size: int = 1) -> list[int] | None:
        """Take the `need_size` lowest free rows, or return None (and change nothing)."""
        if need_size > len(self._free_rows):
            return None
        rows = self._free_rows[:need_size]
        del self._free_rows[:need_size]
        for r in rows:
            self._is_free[r] = False
        return rows

    def free(self, idx: int | list[int]) -> None:
        rows = [idx] if isinstance(idx, int) else list(idx)
        for r in rows:
            if self._is_free[r]:
                raise ValueError(f"ReqToTokenPool row {r} freed twice")
            self._is_free[r] = True
            # NOTE: the free list stays sorted so alloc always returns the lowest rows.
            bisect.insort(self._free_rows, r)

    def clear(self) -> None:
        self._free_rows = list(range(self.size))
        self._is_free = [True] * self.size


class MHATokenToKVPool:
    """Per-layer K and V buffers of shape [size + page_size, head_num, head_dim].

    NOTE: slots 0 .. page_size-1 form a reserved padding page. The allocator never hands them out;
    padded tokens (e.g. CUDA-graph padding) write their K/V there, so no real slot is clobbered.
    Usable slots are page_size .. size + page_size - 1 (page size 1: 1 .. size).
    """

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str | torch.device,
    ) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.size = size
        self.page_size = page_size
        self.dtype = dtype
        self.head_num = head_num
        self.head_dim = head_dim
        self.layer_num = layer_num
        self.device = torch.device(device)
        self.store_dtype = torch.uint8 if dtype in _BYTE_STORED_DTYPES else dtype
        shape = (size + page_size, head_num, head_dim)
        self.k_buffer: list[torch.Tensor] = [
            torch.zeros(shape, dtype=self.store_dtype, device=self.device) for _ in range(layer_num)
        ]
        self.v_buffer: list[torch.Tensor] = [
            torch.zeros(shape, dtype=self.store_dtype, device=self.device) for _ in range(layer_num)
        ]

    @staticmethod
    def cell_size_bytes(head_num: int, head_dim: int, layer_num: int, dtype: torch.dtype) -> int:
        """Bytes one token slot costs across all layers, K and V together."""
        return head_num * head_dim * layer_num * 2 * dtype.itemsize

    def get_kv_size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_buffer + self.v_buffer)

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.dtype) if self.store_dtype != self.dtype else t

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self._view(self.k_buffer[layer_id])

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self._view(self.v_buffer[layer_id])

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def set_kv_buffer(
        self, layer_id: int, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor
    ) -> None:
        """Write K/V of `len(loc)` tokens into their slots, cast to the pool dtype.

        `cache_k`/`cache_v` may be [n, head_num, head_dim] or [n, head_num * head_dim].
        """
        shape = (-1, self.head_num, self.head_dim)
        k = cache_k.reshape(shape).to(self.dtype)
        v = cache_v.reshape(shape).to(self.dtype)
        if self.store_dtype != self.dtype:
            k, v = k.view(self.store_dtype), v.view(self.store_dtype)
        self.k_buffer[layer_id][loc] = k
        self.v_buffer[layer_id][loc] = v
