"""CPU matmul on GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K weights kept packed (csrc/cpu_gemm_gguf.c).

Owns packing a weight's decoded blocks into the kernel's interleaved layout and calling the
kernel through ctypes; sgl_kernel.cpu_build compiles it on first use (gcc, cached under
`~/.cache/sglang/kernels`, torch's libgomp). The C file carries AVX-512 VNNI, AVX2 and portable C
paths picked at run time, so the only requirement is x86-64 Linux and a C compiler.

Every format is `w = d * (code - zp) + mn` per 32-weight block of a row (see the C file). The
activations are quantized per row and 32-block inside each call, so the output differs from a
matmul on the dequantized weights by that rounding alone. `SGLANG_CPU_GGUF_ACT` picks it:
`int8x2` (default: an int8 code plus the int8 code of its residual, about 15 bits; on SmolLM2's
real activations ~4e-5 relative error per layer, below bfloat16 activations' ~2e-3) or `int8`
(llama.cpp's scheme, half the integer dot products; ~1e-2 per layer, enough to change greedy
tokens of the default model). Measured in docs/quantization.md. `SGLANG_CPU_GGUF_ISA` =
`avx512` | `avx2` | `scalar` pins a code path (default: the best this CPU runs); all give the
same numbers. `amx` (AMX-INT8 tiles, the same numbers too) is what the default picks on CPUs that
have it for calls of 32 rows or more (prefill, large batches): 1.05-1.3x the AVX-512 path there,
slower below (docs/quantization.md).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from sgl_kernel import cpu_build

SOURCE = Path(__file__).with_name("csrc") / "cpu_gemm_gguf.c"
CFLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared")
ISA_ENV = "SGLANG_CPU_GGUF_ISA"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "amx": 4}
ACT_ENV = "SGLANG_CPU_GGUF_ACT"
ACTS = {"int8x2": 2, "int8": 1}  # activation quantization: int8 passes per value
BLOCK = 32


class Format(NamedTuple):
    bits: int
    zp: int  # integer offset of the codes
    has_min: bool
    scale_f32: bool  # scales kept as float32 (else float16, exact for the GGUF's own float16)


FORMATS = {
    "Q4_0": Format(4, 8, False, False),
    "Q4_1": Format(4, 0, True, False),
    "Q8_0": Format(8, 128, False, False),
    # Q4_K's sub-block scale d * sc is a product of a float16 and a 6-bit integer.
    "Q4_K": Format(4, 0, True, True),
}

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _setup(lib: ctypes.CDLL) -> None:
    lib.sgl_gguf_record_bytes.argtypes = [_C, _C, _C]
    lib.sgl_gguf_record_bytes.restype = _I
    lib.sgl_gguf_best_isa.restype = _C
    lib.sgl_gguf_amx_usable.restype = _C
    lib.sgl_gguf_pack.argtypes = [_P, _P, _P, _I, _I, _C, _C, _P, _C]
    lib.sgl_gguf_pack.restype = None
    lib.sgl_gguf_gemm.argtypes = [*(_P, _I, _C, _I, _I, _P, _I), *(_C,) * 4, _P, _P, *(_C,) * 4]
    lib.sgl_gguf_gemm.restype = _C


def _precheck() -> str:
    # A malformed setting is an error, not a reason to fall back quietly.
    if os.environ.get(ISA_ENV, "auto") not in ISAS:
        raise ValueError(f"{ISA_ENV} must be one of {sorted(ISAS)}")
    activation_mode()
    return ""


_library = cpu_build.LazyLibrary(SOURCE, CFLAGS, "sgl_cpu_gemm_gguf", _setup, _precheck, __name__)


def _load() -> Optional[ctypes.CDLL]:
    return _library.get()


def available() -> bool:
    return _library.available()


def unavailable_reason() -> Optional[str]:
    return _library.unavailable_reason()


def isa_name(isa: Optional[str] = None) -> str:
    """The path a call runs: `isa`, else $SGLANG_CPU_GGUF_ISA, else the best one here (whose
    AVX-512 calls of 32 rows or more run on AMX where the CPU has it: `amx_usable`)."""
    lib = _load()
    assert lib is not None, f"the CPU GGUF kernel is not available: {_library.reason}"
    code = isa_code(isa) or int(lib.sgl_gguf_best_isa())
    return next(name for name, c in ISAS.items() if c == code)


def amx_usable() -> bool:
    """Whether this CPU has AMX-INT8 and Linux grants this process its tile registers."""
    lib = _load()
    return lib is not None and bool(lib.sgl_gguf_amx_usable())


def isa_code(isa: Optional[str] = None) -> int:
    """The kernel's code for `isa`, else $SGLANG_CPU_GGUF_ISA (0: the best path here)."""
    name = isa or os.environ.get(ISA_ENV, "auto")
    if name == "amx" and not amx_usable():
        raise RuntimeError(f"{ISA_ENV}=amx: this CPU (or the OS) does not run AMX-INT8 tiles")
    return ISAS[name]


