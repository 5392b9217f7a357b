"""Prefill cost of attention_prompt_positions on CPU (docs/attention_tokens.md, Prompt attention).

One 512-token prompt, in-process engine (Scheduler + ModelRunner, no HTTP), SmolLM2-135M float32,
every layer captured, radix cache off so every run prefills the whole prompt. Configurations run
interleaved, `--repeat` rounds after one warm-up each; the median time from admission to the
first token is printed as a markdown table:

    .venv/bin/python benchmark/bench_attention_prompt.py --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.attention_capture.prompt import apply_prompt_positions
from sglang.test.runners import SRTRunner, cpu_threads_hint

PROMPT_LEN, TOP_K = 512, 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cpu_threads_hint()
    srt = SRTRunner(args.model, return_attention_tokens=True, attention_capture_layers="all",
                    attention_tokens_top_k=TOP_K, disable_radix_cache=True,
                    max_total_tokens=8192)  # fmt: skip
    layers = srt.model_runner.model_config.num_hidden_layers
    prompt = [(i * 7919) % 40000 + 100 for i in range(PROMPT_LEN)]
    last = AttentionRequest(top_k=TOP_K, layers=(layers - 1,))
    every = AttentionRequest(top_k=TOP_K, layers=tuple(range(layers)))
    configs = {
        "generated tokens only (last layer)": last,
        '"all" prompt positions, last layer': apply_prompt_positions(
            last, "all", PROMPT_LEN, PROMPT_LEN
        ),
        f'"all" prompt positions, {layers} layers': apply_prompt_positions(
            every, "all", PROMPT_LEN, PROMPT_LEN
        ),
    }

    def prefill(options: AttentionRequest) -> float:
        req = srt.make_req(prompt, 1, attention=options, temperature=0.0)
        start = time.perf_counter()
        srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
        return time.perf_counter() - start

    for options in configs.values():
        prefill(options)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeat):
        for name, options in configs.items():
            times[name].append(prefill(options))
    base = statistics.median(next(iter(times.values())))
    print("| configuration | prefill ms (median) | vs generated tokens only |")
    print("|---|---|---|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms * 1000:.0f} | {100 * (ms / base - 1):+.1f} % |")


if __name__ == "__main__":
    main()
