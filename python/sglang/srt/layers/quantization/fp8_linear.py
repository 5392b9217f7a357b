"""Load FP8 weight checkpoints: dequantized to dense weights, or kept float8 for the Triton GEMM.

The loader passes the checkpoint stream through `Fp8Loader.filter`, which pairs every float8
`<module>.weight` with its scale tensor (`weight_scale_inv` / `weight_scale`, fp8.py) and, per
module, either

- yields the dequantized weight, q * scale in float32 (the `dense` matmul): the model's own
  weight loaders then cast it to the model dtype and shard it like any dense weight; the default
  on CPU, where this measured several times faster than any float8 kernel there
  (docs/quantization.md), and the path where Triton cannot run; or
- yields the float8 weight unchanged plus `<module>.weight_scale`, its scales expanded to one
  row per output row (`expand_scale`), into layers that `attach_fp8` prepared before loading:
  their `weight` parameter is float8 and a `weight_scale` parameter [out, in blocks] sits beside
  it, so the same loaders stack q/k/v and gate/up and shard by TP rank unchanged. Their matmul is
  sgl_kernel.fp8_gemm (`triton`, the default on CUDA), weights staying one byte each.

Which modules are float8 is read from the safetensors headers (`float8_modules`), not from the
configs' lists of dense modules. `SGLANG_FP8_MATMUL=dense|triton` picks the matmul.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn

from sglang.srt.layers.linear import LinearBase, RowParallelLinear
from sglang.srt.layers.quantization.fp8 import FP8_DTYPE, Fp8Config, dequantize, expand_scale
from sglang.srt.layers.quantization.int4_linear import _HF_PARTS

MATMUL_CHOICES = ("dense", "triton")
MATMUL_LABELS = {
    "dense": "dense (float8 weights dequantized to the model dtype at load)",
    "triton": "triton fp8 GEMM (sgl_kernel.fp8_gemm; float8 weights, dequantized in-kernel)",
}


def matmul_choice(device: torch.device | str) -> str:
    """`SGLANG_FP8_MATMUL`, else triton on CUDA with Triton installed, else dense."""
    from sgl_kernel.triton_common import triton_usable

    wanted = os.environ.get("SGLANG_FP8_MATMUL", "").strip().lower()
    if wanted and wanted not in MATMUL_CHOICES:
        raise ValueError(f"SGLANG_FP8_MATMUL={wanted!r}; expected one of {MATMUL_CHOICES}")
    if wanted == "triton" and not triton_usable(device):
        raise ValueError(
            "SGLANG_FP8_MATMUL=triton needs Triton and a CUDA device (or TRITON_INTERPRET=1)"
        )
    if wanted:
        return wanted
    return "triton" if torch.device(device).type == "cuda" and triton_usable(device) else "dense"


def float8_modules(files: list[str]) -> set[str]:
    """HF names of the modules whose `weight` is stored as float8 e4m3 in these safetensors files."""
    from safetensors import safe_open

    found = set()
    for path in files:
        if not path.endswith(".safetensors"):
            continue
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(".weight") and f.get_slice(name).get_dtype() == "F8_E4M3":
                    found.add(name.removesuffix(".weight"))
    return found


class Fp8Method:
    """The matmul of one float8 layer: its `weight` (float8 [out, in]) and `weight_scale`
    (float32 [out, in blocks]) parameters, `block_in` input columns per scale."""

    def __init__(self, layer: LinearBase, block_in: int) -> None:
        self.layer = layer
        self.block_in = block_in

    def apply(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        from sgl_kernel.fp8_gemm import fp8_linear

        return fp8_linear(x, self.layer.weight, self.layer.weight_scale, self.block_in, bias)

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] float32, the checkpoint's q * scale."""
        return dequantize(self.layer.weight, self.layer.weight_scale, self.block_in)


def _scale_loader(layer: LinearBase, dense_loader):
    """The layer's own loader, except that a row-parallel layer's single scale column (per
    tensor or per channel) is the same on every rank."""

    def loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: Any = None) -> None:
        if isinstance(layer, RowParallelLinear) and param.shape[1] == 1 == tensor.shape[1]:
            with torch.no_grad():
                param.data.copy_(tensor)
            return
        dense_loader(param, tensor, shard_id)

    return loader


