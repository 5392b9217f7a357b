"""int4 linear layers on CPU: matmul time per form, and the weight memory of an 8B AWQ model.

For linear shapes of Llama-3.1-8B (group size 128, random codes, scales and zeros), times one
layer's matmul at several row counts (1 = decode of one sequence, more = batched decode or a
prefill chunk) in each form: dense float32 and bfloat16 `F.linear` (an unquantized checkpoint),
the CPU int4 kernel `aten._weight_int4pack_mm_for_cpu` with float32 and bfloat16 activations,
"unpack+dense": the packed codes unpacked and dequantized, then a dense float32 matmul (what
`int4pack` layers run from `DENSE_MIN_ROWS` rows on with float32 activations), and the `dequant`
form (codes two per byte, dequantized per forward). The kernel with float32 activations is timed
only up to 8 rows: it takes seconds per call beyond. Then counts the bytes an 8B AWQ checkpoint
keeps in memory in each int4 form against bf16 (32 decoder layers of int4 linears; embeddings,
lm_head and norms stay bf16). layers/quantization/int4.py holds the forms.

Results go to benchmark/results/int4_matmul_cpu.md (command, machine, date, load average).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from machine_info import load_average, write_result
from timing import add_args, median_ms, start

from sglang.srt.layers.quantization.int4 import DequantInt4, Int4Shard, PackedInt4

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 4096, 14336, 32, 128256
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SHAPES = {  # name: (out, in)
    "qkv_proj": ((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_up_proj": (2 * INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
}
GROUP = 128


def random_shard(out_features: int, in_features: int, seed: int) -> Int4Shard:
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP
    return Int4Shard(
        q=torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(groups, out_features, generator=gen) * 0.01).half(),
        zeros=torch.randint(0, 16, (groups, out_features), generator=gen).float(),
        g_idx=torch.arange(in_features) // GROUP,
    )


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 64])
    parser.add_argument("--timed", nargs="+", default=["o_proj", "down_proj"], choices=SHAPES)
    add_args(parser)
    args = parser.parse_args()
    md = start("int4 linear layers on CPU (Llama-3.1-8B shapes)", args)
    md += ["", f"Group size {GROUP}; median of {args.repeats} runs after one warm-up; ms per call."]
    md += ["", "| layer [out x in] | rows | dense fp32 | dense bf16 | kernel fp32 | kernel bf16 | unpack+dense fp32 | dequant fp32 |"]  # fmt: skip
    md += ["|---|---|---|---|---|---|---|---|"]
    memory: dict[str, dict[str, int]] = {}
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
    for seed, (name, (out_features, in_features)) in enumerate(SHAPES.items()):
        shard = random_shard(out_features, in_features, seed)
        packed32 = PackedInt4(shard, None, GROUP, torch.float32)
        packed16 = PackedInt4(shard, None, GROUP, torch.bfloat16)
        dequant = DequantInt4(shard, torch.device("cpu"))
        memory[name] = {
            "bf16": out_features * in_features * 2,
            "int4pack (bf16 model)": nbytes(packed16.tensors()),
            "int4pack (fp32 model)": nbytes(packed32.tensors()),
            "dequant": nbytes(dequant.tensors()),
        }
        if name not in args.timed:
            continue
        weight = shard.dequantize()
        weight_bf16 = weight.bfloat16()
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            xb = x.bfloat16()
            w32, sz32 = packed32.weight, packed32.scales_zeros
            cells = [
                median_ms(lambda: F.linear(x, weight), args.repeats),
                median_ms(lambda: F.linear(xb, weight_bf16), args.repeats),
                median_ms(lambda: kernel(x, w32, GROUP, sz32), args.repeats) if rows <= 8 else None,
                median_ms(lambda: packed16(xb), args.repeats),
                median_ms(lambda: F.linear(x, packed32.dense_weight()), args.repeats),
                median_ms(lambda: dequant(x), args.repeats),
            ]
            md.append(
                f"| {name} [{out_features} x {in_features}] | {rows} | "
                + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
                + " |"
            )

    dense_rest = (2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN) * 2  # embed, lm_head, norms
    md += [
        "",
        "Weight memory of an 8B AWQ model (32 decoder layers, bf16 embeddings/lm_head/norms):",
    ]
    md += ["", "| form | linear layers | whole model | vs bf16 |", "|---|---|---|---|"]
    bf16_total = LAYERS * sum(m["bf16"] for m in memory.values()) + dense_rest
    for form in memory["o_proj"]:
        linears = LAYERS * sum(m[form] for m in memory.values())
        total = linears + dense_rest
        md.append(
            f"| {form} | {linears / 2**30:.2f} GiB | {total / 2**30:.2f} GiB | "
            f"{total / bf16_total:.2f}x |"
        )
    md += ["", f"- Load average after the run: `{load_average()}`"]
    write_result(md, "int4_matmul_cpu.md", save=not args.no_save)


if __name__ == "__main__":
    main()
