"""Compile every sgl_kernel Triton kernel for a real GPU target on a machine without a GPU.

Owns the ahead-of-time compile check of the GPU path. Triton's interpreter (how the CPU tests
run the kernels) accepts code the compiler rejects (non-constexpr shapes, dtype mismatches in
`tl.dot`, unsupported ops), so a kernel that passes its CPU tests may still fail its first launch
on an H100. This tool closes that gap before a GPU session:

1. it runs the kernel and backend test files in-process under the interpreter and records every
   launch (kernel, arguments, launch options), with the host wrappers choosing their GPU operand
   dtypes (bf16 stays bf16; the tests' interpreter workaround is switched off, so some bf16
   results may fail their assertions here: only the recording matters);
2. it compiles each distinct launch specialization with Triton's own JIT front end for the target
   (default sm_90, Hopper) through a stand-in driver: TTIR -> TTGIR -> LLVM IR -> PTX -> cubin
   (ptxas ships with the Triton wheel), without launching anything;
3. it prints one line per kernel specialization and exits 1 if any failed to compile.

Usage (needs Triton installed; the project's CPU venv has none by design):
    python benchmark/gpu/compile_check.py [--arch 90] [--tests test/srt/test_triton_kernels.py ...]
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Largest shared memory one block may use (bytes): A100 (sm_80), H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
DEFAULT_TESTS = ["test/srt/test_triton_kernels.py", "test/srt/test_triton_backend.py"]


def record_launches(tests: list[str]) -> list[tuple[str, str, tuple, dict]]:
    """Run `tests` under the interpreter; return (module, kernel, args, kwargs) per launch, each
    tensor replaced by `_TensorFacts`."""
    import pytest
    from triton.runtime.interpreter import InterpretedFunction

    import sgl_kernel.triton_common as common

    launches: list[tuple[str, str, tuple, dict]] = []
    original_run = InterpretedFunction.run

    def record(self: Any, args: tuple, kwargs: dict) -> None:
        launches.append((self.fn.__module__, self.fn.__name__, _facts(args), _facts(kwargs)))

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        record(self, args, kwargs)
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    original_dot_dtypes = common.dot_dtypes

    def gpu_dot_dtypes(*dtypes: Any) -> Any:
        """`dot_dtypes` as it answers on a GPU (not interpreting)."""
        interpreting, common.interpreting = common.interpreting, lambda: False
        try:
            return original_dot_dtypes(*dtypes)
        finally:
            common.interpreting = interpreting

    # Modules imported later copy the patched name from triton_common.
    patched = [
        (module, module.dot_dtypes)
        for name, module in list(sys.modules.items())
        if name.startswith("sgl_kernel") and getattr(module, "dot_dtypes", None) is not None
    ]
    for module, _ in patched:
        module.dot_dtypes = gpu_dot_dtypes
    InterpretedFunction.run = run
    try:
        pytest.main(["-q", "--no-header", "-p", "no:cacheprovider", *tests])
        # The tests' shapes are small; real models give other constexprs (head dim 128, GQA
        # groups) and other specializations (strides divisible by 16). Record those launches
        # without running them: only their arguments matter.
        InterpretedFunction.run = lambda self, *a, grid, warmup, **kw: record(self, a, kw)
        model_shaped_launches()
    finally:
        InterpretedFunction.run = original_run
        for module, fn in patched:
            module.dot_dtypes = fn
    return launches


# (query heads, KV heads, head dim, hidden, intermediate) per rank, as the GPU benchmark and the
# default model run them: Llama-3.1-8B, Llama-3-70B at TP 8 (group 8, one KV head), SmolLM2-135M.
MODEL_SHAPES = [(32, 8, 128, 4096, 14336), (8, 1, 128, 1024, 3584), (9, 3, 64, 576, 1536)]


def model_shaped_launches() -> None:
    """Call every host wrapper the way the triton backend and the capture do on real models."""
    import torch
    from sgl_kernel.attention_capture import capture_scores
    from sgl_kernel.decode_attention import decode_attention_fwd
    from sgl_kernel.extend_attention import extend_attention_fwd
    from sgl_kernel.kv_store import store_kv_cache
    from sgl_kernel.norm_act import fused_add_rmsnorm, rmsnorm, silu_and_mul

    i64, f32 = torch.int64, torch.float32
    slots, ctx, bs = 256, 128, 4
    req_to_token = torch.arange(bs * ctx, dtype=i64).view(bs, ctx) % slots
    pool_idx = torch.arange(bs, dtype=i64)
    seq_lens = torch.tensor([5, 17, 40, 64], dtype=i64)
    ext_lens = torch.tensor([5, 1, 8, 64], dtype=i64)
    ext_start = torch.cumsum(ext_lens, 0) - ext_lens
    n_ext = int(ext_lens.sum())
    for dtype in (torch.bfloat16, torch.float16):
        for hq, hkv, d, hidden, inter in MODEL_SHAPES:
            kb = torch.zeros(slots, hkv, d, dtype=dtype)
            vb = torch.zeros(slots, hkv, d, dtype=dtype)
            new = torch.zeros(n_ext, hkv * d, dtype=dtype)
            store_kv_cache(new, new, kb, vb, torch.arange(n_ext, dtype=i64))
            for window in (-1, 4096):
                q = torch.zeros(bs, hq * d, dtype=dtype)
                decode_attention_fwd(
                    q, kb, vb, req_to_token, pool_idx, seq_lens, 0.1, sliding_window=window
                )
                qe = torch.zeros(n_ext, hq * d, dtype=dtype)
                extend_attention_fwd(
                    qe,
                    kb,
                    vb,
                    req_to_token,
                    pool_idx,
                    seq_lens,
                    ext_lens,
                    ext_start,
                    0.1,
                    64,
                    sliding_window=window,
                )
                rows = torch.zeros(bs, ctx, dtype=f32)
                weights = torch.ones(bs, 2, dtype=f32)
                for layer_rows in (None, torch.zeros(bs, ctx, dtype=f32)):
                    capture_scores(
                        qe,
                        torch.zeros(n_ext, hq, dtype=f32),
                        kb,
                        req_to_token,
                        pool_idx,
                        seq_lens,
                        ext_start + ext_lens - 1,
                        torch.ones(bs, dtype=torch.int32),
                        weights[:, 1],
                        rows,
                        0.1,
                        hq,
                        sliding_window=window,
                        layer_rows=layer_rows,
                    )
            x = torch.zeros(bs, hidden, dtype=dtype)
            w = torch.ones(hidden, dtype=dtype)
            rmsnorm(x, w, 1e-5)
            fused_add_rmsnorm(x, x.clone(), w, 1e-5)
            silu_and_mul(torch.zeros(bs, 2 * inter, dtype=dtype))


class _TensorFacts:
    """What launch specialization sees of a tensor: its dtype and its data pointer modulo 64."""

    def __init__(self, dtype: Any, align: int) -> None:
        self.dtype, self.align = dtype, align

    def materialize(self) -> Any:
        import torch

        size = self.dtype.itemsize
        base = torch.empty(64 // size + 16, dtype=self.dtype)
        offset = (self.align - base.data_ptr() % 64) % 64
        return base[offset // size :]


def _facts(values: Any) -> Any:
    import torch

    if isinstance(values, dict):
        return {k: _facts(v) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return type(values)(_facts(v) for v in values)
    if isinstance(values, torch.Tensor):
        return _TensorFacts(values.dtype, values.data_ptr() % 64)
    return values


def _real(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _real(v) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return type(values)(_real(v) for v in values)
    return values.materialize() if isinstance(values, _TensorFacts) else values


def _fake_driver(arch: int) -> Any:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """Answers what the JIT front end asks before a launch; never launches."""

        @classmethod
        def is_active(cls) -> bool:
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            return "void*"

        def get_current_target(self) -> Any:
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self) -> Any:
            return torch.device("cpu")

        def get_benchmarker(self) -> Any:
            raise NotImplementedError

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

    return CompileOnlyDriver()


def compile_all(launches: list[tuple[str, str, tuple, dict]], arch: int) -> int:
    """Compile each distinct specialization (Triton's JIT cache dedupes them) for sm_`arch`."""
    import importlib

    from triton.runtime import driver

    driver.set_active(_fake_driver(arch))
    compiled: dict[str, int] = defaultdict(int)
    failures: dict[str, list[str]] = defaultdict(list)
    seconds: dict[str, float] = defaultdict(float)
    shared: dict[str, int] = defaultdict(int)  # bytes of shared memory, the largest launch
    limit = SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
    for module, name, args, kwargs in launches:
        kernel = getattr(importlib.import_module(module), name)
        before = len(kernel.device_caches[0][0]) if 0 in kernel.device_caches else 0
        start = time.perf_counter()
        try:
            binary = kernel.run(*_real(args), grid=None, warmup=True, **_real(kwargs))
        except Exception as e:  # noqa: BLE001 - every compile error is reported, none stops the check
            consts = {k: v for k, v in kwargs.items() if isinstance(v, (int, bool, str))}
            failures[name].append(f"{type(e).__name__}: {str(e)[:3000]}\n  launch options {consts}")
            continue
        seconds[name] += time.perf_counter() - start
        compiled[name] += len(kernel.device_caches[0][0]) - before
        shared[name] = max(shared[name], int(binary.metadata.shared))
        if "cubin" not in binary.asm:
            failures[name].append("compiled without a cubin (ptxas did not run)")
    names = sorted(set(compiled) | set(failures))
    for name in names:
        print(
            f"{name:24s} sm_{arch}: {compiled[name]:3d} specializations compiled, "
            f"{len(failures[name]):3d} launches failed, {seconds[name]:6.1f}s, "
            f"shared memory up to {shared[name] / 1024:5.1f} KiB  "
            + ("FAILED" if failures[name] else "ok")
        )
        if shared[name] > limit:
            failures[name].append(f"needs {shared[name]} B of shared memory; sm_{arch} has {limit}")
    for name in names:
        for message in dict.fromkeys(failures[name]):  # distinct messages, in order
            print(f"\n--- {name} ---\n{message}")
    return 1 if any(failures.values()) else 0  # printing filled the defaultdict with empty lists


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    parser.add_argument("--tests", nargs="*", default=DEFAULT_TESTS)
    parser.add_argument("--record-to", help=argparse.SUPPRESS)  # the recording subprocess
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "python"), str(ROOT / "sgl-kernel")]
    os.chdir(ROOT)
    if args.record_to:
        with open(args.record_to, "wb") as f:
            pickle.dump(record_launches(args.tests), f)
        return 0
    # NOTE: the interpreter patches triton.language for good, so recording runs in its own
    # process and this one, which compiles, never sets TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.pkl")
        cmd = [sys.executable, __file__, "--record-to", path, "--tests", *args.tests]
        subprocess.run(cmd, env={**env, "TRITON_INTERPRET": "1"}, check=True)
        with open(path, "rb") as f:
            launches = pickle.load(f)
    os.environ.pop("TRITON_INTERPRET", None)
    print(f"\nrecorded {len(launches)} launches; compiling for sm_{args.arch}")
    return compile_all(launches, args.arch)


if __name__ == "__main__":
    sys.exit(main())
