"""Engine-core latency on CPU: our `bench_one_batch` against HuggingFace transformers `generate`.

Run by `make bench`. For each dtype and batch size, on the same seeded random prompts:
  * sglang: `python -m sglang.bench_one_batch` in a fresh subprocess per timed run (it warms
    up, then times one batch), read back from its JSONL record;
  * HF: `AutoModelForCausalLM` loaded from the same GGUF file. Prefill is a separate forward of
    the prompt batch (LM head on the last position only, as `generate` does); decode steps are
    the gaps between consecutive sampling steps inside a greedy `generate` of exactly
    `output_len` tokens, stamped by a no-op logits processor. The subtraction estimate
    (total - prefill) / (output_len - 1) is kept in the raw JSON.
The `--repeat` runs of each configuration alternate between the engines, so slow drift in the
load of a shared machine hits both alike; each reported number is the best (lowest) of the
repeats, since contention only ever adds time. Both engines use the same number of intra-op
threads. The markdown table, the exact command, the machine and the date
go to `benchmark/results/engine_core_cpu.md`, every sample beside it as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sglang.bench_one_batch import synthetic_input_ids
from sglang.srt.model_loader import resolve_model_path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SEED = 0
QUICK = dict(dtypes=["float32"], batch_sizes=[1, 4], input_len=64, output_len=8, repeat=1)
FULL = dict(
    dtypes=["float32", "bfloat16"], batch_sizes=[1, 16], input_len=256, output_len=32, repeat=3
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"Small run: {QUICK}.")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None, help="Timed runs per configuration.")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="Intra-op threads (both)."
    )
    p.add_argument("--engines", nargs="+", choices=["sglang", "hf"], default=["sglang", "hf"])
    p.add_argument(
        "--output", default=None, help="Markdown file (default: results/engine_core_cpu.md)."
    )
    args = p.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_len < 2 or args.repeat < 1:
        p.error("--output-len must be >= 2 (decode steps are timed) and --repeat >= 1")
    if args.output is None:
        name = "engine_core_cpu_quick.md" if args.quick else "engine_core_cpu.md"
        args.output = str(RESULTS / name)
    return args


# --------------------------------------------------------------------- machine description


def cpu_model() -> str:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = fields.get("model name", "unknown CPU")
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def machine(threads: int) -> dict[str, Any]:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def summarize(engine: str, dtype: str, bs: int, samples: list[dict[str, float]]) -> dict:
    """One table row: the best (lowest) of each quantity over the repeats, plus every sample."""
    row: dict[str, Any] = {"engine": engine, "dtype": dtype, "batch": bs}
    for key in samples[0]:
        row[key] = min(s[key] for s in samples)
    row["samples"] = samples
    return row


# --------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace, dtype: str, bs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.jsonl")
        cmd = [
            sys.executable, "-m", "sglang.bench_one_batch",
            "--model-path", MODEL, "--device", "cpu", "--dtype", dtype,
            "--batch-size", str(bs),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--random-seed", str(SEED), "--run-name", f"sglang-{dtype}",
            "--result-filename", result, "--log-level", "warning",
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr[-3000:]
            raise SystemExit(f"bench_one_batch failed ({shlex.join(cmd)}):\n{tail}")
        with open(result, encoding="utf-8") as f:
            rec = json.loads(f.readline())
    return {
        "prefill_s": rec["prefill_latency"],
        "decode_step_s": rec["median_decode_latency"],
        "total_s": rec["total_latency"],
    }


# --------------------------------------------------------------------- transformers


def load_hf(dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(resolve_model_path(MODEL))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    return model.eval()


class StepClock:
    """A logits processor that only records when `generate` reaches each sampling step.

    The first stamp follows the prompt forward, each later one a single-token decode forward,
    so decode-step latencies are measured inside `generate` itself.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


@torch.inference_mode()
def hf_generate(model: Any, ids: torch.Tensor, new_tokens: int, clock: Any = None) -> Any:
    from transformers import LogitsProcessorList

    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=model.config.eos_token_id,
        logits_processor=LogitsProcessorList([clock] if clock else []),
    )


@torch.inference_mode()
def hf_prefill(model: Any, ids: torch.Tensor) -> float:
    mask = torch.ones_like(ids)
    tic = time.perf_counter()
    # logits_to_keep=1: like generate, only the last position goes through the LM head.
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    out.logits[:, -1].argmax(-1).tolist()
    return time.perf_counter() - tic


