"""CPU matmul with bfloat16 weights widened in registers (csrc/cpu_gemm_bf16.c), via ctypes.

The same C kernel takes float32 weights packed in the same layout (`pack_f32`; `linear_bf16w`
picks the entry by the packed tensor's dtype): layers/cpu_weight_layout.py uses it where
PyTorch's float32 GEMM is slow (MKL on non-Intel CPUs).

Owns loading and calling that C kernel; sgl_kernel.cpu_build compiles it on first use (gcc,
cached under `~/.cache/sglang/kernels`, torch's libgomp, so the kernel's threads are PyTorch's).
The flags name the instruction set (`-mavx512f -mfma`) rather than `-march=native`.

`available()` says whether the kernel can run here: x86-64 Linux with AVX-512F and FMA, and a
compiler that built it. When it cannot, callers keep PyTorch's own matmul; the reason is logged
once. Nothing here is imported by a CUDA server.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from sgl_kernel import cpu_build

SOURCE = Path(__file__).with_name("csrc") / "cpu_gemm_bf16.c"
CFLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp", "-fPIC", "-shared")
# Set to 0 to keep PyTorch's bf16 matmul (A/B measurements, or a suspected kernel problem).
ENABLE_ENV = "SGLANG_CPU_BF16_GEMM"

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _setup(lib: ctypes.CDLL) -> None:
    lib.sgl_cpu_pack_bf16.argtypes = [_P, _I, _I, _P, _C]
    lib.sgl_cpu_pack_bf16.restype = None
    lib.sgl_cpu_gemm_bf16w.argtypes = [_P, _I, _C, _I, _I, _P, _I, _P, _P, _C, _C]
    lib.sgl_cpu_gemm_bf16w.restype = _C
    lib.sgl_cpu_pack_f32.argtypes = [_P, _I, _I, _P, _C]
    lib.sgl_cpu_pack_f32.restype = None
    lib.sgl_cpu_gemm_f32w.argtypes = [_P, _I, _C, _I, _I, _P, _I, _P, _P, _C, _C]
    lib.sgl_cpu_gemm_f32w.restype = _C
    lib.sgl_cpu_gemm_block_cols.restype = _C


_library = cpu_build.LazyLibrary(
    SOURCE,
    CFLAGS,
    "sgl_cpu_gemm_bf16",
    _setup,
    label="CPU bf16-weight GEMM kernel",
    required=("avx512f", "fma"),
    enable_env=ENABLE_ENV,
    fallback="PyTorch's matmul runs",
)


def available() -> bool:
    """True when the kernel is built and loadable on this machine."""
    return _library.available()


def unavailable_reason() -> Optional[str]:
    return _library.unavailable_reason()


def block_cols() -> int:
    lib = _library.get()
    assert lib is not None, "the CPU bf16 GEMM kernel is not available"
    return int(lib.sgl_cpu_gemm_block_cols())


def _pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lib = _library.get()
    assert lib is not None, "the CPU bf16 GEMM kernel is not available"
    if weight.dtype != dtype or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"the packed layout takes a 2-D {dtype} CPU tensor")
    w = weight.contiguous()
    n, k = w.shape
    nr = block_cols()
    out = torch.empty(((n + nr - 1) // nr) * nr * k, dtype=dtype)
    entry = lib.sgl_cpu_pack_bf16 if dtype == torch.bfloat16 else lib.sgl_cpu_pack_f32
    entry(w.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A `[N, K]` bf16 weight in the kernel's blocked layout (a flat tensor, N padded to blocks)."""
    return _pack(weight, torch.bfloat16)


def pack_f32(weight: torch.Tensor) -> torch.Tensor:
    """A `[N, K]` float32 weight in the same blocked layout."""
    return _pack(weight, torch.float32)


def gemm_entry(lib: ctypes.CDLL, packed: torch.Tensor):
    """The C entry for a packed weight: `sgl_cpu_gemm_f32w` for `pack_f32`'s output, else
    `sgl_cpu_gemm_bf16w` (one signature, so callers holding function addresses can take either)."""
    return lib.sgl_cpu_gemm_f32w if packed.dtype is torch.float32 else lib.sgl_cpu_gemm_bf16w


def linear_bf16w(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`x @ W.T + bias` for a packed `W` of `n` rows; x float32 or bfloat16, out the same.

    `packed` comes from `pack_bf16` or `pack_f32` (its dtype picks the kernel's entry). `bias`,
    when given, must be a float32 tensor of `n` values.
    """
    lib = _library.lib
    if lib is None:
        lib = _library.get()
    # Decode calls this ~120 times a step with 2-D rows: no reshape or view when none is needed.
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    dtype = x2.dtype
    if dtype is not torch.float32 and dtype is not torch.bfloat16:
        raise TypeError(f"linear_bf16w takes float32 or bfloat16 input, not {dtype}")
    m, k = x2.shape
    bf16 = int(dtype is torch.bfloat16)
    y = torch.empty(m, n, dtype=dtype)
    rc = gemm_entry(lib, packed)(
        x2.data_ptr(),
        x2.stride(0),
        bf16,
        m,
        k,
        packed.data_ptr(),
        n,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        bf16,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("cpu bf16 GEMM: could not allocate the float32 copy of the input")
    return y if flat else y.view(*x.shape[:-1], n)


@torch.library.custom_op("sgl_kernel::cpu_linear_bf16w", mutates_args=())
def linear_bf16w_op(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """`linear_bf16w` as an opaque operator, for code that torch.compile traces."""
    return linear_bf16w(x, packed, n, bias)


@linear_bf16w_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, n: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n)
