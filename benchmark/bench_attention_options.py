"""Decode cost of the attention-token options against plain capture: CPU, batch 16.

Each option of `option_fields` is a set of request fields (as a client sends them); every request of its
batch carries them. One in-process engine (ModelRunner + Scheduler) per option, the same seeded
prompts, decoding in lockstep with bench_attention_capture.py's method (step i of every option
back to back, each `Scheduler.step()` timed with sampling, output processing and the capture's
host copy; median over `--repeat` rounds). Targets (issue 14, item 8): stats and spans within 2 %
of plain capture, 8 heads with aggregation "none" within 5 %, logit lens on 4 layers within 10 %.

To add an option, add its name to OPTION_NAMES and its fields to `option_fields`; request fields other than the attention-token ones need
their parser in `request_options` (where the tokenizer manager's validation is reproduced).
The results also give the lens's floor on this CPU: its extra LM-head rows' products over the
peak rate of the instruction that does them (vector_peak.py, measured in the run).
Results go to `benchmark/results/attention_options_cpu.md` (`_dequantized.md` with `--gguf-dequantize`;
command, machine, date, load average).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention_capture import lockstep_round, prompts  # noqa: E402
from machine_info import cpu_model  # noqa: E402
from vector_peak import vector_peaks  # noqa: E402

from sglang.srt.attention_capture.config import parse_attention_request  # noqa: E402
from sglang.srt.managers.io_struct import ATTENTION_FIELDS  # noqa: E402
from sglang.srt.managers.layer_probes import PROBE_FIELDS, parse_probe_request  # noqa: E402
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.test.runners import SRTRunner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
BASELINE = "plain capture"
LENS = "logit lens (4 layers)"
OPTION_NAMES = (BASELINE, "stats", "spans (4)", "8 heads, none", LENS)


def option_fields(input_len: int) -> dict[str, dict[str, Any]]:
    """Option name -> request fields of every request in its batch (prompts of input_len)."""
    quarter = input_len // 4
    spans = [{"name": f"q{i}", "start": quarter * i, "end": quarter * (i + 1)} for i in range(4)]
    return {
        BASELINE: {"return_attention_tokens": True},
        "stats": {"return_attention_tokens": True, "attention_stats": True},
        "spans (4)": {"return_attention_tokens": True, "attention_spans": spans},
        "8 heads, none": {
            "return_attention_tokens": True,
            "attention_heads": list(range(8)),
            "attention_head_aggregation": "none",
        },
        # Four layers spread from the top (valid for models of 22 layers or more).
        LENS: {"return_attention_tokens": True, "logit_lens": {"layers": [-22, -15, -8, -1]}},
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--gguf-dequantize",
        action="store_true",
        help="Dense weights (--gguf-dequantize): the configuration whose logit lens is checked "
        "against HF within 1e-4; results go to attention_options_cpu_dequantized.md.",
    )
    p.add_argument("--capture-layers", default="last", help="--attention-capture-layers")
    p.add_argument("--options", nargs="+", default=list(OPTION_NAMES), choices=OPTION_NAMES)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-write", action="store_true", help="Print only; do not write results.")
    return p.parse_args()


def request_options(
    runner: SRTRunner, fields: dict[str, Any], prompt_len: int, max_new_tokens: int
) -> dict:
    """Req keyword arguments for one request's fields, validated as the tokenizer manager does."""
    from sglang.srt.attention_capture import resolve_capture_layers

    mc = runner.model_runner.model_config
    args = runner.server_args
    attention = parse_attention_request(
        {name: fields.get(name) for name in ATTENTION_FIELDS},
        enabled=True,
        max_top_k=int(args.attention_tokens_top_k),
        captured_layers=resolve_capture_layers(args.attention_capture_layers, mc.num_hidden_layers),
        num_layers=mc.num_hidden_layers,
        num_heads=mc.num_attention_heads,
        prompt_len=prompt_len,
    )
    probe = parse_probe_request(
        {name: fields.get(name) for name in PROBE_FIELDS},
        num_layers=mc.num_hidden_layers,
        hidden_size=mc.hidden_size,
        max_new_tokens=max_new_tokens,
        max_bytes=int(args.hidden_states_max_bytes),
    )
    return {"attention": attention, "probe": probe}


def start_batch(runner: SRTRunner, name: str, args: argparse.Namespace) -> None:
    sched = runner.scheduler
    for i, ids in enumerate(prompts(args.batch_size, args.input_len)):
        params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        fields = option_fields(args.input_len)[name]
        extra = request_options(runner, fields, len(ids), args.output_len)
        sched.add_request(Req(f"{name}-{i}-{time.time_ns()}", ids, params, **extra))
    while len(sched.running_batch.reqs) < args.batch_size:
        sched.step()


