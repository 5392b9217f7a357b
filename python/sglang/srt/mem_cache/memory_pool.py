"""KV memory tensors: the request-row table and the per-layer K/V buffers.

`ReqToTokenPool` maps (request row, position) -> KV slot; the scheduler allocates one row per
running request and writes the slots the allocator hands out into it, and the attention backends
read it. `MHATokenToKVPool` owns the K and V tensors of every layer, indexed by slot; attention
layers write the new tokens' K/V through `set_kv_buffer` and read whole buffers. Which slots are
free is not known here: that is the allocator's job (allocator.py).

Float8 pools (`--kv-cache-dtype fp8_e4m3|fp8_e5m2`) hold one byte per element. A layer's K/V are
stored divided by its per-tensor scale (`k_scale`/`v_scale`, 1.0 unless a checkpoint provides
one) and saturated to the format's largest finite value; readers get the float8 view, widen it
and apply the scales (`kv_scales`) by folding them into the softmax scale and the output.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

# Dtypes that some torch builds cannot index_put into; they are stored as raw bytes.
_BYTE_STORED_DTYPES = tuple(
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d
)


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in _BYTE_STORED_DTYPES


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """`x / scale` in `dtype`; float8 saturates at its largest finite value (e4m3fn has no
    infinity, and an outlier key must not turn into NaN or inf for every later query)."""
    if not is_float8(dtype):
        return x.to(dtype)
    if scale != 1.0:
        x = x / scale
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype)


class ReqToTokenPool:
    """A table of `size` rows, each holding the KV slots of one request's positions.

    Rows are handed out lowest-index first so runs are reproducible. Slots are int32, as upstream
    (a pool never has 2**31 slots): the table spans every row's whole context, so it is half the
    memory of int64; readers that keep slots widen them to int64 (the allocator's dtype).
    """

    DTYPE = torch.int32

    @staticmethod
    def size_bytes(size: int, max_context_len: int) -> int:
        """Bytes of the table, for the memory budget before the KV pool is sized."""
        return size * max_context_len * ReqToTokenPool.DTYPE.itemsize

    def __init__(self, size: int, max_context_len: int, device: str | torch.device) -> None:
        if size <= 0 or max_context_len <= 0:
            raise ValueError(f"bad ReqToTokenPool shape ({size}, {max_context_len})")
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros(
            (size, max_context_len), dtype=self.DTYPE, device=self.device
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
        # NOTE: left uninitialized (zero-filling gigabytes on a CPU took most of a start-up, and
        # torch.empty commits host pages only as slots are first written): attention reads a slot
        # only after its K/V were written, except the padding page, which padded key positions
        # point at behind a mask. A 0 * NaN there would poison whole rows, so it is zeroed.
        self.k_buffer: list[torch.Tensor] = [self._new_buffer(shape) for _ in range(layer_num)]
        self.v_buffer: list[torch.Tensor] = [self._new_buffer(shape) for _ in range(layer_num)]

    def _new_buffer(self, shape: tuple[int, int, int]) -> torch.Tensor:
        buf = torch.empty(shape, dtype=self.store_dtype, device=self.device)
        buf[: self.page_size].zero_()
        return buf

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

    def kv_scales(self, layer: Any) -> tuple[float, float]:
        """(k_scale, v_scale) that `layer`'s stored K/V carry: its own scales in a float8 pool,
        1.0 otherwise (wider pools store K/V as they are, as upstream does)."""
        if not is_float8(self.dtype):
            return 1.0, 1.0
        return float(getattr(layer, "k_scale", 1.0)), float(getattr(layer, "v_scale", 1.0))

    def set_kv_buffer(
        self,
        layer_id: int,
        loc: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        """Write K/V of `len(loc)` tokens into their slots, cast to the pool dtype.

        `cache_k`/`cache_v` may be [n, head_num, head_dim] or [n, head_num * head_dim]; a float8
        pool stores them divided by `k_scale`/`v_scale` (the layer's per-tensor scales).
        """
        shape = (-1, self.head_num, self.head_dim)
        k = quantize_kv(cache_k.reshape(shape), self.dtype, k_scale)
        v = quantize_kv(cache_v.reshape(shape), self.dtype, v_scale)
        if self.store_dtype != self.dtype:
            k, v = k.view(self.store_dtype), v.view(self.store_dtype)
        self.k_buffer[layer_id][loc] = k
        self.v_buffer[layer_id][loc] = v
