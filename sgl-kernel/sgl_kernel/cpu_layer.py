"""CPU kernels of a decoder layer's non-matmul work (csrc/cpu_layer.c), via ctypes: RMSNorm with
the fused residual add, rotary embedding, SiLU-and-mul, decode attention read straight from
the paged KV pool, and `decoder_layers`, which runs whole Llama-family decoder layers of a decode
step with them and the packed GEMMs in one call (python/sglang/srt/layers/cpu_decoder_layers.py
decides when; the ctypes structures below mirror the C ones).

Owns loading and calling them. At decode's batch sizes each of these is several PyTorch operator
calls (decode attention some twenty: gathers, casts, mask, fused SDPA, reshapes) whose per-call
overhead, not arithmetic, dominates a small model's step on CPU. The row kernels follow their
`ref` functions operation by operation with the same roundings (see the C file) and run on one
thread (a decode batch's rows are less work than a parallel region's start-up); decode attention
computes in float32 (AVX-512 bodies for head_dim 64/128/256 where the CPU has it) and runs on
PyTorch's threads when the work is large enough.

`usable(x)` says whether a tensor can take them: a CPU float32 / bfloat16 tensor outside
torch.compile tracing (compiled code keeps the references, which Inductor fuses), on a machine
where the library built (x86-64 Linux with AVX2 and a C compiler; cpu_build owns the build, its
cache and the OpenMP runtime). `SGLANG_CPU_LAYER_KERNELS=0` keeps PyTorch everywhere. Nothing
is built until a CPU tensor asks, so a CUDA server never compiles it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from sgl_kernel import cpu_build


SOURCE = Path(__file__).with_name("csrc") / "cpu_layer.c"
# -ffp-contract=off: no fused multiply-add the PyTorch reference does not do.
CFLAGS = (
    "-O3",
    "-mavx2",
    "-mfma",
    "-fopenmp",
    "-ffp-contract=off",
    # Value-preserving: lets float selects and sqrt vectorize (no errno, no trap semantics).
    "-fno-trapping-math",
    "-fno-math-errno",
    "-fPIC",
    "-shared",
)
ENABLE_ENV = "SGLANG_CPU_LAYER_KERNELS"
_BF16 = {torch.float32: 0, torch.bfloat16: 1}  # the C code's dtype codes

_enabled = True  # set_enabled(False) routes every call back to PyTorch (A/B runs, tests)
_P, _I, _C, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _setup(lib: ctypes.CDLL) -> None:
    lib.sgl_cpu_rmsnorm.argtypes = [_P, _I, _P, _I, _P, _C, _C, _F, _I, _I, _P, _C, _P]
    lib.sgl_cpu_rotary.argtypes = [_P, _I, _C, _P, _P, _I, _I, _I, _I, _P]
    lib.sgl_cpu_silu_and_mul.argtypes = [_P, _I, _C, _I, _I, _P]
    lib.sgl_cpu_rmsnorm.restype = lib.sgl_cpu_silu_and_mul.restype = _C
    lib.sgl_cpu_rotary.restype = None
    fn = lib.sgl_cpu_decode_attention
    fn.argtypes = [_P, _I, _C, _P, _P, _C, _P, _P, _I, _I, _C, _P, _I, _I, _I, _P, _C]
    fn.argtypes += [_I, _P, _P, _I, _I, _F, _F, _P, _C, _P, _C]
    fn.restype = _C
    lib.sgl_cpu_decoder_scratch.argtypes = [_P]
    lib.sgl_cpu_decoder_scratch.restype = _I
    lib.sgl_cpu_decoder_layers.argtypes = [_P, _P, _I, _P, _P, _P, _P, _P]
    lib.sgl_cpu_decoder_layers.restype = _C


_library = cpu_build.LazyLibrary(
    SOURCE,
    CFLAGS,
    "sgl_cpu_layer",
    _setup,
    label="CPU layer kernels",
    required=("avx2", "fma"),
    enable_env=ENABLE_ENV,
    fallback="PyTorch runs",
)
_lib: Optional[ctypes.CDLL] = None  # _library.lib once loaded: the hot paths read this name


def _load() -> Optional[ctypes.CDLL]:
    global _lib
    _lib = _library.get()
    return _lib


def set_enabled(enabled: bool) -> None:
    """Turn the kernels off (PyTorch runs instead) or back on, for this process."""
    global _enabled
    _enabled = bool(enabled)


def usable(x: torch.Tensor) -> bool:
    """True when `x` can go through these kernels (see the module docstring)."""
    if not _enabled or x.device.type != "cpu" or x.dtype not in _BF16:
        return False
    if torch.compiler.is_compiling():
        return False
    return (_lib if _lib is not None else _load()) is not None


# Rows up to which the single-threaded row kernels take a tensor: decode batches. A prefill
# chunk's hundreds of rows are real arithmetic, which PyTorch's ops spread over every thread.
ROW_KERNEL_MAX_ROWS = 64


def usable_rows(x: torch.Tensor) -> bool:
    """`usable(x)` for a row kernel's input of at most ROW_KERNEL_MAX_ROWS rows (all but the last
    dimension)."""
    return x.numel() <= ROW_KERNEL_MAX_ROWS * x.shape[-1] and usable(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a 2-D tensor of contiguous rows (a view when it can be)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(rmsnorm(h) * weight, h) with h = x + residual, or x when residual is None (then the
    second item is None); `ref.rmsnorm` / `ref.fused_add_rmsnorm`'s semantics. residual must have
    x's dtype and weight must be a contiguous float32 or bfloat16 tensor."""
    x2 = _rows(x)
    m, n = x2.shape
    out_dtype = x.dtype if weight.dtype == x.dtype else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype)
    res_out = r2 = None
    if residual is not None:
        r2 = _rows(residual)
        res_out = torch.empty(x.shape, dtype=x.dtype)
    rc = _lib.sgl_cpu_rmsnorm(
        x2.data_ptr(),
        x2.stride(0),
        None if r2 is None else r2.data_ptr(),
        0 if r2 is None else r2.stride(0),
        weight.data_ptr(),
        _BF16[weight.dtype],
        _BF16[x.dtype],
        float(eps),
        m,
        n,
        out.data_ptr(),
        _BF16[out_dtype],
        None if res_out is None else res_out.data_ptr(),
    )
    if rc != 0:
        raise MemoryError("cpu rmsnorm: could not allocate a row buffer")
    return out, res_out


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`ref.apply_rotary_emb`: x [tokens, heads, head_dim] (last dim contiguous), cos/sin float32
    [tokens, rot] contiguous; returns a new contiguous tensor of x's shape."""
    tokens, heads, head_dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != head_dim:
        x = x.contiguous()
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype)
    _lib.sgl_cpu_rotary(
        x.data_ptr(),
        x.stride(0),
        _BF16[x.dtype],
        cos.data_ptr(),
        sin.data_ptr(),
        tokens,
        heads,
        head_dim,
        cos.shape[-1],
        out.data_ptr(),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`ref.silu_and_mul`: x = [gate, up] along the last dim -> silu(gate) * up."""
    x2 = _rows(x)
    m, two_d = x2.shape
    d = two_d // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype)
    rc = _lib.sgl_cpu_silu_and_mul(
        x2.data_ptr(), x2.stride(0), _BF16[x.dtype], m, d, out.data_ptr()
    )
    if rc != 0:
        raise MemoryError("cpu silu_and_mul: could not allocate a row buffer")
    return out


# Multiply-adds below which decode attention runs on the calling thread: a parallel region costs
# ~10 us on idle cores and milliseconds when another process holds one of them (each thread
# waits at the barrier), while a batch-1 SmolLM2 layer's attention is ~0.2M multiply-adds.
PARALLEL_MIN_WORK = 4_000_000


def _attention_threads(work: int) -> int:
    return torch.get_num_threads() if work >= PARALLEL_MIN_WORK else 1


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """`x` [tokens, ...] as [tokens, values] rows, each row's values contiguous (a view when the
    layout allows: a slice of a fused projection's output is one)."""
    x2 = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    num_kv_heads: int,
    scale: float,
    window: int = 0,
    logit_cap: float = 0.0,
    new_kv: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    return_lse: bool = False,
    max_seq_len: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of one query per request over its first `seq_lens[b]` keys (query position
    `seq_lens[b] - 1`).

    q: [bs, hq * d] (float32 or bfloat16); k_buf / v_buf: one layer's pool [slots, hkv, d] in
    float32 or bfloat16; `new_kv` = (k [bs, hkv*d], v [bs, hkv*d], slots [bs] int64) is stored
    into the pool first. Returns out [bs, hq * d] in q's dtype and, with `return_lse`, the
    float32 log-sum-exp [bs, hq] of the scaled (soft-capped) scores. `max_seq_len` (the largest
    of seq_lens, when the caller knows it) sizes the work that decides the thread count.
    """
    bs = q.shape[0]
    d = k_buf.shape[-1]
    hq = q.shape[-1] // d if q.dim() == 2 else q.shape[1]
    q2 = _tokens(q)
    if new_kv is not None:
        k_new, v_new = _tokens(new_kv[0]), _tokens(new_kv[1].to(new_kv[0].dtype))
        loc = new_kv[2]
        new_args = (k_new.data_ptr(), v_new.data_ptr(), k_new.stride(0), v_new.stride(0))
        new_args += (_BF16[k_new.dtype],)
        loc_ptr = loc.data_ptr()
    else:
        new_args, loc_ptr = (None, None, 0, 0, 0), None
    out = torch.empty(bs, hq * d, dtype=q.dtype)
    lse = torch.empty(bs, hq, dtype=torch.float32) if return_lse else None
    rc = _lib.sgl_cpu_decode_attention(
        q2.data_ptr(),
        q2.stride(0),
        _BF16[q.dtype],
        k_buf.data_ptr(),
        v_buf.data_ptr(),
        _BF16[k_buf.dtype],
        *new_args,
        loc_ptr,
        hq,
        num_kv_heads,
        d,
        req_to_token.data_ptr(),
        int(req_to_token.dtype == torch.int64),
        req_to_token.stride(0),
        req_pool_indices.data_ptr(),
        seq_lens.data_ptr(),
        bs,
        int(window),
        float(logit_cap),
        float(scale),
        out.data_ptr(),
        _BF16[out.dtype],
        None if lse is None else lse.data_ptr(),
        _attention_threads(bs * hq * d * (max_seq_len or int(seq_lens.max()))),
    )
    if rc != 0:
        raise MemoryError("cpu decode attention: could not allocate its scratch buffers")
    return out, lse


# ---- a decode step's decoder layers in one call (csrc/cpu_layer.c, sgl_cpu_decoder_layers) ----


class Linear(ctypes.Structure):
    """A projection's packed weight as the C side reads it (`sgl_linear`)."""

    _fields_ = [
        ("kind", _I),  # LINEAR_BF16W or LINEAR_GGUF
        ("fn", _P),  # the GEMM entry point of that kernel's library
        ("w", _P),
        ("n", _I),
        ("k", _I),
        ("bias", _P),  # float32 [n] or None
        ("bits", _I),
        ("zp", _I),
        ("has_min", _I),
        ("scale_f32", _I),
    ]


LINEAR_BF16W, LINEAR_GGUF = 1, 2


class DecoderLayer(ctypes.Structure):
    """One decoder layer's weights, norms, attention settings and pool (`sgl_decoder_layer`)."""

    _fields_ = [
        ("qkv", Linear),
        ("o", Linear),
        ("gate_up", Linear),
        ("down", Linear),
        ("norm1", _P),
        ("norm2", _P),
        ("eps1", _F),
        ("eps2", _F),
        ("scale", _F),
        ("logit_cap", _F),
        ("window", _I),
        ("k_buf", _P),
        ("v_buf", _P),
        ("id", _I),  # the layer's index in the model (the probe slots' index)
    ]


class DecodeStep(ctypes.Structure):
    """A decode step's shapes, rotary rows, slot tables and thread counts (`sgl_decode_step`)."""

    _fields_ = [
        ("m", _I),
        ("hidden", _I),
        ("hq", _I),
        ("hkv", _I),
        ("head_dim", _I),
        ("rot", _I),
        ("inter", _I),
        ("bf16", _I),
        ("kv_bf16", _I),
        ("cos", _P),
        ("sin", _P),
        ("req_to_token", _P),
        ("rtt_i64", _I),
        ("rtt_stride", _I),
        ("req_idx", _P),
        ("seq_lens", _P),
        ("loc", _P),
        ("gguf_passes", _I),
        ("gguf_isa", _I),
        ("gemm_threads", _I),
        ("attn_threads", _I),
        # Layer probes (tap_n 0: none): see sgl_decode_step in csrc/cpu_layer.c.
        ("tap_n", _I),
        ("tap_rows", _P),  # int64 [tap_n]: the batch row of each probe row
        ("stream_slot", _P),  # int64 [layers]: slot in tap_stream, or -1
        ("normed_slot", _P),  # int64 [layers]: slot in tap_normed, or -1
        ("tap_stream", _P),  # [slots, tap_n, hidden] residual streams, the activation dtype
        ("tap_normed", _P),  # [slots, tap_n, hidden] final-normed streams
        ("final_norm", _P),  # the model's final RMSNorm weight, the activation dtype
        ("final_eps", _F),
    ]


def decoder_scratch_values(step: DecodeStep) -> int:
    """Values of the activation dtype `decoder_layers` needs as scratch for `step`."""
    return int(_lib.sgl_cpu_decoder_scratch(ctypes.byref(step)))


def decoder_layers(
    step: DecodeStep,
    layers: ctypes.Array,
    start: int,
    stop: int,
    x_in: torch.Tensor,
    res_in: Optional[torch.Tensor],
    x_out: torch.Tensor,
    res_out: torch.Tensor,
    scratch: torch.Tensor,
) -> None:
    """Layers `layers[start:stop]` of a decode step (see csrc/cpu_layer.c): x_in / res_in the
    first one's input and residual stream (res_in None: the model's first layer), results in
    x_out / res_out (contiguous [m, hidden]; res_out may be res_in)."""
    rc = _lib.sgl_cpu_decoder_layers(
        ctypes.byref(step),
        ctypes.byref(layers, start * ctypes.sizeof(DecoderLayer)),
        stop - start,
        x_in.data_ptr(),
        None if res_in is None else res_in.data_ptr(),
        x_out.data_ptr(),
        res_out.data_ptr(),
        scratch.data_ptr(),
    )
    if rc != 0:
        raise MemoryError("cpu decoder layers: a kernel could not allocate its buffers")
