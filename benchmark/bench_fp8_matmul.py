"""FP8 linear layers on CPU: why FP8 checkpoints are dequantized at load there.

For linear shapes of Llama-3.1-8B (random float8 e4m3 weights with 128x128 block scales), times
one layer's matmul at several row counts in the forms a CPU could run: the dense matmul on
weights dequantized at load (float32 and bfloat16, what layers/quantization/fp8_linear.py does on
CPU), dequantizing the float8 weight at every forward (float32, what keeping weights float8 in
memory would cost without a kernel), and PyTorch's float8 GEMM `torch._scaled_mm` on CPU with
per-token activation scales and per-channel weight scales (the activations quantized per call
included; the kernel takes no block scales, so this is its best case).

Results go to benchmark/results/fp8_matmul_cpu.md (command, machine, date, load average).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from machine_info import load_average, write_result
from timing import add_args, median_ms, start

from sglang.srt.layers.quantization.fp8 import dequantize, expand_scale

SHAPES = {"o_proj": (4096, 4096), "down_proj": (4096, 14336)}  # name: (out, in)
BLOCK = (128, 128)
FP8 = torch.float8_e4m3fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    add_args(parser)
    args = parser.parse_args()
    md = start("FP8 linear layers on CPU (Llama-3.1-8B shapes)", args)
    md += ["", f"Block scales {BLOCK[0]}x{BLOCK[1]}; median of {args.repeats} runs after one "
           "warm-up; ms per call."]  # fmt: skip
    md += ["", "| layer [out x in] | rows | dense fp32 | dense bf16 | dequant per forward fp32 | _scaled_mm (+ activation quantization) |"]  # fmt: skip
    md += ["|---|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    for name, (out_features, in_features) in SHAPES.items():
        q = (torch.randn(out_features, in_features, generator=gen) * 64).clamp(-448, 448).to(FP8)
        blocks = (-(-out_features // BLOCK[0]), -(-in_features // BLOCK[1]))
        rows, block_in = expand_scale(torch.rand(blocks, generator=gen) * 1e-3, out_features,
                                      in_features, BLOCK)  # fmt: skip
        dense32 = dequantize(q, rows, block_in)
        dense16 = dense32.bfloat16()
        channel = rows.amax(1, keepdim=True).T.contiguous()  # [1, out]
        for m in args.rows:
            x = torch.randn(m, in_features, generator=gen)
            x16 = x.bfloat16()

            def scaled_mm() -> torch.Tensor:
                xs = (x.abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
                xq = (x / xs).to(FP8)
                return torch._scaled_mm(xq, q.T, scale_a=xs, scale_b=channel,
                                        out_dtype=torch.bfloat16)  # fmt: skip

            cells = [
                median_ms(lambda: F.linear(x, dense32), args.repeats),
                median_ms(lambda: F.linear(x16, dense16), args.repeats),
                median_ms(lambda: F.linear(x, dequantize(q, rows, block_in)), args.repeats),
                median_ms(scaled_mm, args.repeats),
            ]
            md.append(f"| {name} [{out_features} x {in_features}] | {m} | "
                      + " | ".join(f"{c:.1f}" for c in cells) + " |")  # fmt: skip
    md += ["", f"- Load average after the run: `{load_average()}`"]
    write_result(md, "fp8_matmul_cpu.md", save=not args.no_save)


if __name__ == "__main__":
    main()
