"""Online serving benchmark: an asyncio HTTP client that replays a request set against a server.

`python -m sglang.benchmark.serving` and `python -m sglang.bench_serving` run `main`. It builds the
requests (`sglang.benchmark.datasets`), sends them with aiohttp at `--request-rate` (Poisson
arrivals; `inf` sends all at once) under an optional `--max-concurrency` cap, and times each one:
TTFT (send to the first chunk that carries output), ITL (gaps between later chunks), end-to-end
latency, and TPOT = (latency - TTFT) / (output_len - 1). Output lengths come from the server's own
count (`meta_info.completion_tokens` or OpenAI `usage`) and otherwise from re-tokenizing the text.

Backends: `sglang` (native `/generate`), `sglang-oai` and `vllm` (`/v1/completions`),
`sglang-oai-chat` (`/v1/chat/completions`). Results print as the ` Serving Benchmark Result `
block and, with `--output-file`, append one JSON line per run (formats: docs/compat.md).

A failed request is counted, never fatal; an unreachable server or bad input ends with one
`error:` line and exit status 1, as does a run in which no request succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import aiohttp
import numpy as np

from sglang.benchmark.datasets import DatasetError, DatasetRow, add_dataset_args, get_dataset

BACKENDS = ("sglang", "sglang-oai", "sglang-oai-chat", "vllm")
ENDPOINTS = {
    "sglang": "/generate",
    "sglang-oai": "/v1/completions",
    "vllm": "/v1/completions",
    "sglang-oai-chat": "/v1/chat/completions",
}
REQUEST_TIMEOUT_S = 6 * 3600
WARMUP_MAX_OUTPUT_LEN = 16  # warm-up only has to touch every code path, not finish long outputs
BLOCK_WIDTH = 50


class BenchmarkError(Exception):
    """Unreachable server or unusable input; printed as one `error:` line."""


@dataclass
class RequestInput:
    prompt: str
    prompt_len: int
    output_len: int
    api_url: str
    model: str
    backend: str
    stream: bool = True
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between chunks after the first
    error: str = ""


# ------------------------------------------------------------------------------ one request


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """extra wins; nested dicts (e.g. sampling_params) are merged key by key, one level deep."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def build_payload(req: RequestInput) -> dict[str, Any]:
    if req.backend == "sglang":
        body: dict[str, Any] = {
            "text": req.prompt,
            "sampling_params": {
                "max_new_tokens": req.output_len,
                "temperature": 0.0,
                "ignore_eos": req.ignore_eos,
            },
            "stream": req.stream,
        }
    else:
        body = {
            "model": req.model,
            "max_tokens": req.output_len,
            "temperature": 0.0,
            "ignore_eos": req.ignore_eos,
            "stream": req.stream,
        }
        if req.backend == "sglang-oai-chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if req.stream:
            body["stream_options"] = {"include_usage": True}
    return _merge(body, req.extra_body)


