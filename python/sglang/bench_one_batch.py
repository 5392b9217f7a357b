"""Latency of one static batch, measured on the model runner directly (no server, no scheduler).

`python -m sglang.bench_one_batch` owns the benchmark loop: for every (batch size, input length,
output length) it builds that many requests of seeded random token ids, runs one extend batch
(prefill) and then one greedy decode step per further output token, timing each with a device
synchronize. It prints upstream's `Prefill.`, `Decode.`, `Total.` lines (docs/compat.md) and appends a
JSON line per run to `--result-filename`. Between runs every request is released, so the KV pool
returns to empty.

It imports only the execution side (ServerArgs, ModelConfig, ModelRunner, ScheduleBatch and the
no-sharing prefix cache), so it runs on machines without the serving stack's dependencies.
Bad input (unknown model, a run that does not fit the context or the KV pool) ends with a one-line
`error:` message and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, NamedTuple, Optional

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.mem_cache.chunk_cache import ChunkCache
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
WARMUP_OUTPUT_LEN = 4
CORRECTNESS_PROMPTS = (
    "The capital of France is",
    "The capital of the United Kingdom is",
    "Today is a sunny day and I like",
)
CORRECTNESS_PROMPT_BUDGET = 64  # KV slots reserved per correctness prompt (they are far shorter)


class BenchError(Exception):
    """A problem with the user's input; reported as one line, exit status 1."""


