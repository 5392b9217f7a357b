"""A Llama-family decode step's decoder layers in one C call on CPU.

Owns deciding when a model's decode forward can take sgl_kernel's `sgl_cpu_decoder_layers`
(csrc/cpu_layer.c), describing the model's packed weights, norms and KV pool to it once, and
running a step's layers through it, in segments when attention capture or a layer probe needs a
layer in Python.

Why: on CPU a small model's decode step is some 300 kernel calls, and the Python around them
(module dispatch, argument checks, views, allocations) cost 13.5 of the 37 ms of a SmolLM2-135M
bf16 step at batch 1 (idle, two bound threads). The C function makes the same kernel calls in the
same order with the same arguments and thread counts, so its hidden states are bit-identical to
the modules' (test/srt/test_cpu_layer_kernels.py checks it), and that Python goes away.

When it runs (else the modules run, as before): the layers are exactly `LlamaDecoderLayer` with
`LlamaAttention` (no q/k norm), `LlamaMLP`, `RMSNorm` and the standard rotary embedding, with
norm weights in the activation dtype; every projection is packed for a CPU kernel (bf16 or float32
weights on sgl_kernel.cpu_gemm, GGUF blocks on sgl_kernel.cpu_gemm_gguf); tensor parallelism is 1; the
torch_native backend attends over a float32 / bfloat16 pool of the activation dtype without
scales. Per step: a decode batch of at most `cpu_layer.ROW_KERNEL_MAX_ROWS` rows outside
torch.compile. Layers the attention capture wants run their modules (the capture needs q and the
log-sum-exp); the C call takes the layer probes' rows itself (residual stream and final-normed
rows, the calls `LayerProbe.record` makes), so probes do not split the step.
`SGLANG_CPU_FUSED_DECODE=0` turns it off; `SGLANG_CPU_LAYER_KERNELS=0` (no C kernels) does too.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any, Optional

import torch
from torch import nn

from sglang.srt.layers.layer_probe import tap_layer

logger = logging.getLogger(__name__)

ENABLE_ENV = "SGLANG_CPU_FUSED_DECODE"
_enabled = os.environ.get(ENABLE_ENV, "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Turn the one-call decode layers off (the modules run) or back on, for this process."""
    global _enabled
    _enabled = bool(enabled)


def _fn_address(fn: Any) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _linear(layer: nn.Module, keep: list[torch.Tensor]) -> Optional[Any]:
    """The C description of a projection's packed weight, or None when it is not packed."""
    from sgl_kernel import cpu_layer

    if getattr(layer, "tp_size", 1) != 1:
        return None
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias = bias.detach().float().contiguous()
        keep.append(bias)
    desc = cpu_layer.Linear(k=layer.input_size, bias=None if bias is None else bias.data_ptr())
    method = layer.quant_method
    if method is None:
        packed = layer.cpu_packed
        if packed is None:
            return None
        from sgl_kernel import cpu_gemm

        lib = cpu_gemm._library.get()
        if lib is None:
            return None
        entry = cpu_gemm.gemm_entry(lib, packed.packed)  # bf16 or float32 weights
        desc.kind, desc.fn = cpu_layer.LINEAR_BF16W, _fn_address(entry)
        desc.w, desc.n = packed.packed.data_ptr(), packed.out_features
        keep.append(packed.packed)
        return desc
    from sglang.srt.layers.quantization.gguf import GGUFCpuGemm

    gemm = getattr(method, "method", None)
    if not isinstance(gemm, GGUFCpuGemm):
        return None
    from sgl_kernel import cpu_gemm_gguf

    lib = cpu_gemm_gguf._library.get()
    if lib is None:
        return None
    fmt = cpu_gemm_gguf.FORMATS[gemm.qtype]
    desc.kind, desc.fn = cpu_layer.LINEAR_GGUF, _fn_address(lib.sgl_gguf_gemm)
    desc.w, desc.n = gemm.weight.data_ptr(), gemm.out_features
    desc.bits, desc.zp, desc.has_min = fmt.bits, fmt.zp, int(fmt.has_min)
    desc.scale_f32 = int(fmt.scale_f32)
    keep.append(gemm.weight)
    return desc


def _why_not_model(model: nn.Module) -> str:
    """'' when every layer of `model` (a LlamaModel) has the supported structure."""
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.layers.rotary_embedding import RotaryEmbedding
    from sglang.srt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

    for layer in model.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(layer).forward is not LlamaDecoderLayer.forward:
            return f"{type(layer).__name__} has its own forward"
        if type(attn) is not LlamaAttention or attn.qk_norm:
            return f"{type(attn).__name__} is not plain Llama attention"
        if type(mlp) is not LlamaMLP or type(attn.rotary_emb) is not RotaryEmbedding:
            return "the MLP or the rotary embedding is not Llama's"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n) is not RMSNorm for n in norms):
            return "the norms are not plain RMSNorm"
    return ""


