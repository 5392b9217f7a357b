"""The overlap schedule (managers/scheduler_overlap.py) gives what the sequential one gives.

In process, on a tiny random Llama: the same requests (greedy and seeded sampling, logprobs, stop
tokens, different prompt and output lengths, page sizes 1 and 4) give identical tokens, logprobs
and finish reasons, with decode steps really chained and no KV slot leaked; a failure injected
into a chained step ends both steps' requests and frees everything; an abort while steps are in
flight settles them first. Through the real server: one server per schedule, the same concurrent
requests (stop strings, stop token ids, EOS, lengths, logprobs, attention tokens) answer the same.
"""

from __future__ import annotations

import concurrent.futures
import random

import pytest
import requests

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.managers.scheduler_overlap import (
    CPU_OVERLAP_ENV,
    OverlapScheduler,
    overlap_enabled,
)
from sglang.test.runners import SRTRunner, make_tiny_model
from sglang.test.served_tiny import make_tiny_served_model
from sglang.test.test_utils import find_free_port, popen_launch_server, terminate


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("tiny-llama")))


def _schedulers(folder: str, page_size: int):
    """A sequential and an overlap scheduler over one model runner (run one after the other)."""
    srt = SRTRunner(folder, max_total_tokens=2048, chunked_prefill_size=64, page_size=page_size)
    return srt, srt.scheduler, OverlapScheduler(srt.server_args, srt.model_runner)


def _forget_cache(sched) -> None:
    sched.tree_cache.evict(sched.tree_cache.evictable_size())
    sched.tree_cache.reset()
    sched.check_memory()


def _requests(srt: SRTRunner, stop: list[int]) -> list[Req]:
    rnd = random.Random(0)
    reqs = []
    for k in range(6):
        prompt = [rnd.randrange(3, 250) for _ in range(5 + 7 * k)]
        sampling = {"temperature": 0.0} if k % 2 == 0 else {"temperature": 0.8, "top_k": 20}
        req = srt.make_req(
            prompt,
            10 + 3 * k,
            return_logprob=True,
            stop_token_ids=stop,
            sampling_seed=k,
            **sampling,
        )
        req.top_logprobs_num = 2
        reqs.append(req)
    return reqs


def _run(srt: SRTRunner, sched, stop: list[int]) -> list[tuple]:
    reqs = _requests(srt, stop)
    for req in reqs:
        sched.add_request(req)
    sched.run_until_idle()
    sched.check_memory()
    _forget_cache(sched)
    return [
        (r.output_ids, r.output_token_logprobs, r.output_top_logprobs, r.finished_reason.to_json())
        for r in reqs
    ]


@pytest.mark.parametrize("page_size", [1, 4])
def test_chained_steps_give_the_sequential_outputs(folder, page_size):
    srt, seq, overlap = _schedulers(folder, page_size)
    free = _run(srt, seq, [])
    # Stop tokens that two requests sample mid-way: they finish early, with a spare chained row.
    stop = [free[0][0][3], free[3][0][5]]
    expected = _run(srt, seq, stop)
    assert [o[3]["type"] for o in expected].count("stop") >= 2
    got = _run(srt, overlap, stop)
    assert got == expected
    assert overlap.chained_steps > 10


def test_failure_in_a_chained_step_frees_both_steps(folder):
    srt, _, sched = _schedulers(folder, 1)
    victims = [srt.make_req([7, 8, 9, 10 + i], 12, ignore_eos=True) for i in range(3)]
    for req in victims:
        sched.add_request(req)
    chained = sched.chained_steps
    while sched.chained_steps == chained:  # until a decode step is chained onto one in flight
        sched.step()

    def fail(batch) -> None:
        raise RuntimeError("injected")

    sched.before_forward = fail
    with pytest.raises(RuntimeError):
        sched.step()
    assert sched.fail_current_batch("the batch failed") is None
    assert all(r.finished_reason.to_json()["type"] == "abort" for r in victims)
    sched.before_forward = None
    survivor = srt.make_req([11, 12, 13], 6, ignore_eos=True)
    sched.add_request(survivor)
    sched.run_until_idle()
    assert len(survivor.output_ids) == 6
    sched.check_memory()