def _weight_loader(name: str, dense_loader):
    def loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: Any = None) -> None:
        if tensor.dtype != FP8_DTYPE:
            raise ValueError(f"{name}: got a {tensor.dtype} weight for a float8 layer")
        dense_loader(param, tensor, shard_id)

    return loader


def attach_fp8(model: nn.Module, fp8_modules: set[str], config: Fp8Config) -> set[str]:
    """Make every layer whose checkpoint parts are all float8 a float8 layer (see the module
    docstring); returns the HF module names now loaded as float8."""
    kept: set[str] = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{p}" if prefix else p for p in _HF_PARTS.get(leaf, (leaf,))]
        hits = [part in fp8_modules for part in parts]
        if not any(hits):
            continue
        if not all(hits):
            raise ValueError(f"{parts} share one layer here but only some of them are float8")
        out_features, in_features = layer.weight.shape
        block_in = config.block[1] if config.block else layer.input_size
        split = isinstance(layer, RowParallelLinear) and layer.tp_size > 1
        if split and in_features % block_in and block_in < layer.input_size:
            raise ValueError(
                f"{name}: this rank's {in_features} input columns split a {block_in}-column "
                "scale block; use a tensor-parallel size that divides the blocks"
            )
        scale_cols = -(-in_features // block_in)
        dense_loader = layer.weight.weight_loader  # sharding and stacking as for dense weights
        del layer.weight
        weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        weight.weight_loader = _weight_loader(name, dense_loader)  # type: ignore[attr-defined]
        scale = nn.Parameter(torch.empty(out_features, scale_cols), requires_grad=False)
        scale.weight_loader = _scale_loader(layer, dense_loader)  # type: ignore[attr-defined]
        layer.register_parameter("weight", weight)
        layer.register_parameter("weight_scale", scale)
        layer.quant_method = Fp8Method(layer, block_in)
        kept.update(parts)
    return kept


class Fp8Loader:
    """Pairs float8 weights with their scales in the checkpoint stream (module docstring)."""

    def __init__(self, config: Fp8Config, keep_float8: set[str]) -> None:
        self.config = config
        self.keep_float8 = keep_float8
        self.dequantized = 0

    def filter(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        scale_suffix = "." + self.config.scale_name
        weights_waiting: dict[str, torch.Tensor] = {}
        scales_waiting: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            if name.endswith((".input_scale", ".weight_zero_point")):
                raise ValueError(
                    f"{name}: static activation scales / zero points are not implemented"
                )
            if name.endswith(scale_suffix):
                module = name.removesuffix(scale_suffix)
                if module in weights_waiting:
                    yield from self._pair(module, weights_waiting.pop(module), tensor)
                else:
                    scales_waiting[module] = tensor
            elif name.endswith(".weight") and tensor.dtype == FP8_DTYPE:
                module = name.removesuffix(".weight")
                if module in scales_waiting:
                    yield from self._pair(module, tensor, scales_waiting.pop(module))
                else:
                    weights_waiting[module] = tensor
            else:
                yield name, tensor
        if weights_waiting or scales_waiting:
            missing = [f"{m}.{self.config.scale_name}" for m in weights_waiting]
            missing += [f"{m}.weight" for m in scales_waiting]
            raise ValueError(f"checkpoint lacks {missing[:4]} ({len(missing)} unpaired tensors)")

    def _pair(
        self, module: str, q: torch.Tensor, scale: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        out_features, in_features = q.shape
        try:
            rows, block_in = expand_scale(scale, out_features, in_features, self.config.block)
        except ValueError as exc:
            raise ValueError(f"{module}: {exc}") from exc
        if module in self.keep_float8:
            yield f"{module}.weight", q
            yield f"{module}.weight_scale", rows
        else:
            self.dequantized += 1
            yield f"{module}.weight", dequantize(q, rows, block_in)