def activation_mode(act: Optional[str] = None) -> str:
    """The activation quantization a call uses: `act`, else $SGLANG_CPU_GGUF_ACT, else int8x2."""
    mode = act or os.environ.get(ACT_ENV, "int8x2")
    if mode not in ACTS:
        raise ValueError(f"{ACT_ENV} must be one of {sorted(ACTS)}, not {mode!r}")
    return mode


def pack(
    codes: torch.Tensor, scale: torch.Tensor, mins: Optional[torch.Tensor], qtype: str
) -> torch.Tensor:
    """The kernel's layout of one weight from its unsigned codes uint8 [n, k] and float32 scale
    (and, for Q4_1 / Q4_K, mins) [n, k / 32]; a flat uint8 tensor."""
    lib = _load()
    assert lib is not None, f"the CPU GGUF kernel is not available: {_library.reason}"
    fmt = FORMATS[qtype]
    n, k = codes.shape
    if codes.dtype != torch.uint8 or k % BLOCK or tuple(scale.shape) != (n, k // BLOCK):
        raise ValueError(
            f"pack takes uint8 codes [n, k % 32 == 0] and scales [n, k / 32] ({qtype})"
        )
    if fmt.has_min != (mins is not None):
        raise ValueError(f"{qtype} {'needs' if fmt.has_min else 'has no'} mins")
    store = torch.float32 if fmt.scale_f32 else torch.float16
    parts = [scale] + ([mins] if mins is not None else [])
    stored = [p.float().to(store).contiguous() for p in parts]
    for p, s in zip(parts, stored):
        if not torch.equal(s.float(), p.float()):
            raise ValueError(f"{qtype} scales are not exact in {store}")
    nt = (n + 15) // 16
    rec = int(lib.sgl_gguf_record_bytes(fmt.bits, int(fmt.has_min), int(fmt.scale_f32)))
    out = torch.empty(nt * (k // BLOCK) * rec, dtype=torch.uint8)
    lib.sgl_gguf_pack(
        codes.contiguous().data_ptr(),
        stored[0].data_ptr(),
        stored[1].data_ptr() if fmt.has_min else None,
        n,
        k,
        fmt.bits,
        int(fmt.scale_f32),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def linear_gguf(
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    qtype: str,
    bias: Optional[torch.Tensor] = None,
    isa: Optional[str] = None,
    act: Optional[str] = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for a packed `W` of `n` rows; x float32 or bfloat16, out the same.

    `bias`, when given, must be a float32 tensor of `n` values.
    """
    lib = _library.lib or _load()
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"linear_gguf takes float32 or bfloat16 input, not {x2.dtype}")
    fmt = FORMATS[qtype]
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype)
    rc = lib.sgl_gguf_gemm(
        x2.data_ptr(),
        x2.stride(0),
        int(x2.dtype == torch.bfloat16),
        m,
        k,
        packed.data_ptr(),
        n,
        fmt.bits,
        fmt.zp,
        int(fmt.has_min),
        int(fmt.scale_f32),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        int(y.dtype == torch.bfloat16),
        ACTS[activation_mode(act)],
        isa_code(isa),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("cpu GGUF GEMM: could not allocate the quantized copy of the input")
    return y.view(*x.shape[:-1], n)


@torch.library.custom_op("sgl_kernel::cpu_linear_gguf", mutates_args=())
def linear_gguf_op(
    x: torch.Tensor, packed: torch.Tensor, n: int, qtype: str, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """`linear_gguf` as an opaque operator, for code that torch.compile traces."""
    return linear_gguf(x, packed, n, qtype, bias)


@linear_gguf_op.register_fake
def _(
    x: torch.Tensor, packed: torch.Tensor, n: int, qtype: str, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n)
