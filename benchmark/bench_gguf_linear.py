"""GGUF packed vs dense linear layers of SmolLM2-135M: time of every linear matmul of one decode
step (30 layers x qkv, o, gate_up, down, plus the LM head) at given row counts.

Loads the default model three ways (Q4_1 packed with bf16 activations; dequantized bf16; float32,
which always loads dense) and times only the matmuls, one torch thread by default, so the
comparison holds on a machine other work is using (whole-step timings there are dominated by
scheduling noise).

    .venv/bin/python benchmark/bench_gguf_linear.py --rows 1 32 --threads 1
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.linear import LinearBase
from sglang.srt.model_loader.loader import get_model

FORMS = {
    "packed Q4_1 (bf16 act.)": ("bfloat16", False),
    "dense bf16": ("bfloat16", True),
    "dense fp32": ("float32", True),
}


def step_ms(model: torch.nn.Module, rows: int, dtype: torch.dtype, repeat: int) -> float:
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    inputs = [torch.randn(rows, m.input_size, dtype=dtype) for m in layers]
    head = model.lm_head
    hidden = torch.randn(rows, head.embedding_dim, dtype=dtype)
    processor = model.logits_processor

    def once() -> None:
        for layer, x in zip(layers, inputs):
            layer(x)
        processor.get_logits(hidden, head)

    with torch.no_grad():
        once()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}, torch threads {args.threads}")
    print("| form | " + " | ".join(f"{r} rows ms" for r in args.rows) + " | weight MiB |")
    print("|---|" + "---:|" * (len(args.rows) + 1))
    for label, (dtype, dense) in FORMS.items():
        mc = ModelConfig("smollm2-135m-instruct", dtype=dtype)
        model = get_model(
            model_config=mc, load_config=LoadConfig(gguf_dequantize=dense), device="cpu"
        )
        tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()
        mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        cells = [f"{step_ms(model, r, mc.dtype, args.repeat):.2f}" for r in args.rows]
        print(f"| {label} | " + " | ".join(cells) + f" | {mib:.0f} |", flush=True)
        del model
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
