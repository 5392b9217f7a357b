"""Tests for SamplingParams validation, SamplingBatchInfo construction and the seeded Sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from sglang.srt.layers.sampler import Sampler, seeded_uniform
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglang.srt.sampling.sampling_params import SamplingParams

V = 64
# CUDA variants run where a GPU exists; the CPU suite skips them.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
    ),
]
EOS = 2


@dataclass
class FakeReq:
    sampling_params: SamplingParams
    origin_input_ids: list[int] = field(default_factory=lambda: [5, 6, 7])
    output_ids: list[int] = field(default_factory=list)
    sampling_seed: int = 0
    eos_token_ids: set[int] = field(default_factory=lambda: {EOS})


def make_req(seed: int = 0, **kw) -> FakeReq:
    extra = {k: kw.pop(k) for k in ("origin_input_ids", "output_ids") if k in kw}
    sp = SamplingParams(**kw)
    sp.verify(V)
    return FakeReq(sp.normalize(), sampling_seed=seed, **extra)


def run(reqs: list[FakeReq], logits: torch.Tensor, **kw):
    info = SamplingBatchInfo.from_reqs(reqs, V, logits.device)
    return Sampler()(logits, info, **kw)


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", -2),
        ("min_p", 1.1),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.1),
        ("max_new_tokens", -1),
        ("min_new_tokens", -1),
        ("n", 0),
        ("logit_bias", {"99999": 1.0}),
        ("logit_bias", {"abc": 1.0}),
        ("stop_token_ids", [V]),
        ("temperature", "hot"),
    ],
)
def test_verify_names_field(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value}).verify(V)


def test_verify_cross_field_rules():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5).verify(V)
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema="{}", regex="a+").verify(V)
    SamplingParams(max_new_tokens=4, min_new_tokens=4, logit_bias={"3": -1}).verify(V)


def test_from_dict_and_normalize():
    with pytest.raises(ValueError, match="bogus"):
        SamplingParams.from_dict({"temperature": 0.5, "bogus": 1})
    sp = SamplingParams.from_dict(
        {
            "stop": "END",
            "stop_token_ids": [3, 3, 4],
            "logit_bias": {"7": 2},
            "temperature": 0,
        }
    )
    sp.verify(V)
    sp.normalize().normalize()
    assert sp.stop == ["END"] and sp.stop_token_ids == {3, 4}
    assert sp.logit_bias == {7: 2.0}
    assert sp.is_greedy and sp.temperature == 0
    assert SamplingParams(stop=["a", "abcd"]).stop_str_max_len == 4
    assert SamplingParams().normalize().stop == [] and SamplingParams().stop_str_max_len == 0
    assert SamplingParams(top_k=1).is_greedy and not SamplingParams().is_greedy


# ---------------------------------------------------------------- hashing


def _splitmix_ref(seed: int, step: int) -> float:
    m = (1 << 64) - 1
    gamma = 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    state = mix((seed + gamma) & m)
    z = mix((state + (step + 1) * gamma) & m)
    return (z >> 40) / (1 << 24)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_uniform_matches_unsigned_reference(device):
    seeds = [0, 1, 12345, (1 << 63) - 1, -1, -(1 << 63)]
    steps = [0, 1, 7, 1000, 3, 99]
    got = seeded_uniform(torch.tensor(seeds, device=device), torch.tensor(steps, device=device))
    want = [_splitmix_ref(s & ((1 << 64) - 1), t) for s, t in zip(seeds, steps)]
    assert got.tolist() == pytest.approx(want, abs=0)


# ---------------------------------------------------------------- sampler


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    reqs = [make_req(seed=i, temperature=0.0) for i in range(6)]
    out = run(reqs, logits)
    assert out.next_token_ids.dtype == torch.int64
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


def test_top_k_one_equals_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, V) * 0.1
    reqs = [make_req(seed=i, temperature=1.3, top_k=1) for i in range(8)]
    assert torch.equal(run(reqs, logits).next_token_ids, logits.argmax(-1))


def _rollout(
    target_slot: int, others: list[dict], device: str = "cpu", steps: int = 24
) -> list[int]:
    """Decode `steps` tokens where each row's logits are a fixed map of its previous token."""
    g = torch.Generator().manual_seed(42)
    table = (torch.randn(V, V, generator=g) * 2.0).to(device)
    target = dict(seed=1234, temperature=0.8, top_p=0.9, top_k=20)
    specs = list(others)
    specs.insert(target_slot, target)
    reqs = [make_req(**dict(s)) for s in specs]
    for r in reqs:
        r.origin_input_ids = [(3 * r.sampling_seed + 1) % V]
    for _ in range(steps):
        last = [(r.output_ids or r.origin_input_ids)[-1] for r in reqs]
        prev = torch.tensor(last, device=device)
        ids = run(reqs, table[prev]).next_token_ids.tolist()
        for r, t in zip(reqs, ids):
            r.output_ids.append(t)
    return reqs[target_slot].output_ids