def test_abort_with_steps_in_flight_settles_them_first(folder):
    srt, _, sched = _schedulers(folder, 1)
    keep, drop = (srt.make_req([5, 6, 7, 8], 16, ignore_eos=True) for _ in range(2))
    for req in (keep, drop):
        sched.add_request(req)
    while sched.chained_steps < 2:
        sched.step()
    assert sched.launched
    sched.abort_request(drop.rid)
    assert not sched.launched and drop not in sched.running_batch.reqs
    produced = len(drop.output_ids)
    sched.check_accounting()
    sched.run_until_idle()
    assert len(drop.output_ids) == produced and len(keep.output_ids) == 16
    sched.check_memory()


# ---------------------------------------------------------------------------------- served


def _serve_and_ask(model: str, extra: list[str], bodies: list[dict]) -> list[dict]:
    url = f"http://127.0.0.1:{find_free_port()}"
    args = ["--max-total-tokens", "8192", "--return-attention-tokens", *extra]
    proc = popen_launch_server(model, url, other_args=args)
    try:

        def ask(body: dict) -> dict:
            r = requests.post(url + "/generate", json=body, timeout=300)
            r.raise_for_status()
            return r.json()

        first = ask(bodies[0])  # the stop string and token come from a free-running answer
        text, ids = first["text"], first["output_ids"]
        bodies[1]["sampling_params"]["stop"] = [text[len(text) // 2 : len(text) // 2 + 3]]
        bodies[2]["sampling_params"]["stop_token_ids"] = [ids[6]]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            return [first, *pool.map(ask, bodies[1:])]
    finally:
        terminate(proc)


def _bodies(prompt_ids: list[int]) -> list[dict]:
    def body(n: int, max_new: int, **extra) -> dict:
        sampling = {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}
        sampling.update(extra.pop("sampling", {}))
        return {"input_ids": prompt_ids[:n], "sampling_params": sampling, **extra}

    return [
        body(12, 24),
        body(12, 24, return_logprob=True, top_logprobs_num=2),  # + a stop string
        body(12, 30, return_logprob=True, logprob_start_len=0),  # + a stop token id
        body(5, 17, sampling={"ignore_eos": False}),
        body(30, 9, return_attention_tokens=True),
        body(16, 40, sampling={"temperature": 0.7, "sampling_seed": 3}),
    ]


def _same(a, b, path: str = "") -> None:
    """Equal structure, ids, text and finish reasons; floats (logprobs, attention scores) within
    1e-5, since concurrent arrivals may batch the requests differently on each server."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_served_outputs_equal_with_and_without_overlap(tmp_path_factory, monkeypatch):
    model = make_tiny_served_model(str(tmp_path_factory.mktemp("tiny-served")))
    prompt = list(range(1000, 1040))
    monkeypatch.setenv(CPU_OVERLAP_ENV, "1")  # on CPU the overlap schedule is opt-in
    on = _serve_and_ask(model, [], _bodies(prompt))
    off = _serve_and_ask(model, ["--disable-overlap-schedule"], _bodies(prompt))
    for a, b in zip(on, off):
        for key in ("id", "e2e_latency", "cached_tokens"):
            a["meta_info"].pop(key, None), b["meta_info"].pop(key, None)
        _same(a, b)
    assert on[1]["meta_info"]["finish_reason"]["type"] == "stop"
    assert on[2]["meta_info"]["finish_reason"] == {
        "type": "stop",
        "matched": on[0]["output_ids"][6],
    }


def test_overlap_default_per_device(monkeypatch):
    """Upstream's default (on) on CUDA; opt-in on CPU; the flag and TP > 1 turn it off."""
    from types import SimpleNamespace

    on, off = (
        SimpleNamespace(disable_overlap_schedule=False),
        SimpleNamespace(disable_overlap_schedule=True),
    )
    monkeypatch.delenv(CPU_OVERLAP_ENV, raising=False)
    assert overlap_enabled(on, 1, "cuda") and not overlap_enabled(on, 1, "cpu")
    assert not overlap_enabled(off, 1, "cuda") and not overlap_enabled(on, 2, "cuda")
    monkeypatch.setenv(CPU_OVERLAP_ENV, "1")
    assert overlap_enabled(on, 1, "cpu") and not overlap_enabled(off, 1, "cpu")
