"""Attention backends, created by name with lazy imports (GPU-only ones need triton/flashinfer).

`create_attention_backend(name, runner)` builds one backend; `create_model_attention_backend`
builds the runner's: one backend, or a `HybridAttnBackend` when `--prefill-attention-backend` and
`--decode-attention-backend` resolve to different ones. `triton` runs on CUDA, or on CPU tensors
under Triton's interpreter when SGLANG_TRITON_INTERPRET_OK=1 and TRITON_INTERPRET=1 (tests);
other CPU runs fall back to torch_native with a warning. `flashinfer` is not built: it falls back
to triton where that runs, else torch_native. On a CUDA device without Triton installed, `triton` (and `flashinfer`, which is not built and
stands in as triton) is refused with one line naming the `gpu` extra: the dense torch_native path
would materialise [q, k] score matrices and run out of memory on long prompts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def triton_backend_usable(device: Any) -> bool:
    """The triton backend can run on `device`: Triton imports and the device is CUDA (with a GPU),
    or the interpreter is on and SGLANG_TRITON_INTERPRET_OK=1 allows CPU tensors."""
    try:
        from sgl_kernel.triton_common import interpreting, triton_available
    except ImportError:
        return False
    if not triton_available():
        return False
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.is_available()
    return os.environ.get("SGLANG_TRITON_INTERPRET_OK") == "1" and interpreting()


TRITON_MISSING = (
    "Triton is not installed, and the GPU attention path needs it: install the gpu extra "
    "(pip install 'sglang[gpu]', or `make install`, which adds it on a CUDA machine)"
)


class TritonMissingError(ValueError):
    """A CUDA device would run Triton attention, and Triton is not installed."""


def check_triton_installed(device: Any, names: list[str]) -> None:
    """Raise TritonMissingError when a CUDA device would run `triton`/`flashinfer` without
    Triton importable (the launch check; torch_native chosen by name stays allowed)."""
    if not str(device).startswith("cuda") or not set(names) & {"triton", "flashinfer"}:
        return
    from sgl_kernel.triton_common import triton_available

    if not triton_available():
        raise TritonMissingError(TRITON_MISSING)


def resolve_attention_backend(name: str, device: Any) -> str:
    """The backend that `name` runs as on `device` (warning when it falls back)."""
    check_triton_installed(device, [name])
    if name == "flashinfer":
        fallback = "triton" if triton_backend_usable(device) else "torch_native"
        logger.warning("attention backend 'flashinfer' is not built; using %s", fallback)
        return fallback
    if name == "triton" and not triton_backend_usable(device):
        logger.warning(
            "attention backend 'triton' needs Triton and a CUDA device (device=%s); "
            "using torch_native",
            device,
        )
        return "torch_native"
    return name


def create_attention_backend(name: str, model_runner: Any):
    name = resolve_attention_backend(name, model_runner.device)
    if name == "triton":
        from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

        return TritonAttnBackend(model_runner)
    if name == "torch_native":
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        return TorchNativeAttnBackend(model_runner)
    raise ValueError(
        f"unknown attention backend {name!r} (choose torch_native, triton or flashinfer)"
    )


def create_model_attention_backend(model_runner: Any):
    """The runner's backend from its server args (prefill/decode default to --attention-backend)."""
    args = model_runner.server_args
    default, device = args.attention_backend, model_runner.device
    prefill = resolve_attention_backend(
        getattr(args, "prefill_attention_backend", None) or default, device
    )
    decode = resolve_attention_backend(
        getattr(args, "decode_attention_backend", None) or default, device
    )
    if prefill == decode:
        return create_attention_backend(prefill, model_runner)
    from sglang.srt.layers.attention.hybrid_backend import HybridAttnBackend

    logger.info("Attention backends: prefill=%s, decode=%s", prefill, decode)
    return HybridAttnBackend(
        create_attention_backend(prefill, model_runner),
        create_attention_backend(decode, model_runner),
    )