class CpuDecoderLayers:
    """A model's decoder layers described for `sgl_cpu_decoder_layers`; `run` does a step."""

    def __init__(self, model: nn.Module, pool: Any, req_to_token: torch.Tensor) -> None:
        from sgl_kernel import cpu_layer

        self.model = model
        self.pool = pool
        self.req_to_token = req_to_token
        first = model.layers[0]
        attn0 = first.self_attn
        self.dtype = first.input_layernorm.weight.dtype
        self.num_layers = len(model.layers)
        self.rotary = attn0.rotary_emb
        self.keep: list[torch.Tensor] = []  # what the descriptions point into
        self.table = (cpu_layer.DecoderLayer * self.num_layers)()
        self.reason = ""
        self.uses_gguf = False
        for i, layer in enumerate(model.layers):
            self.reason = self._describe(i, layer, self.table[i])
            if self.reason:
                return
        hq, hkv, d = attn0.num_heads, attn0.num_kv_heads, attn0.head_dim
        self.heads = (hq, hkv, d)
        self.hidden = int(first.input_layernorm.weight.shape[0])
        step = self.step = cpu_layer.DecodeStep(hidden=self.hidden, hq=hq, hkv=hkv, head_dim=d)
        step.inter = int(first.mlp.down_proj.input_size)
        step.bf16 = int(self.dtype == torch.bfloat16)
        step.kv_bf16 = step.bf16
        step.req_to_token = req_to_token.data_ptr()
        step.rtt_i64 = int(req_to_token.dtype == torch.int64)
        step.rtt_stride = req_to_token.stride(0)
        step.m = 1
        self.scratch_per_row = cpu_layer.decoder_scratch_values(step)
        # Layer probes are taken inside the C call when the final norm is one it can run (the
        # model's own call: a plain RMSNorm in the activation dtype); else a probed layer ends
        # a segment and tap_layer records it in Python.
        from sglang.srt.layers.layernorm import RMSNorm

        norm = model.norm
        self.c_taps = type(norm) is RMSNorm and norm.weight.dtype == self.dtype
        if self.c_taps:
            self.keep.append(norm.weight)
            step.final_norm, step.final_eps = norm.weight.data_ptr(), norm.variance_epsilon
        self._slots: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _slot_tables(self, hidden: tuple, lens: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer, the slot of its residual stream / final-normed rows (-1: not probed)."""
        key = (hidden, lens)
        tables = self._slots.get(key)
        if tables is None:
            tables = tuple(torch.full((self.num_layers,), -1, dtype=torch.int64) for _ in key)
            for table, layers in zip(tables, key):
                for slot, layer in enumerate(layers):
                    table[layer] = slot
            if len(self._slots) > 64:
                self._slots.clear()
            self._slots[key] = tables
        return tables

    def _set_taps(self, probe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Point the step's probe fields at new output buffers for `probe`'s rows."""
        spec, step = probe.spec, self.step
        rows = len(spec.batch_rows)
        stream_slot, normed_slot = self._slot_tables(spec.hidden_layers, spec.lens_layers)
        shape = (rows, self.hidden)
        stream = torch.empty((len(spec.hidden_layers),) + shape, dtype=self.dtype)
        normed = torch.empty((len(spec.lens_layers),) + shape, dtype=self.dtype)
        step.tap_n, step.tap_rows = rows, probe.index.data_ptr()
        step.stream_slot, step.normed_slot = stream_slot.data_ptr(), normed_slot.data_ptr()
        step.tap_stream, step.tap_normed = stream.data_ptr(), normed.data_ptr()
        return stream, normed

    def _describe(self, i: int, layer: nn.Module, out: Any) -> str:
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin in (
            ("qkv", attn.qkv_proj),
            ("o", attn.o_proj),
            ("gate_up", mlp.gate_up_proj),
            ("down", mlp.down_proj),
        ):
            desc = _linear(lin, self.keep)
            if desc is None:
                return f"layer {i}'s {name} projection has no packed CPU weight"
            self.uses_gguf |= desc.kind == 2
            setattr(out, name, desc)
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        if n1.weight.dtype != self.dtype or n2.weight.dtype != self.dtype:
            return "the norm weights differ in dtype"
        if self.dtype not in (torch.float32, torch.bfloat16):
            return f"activations are {self.dtype}"
        ra = attn.attn
        pool = self.pool
        k_buf, v_buf = pool.get_key_buffer(ra.layer_id), pool.get_value_buffer(ra.layer_id)
        ok_pool = pool.dtype == self.dtype and pool.store_dtype == pool.dtype
        if not ok_pool or pool.kv_scales(ra) != (1.0, 1.0):
            return "the KV pool is not of the activation dtype, or it carries scales"
        if not (k_buf.is_contiguous() and v_buf.is_contiguous()):
            return "the KV pool buffers are not contiguous"
        self.keep += [n1.weight, n2.weight, k_buf, v_buf]
        out.norm1, out.norm2 = n1.weight.data_ptr(), n2.weight.data_ptr()
        out.eps1, out.eps2 = n1.variance_epsilon, n2.variance_epsilon
        out.scale, out.logit_cap, out.window = ra.scaling, ra.logit_cap, ra.sliding_window_size
        out.k_buf, out.v_buf = k_buf.data_ptr(), v_buf.data_ptr()
        out.id = i
        return ""

    def run(
        self, positions: torch.Tensor, hidden: torch.Tensor, fb: Any, max_kv: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's layers: (output, residual stream) for the model's final norm."""
        from sgl_kernel import cpu_layer

        m = hidden.shape[0]
        step = self.step
        cos, sin = self.rotary._cos_sin(positions)
        hq, _, d = self.heads
        step.m, step.rot = m, cos.shape[-1]
        step.cos, step.sin = cos.data_ptr(), sin.data_ptr()
        step.req_idx, step.seq_lens = fb.req_pool_indices.data_ptr(), fb.seq_lens.data_ptr()
        step.loc = fb.out_cache_loc.data_ptr()
        step.gemm_threads = torch.get_num_threads()
        step.attn_threads = cpu_layer._attention_threads(m * hq * d * max_kv)
        if self.uses_gguf:
            from sgl_kernel import cpu_gemm_gguf as g

            step.gguf_passes = g.ACTS[g.activation_mode()]
            step.gguf_isa = g.isa_code()
        scratch = torch.empty(m * self.scratch_per_row, dtype=self.dtype)
        x_out = torch.empty(m, self.hidden, dtype=self.dtype)
        res_out = torch.empty(m, self.hidden, dtype=self.dtype)
        x: torch.Tensor = hidden if hidden.is_contiguous() else hidden.contiguous()
        res: Optional[torch.Tensor] = None
        capture, probe = fb.attention_capture, fb.layer_probe
        in_python = [capture is not None and capture.wants_layer(i) for i in range(self.num_layers)]
        tapped: Any = ()
        step.tap_n = 0
        if probe is not None:
            if self.c_taps:
                stream, normed = self._set_taps(probe)
            else:
                tapped = probe.layers
        i, n = 0, self.num_layers
        while i < n:
            if in_python[i]:
                x, res = self.model.layers[i](positions, x, fb, res)
                tap_layer(fb, i, x, res, self.model.norm)
                i += 1
                continue
            j = i + 1
            while j < n and not in_python[j] and (j - 1) not in tapped:
                j += 1
            # x may be x_out and res res_out: the C side reads its inputs before writing.
            cpu_layer.decoder_layers(step, self.table, i, j, x, res, x_out, res_out, scratch)
            x, res = x_out, res_out
            if j - 1 in tapped:
                tap_layer(fb, j - 1, x, res, self.model.norm)
            i = j
        assert res is not None
        if step.tap_n:
            step.tap_n = 0
            probe.take(stream, normed, skip=in_python)
        return x, res


def decoder_layers_for(model: nn.Module, hidden: torch.Tensor, fb: Any) -> Optional[Any]:
    """(runner, max_kv) when this forward's layers can run in one C call, else None."""
    if not _enabled or fb.forward_mode is None or not fb.forward_mode.is_decode():
        return None
    from sgl_kernel import cpu_layer

    if hidden.shape[0] > cpu_layer.ROW_KERNEL_MAX_ROWS or not cpu_layer.usable(hidden):
        return None
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    backend = fb.attn_backend
    if type(backend) is not TorchNativeAttnBackend:
        return None
    md = backend.forward_metadata
    if md is None or not md.decode:
        return None
    runner = model.__dict__.get("_cpu_decoder_layers")
    if runner is None or runner.pool is not fb.token_to_kv_pool:
        why = _why_not_model(model)
        runner = None if why else CpuDecoderLayers(model, fb.token_to_kv_pool, backend.req_to_token)
        why = why or runner.reason
        if why:
            logger.info("CPU decode runs the layer modules (%s)", why)
            runner = _NotEligible(fb.token_to_kv_pool)
        else:
            logger.info("CPU decode: each step's decoder layers run in one C call")
        model.__dict__["_cpu_decoder_layers"] = runner
    if isinstance(runner, _NotEligible) or hidden.dtype != runner.dtype:
        return None
    int64 = torch.int64
    if not (fb.seq_lens.dtype == fb.req_pool_indices.dtype == fb.out_cache_loc.dtype == int64):
        return None
    return runner, md.max_kv


class _NotEligible:
    """Marks a model (for one pool) whose layers keep their modules."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
