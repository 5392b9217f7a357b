"""hidden_states_layers and logit_lens against HuggingFace float32 eager.

The reference (python/sglang/test/layer_probe_reference.py): HF's `output_hidden_states[L + 1]`
at each generated token's query position (the last layer: the decoder layer's own output, before
the final norm HF applies there), and log_softmax(lm_head(final_norm(h_L))) with HF's modules
(Gemma 2's final-logit softcap included).

The in-process scheduler covers the rows a request gets in mixed batches, chunked prefill, a
prefix hit and a request that does not ask; the Engine covers the serving path (native dicts,
streaming, base64); test_layer_probes_http.py covers /generate, both OpenAI routes and the 400s.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from sglang.srt.managers.layer_probes import ProbeRequest
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.test.layer_probe_reference import check_hidden, check_lens, lens_pairs, reference
from sglang.test.runners import HFRunner, SRTRunner, cpu_threads_hint, make_tiny_model

cpu_threads_hint()
MAX_NEW = 5
PROMPTS = [[1, 5, 9, 13, 17], list(range(3, 30)), [1, 5, 9, 13, 17, 21, 22, 40]]


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return make_tiny_model("llama", seed=7)


@pytest.fixture(scope="module")
def hf(tiny_path: str) -> HFRunner:
    return HFRunner(tiny_path)


def record_rows(req: Req, layer: int) -> list:
    return [np.frombuffer(r.hidden[layer], dtype="<f4") for r in req.probe_records]


def record_lens(req: Req, layer: int) -> list:
    return [list(zip(*r.lens[layer])) for r in req.probe_records]


def test_scheduler_batch_chunked_and_prefix_hit(tiny_path: str, hf: HFRunner) -> None:
    srt = SRTRunner(tiny_path, chunked_prefill_size=8)
    sched = srt.scheduler
    asks = [
        ProbeRequest(hidden_layers=(0, 2), lens_layers=(1,), top_n=5),
        ProbeRequest(hidden_layers=(1,), lens_layers=(0, 2), top_n=3),
        None,
    ]

    def run(prompts: list[list[int]], probes: list) -> list[Req]:
        reqs = [
            Req(
                f"r{len(p)}-{i}-{probe is not None}-{len(sched.waiting_queue)}",
                p,
                SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
                probe=probe,
            )
            for i, (p, probe) in enumerate(zip(prompts, probes))
        ]
        for req in reqs:
            sched.add_request(req)
        sched.run_until_idle()
        sched.check_memory()
        return reqs

    # PROMPTS[1] (27 tokens) is prefilled in chunks; the request that does not ask gets nothing.
    reqs = run(PROMPTS, asks)
    for req, prompt, probe in zip(reqs[:2], PROMPTS, asks):
        ref = reference(hf, prompt, req.output_ids)
        assert len(req.probe_records) == MAX_NEW
        for layer in probe.hidden_layers:
            check_hidden(record_rows(req, layer), ref[layer])
        for layer in probe.lens_layers:
            check_lens(hf, record_lens(req, layer), ref[layer], probe.top_n)
    assert reqs[2].probe_records == []
    # A prefix hit: the prompt of the request that did not ask is cached now.
    again = run([PROMPTS[2]], [ProbeRequest(hidden_layers=(2,), lens_layers=(2,), top_n=20)])[0]
    assert again.cached_tokens > 0 and again.output_ids == reqs[2].output_ids
    ref = reference(hf, PROMPTS[2], again.output_ids)
    check_hidden(record_rows(again, 2), ref[2])
    check_lens(hf, record_lens(again, 2), ref[2], 20)
    # The lens of the last layer is the model's own next-token distribution.
    greedy = [lens[0][0] for lens in record_lens(again, 2)]
    assert greedy == again.output_ids


def test_retraction_keeps_one_record_per_token(tiny_path: str, hf: HFRunner) -> None:
    """A KV pool too small for all four requests retracts one; its re-prefill (in chunks) gives
    just the record of the token it stands in for."""
    srt = SRTRunner(tiny_path, max_total_tokens=96, chunked_prefill_size=8)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (12, 9, 15, 10)]
    probe = ProbeRequest(hidden_layers=(1,), lens_layers=(2,), top_n=3)
    params = dict(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    reqs = [Req(f"r{i}", p, SamplingParams(**params), probe=probe) for i, p in enumerate(prompts)]
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    assert srt.scheduler.num_retractions > 0
    for req, prompt in zip(reqs, prompts):
        assert len(req.probe_records) == len(req.output_ids)
        ref = reference(hf, prompt, req.output_ids)
        check_hidden(record_rows(req, 1), ref[1])
        check_lens(hf, record_lens(req, 2), ref[2], 3)


@pytest.mark.parametrize("arch", ["gemma2", "gpt2", "gpt_neox"])
def test_other_layer_loops(arch: str) -> None:
    """Gemma 2 (final-logit softcap: the lens goes through the model's own logits), GPT-2 and
    GPT-NeoX (LayerNorm final norms, their own layer loops)."""
    path = make_tiny_model(arch, seed=3)
    ref_model = HFRunner(path)
    srt = SRTRunner(path)
    top = ref_model.model.config.num_hidden_layers - 1
    probe = ProbeRequest(hidden_layers=(0, top), lens_layers=(1, top), top_n=4)
    req = Req("g", PROMPTS[2], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True),
              probe=probe)  # fmt: skip
    srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    ref = reference(ref_model, PROMPTS[2], req.output_ids)
    for layer in probe.hidden_layers:
        check_hidden(record_rows(req, layer), ref[layer])
    for layer in probe.lens_layers:
        check_lens(ref_model, record_lens(req, layer), ref[layer], 4)


def test_engine_native_streaming_and_base64(tiny_path: str, hf: HFRunner) -> None:
    import sglang as sgl

    greedy = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}
    engine = sgl.Engine(model_path=tiny_path, device="cpu", dtype="float32",
                        skip_tokenizer_init=True, max_total_tokens=4096, random_seed=0,
                        chunked_prefill_size=8)  # fmt: skip
    with engine:
        out = engine.generate(input_ids=PROMPTS[1], sampling_params=greedy,
                              hidden_states_layers=[0, -1],
                              logit_lens={"layers": [-1, 1]})  # fmt: skip
        meta = out["meta_info"]
        ref = reference(hf, PROMPTS[1], out["output_ids"])
        assert sorted(meta["hidden_states_layers"]) == ["0", "2"]
        check_hidden(meta["hidden_states_layers"]["0"], ref[0])
        check_hidden(meta["hidden_states_layers"]["2"], ref[2])
        lens = meta["logit_lens"]
        assert len(lens) == MAX_NEW and sorted(lens[0]) == ["1", "2"]
        for layer in (1, 2):
            check_lens(hf, lens_pairs(lens, layer), ref[layer], 5)
        # base64: little-endian float32 strings (this time the prompt is a prefix hit).
        b64 = engine.generate(input_ids=PROMPTS[1], sampling_params=greedy,
                              hidden_states_layers=[0, 2],
                              hidden_states_format="base64")  # fmt: skip
        assert b64["meta_info"]["cached_tokens"] > 0
        ref = reference(hf, PROMPTS[1], b64["output_ids"])
        for layer in ("0", "2"):
            rows = b64["meta_info"]["hidden_states_layers"][layer]
            assert all(isinstance(r, str) for r in rows)
            check_hidden([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows],
                         ref[int(layer)])  # fmt: skip
        assert "logit_lens" not in b64["meta_info"]
        # Streaming: each chunk carries the rows of its new tokens only.
        chunks = list(engine.generate(input_ids=PROMPTS[0], sampling_params=greedy,
                                      hidden_states_layers=[1], logit_lens={"layers": [0]},
                                      stream=True))  # fmt: skip
        rows = [r for c in chunks for r in c["meta_info"]["hidden_states_layers"]["1"]]
        steps = [s for c in chunks for s in c["meta_info"]["logit_lens"]]
        ref = reference(hf, PROMPTS[0], chunks[-1]["output_ids"])
        check_hidden(rows, ref[1])
        check_lens(hf, lens_pairs(steps, 0), ref[0], 5)
        plain = engine.generate(input_ids=PROMPTS[0], sampling_params=greedy)
        assert "hidden_states_layers" not in plain["meta_info"]
        assert "logit_lens" not in plain["meta_info"]


def test_deepest_lens_layer_reads_the_sampled_rows() -> None:
    """A lens layer whose final-normed rows are the sampled rows bit for bit (the last layer)
    adds no LM-head rows: its lens is read from the sampled rows' logits; others add theirs."""
    from sglang.srt.layers.layer_probe import LayerProbe, ProbeSpec, unpack
    from sglang.srt.layers.layernorm import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm, head = RMSNorm(8), torch.randn(40, 8, generator=g)
    hidden, residual = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    spec = ProbeSpec([2, 0], [2, 0], (), (1, 3), 4, [None, None])
    probe = LayerProbe(spec, torch.device("cpu"))
    probe.record(1, hidden * 2, residual, norm)
    probe.record(3, hidden, residual, norm)
    final, _ = norm(hidden, residual)  # the model's own final call
    extra = probe.lens_rows(final)
    assert extra is not None and extra.shape == (2, 8)  # layer 1 only
    assert probe.lens_at == [3, 4, 2, 0]
    logits = torch.cat([final, extra]) @ head.T
    host = unpack(spec, probe.finish(logits).packed)
    for c, rows in enumerate((extra, final[[2, 0]])):
        values, ids = torch.log_softmax(rows @ head.T, -1).topk(4)
        assert (host.lens_ids[c] == ids.numpy()).all()
        np.testing.assert_allclose(host.lens_values[c], values.numpy(), rtol=0, atol=1e-5)
    # Rows that differ from the sampled ones (here: other rows) are computed on their own.
    assert probe.lens_rows(final.flip(0)).shape == (4, 8)
    assert probe.lens_at == [3, 4, 5, 6]
