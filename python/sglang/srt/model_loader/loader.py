"""Build a model and fill its weights: `get_model` is the one entry point the model runner calls.

The model class comes from the model registry by architecture name; the model is constructed
directly on the target device in the target dtype (no CPU copy of the full model), then fed the
(HF name, tensor) stream from weight_utils through its own `load_weights`, which owns name mapping,
q/k/v stacking, TP sharding and casting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.model_loader.resolve import ModelLoadError
from sglang.srt.model_loader.weight_utils import (
    fill_dummy_weights,
    find_weight_files,
    iterate_weights,
)

if TYPE_CHECKING:
    from sglang.srt.configs.model_config import ModelConfig

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make `dtype` torch's default, so layers create their parameters in it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def get_model(
    *, model_config: ModelConfig, load_config: LoadConfig, device: str | torch.device
) -> nn.Module:
    """Construct the model for `model_config` on `device` and load (or fake) its weights."""
    # Imported here: the registry imports every model module, which the config-only callers of this
    # package (ModelConfig, tokenizer setup) do not need.
    from sglang.srt.models.registry import get_model_class

    model_class = get_model_class(model_config.architectures)
    start = time.perf_counter()
    # Weight files are located before the model is built, so a missing or incomplete checkpoint
    # fails before any device memory is spent.
    weights = None
    if load_config.load_format != "dummy":
        weights = iterate_weights(model_config.model_path, load_config.load_format)
    quant_config = getattr(model_config, "quant_config", None)
    if quant_config is not None and weights is None:
        raise ModelLoadError(
            "--load-format dummy cannot fake quantized weights; load the checkpoint's weights"
        )
    with torch.device(device), default_dtype(model_config.dtype):
        model = model_class(config=model_config.hf_config)

    model.quant_info = None
    if weights is not None and model_config.gguf_file and not load_config.gguf_dequantize:
        from sglang.srt.layers.quantization.gguf import load_gguf_packed

        weights = load_gguf_packed(model, model_config, weights, device)
    if weights is None:
        fill_dummy_weights(model, seed=load_config.dummy_seed)
    else:
        _load_weights(model, weights, model_config, torch.device(device))
    model.eval()
    if torch.device(device).type == "cpu":
        from sglang.srt.layers.cpu_weight_layout import prepare_cpu_weights

        try:
            prepare_cpu_weights(model)
        except ValueError as exc:  # a bad SGLANG_CPU_* setting: one line, not a traceback
            raise ModelLoadError(str(exc)) from exc
    logger.info(
        "Loaded %s (%s, %s) on %s in %.1f s",
        model_class.__name__,
        load_config.load_format,
        str(model_config.dtype).removeprefix("torch."),
        device,
        time.perf_counter() - start,
    )
    return model


def _load_weights(model: nn.Module, weights, model_config: ModelConfig, device) -> None:
    """Route the checkpoint to its loader; checkpoint k/v scales are taken out of every stream
    and set on the attention layers (layers/quantization/kv_cache.py)."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.layers.quantization.kv_cache import KVScales

    kv_scales = KVScales()
    weights = kv_scales.filter(weights)
    quant_config = getattr(model_config, "quant_config", None)
    if isinstance(quant_config, Fp8Config):
        _load_fp8(model, weights, model_config, device)
    elif quant_config is not None:
        _load_int4(model, weights, model_config)
    else:
        model.load_weights(weights)
    try:
        layers = kv_scales.apply(model)
    except ValueError as exc:
        raise ModelLoadError(f"Cannot load k/v scales: {exc}") from exc
    if layers:
        logger.info(
            "KV cache scales: k_scale/v_scale of %d layers from the checkpoint (used by a "
            "float8 --kv-cache-dtype; wider KV caches store K/V unscaled)",
            layers,
        )
    if model.quant_info is not None:
        model.quant_info["kv_scales"] = "checkpoint" if layers else "1.0"


def _load_fp8(model: nn.Module, weights, model_config: ModelConfig, device) -> None:
    """Load an FP8 checkpoint: dequantized at load, or float8 layers for the Triton GEMM
    (layers/quantization/fp8_linear.py)."""
    from sglang.srt.layers.quantization import fp8_linear

    config = model_config.quant_config
    try:
        kind = fp8_linear.matmul_choice(device)
        keep: set[str] = set()
        if kind == "triton":
            files = find_weight_files(model_config.model_path, "auto")
            keep = fp8_linear.attach_fp8(model, fp8_linear.float8_modules(files), config)
        loader = fp8_linear.Fp8Loader(config, keep)
        model.load_weights(loader.filter(weights))
    except ValueError as exc:
        raise ModelLoadError(f"Cannot load {config.method} FP8 model: {exc}") from exc
    layers = loader.dequantized + len(keep)
    kernel = fp8_linear.MATMUL_LABELS[kind]
    model.quant_info = {**config.describe(), "kernel": kernel, "quantized_tensors": layers}
    logger.info(
        "Quantization: %s FP8 e4m3 weights, %s scales, %d float8 weight tensors, matmul: %s; "
        "activations stay in the model dtype (the checkpoint's activation scheme: %s)",
        config.method,
        "x".join(map(str, config.block)) + " block" if config.block else config.strategy,
        layers,
        kernel,
        config.activations,
    )


def _load_int4(model: nn.Module, weights, model_config: ModelConfig) -> None:
    """Load an AWQ/GPTQ checkpoint into int4 layers (layers/quantization/int4_linear.py)."""
    from sglang.srt.layers.quantization.int4_linear import attach_int4, finish_int4

    config = model_config.quant_config
    try:
        layers = attach_int4(model, config)
        model.load_weights(weights)
        kernels = finish_int4(model)
    except ValueError as exc:
        raise ModelLoadError(f"Cannot load {config.method.upper()} model: {exc}") from exc
    flag = model_config.quantization
    kernel_note = (
        f" (--quantization {flag} names a Marlin GPU kernel, which is not built here; our own "
        "int4 path runs instead)"
        if flag and "marlin" in flag
        else ""
    )
    model.quant_info = {
        "method": config.method,
        "bits": 4,
        "group_size": config.group_size,
        "kernel": kernels + kernel_note,
        "quantized_tensors": layers,
    }
    logger.info(
        "Quantization: %s 4-bit, %d linear layers int4 in memory, matmul: %s%s",
        config.method.upper(),
        layers,
        kernels,
        kernel_note,
    )
