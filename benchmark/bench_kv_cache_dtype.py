"""`--kv-cache-dtype` on SmolLM2 (CPU): agreement with HuggingFace, attention scores, decode speed.

For each KV cache dtype (auto = the model dtype, fp8_e4m3, fp8_e5m2) and model dtype, an
in-process engine (ModelRunner + Scheduler, torch_native attention) greedily generates
`--output-len` tokens for a few chat prompts, every request asking for attention tokens
(top-10, mean over all 30 layers). The reference is HuggingFace transformers in float32 (eager
attention) on the same GGUF file. Reported:

  * token agreement: mean share of each answer equal to HF's before the first different token,
    and the share of prompts whose whole answer is HF's;
  * attention: max |score - HF score| over every reported (position, score) of the tokens
    whose context is still HF's (up to and including the first different token), and the mean
    overlap of the reported top-10 positions with HF's top-10;
  * decode speed: median `Scheduler.step()` time with batch 1 and 8 (seeded random prompts),
    the dtypes of one model dtype decoding in lockstep so machine drift lands on all alike;
  * KV pool: bytes per token and tokens per GiB.

Results go to benchmark/results/kv_cache_dtype_cpu.md (command, machine, date, load average).
"""

from __future__ import annotations

import argparse
import os
import statistics
from types import SimpleNamespace
from typing import Any

import torch
from bench_attention_capture import lockstep_round
from machine_info import header, load_average, write_result

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.hf_transformers_utils import get_tokenizer
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_loader import resolve_model_path
from sglang.test.runners import HFRunner, SRTRunner

MODEL = "smollm2-135m-instruct"
NUM_LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain why the sky is blue in one sentence.",
    "List three primary colors.",
    "What is 12 times 12?",
    "Give me a tip for learning to program.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--speed-batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--speed-input-len", type=int, default=128)
    p.add_argument("--speed-output-len", type=int, default=48)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-write", action="store_true")
    return p.parse_args()


def hf_reference(prompts: list[list[int]], steps: int) -> list[tuple[list[int], list]]:
    path = resolve_model_path(MODEL)
    hf = HFRunner(os.path.dirname(path), gguf_file=os.path.basename(path))
    refs = []
    for p in prompts:
        out, rows = hf.greedy_with_attention(p, steps)
        refs.append((out.output_ids, [r.mean(0) for r in rows]))  # mean over all layers
    return refs


def quality(dtype: str, kv: str, prompts, refs, steps: int) -> dict[str, Any]:
    runner = SRTRunner(MODEL, dtype=dtype, kv_cache_dtype=kv, max_total_tokens=8192,
                       return_attention_tokens=True, attention_capture_layers="all",
                       attention_tokens_top_k=10)  # fmt: skip
    opt = AttentionRequest(top_k=10, layers=tuple(range(NUM_LAYERS)))
    reqs = [runner.make_req(p, steps, attention=opt, temperature=0.0, ignore_eos=True)
            for p in prompts]  # fmt: skip
    for req in reqs:
        runner.scheduler.add_request(req)
    runner.scheduler.run_until_idle()
    prefix_shares, max_diff, overlaps = [], 0.0, []
    for req, (ref_ids, ref_rows) in zip(reqs, refs):
        same = next((i for i, (a, b) in enumerate(zip(req.output_ids, ref_ids)) if a != b), steps)
        prefix_shares.append(same / steps)
        # Record t is the query that produced token t: its context is HF's while t <= same.
        for t in range(min(same + 1, steps)):
            rec, row = req.attention_records[t], ref_rows[t]
            for pos, score in zip(rec.positions, rec.scores):
                max_diff = max(max_diff, abs(score - row[pos].item()))
            hf_top = set(row.topk(min(10, row.numel())).indices.tolist())
            overlaps.append(len(hf_top & set(rec.positions)) / len(hf_top))
    return {
        "dtype": dtype,
        "kv": kv,
        "prefix_share": statistics.mean(prefix_shares),
        "all_same": sum(s == 1.0 for s in prefix_shares) / len(prefix_shares),
        "attn_max_diff": max_diff,
        "topk_overlap": statistics.mean(overlaps),
    }