def hf_sample(model: Any, ids: torch.Tensor, output_len: int) -> dict[str, float]:
    prefill = hf_prefill(model, ids)
    clock = StepClock()
    tic = time.perf_counter()
    out = hf_generate(model, ids, output_len, clock)
    total = time.perf_counter() - tic
    assert out.shape[1] == ids.shape[1] + output_len, out.shape
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {
        "prefill_s": prefill,
        "decode_step_s": statistics.median(steps),
        "total_s": total,
        "prefill_inside_generate_s": clock.stamps[0] - tic,
        # Fragile when prefill dominates the total; kept for reference only.
        "decode_step_by_subtraction_s": max(total - prefill, 0.0) / (output_len - 1),
    }


# --------------------------------------------------------------------- report


def add_rates(row: dict[str, Any], input_len: int) -> dict[str, Any]:
    row["prefill_tok_s"] = row["batch"] * input_len / row["prefill_s"]
    row["decode_tok_s"] = row["batch"] / row["decode_step_s"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | dtype | batch | prefill s | prefill tok/s | median decode step s "
        "| decode tok/s | total s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['dtype']} | {r['batch']} | {r['prefill_s']:.4f} | "
            f"{r['prefill_tok_s']:.1f} | {r['decode_step_s']:.4f} | {r['decode_tok_s']:.1f} | "
            f"{r['total_s']:.3f} |"
        )
    return "\n".join(lines)


def comparisons(rows: list[dict[str, Any]]) -> list[str]:
    """Per (dtype, batch): our time over HF's (below 1.0 means ours is faster)."""
    by_key = {(r["engine"], r["dtype"], r["batch"]): r for r in rows}
    out = []
    for (engine, dtype, bs), ours in by_key.items():
        hf = by_key.get(("hf", dtype, bs))
        if engine != "sglang" or hf is None:
            continue
        p = ours["prefill_s"] / hf["prefill_s"]
        d = ours["decode_step_s"] / hf["decode_step_s"]
        out.append(
            f"- {dtype}, batch {bs}: prefill {p:.3f} ({'ok' if p <= 1.0 else 'slower'}), "
            f"decode step {d:.3f} ({'ok' if d <= 1.0 else 'slower'})"
        )
    return out


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict) -> str:
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "# Engine core on CPU: sglang bench_one_batch vs HuggingFace generate",
        "",
        f"- Date: {date}",
        f"- Command: `{command}`",
        f"- Machine: {info['cpu']}, {info['cores']} cores; {info['threads']} intra-op threads "
        "for both engines",
        f"- Software: torch {info['torch']}, transformers {info['transformers']}, "
        f"Python {info['python']} ({info['platform']})",
        f"- Model: {MODEL} (GGUF, dequantized by both engines to the listed dtype)",
        f"- Workload: random token ids (seed {SEED}), input {args.input_len}, output "
        f"{args.output_len}, greedy; every number is the best of {args.repeat} timed runs "
        "(after a warm-up; the engines take turns run by run; all samples are in the JSON).",
        "- Decode step: median over the decode steps of a run (sglang: its timed steps; HF: "
        "gaps between sampling steps inside `generate`). HF prefill: a separate forward of "
        "the prompt batch with the LM head on the last position only, as in `generate`.",
        f"- Load average at start (1/5/15 min): {info['loadavg']} (the machine may be shared)",
        "",
        table(rows),
        "",
        "Time ratios sglang / hf (target: <= 1.00):",
        "",
        *comparisons(rows),
        "",
    ]
    text = "\n".join(lines)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    raw = {"command": command, "date": date, "machine": info, "args": vars(args), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return text


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    info = machine(args.threads)
    rows: list[dict[str, Any]] = []
    for dtype in args.dtypes:
        model = load_hf(dtype) if "hf" in args.engines else None
        for bs in args.batch_sizes:
            samples: dict[str, list[dict[str, float]]] = {e: [] for e in args.engines}
            if model is not None:
                ids = synthetic_input_ids(bs, args.input_len, model.config.vocab_size, SEED)
                ids = torch.tensor(ids)
                hf_generate(model, ids, min(4, args.output_len))  # warm-up, as ours does
            for i in range(args.repeat):
                print(f"{dtype} batch {bs}: run {i + 1}/{args.repeat}", flush=True)
                if "sglang" in samples:
                    samples["sglang"].append(run_ours(args, dtype, bs))
                if model is not None:
                    samples["hf"].append(hf_sample(model, ids, args.output_len))
            for engine in ("sglang", "hf"):
                if engine in samples:
                    row = summarize(engine, dtype, bs, samples[engine])
                    rows.append(add_rates(row, args.input_len))
        del model
    text = write_report(args, rows, info)
    print(text)
    print(f"Wrote {args.output} and {Path(args.output).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
