"""The top-n of log_softmax over chosen rows of CPU float32 logits (csrc/cpu_log_softmax_topk.c).

Owns loading and calling that C kernel through ctypes, and the PyTorch code that gives the same
result where it cannot run. `log_softmax_topk(logits, rows, n)` returns, for each listed row,
the n largest values of `log_softmax(logits[row])` (descending) and their columns (int32), the
same as `torch.log_softmax(logits[rows], -1).topk(n)` up to float32 rounding of the row's
log-sum-exp. The kernel reads the rows where they lie (no gather, nothing written back), once
for the top-n and once for the sum of exponentials; the logit lens (python/sglang/srt/layers/
layer_probe.py) calls it on the LM head's output.

Built by sgl_kernel.cpu_build on first use (gcc; an AVX-512 path picked at run time, else
portable C). `SGLANG_CPU_LOG_SOFTMAX_TOPK=0` runs the PyTorch path; so do non-CPU tensors,
logits that are not float32 with unit column stride, and n above `MAX_N`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional, Sequence

import torch

from sgl_kernel import cpu_build

SOURCE = Path(__file__).with_name("csrc") / "cpu_log_softmax_topk.c"
CFLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared")
ENABLE_ENV = "SGLANG_CPU_LOG_SOFTMAX_TOPK"
MAX_N = 64  # the C file's MAX_N
ISAS = {"auto": 0, "scalar": 1}

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _setup(lib: ctypes.CDLL) -> None:
    lib.sgl_cpu_log_softmax_topk.argtypes = [_P, _I, _I, _P, _I, _C, _P, _P, _C, _C]
    lib.sgl_cpu_log_softmax_topk.restype = _C


_library = cpu_build.LazyLibrary(
    SOURCE,
    CFLAGS,
    "sgl_cpu_log_softmax_topk",
    _setup,
    label="CPU log_softmax top-n kernel",
    enable_env=ENABLE_ENV,
    fallback="PyTorch's log_softmax and topk run instead",
)


def available() -> bool:
    """True when the kernel is built and loadable on this machine."""
    return _library.available()


def log_softmax_topk_torch(
    logits: torch.Tensor, rows: Sequence[int], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path: (values float32 [len(rows), n], ids int32), any device and dtype."""
    index = torch.as_tensor(rows, dtype=torch.int64, device=logits.device)
    values, ids = torch.log_softmax(logits[index].float(), dim=-1).topk(n, dim=-1)
    return values, ids.to(torch.int32)


def log_softmax_topk(
    logits: torch.Tensor, rows: Sequence[int], n: int, isa: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n of log_softmax of `logits[r]` for each r in `rows`: (values float32, ids int32),
    each [len(rows), n], values descending (ties: the lower column first)."""
    if logits.dim() != 2:
        raise ValueError(f"expected 2-D logits, got shape {tuple(logits.shape)}")
    vocab = logits.shape[1]
    if not 1 <= n <= vocab:
        raise ValueError(f"n must be in 1..{vocab}, not {n}")
    if rows and (min(rows) < 0 or max(rows) >= logits.shape[0]):
        raise IndexError(f"row index out of range for logits {tuple(logits.shape)}")
    lib = _library.lib or _library.get()
    usable = (
        lib is not None
        and logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.stride(1) == 1
        and n <= MAX_N
    )
    if not usable:
        return log_softmax_topk_torch(logits, rows, n)
    values = torch.empty(len(rows), n, dtype=torch.float32)
    ids = torch.empty(len(rows), n, dtype=torch.int32)
    if not rows:
        return values, ids
    rc = lib.sgl_cpu_log_softmax_topk(
        logits.data_ptr(),
        logits.stride(0),
        vocab,
        (ctypes.c_int64 * len(rows))(*rows),
        len(rows),
        n,
        values.data_ptr(),
        ids.data_ptr(),
        ISAS[isa or "auto"],
        torch.get_num_threads(),
    )
    assert rc == 0, "sgl_cpu_log_softmax_topk rejected checked arguments"
    return values, ids
