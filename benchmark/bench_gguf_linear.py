"""GGUF packed vs dense matmuls of SmolLM2-135M, per shape and per decode step.

Loads the default model (Q4_1 GGUF) in each form below and prints

1. ms per matmul for every distinct linear shape of the model (qkv, o, gate_up, down, LM head)
   at the given row counts, timed on the layers themselves (median of `--repeat`), and the sum
   over one decode step's matmuls (30 layers x 4 + the LM head);
2. with `--decode`, a `python -m sglang.bench_one_batch` decode step (median latency) at batch
   sizes `--decode-bs`, one subprocess per form, so the whole model runs (attention, norms,
   sampling) as a server's forward would.

Forms: packed Q4_1 with float32 activations (the CPU default), packed with bfloat16 activations,
and the dequantized (`--gguf-dequantize`) float32 and bfloat16 models. The packed matmul is
sgl_kernel's GGUF kernel (`SGLANG_CPU_GGUF_ACT` picks the activation quantization). One torch
thread by default so the comparison holds on a machine other work is using; the load average is
printed before and after each part.

    .venv/bin/python benchmark/bench_gguf_linear.py --rows 1 8 32 --decode --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from timing import median_ms

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.linear import LinearBase
from sglang.srt.model_loader.loader import get_model

MODEL = "smollm2-135m-instruct"
FORMS = {  # label: (dtype, --gguf-dequantize)
    "packed Q4_1, fp32 act.": ("float32", False),
    "packed Q4_1, bf16 act.": ("bfloat16", False),
    "dense fp32": ("float32", True),
    "dense bf16": ("bfloat16", True),
}


def shape_ms(model: torch.nn.Module, rows: int, dtype: torch.dtype, repeat: int) -> dict:
    """{shape label: ms per call} for one layer of each linear shape and the LM head, plus
    'step': all of one decode step's matmuls."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearBase)]
    head, processor = model.lm_head, model.logits_processor
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in layers:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in out:
                continue
            x = torch.randn(rows, layer.input_size, dtype=dtype)
            out[leaf] = median_ms(lambda: layer(x), repeat)
        hidden = torch.randn(rows, head.embedding_dim, dtype=dtype)
        out["lm_head"] = median_ms(lambda: processor.get_logits(hidden, head), repeat)
        inputs = [torch.randn(rows, m.input_size, dtype=dtype) for _, m in layers]

        def step() -> None:
            for (_, layer), x in zip(layers, inputs):
                layer(x)
            processor.get_logits(hidden, head)

        out["step"] = median_ms(step, repeat)
    return out


def weight_mib(model: torch.nn.Module) -> float:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def matmul_tables(args: argparse.Namespace) -> None:
    print(f"\n## Matmuls (ms per call, median of {args.repeat}), torch threads {args.threads}")
    print(f"load average before: {os.getloadavg()}")
    for rows in args.rows:
        results = {}
        for label, (dtype, dense) in FORMS.items():
            mc = ModelConfig(MODEL, dtype=dtype)
            model = get_model(
                model_config=mc, load_config=LoadConfig(gguf_dequantize=dense), device="cpu"
            )
            results[label] = (shape_ms(model, rows, mc.dtype, args.repeat), weight_mib(model))
            del model
        cols = list(next(iter(results.values()))[0])
        print(f"\n{rows} row(s):\n")
        print("| form | " + " | ".join(cols) + " | weight MiB |")
        print("|---|" + "---:|" * (len(cols) + 1))
        for label, (ms, mib) in results.items():
            print(f"| {label} | " + " | ".join(f"{ms[c]:.3f}" for c in cols) + f" | {mib:.0f} |")
    print(f"\nload average after: {os.getloadavg()}")


def decode_table(args: argparse.Namespace) -> None:
    # Threads: the engine's default (cores - 1, at least 1; SGLANG_CPU_OMP_THREADS_BIND binds).
    print(f"\n## bench_one_batch decode step (median), input {args.input_len} tokens")
    print(f"load average before: {os.getloadavg()}")
    print("| form | " + " | ".join(f"bs {b}" for b in args.decode_bs) + " |")
    print("|---|" + "---:|" * len(args.decode_bs))
    for label, (dtype, dense) in FORMS.items():
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "result.jsonl")
            cmd = [
                sys.executable,
                "-m",
                "sglang.bench_one_batch",
                "--model-path",
                MODEL,
                "--dtype",
                dtype,
                "--batch-size",
                *map(str, args.decode_bs),
                "--input-len",
                str(args.input_len),
                "--output-len",
                str(args.output_len),
                "--max-total-tokens",
                "8192",
                "--result-filename",
                result,
            ] + (["--gguf-dequantize"] if dense else [])
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            with open(result, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
        by_bs = {r["batch_size"]: r["median_decode_latency"] for r in rows}
        cells = [f"{by_bs[b] * 1e3:.1f} ms" for b in args.decode_bs]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average after: {os.getloadavg()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--decode", action="store_true", help="also time bench_one_batch decode steps")
    p.add_argument("--decode-bs", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# GGUF packed vs dense, {MODEL}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"SGLANG_CPU_GGUF_ACT={os.environ.get('SGLANG_CPU_GGUF_ACT', 'int8x2')}")
    matmul_tables(args)
    if args.decode:
        decode_table(args)


if __name__ == "__main__":
    main()
