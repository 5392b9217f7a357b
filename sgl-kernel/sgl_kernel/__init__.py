"""sgl_kernel: the engine's compute kernels.

Every op has a pure-torch reference in `ref` that defines its exact semantics (it matches
HuggingFace transformers' float behaviour) and runs on any device. Triton kernels for CUDA plug in
behind the same names later; importing this package never requires a GPU or Triton.
"""

from sgl_kernel.ref import (
    apply_rotary_emb,
    fused_add_rmsnorm,
    rmsnorm,
    rotary_cos_sin,
    silu_and_mul,
)

__all__ = ["apply_rotary_emb", "fused_add_rmsnorm", "rmsnorm", "rotary_cos_sin", "silu_and_mul"]
