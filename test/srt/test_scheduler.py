"""Scheduler behaviour, driven in-process on a tiny random Llama (and SmolLM2 for stop strings).

Covers retraction under a dry KV pool (same tokens as an unconstrained run), seeded sampling
alone vs in a batch, page size > 1, admission policies and limits, finish conditions, aborts,
the idle memory invariant, and clear errors for requests or models that cannot run.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from sglang.srt.server_args import ServerArgs
from sglang.test.runners import HFRunner, SRTRunner, cpu_threads_hint, make_tiny_model

cpu_threads_hint()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


def rand_prompts(n: int, seed: int, lo: int = 5, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def test_retraction_keeps_tokens(folder):
    prompts = rand_prompts(8, seed=1, lo=15, hi=25)
    expected = SRTRunner(folder).generate(prompts, 40)
    # 8 x (~20 + 40) tokens do not fit in 240 slots: optimistic admission forces retraction.
    tight = SRTRunner(folder, max_total_tokens=240, schedule_conservativeness=0.05)
    outs = tight.generate(prompts, 40)
    assert tight.scheduler.num_retractions > 0, (
        "the pool never ran dry; the test is not testing retraction"
    )
    assert [o.output_ids for o in outs] == [o.output_ids for o in expected]
    assert all(len(o.output_ids) == 40 for o in outs)


def test_seeded_sampling_alone_and_in_batch(folder):
    prompts = rand_prompts(8, seed=2)
    params = dict(temperature=0.9, top_p=0.95, top_k=50, ignore_eos=True)
    srt = SRTRunner(folder, disable_radix_cache=True)
    alone = srt.generate([prompts[3]], 24, sampling_seed=1234, **params)[0]
    reqs = [
        srt.make_req(p, 24, sampling_seed=1234 if i == 3 else 99 + i, **params)
        for i, p in enumerate(prompts)
    ]
    for r in reqs:
        srt.scheduler.add_request(r)
    srt.scheduler.run_until_idle()
    assert reqs[3].output_ids == alone.output_ids
    other = srt.generate([prompts[3]], 24, sampling_seed=4321, **params)[0]
    assert other.output_ids != alone.output_ids


def test_page_size_four_matches_hf(folder):
    hf = HFRunner(folder)
    prompts = rand_prompts(4, seed=3)
    refs = [hf.greedy(p, 16).output_ids for p in prompts]
    srt = SRTRunner(folder, page_size=4, chunked_prefill_size=6)
    assert [o.output_ids for o in srt.generate(prompts, 16)] == refs
    again = srt.generate(prompts, 16)  # radix hit at page granularity
    assert [o.output_ids for o in again] == refs
    assert all(o.cached_tokens % 4 == 0 and o.cached_tokens > 0 for o in again if len(prompts) >= 5)


def test_max_running_requests_and_lpm(folder):
    srt = SRTRunner(folder, max_running_requests=2, schedule_policy="lpm")
    sizes: list[int] = []
    srt.scheduler.on_batch = lambda b: sizes.append(len(b.reqs))
    shared = rand_prompts(1, seed=4, lo=25, hi=26)[0]
    srt.generate([shared], 4)
    sizes.clear()
    order: list[str] = []
    srt.scheduler.output.listener = lambda reqs: order.extend(r.rid for r in reqs if r.finished())
    fresh = srt.make_req(rand_prompts(1, seed=5)[0], 4, temperature=0.0, ignore_eos=True)
    hit = srt.make_req(shared + [9, 9], 4, temperature=0.0, ignore_eos=True)
    fresh2 = srt.make_req(rand_prompts(1, seed=6)[0], 4, temperature=0.0, ignore_eos=True)
    for r in (fresh, fresh2, hit):
        srt.scheduler.add_request(r)
    srt.scheduler.run_until_idle()
    assert max(sizes) <= 2
    assert hit.cached_tokens >= len(shared)
    # lpm admits the request with the cached prefix first although it arrived last.
    assert order.index(hit.rid) <= 1


def test_finish_conditions(folder):
    srt = SRTRunner(folder)
    prompt = rand_prompts(1, seed=7)[0]
    free = srt.generate([prompt], 12)[0].output_ids
    target = free[5]
    first = free.index(target)
    out = srt.generate([prompt], 12, stop_token_ids=[target])[0]
    assert out.output_ids == free[: first + 1]
    assert out.finish_reason == {"type": "stop", "matched": target}
    # The model's EOS (id 2 here) stops unless ignore_eos; make it EOS via logit_bias.
    out = srt.generate([prompt], 12, ignore_eos=False, logit_bias={"2": 100.0})[0]
    assert out.output_ids == [2] and out.finish_reason == {"type": "stop", "matched": 2}
    out = srt.generate([prompt], 12, ignore_eos=False, logit_bias={"2": 100.0}, min_new_tokens=3)[0]
    assert len(out.output_ids) == 4 and out.output_ids[-1] == 2
    out = srt.generate([prompt], 5)[0]
    assert out.finish_reason == {"type": "length", "length": 5}
    out = srt.generate([prompt], 0, return_logprob=True, logprob_start_len=0)[0]
    assert out.output_ids == [] and out.finish_reason == {"type": "length", "length": 0}
    assert len(out.input_logprobs) == len(prompt)


def test_abort_and_invariant_under_mixed_load(folder):
    srt = SRTRunner(
        folder, max_total_tokens=600, chunked_prefill_size=16, schedule_conservativeness=0.3
    )
    rng = random.Random(8)
    sched = srt.scheduler
    reqs = []
    for i, p in enumerate(rand_prompts(60, seed=9, lo=3, hi=60)):
        r = srt.make_req(
            p, rng.randrange(1, 30), temperature=rng.choice([0.0, 0.8]), ignore_eos=True
        )
        reqs.append(r)
        sched.add_request(r)
        if i % 7 == 0:
            for _ in range(rng.randrange(1, 4)):
                sched.step()
        if i % 5 == 0:
            sched.abort_request(rng.choice(reqs).rid)
    sched.run_until_idle()
    sched.check_memory()
    assert all(r.finished() for r in reqs)
    aborted = [r for r in reqs if r.finished_reason.to_json()["type"] == "abort"]
    assert aborted, "no request was aborted"


def test_prompt_too_long_is_rejected_clearly(folder):
    srt = SRTRunner(folder, context_length=64)
    out = srt.generate([list(range(3, 80))], 4)[0]
    assert out.finish_reason["type"] == "abort"
    assert (
        "context length" in out.finish_reason["message"]
        and "77 tokens" in out.finish_reason["message"]
    )
    out = srt.generate([list(range(3, 40))], 40)[0]
    assert "max_new_tokens" in out.finish_reason["message"]
    srt.scheduler.check_memory()


def test_unknown_architecture_and_missing_weights(tmp_path, folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["architectures"] = ["FooForCausalLM"]
    json.dump(cfg, open(bad / "config.json", "w"))
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(folder, name), bad / name)
    with pytest.raises(ValueError, match="FooForCausalLM.*not supported"):
        SRTRunner(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    json.dump(
        json.load(open(os.path.join(folder, "config.json"))), open(empty / "config.json", "w")
    )
    with pytest.raises(ValueError, match="weight"):
        SRTRunner(str(empty))


def test_server_args_drive_runner(folder):
    args = ServerArgs(model_path=folder, device="cpu", max_total_tokens=128, dtype="bfloat16")
    assert args.attention_backend == "torch_native" and args.chunked_prefill_size == 2048
    srt = SRTRunner(folder, max_total_tokens=128, dtype="bfloat16")
    assert (
        srt.model_runner.dtype.is_floating_point and str(srt.model_runner.dtype) == "torch.bfloat16"
    )
    assert len(srt.generate(rand_prompts(2, seed=10), 4)[0].output_ids) == 4


def test_stop_string_with_tokenizer():
    from sglang.srt.hf_transformers_utils import get_tokenizer

    tok = get_tokenizer("smollm2-135m-instruct")
    srt = SRTRunner("smollm2-135m-instruct", max_total_tokens=1024)
    srt.scheduler.output.tokenizer = tok
    prompt = tok.encode("1, 2, 3, 4, 5,")
    out = srt.generate([prompt], 20, stop=[" 8"])[0]
    text = tok.decode(out.output_ids)
    assert out.finish_reason == {"type": "stop", "matched": " 8"}, text
    assert text.rstrip().endswith("8") and len(out.output_ids) < 20
