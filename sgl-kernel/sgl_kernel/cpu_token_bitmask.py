"""A grammar's token bitmask applied to CPU logits in place (csrc/cpu_token_bitmask.c), via ctypes.

Owns loading and calling that C kernel, and the PyTorch code that does the same where it cannot
run. `apply_token_bitmask_inplace(logits, bitmask, rows, vocab_size)` sets `logits[r, t] = -inf`
for every listed row `r` and token `t < vocab_size` whose bit (`bitmask[r, t // 32] >> (t % 32)
& 1`, xgrammar's int32 layout) is 0, and leaves every other value as it was: exactly xgrammar's
`apply_token_bitmask_inplace(logits, bitmask, vocab_size=..., indices=rows)`, in one call for all
rows; where the grammar blocks nearly every token of a 49k vocabulary it is about 80x faster than
xgrammar's CPU kernel (benchmark/results/structured_output_cpu.md).

The kernel is plain C (no instruction-set flags) built by sgl_kernel.cpu_build on first use.
`available()` says whether it can run here; when it cannot (no C compiler, not x86-64 Linux, or
`SGLANG_CPU_TOKEN_BITMASK=0`), or the logits are not float32 rows of unit stride, the PyTorch path
below runs; the reason is logged once. Constrained decoding (python/sglang/srt/constrained/
vocab_mask.py) asks `available()` first and otherwise keeps xgrammar's CPU kernel, which skips
all-allowed words and so beats the PyTorch path, whose cost is the same in every grammar state.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from sgl_kernel import cpu_build

SOURCE = Path(__file__).with_name("csrc") / "cpu_token_bitmask.c"
CFLAGS = ("-O3", "-fPIC", "-shared")
# Set to 0 to run the PyTorch path (A/B measurements, or a suspected kernel problem).
ENABLE_ENV = "SGLANG_CPU_TOKEN_BITMASK"

_P, _I = ctypes.c_void_p, ctypes.c_int64


def _setup(lib: ctypes.CDLL) -> None:
    lib.sgl_cpu_apply_token_bitmask.argtypes = [_P, _I, _P, _I, _P, _I, _I]
    lib.sgl_cpu_apply_token_bitmask.restype = None


_library = cpu_build.LazyLibrary(
    SOURCE,
    CFLAGS,
    "sgl_cpu_token_bitmask",
    _setup,
    label="CPU token-bitmask kernel",
    enable_env=ENABLE_ENV,
)


def available() -> bool:
    """True when the kernel is built and loadable on this machine."""
    return _library.available()


def unavailable_reason() -> Optional[str]:
    return _library.unavailable_reason()


def _check(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
    # The kernel writes through raw pointers: every index it will touch is checked here.
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError("expected 2-D logits and a 2-D int32 bitmask")
    if logits.device.type != "cpu" or bitmask.device.type != "cpu":
        raise ValueError("cpu_token_bitmask takes CPU tensors")
    if not 0 <= vocab_size <= logits.shape[1] or (vocab_size + 31) // 32 > bitmask.shape[1]:
        raise ValueError(
            f"vocab_size {vocab_size} does not fit logits {tuple(logits.shape)} "
            f"and bitmask {tuple(bitmask.shape)}"
        )
    if rows and (min(rows) < 0 or max(rows) >= min(logits.shape[0], bitmask.shape[0])):
        raise IndexError(f"row index out of range for logits {tuple(logits.shape)}")


def apply_token_bitmask_torch(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab_size: int
) -> None:
    """The PyTorch path: the same result as the kernel, for any dtype and strides."""
    if not rows or vocab_size == 0:
        return
    idx = torch.tensor(rows, dtype=torch.int64)
    words = (vocab_size + 31) // 32
    shifts = torch.arange(32, dtype=torch.int32)
    # `>>` on int32 is arithmetic, but `& 1` keeps just the bit asked for.
    allowed = ((bitmask[idx, :words].unsqueeze(-1) >> shifts) & 1).bool()
    blocked = ~allowed.reshape(len(rows), words * 32)[:, :vocab_size]
    cols = logits[idx, :vocab_size]
    logits[idx, :vocab_size] = cols.masked_fill(blocked, float("-inf"))


def apply_token_bitmask_inplace(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab_size: int
) -> None:
    """Block (-inf) the tokens `< vocab_size` whose bit is 0 in the listed rows, in place."""
    _check(logits, bitmask, rows, vocab_size)
    lib = _library.get()
    usable = (
        lib is not None
        and logits.dtype == torch.float32
        and logits.stride(1) == 1
        and bitmask.stride(1) == 1
    )
    if not usable:
        apply_token_bitmask_torch(logits, bitmask, rows, vocab_size)
        return
    if not rows:
        return
    lib.sgl_cpu_apply_token_bitmask(
        logits.data_ptr(),
        logits.stride(0),
        bitmask.data_ptr(),
        bitmask.stride(0),
        (ctypes.c_int64 * len(rows))(*rows),
        len(rows),
        vocab_size,
    )