def run(args: argparse.Namespace) -> tuple[dict[str, float], tuple[int, int, int]]:
    """Median decode step per option, and the model's (vocab, hidden size, layers)."""
    runners = {
        name: SRTRunner(
            args.model,
            dtype=args.dtype,
            max_total_tokens=16384,
            random_seed=0,
            return_attention_tokens=True,
            attention_tokens_top_k=args.top_k,
            attention_capture_layers=args.capture_layers,
            gguf_dequantize=args.gguf_dequantize,
        )  # fmt: skip
        for name in args.options
    }
    lockstep_round(runners, args, start_batch)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeat):
        for name, times in lockstep_round(runners, args, start_batch).items():
            samples[name].extend(times)
    mc = next(iter(runners.values())).model_runner.model_config
    dims = (mc.vocab_size, mc.hidden_size, mc.num_hidden_layers)
    return {name: statistics.median(s) for name, s in samples.items()}, dims


def lens_floor(
    args: argparse.Namespace, steps: dict[str, float], dims: tuple[int, int, int]
) -> str:
    """A markdown line: the least time the lens's extra LM-head rows can take on this CPU.

    Every lens layer but the last adds one LM-head row per request; a row is vocab x hidden
    products, which the packed (GGUF, two activation passes) kernel does at 32 per `vpdpbusd`
    and the dense float32 matmul at 16 per `vfmadd231ps`. Divided by this CPU's measured peak of
    that instruction (benchmark/vector_peak.py, in this run, on --threads threads), this is a
    floor no kernel reaches (AMX tiles, where present, are not counted)."""
    vocab, hidden, layers = dims
    asked = option_fields(args.input_len)[LENS]["logit_lens"]["layers"]
    lens_layers = {layer % layers for layer in asked}
    rows = args.batch_size * len(lens_layers - {layers - 1})
    peaks = vector_peaks(args.threads)
    if peaks is None or BASELINE not in steps:
        return (
            "- Lens floor: not measured (no AVX-512 VNNI, no C compiler or no plain-capture run)."
        )
    instr, per = ("vfmadd231ps", 16) if args.gguf_dequantize else ("vpdpbusd", 32)
    count = rows * vocab * hidden / per
    floor_s = count / (peaks[instr] * 1e9 * args.threads)
    return (
        f"- Lens floor: its {rows} extra LM-head rows ({rows} x {vocab} x {hidden} products) are "
        f"{count / 1e6:.1f} M `{instr}` at this CPU's peak of {peaks[instr]:.2f} G/s per core x "
        f"{args.threads} threads (benchmark/vector_peak.py, this run): at least "
        f"{floor_s * 1e3:.2f} ms, {floor_s / steps[BASELINE] * 100:.1f} % of plain capture's "
        "step, before the top-n and the norms (AMX tiles not counted)."
    )


def table(steps: dict[str, float], batch_size: int) -> str:
    base = steps.get(BASELINE)
    lines = [f"| option | decode step ms | tok/s | vs {BASELINE} |", "|---|---|---|---|"]
    for name, step in steps.items():
        vs = f"{(step / base - 1) * 100:+.1f} %" if base else "n/a"
        lines.append(f"| {name} | {step * 1e3:.2f} | {batch_size / step:.1f} | {vs} |")
    return "\n".join(lines)


def write(
    args: argparse.Namespace, text: str, floor: str, load_before: tuple, load_after: tuple
) -> None:
    cpu = cpu_model()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    md = [
        "# Attention-token options: decode cost on CPU against plain capture",
        "",
        f"- Command: `{command}`",
        f"- Machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads, torch "
        f"{torch.__version__}, Python {platform.python_version()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "- Load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} "
        "{:.2f}".format(*load_before, *load_after),
        f"- Model: {args.model}{' (--gguf-dequantize)' if args.gguf_dequantize else ''}, "
        f"{args.dtype}, batch {args.batch_size}, input {args.input_len}, "
        f"output {args.output_len}, k={args.top_k}, captured layers `{args.capture_layers}`; "
        f"median decode step over {args.repeat} rounds, options decoding in lockstep "
        "(in-process Scheduler.step, one engine per option).",
        "- Targets (issue 14): stats and spans within 2 % of plain capture; 8 heads with "
        "aggregation none within 5 %; logit lens on 4 layers within 10 %.",
        floor,
        "",
        text,
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    name = "attention_options_cpu" + ("_dequantized" if args.gguf_dequantize else "")
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    steps, dims = run(args)
    load_after = os.getloadavg()
    text = table(steps, args.batch_size)
    floor = lens_floor(args, steps, dims) if LENS in steps else ""
    print(text, floor, sep="\n")
    if not args.no_write:
        write(args, text, floor, load_before, load_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