@pytest.mark.parametrize("device", DEVICES)
def test_seed_is_batch_invariant(device):
    alone = _rollout(0, [], device)
    others = [
        dict(seed=1, temperature=0.0),
        dict(seed=2, temperature=1.0),
        dict(seed=3, temperature=0.5, min_p=0.2),
        dict(seed=4, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4),
        dict(seed=5, logit_bias={"9": 3.0}, top_p=0.5),
        dict(seed=6, top_k=3, min_new_tokens=10),
        dict(seed=7, temperature=2.0, top_k=1),
    ]
    assert len(set(alone)) > 3  # a real, varied sequence
    for slot in (0, 3, 7):
        assert _rollout(slot, others, device) == alone


def test_different_seeds_differ():
    seqs = set()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, V, generator=g)
    for seed in range(4):
        seq = [
            run([make_req(seed=seed, output_ids=[0] * step)], logits).next_token_ids.item()
            for step in range(16)
        ]
        seqs.add(tuple(seq))
    assert len(seqs) == 4


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_distribution_matches_softmax():
    vocab, n, temp = 8, 20000, 0.7
    logits_row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.3, -1.0, 0.8])
    probs = torch.softmax(logits_row / temp, dim=-1)
    # Across seeds at a fixed step, and across steps for one seed.
    reqs = [FakeReq(SamplingParams(temperature=temp).normalize(), [], [], s) for s in range(n)]
    info = SamplingBatchInfo.from_reqs(reqs, vocab, "cpu")
    ids = Sampler()(logits_row.expand(n, vocab), info).next_token_ids
    assert _chi_square(torch.bincount(ids, minlength=vocab).float(), probs) < 30.0  # df=7
    info.seeds.fill_(99)
    info.steps.copy_(torch.arange(n))
    ids = Sampler()(logits_row.expand(n, vocab), info).next_token_ids
    assert _chi_square(torch.bincount(ids, minlength=vocab).float(), probs) < 30.0


def _support(vocab_probs: list[float], n: int = 400, **kw) -> set[int]:
    logits = torch.tensor(vocab_probs).log().expand(n, len(vocab_probs))
    reqs = [FakeReq(SamplingParams(**kw).normalize(), [], [], s) for s in range(n)]
    info = SamplingBatchInfo.from_reqs(reqs, len(vocab_probs), "cpu")
    return set(Sampler()(logits, info).next_token_ids.tolist())


# Vocabulary order differs from probability order so the sort is exercised.
PROBS = [0.1, 0.25, 0.5, 0.15]


def test_top_p_keeps_minimal_nucleus():
    assert _support(PROBS) == {0, 1, 2, 3}
    assert _support(PROBS, top_p=0.4) == {2}
    assert _support(PROBS, top_p=0.7) == {1, 2}
    assert _support(PROBS, top_p=0.8) == {1, 2, 3}
    # top-p over the renormalised top-3 (mass .9): .5/.9 + .25/.9 = .83 >= .8.
    assert _support(PROBS, top_k=3, top_p=0.8) == {1, 2}
    assert _support(PROBS, top_k=2) == {1, 2}