@dataclasses.dataclass
class BenchArgs:
    run_name: str = "before"
    batch_size: tuple[int, ...] = (1,)
    input_len: tuple[int, ...] = (1024,)
    output_len: tuple[int, ...] = (16,)
    result_filename: str = "result.jsonl"
    correctness_test: Optional[str] = None
    log_decode_step: int = 0
    profile: bool = False
    profile_filename_prefix: str = "profile"
    request_attention_tokens: bool = False

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("benchmark")
        group.add_argument(
            "--run-name", default=BenchArgs.run_name, help="Label stored in each JSON line."
        )
        group.add_argument("--batch-size", type=int, nargs="+", default=list(BenchArgs.batch_size))
        group.add_argument("--input-len", type=int, nargs="+", default=list(BenchArgs.input_len))
        group.add_argument("--output-len", type=int, nargs="+", default=list(BenchArgs.output_len))
        group.add_argument(
            "--result-filename",
            default=BenchArgs.result_filename,
            help="JSONL file to append results to.",
        )
        group.add_argument(
            "--correctness-test",
            nargs="?",
            const="simple",
            choices=["skip", "simple"],
            default=None,
            help="'simple': greedy-decode a few fixed prompts and print the text instead of timing.",
        )
        group.add_argument(
            "--log-decode-step", type=int, default=0, help="Print every N-th decode step (0: none)."
        )
        group.add_argument(
            "--profile", action="store_true", help="Record each timed run with torch.profiler."
        )
        group.add_argument(
            "--profile-filename-prefix",
            default=BenchArgs.profile_filename_prefix,
            help="Chrome traces go to PREFIX_bs{B}_in{I}_out{O}.trace.json.",
        )
        group.add_argument(
            "--request-attention-tokens",
            action="store_true",
            help="Every request asks for attention tokens (the server's top-k, all captured "
            "layers, mean); needs --return-attention-tokens. Records are copied to the host "
            "every step, as the scheduler does.",
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> BenchArgs:
        correctness = None if args.correctness_test in (None, "skip") else args.correctness_test
        return cls(
            run_name=args.run_name,
            batch_size=tuple(args.batch_size),
            input_len=tuple(args.input_len),
            output_len=tuple(args.output_len),
            result_filename=args.result_filename,
            correctness_test=correctness,
            log_decode_step=args.log_decode_step,
            profile=args.profile,
            profile_filename_prefix=args.profile_filename_prefix,
            request_attention_tokens=args.request_attention_tokens,
        )

    def runs(self) -> list[tuple[int, int, int]]:
        return [(b, i, o) for b in self.batch_size for i in self.input_len for o in self.output_len]


class RunResult(NamedTuple):
    prefill_latency: float
    decode_latencies: list[float]
    total_latency: float


def synthetic_input_ids(
    batch_size: int, input_len: int, vocab_size: int, seed: int = 0
) -> list[list[int]]:
    """Seeded random prompts; `benchmark/bench_engine_core.py` feeds the same ids to transformers."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, input_len), generator=gen)
    return ids.tolist()


# --------------------------------------------------------------------- set-up and validation


def _page_round(n: int, page: int) -> int:
    return -(-n // page) * page


def kv_tokens_needed(batch_size: int, input_len: int, output_len: int, page_size: int) -> int:
    """KV slots a run holds at its peak: every request's prompt and outputs, page-rounded."""
    return batch_size * _page_round(input_len + output_len, page_size)


def check_runs(bench: BenchArgs) -> None:
    for name in ("batch_size", "input_len", "output_len"):
        bad = [v for v in getattr(bench, name) if v < 1]
        if bad:
            raise BenchError(f"--{name.replace('_', '-')} values must be >= 1, got {bad}")
    if bench.log_decode_step < 0:
        raise BenchError(f"--log-decode-step must be >= 0, got {bench.log_decode_step}")


def fill_memory_defaults(args: argparse.Namespace, bench: BenchArgs) -> None:
    """On CPU, size the KV pool (and row table) to the largest run when the user did not."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    page = args.page_size
    peak = max(kv_tokens_needed(b, i, o, page) for b, i, o in bench.runs())
    max_bs = max(bench.batch_size)
    if bench.correctness_test:
        n = len(CORRECTNESS_PROMPTS)
        peak = max(
            peak, kv_tokens_needed(n, CORRECTNESS_PROMPT_BUDGET, max(bench.output_len), page)
        )
        max_bs = max(max_bs, n)
    if device == "cpu" and args.max_total_tokens is None:
        args.max_total_tokens = peak + 2 * page
    if args.max_running_requests is None:
        args.max_running_requests = max_bs


def check_fits(bench: BenchArgs, model_config: ModelConfig, server_args: ServerArgs) -> None:
    ctx = model_config.context_len
    for b, i, o in bench.runs():
        if i + o > ctx:
            raise BenchError(
                f"input_len {i} + output_len {o} = {i + o} exceeds the model's context length {ctx}"
                " (raise it with --context-length if the model supports it)"
            )
        if server_args.max_running_requests is not None and b > server_args.max_running_requests:
            raise BenchError(
                f"batch size {b} exceeds --max-running-requests {server_args.max_running_requests}"
            )


def check_pool(bench: BenchArgs, model_runner: Any) -> None:
    total = model_runner.max_total_num_tokens
    for b, i, o in bench.runs():
        need = kv_tokens_needed(b, i, o, model_runner.page_size)
        if need > total:
            raise BenchError(
                f"batch size {b} x (input {i} + output {o}) needs {need} KV slots but the pool holds "
                f"{total}; raise --max-total-tokens / --mem-fraction-static or shrink the run"
            )


def bench_attention_request(
    bench: BenchArgs, server_args: ServerArgs, model_config: ModelConfig
) -> Any:
    """The AttentionRequest of --request-attention-tokens (None without it)."""
    if not bench.request_attention_tokens:
        return None
    from sglang.srt.attention_capture import AttentionRequest, resolve_capture_layers

    layers = resolve_capture_layers(
        server_args.attention_capture_layers, model_config.num_hidden_layers
    )
    return AttentionRequest(top_k=int(server_args.attention_tokens_top_k), layers=layers)


def load_runner(server_args: ServerArgs, model_config: ModelConfig):
    from sglang.srt.model_executor.model_runner import build_model_runner

    return build_model_runner(server_args, model_config)


# --------------------------------------------------------------------- one batch


class BatchDriver:
    """Runs extend + decode steps of a static batch on a model runner and frees it afterwards."""

    def __init__(self, model_runner: Any, attention: Any = None) -> None:
        self.runner = model_runner
        self.attention = attention  # AttentionRequest every request carries, or None
        self.cache = ChunkCache(
            model_runner.req_to_token_pool,
            model_runner.token_to_kv_pool_allocator,
            page_size=model_runner.page_size,
        )
        self._counter = 0

    def make_batch(self, prompts: list[list[int]], output_len: int) -> ScheduleBatch:
        reqs = []
        for ids in prompts:
            self._counter += 1
            params = SamplingParams(
                max_new_tokens=output_len, temperature=0.0, ignore_eos=True
            ).normalize()
            req = Req(f"bench-{self._counter}", ids, params, attention=self.attention)
            req.init_next_round_input()
            reqs.append(req)
        runner = self.runner
        return ScheduleBatch(
            reqs,
            runner.req_to_token_pool,
            runner.token_to_kv_pool_allocator,
            self.cache,
            runner.model_config.vocab_size,
            runner.device,
        )

    def _step(self, batch: ScheduleBatch, worker_batch: Any) -> None:
        logits_output, fb = self.runner.forward(worker_batch)
        next_ids = self.runner.sample(logits_output, fb).next_token_ids.tolist()
        for req, tok in zip(batch.reqs, next_ids):
            req.output_ids.append(tok)
        if logits_output.attention_capture is not None:
            from sglang.srt.attention_capture.records import result_to_records

            records = result_to_records(logits_output.attention_capture)
            for row, record in zip(logits_output.attention_capture.spec.batch_rows, records):
                batch.reqs[row].attention_records.append(record)

    def prefill(self, batch: ScheduleBatch) -> float:
        self.runner.synchronize()
        tic = time.perf_counter()
        self._step(batch, batch.prepare_for_extend())
        self.runner.synchronize()
        return time.perf_counter() - tic

    def decode(self, batch: ScheduleBatch) -> float:
        self.runner.synchronize()
        tic = time.perf_counter()
        self._step(batch, batch.prepare_for_decode())
        self.runner.synchronize()
        return time.perf_counter() - tic

    def release(self, batch: ScheduleBatch) -> None:
        for req in batch.reqs:
            batch.release_req(req)
        allocator = self.runner.token_to_kv_pool_allocator
        free, total = allocator.available_size(), self.runner.max_total_num_tokens
        if free != total:
            raise RuntimeError(
                f"KV slots leaked by the benchmark: {total - free} of {total} still in use"
            )

    def run(self, prompts: list[list[int]], output_len: int, log_every: int = 0) -> RunResult:
        batch = self.make_batch(prompts, output_len)
        bs = len(prompts)
        try:
            prefill = self.prefill(batch)
            decodes: list[float] = []
            for step in range(output_len - 1):
                latency = self.decode(batch)
                decodes.append(latency)
                if log_every and step % log_every == 0:
                    print(
                        f"Decode {step}. Batch size: {bs}, latency: {latency:6.5f} s, "
                        f"throughput: {bs / latency:9.2f} token/s"
                    )
        finally:
            self.release(batch)
        return RunResult(prefill, decodes, prefill + sum(decodes))

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        """Greedy outputs of `prompts` (for the correctness test)."""
        batch = self.make_batch(prompts, output_len)
        try:
            self.prefill(batch)
            for _ in range(output_len - 1):
                self.decode(batch)
            return [list(r.output_ids) for r in batch.reqs]
        finally:
            self.release(batch)


# --------------------------------------------------------------------- reporting


def summarize(
    bench: BenchArgs, bs: int, input_len: int, output_len: int, res: RunResult
) -> dict[str, Any]:
    prefill_tput = bs * input_len / res.prefill_latency
    print(
        f"Prefill. latency: {res.prefill_latency:6.5f} s, throughput: {prefill_tput:9.2f} token/s"
    )
    median_latency = median_tput = 0.0
    if res.decode_latencies:
        median_latency = statistics.median(res.decode_latencies)
        median_tput = bs / median_latency
        print(
            f"Decode.  median latency: {median_latency:6.5f} s, "
            f"median throughput: {median_tput:9.2f} token/s"
        )
    overall = bs * (input_len + output_len) / res.total_latency
    print(f"Total. latency: {res.total_latency:6.3f} s, throughput: {overall:9.2f} token/s")
    return {
        "run_name": bench.run_name,
        "batch_size": bs,
        "input_len": input_len,
        "output_len": output_len,
        "prefill_latency": res.prefill_latency,
        "prefill_throughput": prefill_tput,
        "median_decode_latency": median_latency,
        "median_decode_throughput": median_tput,
        "total_latency": res.total_latency,
        "overall_throughput": overall,
    }


def _profiled_run(
    driver: BatchDriver, prompts: list[list[int]], output_len: int, bench: BenchArgs, trace: str
) -> RunResult:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if driver.runner.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        res = driver.run(prompts, output_len, bench.log_decode_step)
    prof.export_chrome_trace(trace)
    sort_key = "cuda_time_total" if len(activities) > 1 else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=20))
    print(f"Profile trace written to {trace}")
    return res


def latency_test(driver: BatchDriver, bench: BenchArgs, seed: int) -> None:
    vocab = driver.runner.model_config.vocab_size
    runs = bench.runs()
    b0, i0, o0 = runs[0]
    print(f"Warmup: batch size {b0}, input {i0}, output {min(WARMUP_OUTPUT_LEN, o0)} ...")
    driver.run(synthetic_input_ids(b0, i0, vocab, seed), min(WARMUP_OUTPUT_LEN, o0))
    print("Benchmark ...")
    for bs, input_len, output_len in runs:
        print(f"Run: batch size {bs}, input {input_len}, output {output_len}")
        prompts = synthetic_input_ids(bs, input_len, vocab, seed)
        if bench.profile:
            trace = (
                f"{bench.profile_filename_prefix}_bs{bs}_in{input_len}_out{output_len}.trace.json"
            )
            res = _profiled_run(driver, prompts, output_len, bench, trace)
        else:
            res = driver.run(prompts, output_len, bench.log_decode_step)
        record = summarize(bench, bs, input_len, output_len, res)
        with open(bench.result_filename, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def correctness_test(driver: BatchDriver, server_args: ServerArgs, bench: BenchArgs) -> None:
    from sglang.srt.hf_transformers_utils import get_tokenizer

    tokenizer = get_tokenizer(server_args.tokenizer_path, server_args.tokenizer_mode)
    prompts = [tokenizer.encode(p) for p in CORRECTNESS_PROMPTS]
    outputs = driver.generate(prompts, max(bench.output_len))
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        print(f"========== Prompt {i} ==========")
        print(tokenizer.decode(prompt + out))


# --------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.bench_one_batch",
        description="Time prefill and decode of one static batch on the model runner (no server).",
    )
    ServerArgs.add_cli_args(parser)
    BenchArgs.add_cli_args(parser)
    parser.set_defaults(model_path=DEFAULT_MODEL, random_seed=0)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bench = BenchArgs.from_cli_args(args)
    try:
        check_runs(bench)
        fill_memory_defaults(args, bench)
        try:
            server_args = ServerArgs.from_cli_args(args)
        except ValueError as e:
            parser.error(str(e))
        logging.basicConfig(
            level=getattr(logging, server_args.log_level.upper(), logging.INFO),
            format="[%(asctime)s] %(message)s",
        )
        if server_args.tp_size != 1 or server_args.dp_size != 1 or server_args.pp_size != 1:
            raise BenchError(
                "bench_one_batch runs a single rank; use --tp-size/--dp-size/--pp-size 1"
            )
        if bench.request_attention_tokens and not server_args.return_attention_tokens:
            raise BenchError("--request-attention-tokens needs --return-attention-tokens")
        model_config = ModelConfig.from_server_args(server_args)
        check_fits(bench, model_config, server_args)
        model_runner = load_runner(server_args, model_config)
        check_pool(bench, model_runner)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        # Model loading and pool sizing report bad paths or sizes this way.
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    driver = BatchDriver(model_runner, bench_attention_request(bench, server_args, model_config))
    if bench.correctness_test == "simple":
        correctness_test(driver, server_args, bench)
        return 0
    if bench.profile:
        print(
            f"Profiling with torch.profiler; traces go to {bench.profile_filename_prefix}_*.trace.json"
        )
    os.makedirs(os.path.dirname(os.path.abspath(bench.result_filename)), exist_ok=True)
    latency_test(driver, bench, server_args.random_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
