"""Windowed architectures' remaining checks against HuggingFace transformers (float32, CPU, eager):
Mistral's attention tokens under its sliding window, and tensor parallelism 2 for Mistral and
Gemma 3 (the other paths of both are in test_model_parity.py and test_model_parity_gemma.py).

The tiny Mistral has a window of 8 on every layer and a large init (peaky attention); its prompts
are longer than the window, one of them extends another (a prefix-cache hit across the window),
and prefill is chunked. Every generated token's attention tokens (last layer, all-layer mean,
per-layer lists with an excluded sink) must be a valid top-k of HF's eager head-mean rows within
1e-4, next to identical greedy tokens and logprobs within 1e-4 (HF teacher forcing, as in
test_model_parity_archs.py). Under TP 2 (a real gloo group) both ranks agree, tokens and logprobs
equal HF, and the attention tokens equal TP 1's.
"""

from __future__ import annotations

from test_model_parity_archs import (
    INIT,
    capture_runner,
    check,
    check_tp2,
    prompts_for,
    run,
)
from test_model_parity_gemma import capture_options

from sglang.test.runners import HFRunner, cpu_threads_hint, make_tiny_model

WINDOW = 8

cpu_threads_hint()


def test_mistral_attention_tokens_under_the_window(tmp_path):
    folder = make_tiny_model("mistral", str(tmp_path / "mistral"), sliding_window=WINDOW,
                             initializer_range=INIT)  # fmt: skip
    hf = HFRunner(folder)
    assert hf.model.config.sliding_window == WINDOW
    prompts = prompts_for(3, seed=11, lo=12, hi=40)
    prompts.append(prompts[0] + [7, 8, 9])  # a prefix-cache hit after prompt 0
    options = capture_options(hf.model.config.num_hidden_layers)
    srt = capture_runner(folder, chunked_prefill_size=16)
    # Prompt 0 first, so that prompt 3 finds it cached.
    reqs = run(srt, prompts[:1], options[:1]) + run(srt, prompts[1:], options[1:])
    assert reqs[3].cached_tokens >= len(prompts[0]), "no prefix-cache hit"
    check(hf, reqs, "mistral window 8")


def test_mistral_and_gemma3_tp2_match_tp1_and_hf(tmp_path_factory):
    folders = {
        "mistral": make_tiny_model("mistral", str(tmp_path_factory.mktemp("tp-mistral")),
                                   sliding_window=WINDOW, initializer_range=INIT),
        "gemma3": make_tiny_model("gemma3", str(tmp_path_factory.mktemp("tp-gemma3"))),
    }  # fmt: skip
    check_tp2(folders)