async def _sse_payloads(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent-event stream (own buffer: no line-length limit)."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip().decode("utf-8", errors="replace")
    line = buffer.strip()
    if line.startswith(b"data:"):
        yield line[5:].strip().decode("utf-8", errors="replace")


def _error_text(data: dict[str, Any]) -> Optional[str]:
    """The error a JSON body or stream event reports, if any."""
    err = data.get("error")
    if err:
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    meta = data.get("meta_info")
    if isinstance(meta, dict):
        reason = meta.get("finish_reason")
        if isinstance(reason, dict) and reason.get("type") == "abort":
            return f"aborted: {reason.get('message', '')}"
    return None


def _parse_event(backend: str, data: dict[str, Any]) -> tuple[str, Optional[int], bool]:
    """(text, server token count or None, text is cumulative) of one streamed or final body."""
    if backend == "sglang":
        meta = data.get("meta_info") or {}
        return data.get("text") or "", meta.get("completion_tokens"), True
    usage = data.get("usage") or {}
    count = usage.get("completion_tokens")
    choices = data.get("choices") or []
    if not choices:
        return "", count, False
    choice = choices[0]
    if backend == "sglang-oai-chat":
        part = choice.get("delta") or choice.get("message") or {}
        return part.get("content") or "", count, False
    return choice.get("text") or "", count, False


class _RequestFailed(Exception):
    """The server answered, but not with a usable result."""


async def _read_stream(
    resp: aiohttp.ClientResponse, backend: str, out: RequestOutput, start: float
) -> tuple[str, Optional[int]]:
    """Consume an SSE stream, filling out.ttft and out.itl; returns (text, server token count)."""
    text, server_count, seen_tokens, last = "", None, 0, start
    async for payload in _sse_payloads(resp):
        if payload == "[DONE]":
            break
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise _RequestFailed(f"unexpected stream event: {payload[:100]}")
        error = _error_text(data)
        if error:
            raise _RequestFailed(error)
        piece, count, cumulative = _parse_event(backend, data)
        new_text = piece[len(text) :] if cumulative and piece.startswith(text) else piece
        text += new_text
        # NOTE: only native events count tokens as they go; an OpenAI usage chunk arrives after
        # the last token and must not read as one more chunk.
        grew = cumulative and count is not None and count > seen_tokens
        if count is not None:
            seen_tokens, server_count = max(seen_tokens, count), count
        if not (new_text or grew):
            continue  # role-only deltas, the usage chunk, unchanged events
        now = time.perf_counter()
        if out.ttft == 0.0:
            out.ttft = now - start
        else:
            out.itl.append(now - last)
        last = now
    if out.ttft == 0.0:
        raise _RequestFailed("the stream ended without any output")
    return text, server_count


async def send_request(
    session: aiohttp.ClientSession, req: RequestInput, tokenizer: Any, headers: dict[str, str]
) -> RequestOutput:
    """Send one request and time it; any failure is recorded in the result, never raised."""
    out = RequestOutput(prompt_len=req.prompt_len)
    start = time.perf_counter()
    try:
        async with session.post(req.api_url, json=build_payload(req), headers=headers) as resp:
            if resp.status != 200:
                raise _RequestFailed(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            if req.stream:
                text, server_count = await _read_stream(resp, req.backend, out, start)
            else:
                data = await resp.json(content_type=None)
                error = _error_text(data) if isinstance(data, dict) else "unexpected body"
                if error:
                    raise _RequestFailed(error)
                text, server_count, _ = _parse_event(req.backend, data)
        out.latency = time.perf_counter() - start
        if not req.stream:
            out.ttft = out.latency  # the whole answer is the first chunk
    except _RequestFailed as e:
        out.error = str(e)
        return out
    except Exception as e:  # noqa: BLE001 - a bad response is a failed request, not a crash
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.generated_text = text
    if server_count is not None:
        out.output_len = int(server_count)
    else:
        out.output_len = len(tokenizer.encode(text, add_special_tokens=False))
    out.success = True
    return out


# ------------------------------------------------------------------------------ the run


async def _arrivals(
    rows: list[DatasetRow], rate: float, rng: np.random.Generator
) -> AsyncIterator[DatasetRow]:
    """Rows in order, spaced by exponential gaps (a Poisson process) unless the rate is inf."""
    for i, row in enumerate(rows):
        if i and rate != float("inf"):
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        yield row


async def run_requests(
    args: argparse.Namespace,
    rows: list[DatasetRow],
    make_input: Any,
    tokenizer: Any,
    headers: dict[str, str],
) -> tuple[list[RequestOutput], float]:
    """Send every row; returns the outputs (in row order) and the wall time in seconds."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    # NOTE: one connection per request, as upstream's per-request sessions have: servers such as
    # llama-server close a keep-alive connection after a few requests, and a reused one then
    # fails with 'Can not write request body'.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if args.warmup_requests > 0:
            first = rows[0]
            warm = DatasetRow(
                first.prompt, first.prompt_len, min(first.output_len, WARMUP_MAX_OUTPUT_LEN)
            )
            results = await asyncio.gather(
                *(
                    send_request(session, make_input(warm), tokenizer, headers)
                    for _ in range(args.warmup_requests)
                )
            )
            if not any(r.success for r in results):
                raise BenchmarkError(f"the warm-up request failed: {results[0].error}")
            print(f"Warm-up done ({args.warmup_requests} request(s)).")
        if args.flush_cache:
            await _flush_cache(session, args.base_url, headers)

        pbar = None
        if not args.disable_tqdm:
            from tqdm.asyncio import tqdm

            pbar = tqdm(total=len(rows))
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(row: DatasetRow) -> RequestOutput:
            if limit is None:
                result = await send_request(session, make_input(row), tokenizer, headers)
            else:
                async with limit:
                    result = await send_request(session, make_input(row), tokenizer, headers)
            if pbar is not None:
                pbar.update(1)
            return result

        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        tasks = []
        async for row in _arrivals(rows, args.request_rate, rng):
            tasks.append(asyncio.create_task(one(row)))
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        if pbar is not None:
            pbar.close()
    return outputs, duration


async def _flush_cache(session: aiohttp.ClientSession, base_url: str, headers: dict) -> None:
    try:
        async with session.post(f"{base_url}/flush_cache", headers=headers) as resp:
            if resp.status != 200:
                print(f"warning: /flush_cache answered HTTP {resp.status}", file=sys.stderr)
    except aiohttp.ClientError as e:
        print(f"warning: /flush_cache failed: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------ metrics


STAT_KEYS = ("mean", "median", "std", "p90", "p95", "p99", "max")


def _stats(prefix: str, values_s: list[float]) -> dict[str, float]:
    """`{stat}_{prefix}_ms` for every stat in STAT_KEYS (all 0.0 when there are no values)."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {f"{k}_{prefix}_ms": 0.0 for k in STAT_KEYS}
    found = (ms.mean(), np.median(ms), ms.std(), *np.percentile(ms, [90, 95, 99]), ms.max())
    return {f"{k}_{prefix}_ms": float(v) for k, v in zip(STAT_KEYS, found)}


def calculate_metrics(outputs: list[RequestOutput], duration: float) -> dict[str, Any]:
    done = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in done)
    total_out = sum(o.output_len for o in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    tpots = [(o.latency - o.ttft) / (o.output_len - 1) for o in done if o.output_len > 1]
    errors: list[str] = []
    for o in outputs:
        if not o.success and o.error not in errors:
            errors.append(o.error)
    metrics: dict[str, Any] = {
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "errors": errors[:5],
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(total_in),
        "output_throughput": per_s(total_out),
        "total_throughput": per_s(total_in + total_out),
        "concurrency": per_s(sum(o.latency for o in done)),
    }
    metrics.update(_stats("ttft", [o.ttft for o in done]))
    metrics.update(_stats("tpot", tpots))
    metrics.update(_stats("itl", [g for o in done for g in o.itl]))
    metrics.update(_stats("e2e_latency", [o.latency for o in done]))
    return metrics


def throughput_rows(result: dict[str, Any]) -> list[str]:
    """Token totals and throughput lines shared by the serving and offline result blocks."""
    return [
        result_row("Total input tokens:", result["total_input_tokens"]),
        result_row("Total generated tokens:", result["total_output_tokens"]),
        result_row("Request throughput (req/s):", result["request_throughput"]),
        result_row("Input token throughput (tok/s):", result["input_throughput"]),
        result_row("Output token throughput (tok/s):", result["output_throughput"]),
        result_row("Total token throughput (tok/s):", result["total_throughput"]),
    ]


def result_row(label: str, value: Any) -> str:
    """One `label value` line of a result block (floats with two decimals)."""
    if isinstance(value, float) and value != float("inf"):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def format_result_block(result: dict[str, Any]) -> str:
    title = " Serving Benchmark Result "
    concurrency = result["max_concurrency"] if result["max_concurrency"] else "not set"
    lines = [
        f"{title:=^{BLOCK_WIDTH}}",
        result_row("Backend:", result["backend"]),
        result_row("Traffic request rate:", result["request_rate"]),
        result_row("Max request concurrency:", concurrency),
        result_row("Successful requests:", result["completed"]),
    ]
    if result["failed"]:
        lines.append(result_row("Failed requests:", result["failed"]))
    lines += [
        result_row("Benchmark duration (s):", result["duration"]),
        *throughput_rows(result),
        result_row("Concurrency:", result["concurrency"]),
    ]
    sections = (
        ("End-to-End Latency", "e2e_latency", "E2E Latency", ("mean", "median")),
        ("Time to First Token", "ttft", "TTFT", ("mean", "median", "p99")),
        ("Time per Output Token (excl. 1st token)", "tpot", "TPOT", ("mean", "median", "p99")),
        ("Inter-Token Latency", "itl", "ITL", ("mean", "median", "p95", "p99", "max")),
    )
    for heading, key, label, stats in sections:
        lines.append(f"{' ' + heading + ' ':-^{BLOCK_WIDTH}}")
        for stat in stats:
            name = stat.capitalize() if stat in ("mean", "median", "max") else stat.upper()
            lines.append(result_row(f"{name} {label} (ms):", result[f"{stat}_{key}_ms"]))
    lines.append("=" * BLOCK_WIDTH)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ entry points


def _probe_server(base_url: str, headers: dict[str, str]) -> Optional[str]:
    """Fail fast when nobody listens; returns the first served model id when the server says."""
    import requests

    try:
        resp = requests.get(f"{base_url}/v1/models", headers=headers, timeout=10)
    except requests.RequestException as e:
        raise BenchmarkError(f"cannot reach the server at {base_url} ({type(e).__name__})") from e
    if resp.status_code == 401:
        raise BenchmarkError(f"the server at {base_url} wants an API key (set OPENAI_API_KEY)")
    try:
        return resp.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark described by parsed flags; returns the JSON record (also printed)."""
    from sglang.srt.hf_transformers_utils import get_tokenizer

    if args.base_url:
        args.base_url = args.base_url.rstrip("/")
    else:
        args.base_url = f"http://{args.host}:{args.port}"
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchmarkError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.request_rate <= 0:
        raise BenchmarkError(f"--request-rate must be > 0, got {args.request_rate}")
    if args.warmup_requests < 0:
        raise BenchmarkError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    try:
        extra_body = json.loads(args.extra_request_body) if args.extra_request_body else {}
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"--extra-request-body is not valid JSON: {e}") from e
    if not isinstance(extra_body, dict):
        raise BenchmarkError("--extra-request-body must be a JSON object")

    api_key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    served = _probe_server(args.base_url, headers)
    model = args.model or served
    if model is None:
        raise BenchmarkError("the server did not name its model; pass --model")
    try:
        tokenizer = get_tokenizer(args.tokenizer or model)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one readable line
        raise BenchmarkError(f"cannot load the tokenizer {args.tokenizer or model!r}: {e}") from e
    try:
        rows = get_dataset(args, tokenizer)
    except DatasetError as e:
        raise BenchmarkError(str(e)) from e
    print(
        f"Benchmarking {len(rows)} requests against {args.base_url} ({args.backend}); "
        f"{sum(r.prompt_len for r in rows)} input tokens, "
        f"{sum(r.output_len for r in rows)} requested output tokens."
    )

    api_url = args.base_url + ENDPOINTS[args.backend]

    def make_input(row: DatasetRow) -> RequestInput:
        return RequestInput(
            prompt=row.prompt,
            prompt_len=row.prompt_len,
            output_len=row.output_len,
            api_url=api_url,
            model=model,
            backend=args.backend,
            stream=not args.disable_stream,
            ignore_eos=not args.disable_ignore_eos,
            extra_body=extra_body,
        )

    outputs, duration = asyncio.run(run_requests(args, rows, make_input, tokenizer, headers))
    result: dict[str, Any] = {
        "backend": args.backend,
        "dataset_name": args.dataset_name,
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "num_prompts": len(rows),
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "model": model,
        "tokenizer": args.tokenizer or model,
        "seed": args.seed,
    }
    result.update(calculate_metrics(outputs, duration))
    print(format_result_block(result))
    if result["failed"]:
        print(f"{result['failed']} request(s) failed; first error: {result['errors'][0]}")
    if args.output_file:
        folder = os.path.dirname(args.output_file)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(args.output_file, "a", encoding="utf-8") as f:
            # NOTE: JSON has no inf; an unlimited rate is written as the string "inf".
            record = {**result, "request_rate": _json_rate(args.request_rate)}
            f.write(json.dumps(record) + "\n")
    return result


def _json_rate(rate: float) -> Any:
    return "inf" if rate == float("inf") else rate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.bench_serving",
        description="Measure a running server's throughput and latency (SGLang-compatible flags).",
    )
    parser.add_argument("--backend", default="sglang", choices=BACKENDS, help="Request API.")
    parser.add_argument("--base-url", default=None, help="Server URL (default: from host, port).")
    parser.add_argument("--host", default="127.0.0.1", help="Server host.")
    parser.add_argument("--port", type=int, default=30000, help="Server port.")
    parser.add_argument("--model", default=None, help="Model name (default: the server's).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer (default: the model).")
    add_dataset_args(parser)
    run = parser.add_argument_group("traffic")
    run.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second with Poisson arrivals; inf sends every request at once.",
    )
    run.add_argument("--max-concurrency", type=int, default=None, help="Cap on requests in flight.")
    run.add_argument(
        "--disable-ignore-eos", action="store_true", help="Let requests stop at end of sequence."
    )
    run.add_argument("--disable-stream", action="store_true", help="Send non-streaming requests.")
    run.add_argument(
        "--extra-request-body",
        default=None,
        help="JSON object merged into every request body.",
    )
    run.add_argument(
        "--flush-cache", action="store_true", help="POST /flush_cache before the timed run."
    )
    run.add_argument(
        "--warmup-requests", type=int, default=1, help="Untimed requests sent first (0: none)."
    )
    run.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    run.add_argument("--output-file", default=None, help="JSONL file; one line appended per run.")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_benchmark(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if result["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