def test_min_p():
    assert _support(PROBS, min_p=0.29) == {1, 2, 3}  # threshold .145
    assert _support(PROBS, min_p=0.31) == {1, 2}  # threshold .155
    assert _support(PROBS, min_p=1.0) == {2}


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=g) * 3
    prompt, output = [1, 4, 4, 9], [4, 9, 9, 11, 4]
    specs = [
        dict(repetition_penalty=1.5),
        dict(frequency_penalty=0.5, presence_penalty=0.3),
        dict(repetition_penalty=0.8, frequency_penalty=-0.2, presence_penalty=1.0),
    ]
    reqs = [make_req(origin_input_ids=prompt, output_ids=output, **s) for s in specs]
    info = SamplingBatchInfo.from_reqs(reqs, V, "cpu")
    got = info.apply_logits_bias(logits)
    want = logits.clone()
    for row, s in enumerate(specs):
        rp = s.get("repetition_penalty", 1.0)
        for tok in set(prompt + output):
            x = want[row, tok].item()
            want[row, tok] = x / rp if x > 0 else x * rp
        for tok in set(output):
            cnt = output.count(tok)
            want[row, tok] -= s.get("frequency_penalty", 0.0) * cnt
            want[row, tok] -= s.get("presence_penalty", 0.0)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, logits)  # the raw logits stay untouched
    assert torch.equal(logits, logits.clone())


def test_logit_bias_forces_token():
    logits = torch.zeros(4, V)
    logits[:, 0] = 5.0
    temps = [0, 1, 1, 2]
    reqs = [make_req(seed=i, temperature=t, logit_bias={"17": 100.0}) for i, t in enumerate(temps)]
    assert run(reqs, logits).next_token_ids.tolist() == [17] * 4


def test_min_new_tokens_blocks_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 50.0
    logits[0, 30] = 40.0
    for n_out in range(4):
        req = make_req(temperature=0, min_new_tokens=3, stop_token_ids=[30], output_ids=[8] * n_out)
        tok = run([req], logits).next_token_ids.item()
        assert tok == (EOS if n_out >= 3 else 0)  # blocked: argmax of the zero logits
    # Sampled rows are blocked too.
    reqs = [make_req(seed=s, min_new_tokens=1) for s in range(32)]
    assert EOS not in run(reqs, logits.expand(32, V)).next_token_ids.tolist()


def test_logprobs_are_raw_log_softmax():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, V, generator=g).to(torch.bfloat16)
    reqs = [
        make_req(temperature=0),
        make_req(seed=1, temperature=0.7, repetition_penalty=1.4, output_ids=[3, 4]),
        make_req(seed=2, logit_bias={"5": 4.0}, top_k=5),
    ]
    out = run(reqs, logits, return_logprob=True, top_logprobs_nums=[0, 3, 5])
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert out.next_token_logprobs.dtype == torch.float32
    chosen = ref.gather(1, out.next_token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.next_token_logprobs, chosen)
    assert out.top_logprobs_val.shape == (3, 5) and out.top_logprobs_idx.dtype == torch.int64
    want_val, _ = ref.topk(5, dim=-1)
    torch.testing.assert_close(out.top_logprobs_val, want_val)
    torch.testing.assert_close(ref.gather(1, out.top_logprobs_idx), want_val)
    assert out.next_token_ids[0].item() == logits[0].float().argmax().item()

    plain = run(reqs, logits)
    assert plain.next_token_logprobs is None and plain.top_logprobs_val is None
    no_top = run(reqs, logits, return_logprob=True)
    assert no_top.next_token_logprobs is not None and no_top.top_logprobs_idx is None


def test_batch_info_edge_cases():
    huge = make_req(seed=(1 << 64) + 5, presence_penalty=1.0, output_ids=[V + 10, 3])
    huge.origin_input_ids = [-1, V + 3]
    rep = make_req(repetition_penalty=1.2)
    rep.origin_input_ids = [V + 100, 1]
    info = SamplingBatchInfo.from_reqs([huge, rep], V, "cpu")
    assert info.seeds[0].item() == 5
    assert info.output_token_counts.sum().item() == 1.0  # out-of-vocab ids are dropped
    assert info.seen_token_mask[1].nonzero().flatten().tolist() == [1]
    greedy_only = SamplingBatchInfo.from_reqs([make_req(temperature=0)], V, "cpu")
    assert greedy_only.is_all_greedy and not greedy_only.has_logits_bias
    assert greedy_only.steps.tolist() == [0]
