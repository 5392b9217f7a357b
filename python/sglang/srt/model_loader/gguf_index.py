"""A fast GGUF header reader: metadata values and tensor locations, without the vocabulary.

`gguf.GGUFReader` turns every element of every metadata array into its own numpy view; for a
model's tokenizer arrays (tens of thousands of strings and merges) that took seconds of each
process's start-up, just to be skipped by the config reader. `GGUFIndex` walks the header once
with `struct`: scalar and small array values are decoded, the big tokenizer arrays only counted
(`<key>.count`), and each tensor gets a read-only memory-map view shaped as GGUFReader shapes it
(so `gguf.quants.dequantize` takes it unchanged). Little-endian GGUF v2 and v3 files only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from sglang.srt.model_loader.resolve import ModelLoadError

# Arrays whose values nothing here needs (the tokenizer reads them itself): only counted.
COUNTED_ONLY = frozenset(
    {
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.scores",
    }
)
_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format (little-endian).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
DEFAULT_ALIGNMENT = 32


@dataclass
class IndexedTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # dimensions as GGUF lists them, fastest-varying first
    data: np.ndarray  # read-only view of the file: elements, or raw bytes for block formats


class GGUFIndex:
    def __init__(self, path: str) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.path = path
        self._map = np.memmap(path, mode="r")
        self._buf = memoryview(self._map)
        self._pos = 0
        try:
            magic, version = self._raw(4), self._unpack("<I")
            if magic != b"GGUF" or version not in (2, 3):
                raise ModelLoadError(
                    f"{path}: not a little-endian GGUF v2/v3 file (magic {magic!r}, "
                    f"version {version})"
                )
            n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key, vtype = self._string(), self._unpack("<I")
                if key in COUNTED_ONLY and vtype == _ARRAY:
                    etype, count = self._unpack("<I"), self._unpack("<Q")
                    self._skip_array(etype, count)
                    self.metadata[f"{key}.count"] = count
                else:
                    self.metadata[key] = self._value(vtype, key)
            infos = [self._tensor_info() for _ in range(n_tensors)]
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"Cannot read GGUF file {path}: corrupt or truncated ({exc})")
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-self._pos // align) * align
        plain = {
            GGMLQuantizationType.F16: np.float16,
            GGMLQuantizationType.F32: np.float32,
            GGMLQuantizationType.F64: np.float64,
            GGMLQuantizationType.I8: np.int8,
            GGMLQuantizationType.I16: np.int16,
            GGMLQuantizationType.I32: np.int32,
            GGMLQuantizationType.I64: np.int64,
        }
        self.tensors: list[IndexedTensor] = []
        for name, dims, raw_type, offset in infos:
            qtype = GGMLQuantizationType(raw_type)
            np_dims = tuple(reversed(dims))
            n_elems = int(np.prod(dims)) if dims else 1
            block, type_size = GGML_QUANT_SIZES[qtype]
            item = plain.get(qtype)
            if item is None:  # block formats: raw bytes, one row of blocks per tensor row
                item, count = np.uint8, n_elems * type_size // block
                np_dims = quant_shape_to_byte_shape(np_dims, qtype)
            else:
                count = n_elems
            first = start + offset
            last = first + count * np.dtype(item).itemsize
            if last > len(self._map):
                raise ModelLoadError(f"Cannot read GGUF file {path}: tensor {name} is truncated")
            data = self._map[first:last].view(item).reshape(np_dims)
            self.tensors.append(IndexedTensor(name, qtype, np.array(dims, np.uint64), data))

    # ---- header primitives ---------------------------------------------------------------------
    def _raw(self, n: int) -> bytes:
        out = bytes(self._buf[self._pos : self._pos + n])
        if len(out) != n:
            raise ValueError("unexpected end of file")
        self._pos += n
        return out

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        return self._raw(self._unpack("<Q")).decode("utf-8")

    def _value(self, vtype: int, key: str) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype != _ARRAY:
            raise ValueError(f"unknown value type {vtype} of {key}")
        etype, count = self._unpack("<I"), self._unpack("<Q")
        return [self._value(etype, key) for _ in range(count)]

    def _skip_array(self, etype: int, count: int) -> None:
        if etype in _SCALARS:
            self._pos += count * struct.calcsize(_SCALARS[etype])
            return
        for _ in range(count):
            if etype == _STRING:
                self._pos += 8 + struct.unpack_from("<Q", self._buf, self._pos)[0]
            else:
                self._value(etype, "")

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
        return name, dims, self._unpack("<I"), self._unpack("<Q")
