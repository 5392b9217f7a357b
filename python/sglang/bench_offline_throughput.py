"""Offline throughput: one in-process `sglang.Engine` fed a whole request set as a single batch.

`python -m sglang.bench_offline_throughput --model-path M [server flags] [dataset flags]` builds the
requests with `sglang.benchmark.datasets` (random, sharegpt, generated-shared-prefix), warms the
engine with a few short requests (unless `--skip-warmup`), submits every request at once, and
times until the last finishes. No HTTP is involved, so this measures the scheduler and model alone.

It prints the ` Offline Throughput Benchmark Result ` block and appends one JSON object (a line) to
`--result-filename` with request/input/output/total throughput and total latency (formats:
docs/compat.md). Bad input ends with one `error:` line and exit status 1. Every server flag is
accepted; only the log level defaults differently (error), so per-batch log lines do not bury the
result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

from sglang.benchmark.datasets import DatasetError, DatasetRow, add_dataset_args, get_dataset
from sglang.benchmark.serving import BLOCK_WIDTH, result_row, throughput_rows
from sglang.srt.server_args import ServerArgs

WARMUP_REQUESTS = 4
WARMUP_OUTPUT_LEN = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.bench_offline_throughput",
        description="Throughput of an in-process Engine on a batch of requests.",
    )
    ServerArgs.add_cli_args(parser)
    parser.set_defaults(log_level="error")
    add_dataset_args(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument(
        "--result-filename", default=None, help="File to append the result's JSON object to."
    )
    bench.add_argument("--skip-warmup", action="store_true", help="Time the very first batch.")
    bench.add_argument(
        "--disable-ignore-eos", action="store_true", help="Let requests stop at end of sequence."
    )
    bench.add_argument(
        "--extra-request-body",
        default=None,
        help="JSON object merged into every request's sampling parameters.",
    )
    return parser


def sampling_params_for(
    rows: list[DatasetRow], ignore_eos: bool, extra: dict[str, Any]
) -> list[dict[str, Any]]:
    return [
        {"max_new_tokens": r.output_len, "temperature": 0.0, "ignore_eos": ignore_eos, **extra}
        for r in rows
    ]


def _finished_ok(out: dict[str, Any]) -> bool:
    reason = (out.get("meta_info") or {}).get("finish_reason")
    return not (isinstance(reason, dict) and reason.get("type") == "abort")


def throughput_benchmark(
    engine: Any, rows: list[DatasetRow], params: list[dict[str, Any]], skip_warmup: bool
) -> dict[str, Any]:
    """Run the batch on a started engine; returns the result record."""
    if not skip_warmup:
        warm = rows[:WARMUP_REQUESTS]
        engine.generate(
            prompt=[r.prompt for r in warm],
            sampling_params=[
                {**p, "max_new_tokens": min(p["max_new_tokens"], WARMUP_OUTPUT_LEN)}
                for p in params[: len(warm)]
            ],
        )
        engine.flush_cache()  # the timed run must not reuse the warm-up's prefixes

    start = time.perf_counter()
    outputs = engine.generate(prompt=[r.prompt for r in rows], sampling_params=params)
    latency = time.perf_counter() - start

    done = [(row, out) for row, out in zip(rows, outputs) if _finished_ok(out)]
    total_in = sum(row.prompt_len for row, _ in done)
    total_out = sum(int(out["meta_info"]["completion_tokens"]) for _, out in done)
    return {
        "backend": "engine",
        "successful_requests": len(done),
        "failed_requests": len(rows) - len(done),
        "total_latency": latency,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / latency,
        "input_throughput": total_in / latency,
        "output_throughput": total_out / latency,
        "total_throughput": (total_in + total_out) / latency,
    }


def format_result_block(result: dict[str, Any]) -> str:
    title = " Offline Throughput Benchmark Result "
    lines = [
        f"{title:=^{BLOCK_WIDTH}}",
        result_row("Backend:", result["backend"]),
        result_row("Successful requests:", result["successful_requests"]),
    ]
    if result["failed_requests"]:
        lines.append(result_row("Failed requests:", result["failed_requests"]))
    lines += [
        result_row("Benchmark duration (s):", result["total_latency"]),
        *throughput_rows(result),
        "=" * BLOCK_WIDTH,
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.hf_transformers_utils import get_tokenizer

    if args.model_path is None:
        parser.error("the following arguments are required: --model-path/--model")
    try:
        server_args = ServerArgs.from_cli_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
    except json.JSONDecodeError as e:
        raise DatasetError(f"--extra-request-body is not valid JSON: {e}") from e
    if not isinstance(extra, dict):
        raise DatasetError("--extra-request-body must be a JSON object")

    tokenizer = get_tokenizer(server_args.tokenizer_path, server_args.tokenizer_mode)
    rows = get_dataset(args, tokenizer)
    params = sampling_params_for(rows, not args.disable_ignore_eos, extra)
    print(
        f"Offline benchmark: {len(rows)} requests, {sum(r.prompt_len for r in rows)} input "
        f"tokens, {sum(r.output_len for r in rows)} requested output tokens."
    )
    engine = Engine(**dataclasses.asdict(server_args))
    try:
        result = throughput_benchmark(engine, rows, params, args.skip_warmup)
    finally:
        engine.shutdown()
    result.update(dataset_name=args.dataset_name, num_prompts=len(rows), seed=args.seed)
    print(format_result_block(result))
    if args.result_filename:
        folder = os.path.dirname(args.result_filename)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(args.result_filename, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run(args, parser)
    except (DatasetError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if result["successful_requests"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
