"""Shared helpers of the Triton kernels: availability check, block-size arithmetic, dot precision.

Owns nothing numeric. Triton is imported lazily so that `import sgl_kernel` works on machines
without it (CI, CPU development); Triton kernels run on CUDA tensors, or on CPU tensors under
Triton's interpreter (`TRITON_INTERPRET=1`), which is how the CPU tests check them.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    """Triton is importable (it may still lack a GPU: see `triton_usable`)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device | str) -> bool:
    """A Triton kernel can run on tensors of `device`: CUDA, or any device under the interpreter."""
    if not triton_available():
        return False
    return interpreting() or torch.device(device).type == "cuda"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_dtypes(*dtypes: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(operand dtype, dtype fed to `tl.dot`) for inputs of these dtypes.

    16-bit operands of one dtype run on tensor cores as they are (the products are exact in the
    float32 accumulator); anything else is cast to float32 and multiplied in full precision
    (kernels pass input_precision="ieee", never tf32). Triton's interpreter mis-multiplies
    bfloat16, so there the operands are rounded to bfloat16 and multiplied in float32, which gives
    the same products.
    """
    first = dtypes[0]
    if first in (torch.float16, torch.bfloat16) and all(d == first for d in dtypes):
        if first == torch.bfloat16 and interpreting():
            return first, torch.float32
        return first, first
    return torch.float32, torch.float32


def torch_to_tl_dtype(dtype: torch.dtype):  # -> tl.dtype
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[
        dtype
    ]


def as_heads(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[n, H*D] or [n, H, D] as a [n, H, D] tensor whose last dim is contiguous (a view if it can)."""
    if x.dim() == 2:
        try:
            x = x.view(x.shape[0], num_heads, head_dim)
        except RuntimeError:
            x = x.reshape(x.shape[0], num_heads, head_dim)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x
