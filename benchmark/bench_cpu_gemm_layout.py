"""CPU GEMM time of SmolLM2-135M's matmul shapes by weight layout (layers/cpu_weight_layout.py).

One thread, CPU time (`time.process_time`, so a busy machine inflates it less than wall time) of
one decode step's GEMMs (30 layers of qkv / o / gate_up / down plus the LM head) for each dtype and
row count: `linear` is F.linear on the checkpoint's row-major [out, in] weight, `tstorage` the same
weight in transposed (column-major) storage, `packed` oneDNN's prepacked linear. `err` is the
largest difference from a float32 reference relative to its largest value.

    .venv/bin/python benchmark/bench_cpu_gemm_layout.py
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

LAYERS = 30
VOCAB = 49152
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, VOCAB)]  # (in, out)
REPEATS = 20

Make = Callable[[torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]]


def row_major(w: torch.Tensor, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.linear(x, w)


def column_major(w: torch.Tensor, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    moved = w.t().contiguous().t()
    return lambda x: F.linear(x, moved)


def onednn_packed(w: torch.Tensor, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def step_ms(make: Make, rows: int, dtype: torch.dtype) -> tuple[float, float]:
    """CPU ms of one decode step's GEMMs, and the worst relative error against float32."""
    total, err = 0.0, 0.0
    for k, n in SHAPES:
        w = torch.randn(n, k).to(dtype)
        x = torch.randn(rows, k).to(dtype)
        fn = make(w, rows)
        ref = F.linear(x.float(), w.float())
        err = max(err, ((fn(x).float() - ref).abs().max() / ref.abs().max()).item())
        for _ in range(3):
            fn(x)
        start = time.process_time()
        for _ in range(REPEATS):
            fn(x)
        per_call = (time.process_time() - start) / REPEATS
        total += per_call * (1 if n == VOCAB else LAYERS)
    return 1e3 * total, err


def main() -> None:
    torch.set_num_threads(1)
    variants: dict[str, Make] = {
        "linear": row_major,
        "tstorage": column_major,
        "packed": onednn_packed,
    }
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 4, 8, 32):
            cells = []
            for name, make in variants.items():
                ms, err = step_ms(make, rows, dtype)
                cells.append(f"{name} {ms:.1f} (err {err:.1e})")
            print(dtype, rows, " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
