"""Cost of constrained decoding on CPU: decode throughput with 0 / 50 / 100 % JSON-constrained rows,
and grammar compile time (cold and cached) for the five schemas of test_structured_output.py.

The scheduler runs in-process on the default model (float32, the served tokenizer). A batch of
16 requests is admitted at once; every decode step in which all 16 are running is timed (the
forward, the bitmask fill, the masked sampling and the bookkeeping: the whole `Scheduler.step`).
Constrained rows follow a JSON schema that cannot finish within the token budget (an array
with more items than tokens), so every row decodes the same number of steps; unconstrained rows
run with ignore_eos. The modes alternate over `--repeat` rounds so drifting load hits them
alike; each reported step time is the median over all rounds. The mask work of one step (bitmask
fill, the apply with sgl_kernel's C kernel, xgrammar's CPU kernel it replaced and the PyTorch
path, the full-vocab logits copy the sampler no longer makes without logprobs, accepting the
sampled tokens) is timed alone, in two matcher states. Compile times come from a fresh
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
    times, cpu_times = [], []
    while not sched.is_idle():
        decoding = not sched.waiting_queue and not sched.grammar_manager.has_waiting()
        full = decoding and len(sched.running_batch.reqs) == batch
        t0, c0 = time.perf_counter(), time.process_time()
        sched.step()
        if full:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    assert all(len(r.output_ids) == steps + 1 for r in reqs), "a row stopped early"
    return times, cpu_times


IN_STRING = '{"items": ["cat", "dog", "ele'


def _median_ms(fn, iters: int, undo=None) -> float:
    """Median ms of `fn()`; `undo()` runs untimed after each call."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if undo is not None:
            undo()
    return statistics.median(times) * 1e3


def mask_costs(backend, tokenizer, batch: int, vocab: int, iters: int = 50) -> dict:
    """Median ms of each piece of a constrained step's mask work for `batch` rows, in two matcher
    states: at the start of the object (nearly every token blocked) and inside a string (nearly
    every token allowed)."""
    from types import SimpleNamespace

    import xgrammar as xgr
    from sgl_kernel.cpu_token_bitmask import apply_token_bitmask_torch

    from sglang.srt.constrained.vocab_mask import VocabMask

    compiled = backend.get_future(("json", LONG_SCHEMA)).result()
    eos = tokenizer.eos_token_id
    logits = torch.randn(batch, vocab)
    work = logits.clone()
    rows = list(range(batch))
    out = {}
    for state, prefix in (("object start", ""), ("inside a string", IN_STRING)):
        reqs = [SimpleNamespace(grammar=backend.new_matcher(compiled, [eos])) for _ in rows]
        for req in reqs:
            for tok in tokenizer.encode(prefix):
                assert req.grammar.accept_token(tok), (prefix, tok)
        mask = VocabMask.from_reqs(reqs, vocab)
        allowed = sum(bin(w & 0xFFFFFFFF).count("1") for w in mask.bitmask[0].tolist())
        reset = lambda: work.copy_(logits)  # noqa: E731
        # A token the grammar allows here, to time accepting it (rolled back after each round).
        tok = next(t for t in range(vocab) if (mask.bitmask[0, t // 32].item() >> (t % 32)) & 1)

        def accept(reqs=reqs, tok=tok):
            for req in reqs:
                req.grammar.accept_token(tok)

        def rollback(reqs=reqs):
            for req in reqs:
                req.grammar.matcher.rollback(1)

        out[state] = {
            "allowed tokens per row": allowed,
            f"bitmask fill (allocate + {batch} matchers)": _median_ms(
                lambda: VocabMask.from_reqs(reqs, vocab), iters
            ),
            "apply: sgl_kernel C kernel (now)": _median_ms(lambda: mask.apply(work), iters, reset),
            "apply: xgrammar CPU kernel (before)": _median_ms(
                lambda: xgr.apply_token_bitmask_inplace(work, mask.bitmask, vocab_size=vocab),
                iters,
                reset,
            ),
            "apply: PyTorch path (no C compiler)": _median_ms(
                lambda: apply_token_bitmask_torch(work, mask.bitmask, rows, vocab), iters, reset
            ),
            "full-vocab logits copy (before; now only with logprobs)": _median_ms(
                lambda: logits.clone(), iters
            ),
            f"accept_token x {batch}": _median_ms(accept, iters, rollback),
        }
    return out


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
    costs = mask_costs(sched.grammar_manager.backend, tokenizer, args.batch, vocab)

    modes = {"0 %": 0, "50 %": args.batch // 2, "100 %": args.batch}
    decode_step_times(sched, tokenizer, args.batch, args.batch, 4)  # warm-up, compiles the schema
    samples: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode, k in modes.items():
            wall, used = decode_step_times(sched, tokenizer, args.batch, k, args.steps)
            samples[mode] += wall
            cpu[mode] += used

    base = statistics.median(samples["0 %"])
    cpu_base = statistics.median(cpu["0 %"])
    md = header(
        "Structured output on CPU: decode throughput and compile time", args.threads, load_before
    )
    md += [
        f"- Model: {MODEL} (float32), batch {args.batch}, {args.steps} decode steps per run, "
        f"{args.repeat} rounds; load average after: `{load_average()}`",
        "",
        "## Decode throughput at batch 16, by share of JSON-constrained rows",
        "",
        "Wall time is what a client sees; CPU time (this process's, all its threads) is what the "
        "step costs, and with `--threads 1` it hardly moves with other processes' load.",
        "",
        "| constrained rows | median step (ms) | tokens/s | vs unconstrained "
        "| median CPU time (ms) | CPU vs unconstrained |",
        "|---|---|---|---|---|---|",
    ]
    for mode in modes:
        med = statistics.median(samples[mode])
        used = statistics.median(cpu[mode])
        md.append(
            f"| {mode} | {med * 1e3:.1f} | {args.batch / med:.1f} | {(med / base - 1) * 100:+.1f} % "
            f"| {used * 1e3:.1f} | {(used / cpu_base - 1) * 100:+.1f} % |"
        )
    states = list(costs)
    md += [
        "",
        f"## Mask work per step for {args.batch} constrained rows, timed alone (median of 50, ms)",
        "",
        f"Vocabulary {vocab}; matchers of the schema above, at the start of the object and "
        f"inside a string (`{IN_STRING}`).",
        "",
        "| piece | " + " | ".join(states) + " |",
        "|---|" + "---|" * len(states),
    ]
    for piece in costs[states[0]]:
        vals = [costs[st][piece] for st in states]
        cells = [str(v) if isinstance(v, int) else f"{v:.3f}" for v in vals]
        md.append(f"| {piece} | " + " | ".join(cells) + " |")
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
