"""return_hidden_states: final-layer hidden states per token, against HuggingFace float32.

The in-process scheduler covers the paths that decide which rows a request gets: a mixed batch,
a prompt prefilled in chunks, a prompt whose prefix sits in the radix cache (it must still get
the whole prompt's states) and a request retracted when the KV pool runs dry. The Engine covers the serving path (scheduler -> detokenizer ->
tokenizer manager -> `meta_info.hidden_states`), streaming and a request that does not ask (it
also runs with `--log-requests`, whose lines are checked). The refusal without the flag is
checked here for the scheduler and in test_srt_endpoint.py for HTTP. Reference: HF `output_hidden_states=True`,
`hidden_states[-1]` over `prompt + output_ids[:-1]` (after the final norm, as upstream returns).
"""

from __future__ import annotations

import logging

import pytest
import torch

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.test.runners import HFRunner, SRTRunner, cpu_threads_hint, make_tiny_model

cpu_threads_hint()
TOL = 1e-4
MAX_NEW = 6
PROMPTS = [[1, 5, 9, 13, 17], list(range(3, 30)), [1, 5, 9, 13, 17, 21, 22, 40]]


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return make_tiny_model("llama", seed=11)


@pytest.fixture(scope="module")
def hf(tiny_path: str) -> HFRunner:
    return HFRunner(tiny_path)


def reference(hf: HFRunner, prompt: list[int], output_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = hf.model(torch.tensor([prompt + output_ids[:-1]]), output_hidden_states=True)
    return out.hidden_states[-1][0].float()


def as_rows(entries: list) -> torch.Tensor:
    """meta_info.hidden_states -> [prompt_len + completion_len - 1, hidden]."""
    rows = [torch.as_tensor(e, dtype=torch.float32) for e in entries]
    return torch.cat([rows[0]] + [r[None] for r in rows[1:]])


def check(hf: HFRunner, prompt: list[int], output_ids: list[int], entries: list) -> None:
    assert len(entries) == len(output_ids)  # the prompt's entry, then one per decode step
    assert len(entries[0]) == len(prompt)
    torch.testing.assert_close(
        as_rows(entries), reference(hf, prompt, output_ids), rtol=TOL, atol=TOL
    )


def test_scheduler_batch_chunked_and_prefix_hit(tiny_path: str, hf: HFRunner) -> None:
    srt = SRTRunner(tiny_path, enable_return_hidden_states=True, chunked_prefill_size=8)
    sched = srt.scheduler

    def run(prompts: list[list[int]], ask: list[bool]) -> list[Req]:
        reqs = [
            Req(
                f"r{len(p)}-{i}-{a}",
                p,
                SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
                return_hidden_states=a,
            )
            for i, (p, a) in enumerate(zip(prompts, ask))
        ]
        for req in reqs:
            sched.add_request(req)
        sched.run_until_idle()
        sched.check_memory()
        return reqs

    # PROMPTS[1] (27 tokens) is prefilled in 4 chunks; the one that does not ask gets nothing.
    reqs = run(PROMPTS, [True, True, False])
    for req, prompt in zip(reqs[:2], PROMPTS):
        check(hf, prompt, req.output_ids, req.hidden_states)
    assert reqs[2].hidden_states == []
    # Now the prefix of PROMPTS[2] is cached; asking for hidden states still covers every token.
    again = run([PROMPTS[2]], [True])[0]
    assert again.output_ids == reqs[2].output_ids
    check(hf, PROMPTS[2], again.output_ids, again.hidden_states)
    assert again.cached_tokens == 0


def test_scheduler_retraction_keeps_one_entry_per_token(tiny_path: str, hf: HFRunner) -> None:
    """A KV pool too small for all four requests retracts one; its re-prefill (in chunks) adds
    just the state of the token it stands in for."""
    srt = SRTRunner(tiny_path, enable_return_hidden_states=True, max_total_tokens=96,
                    chunked_prefill_size=8)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (12, 9, 15, 10)]
    params = dict(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    reqs = [Req(f"r{i}", p, SamplingParams(**params), return_hidden_states=True)
            for i, p in enumerate(prompts)]  # fmt: skip
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    assert srt.scheduler.num_retractions > 0
    for req, prompt in zip(reqs, prompts):
        check(hf, prompt, req.output_ids, req.hidden_states)


def test_scheduler_refuses_without_the_flag(tiny_path: str) -> None:
    srt = SRTRunner(tiny_path)
    req = Req("r", PROMPTS[0], SamplingParams(max_new_tokens=2), return_hidden_states=True)
    srt.scheduler.add_request(req)
    assert req.finished_reason.to_json()["type"] == "abort"
    assert "--enable-return-hidden-states" in req.finished_reason.to_json()["message"]


def test_engine_meta_info_streaming_and_request_log(
    tiny_path: str, hf: HFRunner, caplog: pytest.LogCaptureFixture
) -> None:
    import sglang as sgl

    greedy = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}
    engine = sgl.Engine(model_path=tiny_path, device="cpu", dtype="float32",
                        skip_tokenizer_init=True, max_total_tokens=4096, random_seed=0,
                        enable_return_hidden_states=True, log_requests=True,
                        log_requests_level=1)  # fmt: skip
    with engine, caplog.at_level(logging.INFO, logger="sglang.srt.managers.request_logger"):
        outs = engine.generate(input_ids=PROMPTS[:2], sampling_params=greedy,
                               return_hidden_states=True)  # fmt: skip
        for out, prompt in zip(outs, PROMPTS):
            check(hf, prompt, out["output_ids"], out["meta_info"]["hidden_states"])
        plain = engine.generate(input_ids=PROMPTS[0], sampling_params=greedy, rid="plain-1")
        assert "hidden_states" not in plain["meta_info"]
        chunks = list(engine.generate(input_ids=PROMPTS[2], sampling_params=greedy,
                                      return_hidden_states=True, stream=True))  # fmt: skip
        last = chunks[-1]
        check(hf, PROMPTS[2], last["output_ids"], last["meta_info"]["hidden_states"])
    # --log-requests level 1: sampling parameters, no prompt or output tokens.
    lines = [r.getMessage() for r in caplog.records if "plain-1" in r.getMessage()]
    assert len(lines) == 2, lines
    assert (
        lines[0].startswith("Receive: obj=GenerateReqInput(") and "'max_new_tokens': 6" in lines[0]
    )
    assert lines[1].startswith("Finish: obj=GenerateReqInput(") and "'finish_reason'" in lines[1]
    assert "input_ids=" not in lines[0] and "'output_ids'" not in lines[1]
