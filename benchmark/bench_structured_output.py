"""Cost of constrained decoding on CPU: decode throughput with 0 / 50 / 100 % JSON-constrained rows,
and grammar compile time (cold and cached) for the five schemas of test_structured_output.py.

The scheduler runs in-process on the default model (float32, the served tokenizer). A batch of
16 requests is admitted at once; every decode step in which all 16 are running is timed (the
forward, the bitmask fill, the masked sampling and the bookkeeping: the whole `Scheduler.step`).
Constrained rows follow a JSON schema that cannot finish within the token budget (an array
with more items than tokens), so every row decodes the same number of steps; unconstrained rows
run with ignore_eos. The modes alternate over `--repeat` rounds so drifting load hits them
alike; each reported step time is the median over all rounds. Compile times come from a fresh
backend (cold: tokenizer table excluded, timed separately) and the same keys again (cached).
Writes benchmark/results/structured_output_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "srt"))

from machine_info import header, load_average, write_result  # noqa: E402
from test_structured_output import SCHEMAS  # noqa: E402

from sglang.srt.constrained.base_grammar_backend import create_grammar_backend  # noqa: E402
from sglang.srt.hf_transformers_utils import get_tokenizer  # noqa: E402
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.model_executor.model_runner import build_model_runner  # noqa: E402
from sglang.srt.model_loader import resolve_model_path  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

MODEL = "smollm2-135m-instruct"
LONG_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 200}},
        "required": ["items"],
    }
)
PROMPT = "Write a long JSON list of animal names:"


def decode_step_times(sched: Scheduler, tokenizer, batch: int, constrained: int, steps: int):
    ids = tokenizer.encode(PROMPT)
    reqs = []
    for i in range(batch):
        sp = {"max_new_tokens": steps + 1, "temperature": 0.0, "ignore_eos": True}
        if i < constrained:
            sp["json_schema"] = LONG_SCHEMA
        reqs.append(Req(f"r{time.monotonic_ns()}-{i}", ids, SamplingParams(**sp)))
    for req in reqs:
        sched.add_request(req)
    times = []
    while not sched.is_idle():
        decoding = not sched.waiting_queue and not sched.grammar_manager.has_waiting()
        full = decoding and len(sched.running_batch.reqs) == batch
        t0 = time.perf_counter()
        sched.step()
        if full:
            times.append(time.perf_counter() - t0)
    assert all(len(r.output_ids) == steps + 1 for r in reqs), "a row stopped early"
    return times


def mask_cost(backend, batch: int, vocab: int, eos: int, iters: int = 50) -> tuple[float, float]:
    """Median seconds to fill the bitmask of `batch` constrained rows and to apply it."""
    from types import SimpleNamespace

    from sglang.srt.constrained.vocab_mask import VocabMask

    compiled = backend.get_future(("json", LONG_SCHEMA)).result()
    reqs = [SimpleNamespace(grammar=backend.new_matcher(compiled, [eos])) for _ in range(batch)]
    logits = torch.randn(batch, vocab)
    fills, applies = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        mask = VocabMask.from_reqs(reqs, vocab)
        t1 = time.perf_counter()
        mask.apply(logits)
        applies.append(time.perf_counter() - t1)
        fills.append(t1 - t0)
    return statistics.median(fills), statistics.median(applies)


def compile_times(server_args: ServerArgs, tokenizer, vocab_size: int) -> dict:
    backend = create_grammar_backend(server_args, tokenizer, vocab_size)
    t0 = time.perf_counter()
    backend.compiler()
    table = time.perf_counter() - t0
    out = {"tokenizer_table_s": table}
    for name, schema in SCHEMAS.items():
        key = ("json", json.dumps(schema))
        t0 = time.perf_counter()
        compiled = backend.get_future(key).result()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = backend.get_future(key).result()
        backend.new_matcher(compiled, [tokenizer.eos_token_id])
        cached = time.perf_counter() - t0
        out[name] = (cold, cached)
    backend.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=32, help="Decode steps per run.")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    load_before = load_average()
    torch.set_num_threads(args.threads)
    path = resolve_model_path(MODEL)
    server_args = ServerArgs(
        model_path=path, device="cpu", dtype="float32", max_total_tokens=8192, random_seed=0
    )
    tokenizer = get_tokenizer(path)
    runner = build_model_runner(server_args)
    sched = Scheduler(server_args, runner, tokenizer)
    vocab = sched.model_config.vocab_size
    compiles = compile_times(server_args, tokenizer, vocab)
    fill_s, apply_s = mask_cost(
        sched.grammar_manager.backend, args.batch, vocab, tokenizer.eos_token_id
    )

    modes = {"0 %": 0, "50 %": args.batch // 2, "100 %": args.batch}
    decode_step_times(sched, tokenizer, args.batch, args.batch, 4)  # warm-up, compiles the schema
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode, k in modes.items():
            samples[mode] += decode_step_times(sched, tokenizer, args.batch, k, args.steps)

    base = statistics.median(samples["0 %"])
    md = header(
        "Structured output on CPU: decode throughput and compile time", args.threads, load_before
    )
    md += [
        f"- Model: {MODEL} (float32), batch {args.batch}, {args.steps} decode steps per run, "
        f"{args.repeat} rounds; load average after: `{load_average()}`",
        "",
        "## Decode throughput at batch 16, by share of JSON-constrained rows",
        "",
        "| constrained rows | median step (ms) | tokens/s | vs unconstrained |",
        "|---|---|---|---|",
    ]
    for mode in modes:
        med = statistics.median(samples[mode])
        md.append(
            f"| {mode} | {med * 1e3:.1f} | {args.batch / med:.1f} | {(med / base - 1) * 100:+.1f} % |"
        )
    md += [
        "",
        f"Mask work per step for {args.batch} constrained rows, timed alone (median of 50): "
        f"bitmask fill {fill_s * 1e3:.2f} ms, apply to the logits {apply_s * 1e3:.2f} ms.",
    ]
    md += [
        "",
        "## Grammar compile time (xgrammar, one compile thread)",
        "",
        f"Tokenizer table (first constrained request only): {compiles['tokenizer_table_s'] * 1e3:.0f} ms",
        "",
        "| schema | cold compile (ms) | cached: lookup + new matcher (ms) |",
        "|---|---|---|",
    ]
    for name in SCHEMAS:
        cold, cached = compiles[name]
        md.append(f"| {name} | {cold * 1e3:.1f} | {cached * 1e3:.3f} |")
    md.append("")
    write_result(md, "structured_output_cpu.md", save=not args.no_save)
    sched.grammar_manager.backend.shutdown()


if __name__ == "__main__":
    main()
