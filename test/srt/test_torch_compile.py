"""`--enable-torch-compile`: the compiled decode forward gives the eager forward's results.

A tiny float32 Llama, one engine with `--enable-torch-compile --torch-compile-max-bs 3` and one
without, both with attention capture on: a batch of 3 (decode runs compiled; two requests ask for
attention tokens, one does not) and a batch of 5 (above the cap: eager) must give identical
greedy tokens, logprobs within 1e-5 and the same attention tokens. Compiling the tiny model
takes about a minute on a loaded 2-core machine (one compile: batch sizes are dynamic). Start-up
refusals (exit 2) are checked too.
"""

from __future__ import annotations

import random

import pytest
import torch

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.server_args import prepare_server_args
from sglang.test.runners import SRTRunner, cpu_threads_hint, make_tiny_model

cpu_threads_hint()
STEPS = 6


def run(runner: SRTRunner, prompts, options):
    reqs = [runner.make_req(p, STEPS, return_logprob=True, attention=o, temperature=0.0,
                            ignore_eos=True) for p, o in zip(prompts, options)]  # fmt: skip
    for req in reqs:
        runner.scheduler.add_request(req)
    runner.scheduler.run_until_idle()
    runner.scheduler.check_memory()
    return reqs


def test_compiled_decode_equals_eager() -> None:
    path = make_tiny_model("llama", seed=3)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(5, 25))] for _ in range(5)]
    opt = AttentionRequest(top_k=5, layers=(0, 2))
    kwargs = dict(return_attention_tokens=True, attention_capture_layers="all")
    compiled = SRTRunner(path, enable_torch_compile=True, torch_compile_max_bs=3, **kwargs)
    eager = SRTRunner(path, **kwargs)
    assert compiled.model_runner.compiled_forward is not None
    assert eager.model_runner.compiled_forward is None

    torch._dynamo.utils.counters.clear()
    for batch in ([opt, None, opt], [opt, None, None, opt, None]):
        n = len(batch)
        got, want = run(compiled, prompts[:n], batch), run(eager, prompts[:n], batch)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.output_ids == b.output_ids, f"batch {n} request {i}: tokens differ"
            lp_a = [lp for lp, _ in a.output_token_logprobs]
            lp_b = [lp for lp, _ in b.output_token_logprobs]
            assert lp_a == pytest.approx(lp_b, abs=1e-5), f"batch {n} request {i}: logprobs"
            assert len(a.attention_records) == len(b.attention_records)
            for ra, rb in zip(a.attention_records, b.attention_records):
                assert ra.positions == rb.positions
                assert ra.scores == pytest.approx(rb.scores, abs=1e-5)
        if n == 3:  # the decode of the first batch ran compiled graphs
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--enable-torch-compile", "--device", "cuda"],  # CUDA graphs on
        ["--enable-torch-compile", "--device", "cpu", "--tp", "2"],
        ["--torch-compile-max-bs", "0", "--device", "cpu"],
    ],
)
def test_refused_combinations_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        prepare_server_args(["--model-path", "m", *argv])
    assert exc.value.code == 2
    assert "torch" in capsys.readouterr().err.strip().splitlines()[-1]
