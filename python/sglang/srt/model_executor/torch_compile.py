"""`--enable-torch-compile`: the decode forward through `torch.compile`, attention left eager.

Owns how the model runner compiles. Small decode batches (up to `--torch-compile-max-bs`, as
upstream) run a `torch.compile`d `model.forward`; extends and larger batches run eagerly. Every
`RadixAttention` call is excluded from tracing (`torch.compiler.disable`): the attention backends
build per-batch index metadata, read a KV pool whose used length changes every step and may
feed the attention capture, none of which has static shapes; so Dynamo compiles the segments
between attention calls (embedding, norms, projections, rotary, MLP, logits) and Inductor fuses
their elementwise work. Batch sizes are dynamic, so one compiled graph set serves every size
above 1 (size 1 is specialised, as Dynamo does).

`check_compiler_works` compiles a two-op function once at start-up, so a missing or broken C++
toolchain (CPU) or Triton (GPU) stops the server with one line instead of failing mid-request.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from sglang.srt.layers.radix_attention import RadixAttention

logger = logging.getLogger(__name__)


def check_compiler_works(device: str) -> None:
    """Raise RuntimeError (one line) when torch.compile cannot build a kernel for `device`."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0 + 1.0, dynamic=False)
        fn(torch.ones(8, device=device))
    except Exception as e:  # any failure of the toolchain means: do not serve with it
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"--enable-torch-compile: torch.compile does not work on {device} here "
            f"({type(e).__name__}: {reason[:200]}); start without --enable-torch-compile"
        ) from None


def compile_decode_forward(model: nn.Module, device: str) -> Callable:
    """A compiled `model.forward` whose attention layers run eagerly."""
    check_compiler_works(device)
    for module in model.modules():
        if isinstance(module, RadixAttention):
            # Eager callers (extends, large batches) go through the same wrapper; outside
            # compiled code it only sets and restores Dynamo's frame hook.
            module.forward = torch.compiler.disable(module.forward)
    logger.info("torch.compile: decode forward compiled on first use (attention stays eager)")
    return torch.compile(model.forward, dynamic=True)
