"""int4 linear layers on CUDA: the Triton int4 GEMM against dequantize-then-dense and dense 16-bit.

For linear shapes of Llama-3.1-8B (group size 128, random codes, scales and zeros; optionally
GPTQ act order), times one layer's matmul at several row counts (1 = decode of one sequence, more
= batched decode or a prefill chunk) in each form: dense `F.linear` on a 16-bit weight (an
unquantized checkpoint), `dequant` (codes two per byte, dequantized to a dense weight per forward,
then `F.linear`) and `triton` (sgl_kernel.int4_gemm, what int4 layers run on CUDA). The row count
from which `dequant` beats `triton` is where a dequantize-to-dense prefill fallback would pay
(layers/quantization/int4.py enables none until this measures one).

Results go to benchmark/results/int4_gemm_cuda.md (command, GPU, date). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys

import torch
import torch.nn.functional as F
from machine_info import write_result

from sglang.srt.layers.quantization.int4 import DequantInt4, Int4Shard, TritonInt4

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336)}  # fmt: skip
GROUP = 128


def random_shard(out_features: int, in_features: int, act_order: bool, seed: int) -> Int4Shard:
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP
    g_idx = torch.arange(in_features) // GROUP
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    return Int4Shard(
        q=torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(groups, out_features, generator=gen) * 0.01).half(),
        zeros=torch.randint(0, 16, (groups, out_features), generator=gen).float(),
        g_idx=g_idx,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--act-order", action="store_true", help="GPTQ desc_act g_idx tables")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    from triton.testing import do_bench

    dev, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [
        "# int4 linear layers on CUDA (Llama-3.1-8B shapes)",
        "",
        f"- Command: `{' '.join(shlex.quote(a) for a in ['.venv/bin/python', *sys.argv])}`",
        f"- GPU: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}",
        f"- Date: {now}",
        "",
        f"Group size {GROUP}, {args.dtype} activations, act order {args.act_order}; "
        "triton.testing.do_bench median, ms per call.",
        "",
        "| layer [out x in] | rows | dense 16-bit | dequant | triton int4 | triton / dense |",
        "|---|---|---|---|---|---|",
    ]
    for seed, name in enumerate(args.shapes):
        out_features, in_features = SHAPES[name]
        shard = random_shard(out_features, in_features, args.act_order, seed)
        dense_weight = shard.dequantize().to(dev, dtype)
        dequant, triton_int4 = DequantInt4(shard, dev), TritonInt4(shard, dev)
        for rows in args.rows:
            x = torch.randn(rows, in_features, device=dev, dtype=dtype)
            err = (triton_int4(x).float() - dequant(x).float()).abs().max().item()
            assert err < 0.05 * dequant(x).float().abs().max().item() + 1e-3, f"{name}: {err}"
            cells = [
                do_bench(lambda: F.linear(x, dense_weight), return_mode="median"),
                do_bench(lambda: dequant(x), return_mode="median"),
                do_bench(lambda: triton_int4(x), return_mode="median"),
            ]
            md.append(
                f"| {name} [{out_features} x {in_features}] | {rows} | "
                + " | ".join(f"{c:.3f}" for c in cells)
                + f" | {cells[2] / cells[0]:.2f}x |"
            )
    write_result(md, "int4_gemm_cuda.md", save=not args.no_save)


if __name__ == "__main__":
    main()