def speed(dtype: str, args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """Median decode step (seconds) per (kv dtype, batch size), the KV dtypes in lockstep."""
    runners = {kv: SRTRunner(MODEL, dtype=dtype, kv_cache_dtype=kv, max_total_tokens=16384)
               for kv in KV_DTYPES}  # fmt: skip
    out: dict[tuple[str, int], float] = {}
    for bs in args.speed_batch_sizes:
        ns = SimpleNamespace(batch_size=bs, input_len=args.speed_input_len,
                             output_len=args.speed_output_len, top_k=10)  # fmt: skip
        lockstep_round(runners, ns)  # warm-up
        samples: dict[str, list[float]] = {kv: [] for kv in KV_DTYPES}
        for _ in range(args.repeat):
            for kv, times in lockstep_round(runners, ns).items():
                samples[kv] += times
        for kv in KV_DTYPES:
            out[(kv, bs)] = statistics.median(samples[kv])
            print(f"{dtype} {kv:9s} bs={bs}: {out[(kv, bs)] * 1e3:.2f} ms/step", flush=True)
    return out


def table(rows: list[dict[str, Any]], steps: dict, batch_sizes: list[int]) -> list[str]:
    bs_cols = " | ".join(f"decode ms/step bs={bs} (tok/s)" for bs in batch_sizes)
    lines = [
        "| model dtype | KV dtype | KV bytes/token | tokens per GiB | token agreement | "
        f"whole answer same | max attention-score diff | top-10 overlap | {bs_cols} |",
        "|---" * (8 + len(batch_sizes)) + "|",
    ]
    for r in rows:
        kv_dtype = {"auto": getattr(torch, r["dtype"]), "fp8_e4m3": torch.float8_e4m3fn,
                    "fp8_e5m2": torch.float8_e5m2}[r["kv"]]  # fmt: skip
        cell = MHATokenToKVPool.cell_size_bytes(KV_HEADS, HEAD_DIM, NUM_LAYERS, kv_dtype)
        speeds = " | ".join(
            f"{steps[(r['dtype'], r['kv'], bs)] * 1e3:.1f} "
            f"({bs / steps[(r['dtype'], r['kv'], bs)]:.1f})"
            for bs in batch_sizes
        )
        lines.append(
            f"| {r['dtype']} | {r['kv']} | {cell} | {2**30 // cell} | "
            f"{r['prefix_share'] * 100:.1f} % | {r['all_same'] * 100:.0f} % | "
            f"{r['attn_max_diff']:.4f} | {r['topk_overlap'] * 100:.1f} % | {speeds} |"
        )
    return lines


def main() -> int:
    args = parse_args()
    load_before = load_average()
    torch.set_num_threads(args.threads)
    tok = get_tokenizer(resolve_model_path(MODEL))
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS
    ]
    prompts = [p if isinstance(p, list) else list(p["input_ids"]) for p in prompts]
    refs = hf_reference(prompts, args.output_len)
    rows, steps = [], {}
    for dtype in args.dtypes:
        for kv in KV_DTYPES:
            rows.append(quality(dtype, kv, prompts, refs, args.output_len))
            print(rows[-1], flush=True)
        for (kv, bs), step in speed(dtype, args).items():
            steps[(dtype, kv, bs)] = step
    md = header("`--kv-cache-dtype` on CPU: accuracy and decode speed", args.threads, load_before)
    md += [
        f"- Model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), torch_native attention. "
        f"Quality: {len(QUESTIONS)} chat prompts, {args.output_len} greedy tokens, against "
        "HuggingFace float32 eager on the same file; attention tokens top-10, mean over all 30 "
        "layers, compared while the context is still HF's. Speed: median Scheduler.step() over "
        f"{args.repeat} rounds of {args.speed_output_len} tokens, input {args.speed_input_len}, "
        "KV dtypes decoding in lockstep.",
        "",
        *table(rows, steps, args.speed_batch_sizes),
        "",
    ]
    write_result(md, "kv_cache_dtype_cpu.md", save=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
