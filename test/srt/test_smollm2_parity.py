"""Parity on the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against HuggingFace float32.

Both sides dequantize the same GGUF file: transformers through its GGUF integration, our engine
through its own loader (un-permuted q/k, tied embeddings). Checked: prefill logits, 32 greedy
tokens and their logprobs at batch 1, 4 and 16, a radix-cache hit, chunked prefill, and the
chat-template answer to the capital-of-France question (HF's greedy answer, up to its EOS).
The default start (packed GGUF kernel, quantized activations) is held to its documented bounds
for attention tokens and the logit lens.
"""

from __future__ import annotations


import pytest

from sglang.srt.hf_transformers_utils import get_tokenizer
from sglang.srt.model_loader import resolve_model_path
from sglang.test.runners import (
    HFRunner,
    SRTRunner,
    assert_greedy_matches,
    chat_prompt_ids,
    cpu_threads_hint,
)

STEPS = 32
TOL = 1e-4
TEXTS = [
    "The capital city of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Explain why the sky is blue in one sentence, please, for a child who is five years old.",
    "Hello",
    "The quick brown fox",
    "In 1492, Columbus",
    "Translate to French: good morning",
    "List three colors:",
    "Once upon a time, in a land far away, there lived",
    "Q: What is 12 times 12?\nA:",
    "Paris is known for",
    "The best way to learn programming is",
    "import numpy as np\n",
    "SmolLM2 is a small language model that",
]

cpu_threads_hint()


@pytest.fixture(scope="module")
def setup():
    path = resolve_model_path("smollm2-135m-instruct")
    tok = get_tokenizer(path)
    prompts = [tok.encode(t) for t in TEXTS]
    hf = HFRunner.for_model(path)
    refs = [hf.greedy(p, STEPS) for p in prompts]
    # The exact path: the packed GGUF kernel's agreement is test_gguf_packed.py's business.
    srt = SRTRunner("smollm2-135m-instruct", max_total_tokens=8192, gguf_dequantize=True)
    return tok, prompts, hf, refs, srt


def test_prefill_logits(setup):
    _, prompts, hf, _, srt = setup
    logits = srt.prefill_logits(prompts[:4])
    for i, p in enumerate(prompts[:4]):
        assert (logits[i] - hf.prefill_logits(p)).abs().max().item() < TOL


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_greedy(setup, bs):
    _, prompts, _, refs, srt = setup
    assert_greedy_matches(
        srt.generate(prompts[:bs], STEPS, return_logprob=True), refs[:bs], f"bs={bs}"
    )


def test_radix_hit_and_chunked(setup):
    _, prompts, _, refs, srt = setup
    outs = srt.generate(prompts[4:8], STEPS, return_logprob=True)
    # A full hit still recomputes the last prompt token to get its logits.
    assert [o.cached_tokens for o in outs] == [len(p) - 1 for p in prompts[4:8]]
    assert_greedy_matches(outs, refs[4:8], "radix hit")
    chunked = SRTRunner(
        "smollm2-135m-instruct", max_total_tokens=8192, chunked_prefill_size=5, gguf_dequantize=True
    )
    assert_greedy_matches(
        chunked.generate(prompts[4:8], STEPS, return_logprob=True), refs[4:8], "chunked"
    )


def test_capital_of_france(setup):
    """The engine stops where HF's greedy answer reaches EOS, with the same tokens before it (for
    SmolLM2: "The capital of France is Paris.", then <|im_end|>, id 2)."""
    tok, _, hf, _, srt = setup
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    ref = hf.greedy(ids, 20).output_ids
    stop = next(i for i, t in enumerate(ref) if t == tok.eos_token_id)
    (out,) = srt.generate([ids], 20, ignore_eos=False)
    assert out.output_ids == ref[: stop + 1], tok.decode(out.output_ids)
    assert out.finish_reason == {"type": "stop", "matched": ref[stop]}


def test_layer_probes(setup):
    """hidden_states_layers and logit_lens on the default model (docs/request_fields.md), with a
    request that does not probe in the same batch: HF's output_hidden_states (layer L = index
    L + 1; the last layer before the final norm) within 1e-5 relative, the lens within 1e-4."""
    import numpy as np

    from sglang.srt.managers.layer_probes import ProbeRequest
    from sglang.test.layer_probe_reference import check_hidden, check_lens, reference

    _, prompts, hf, _, srt = setup
    probe = ProbeRequest(hidden_layers=(0, 14, 29), lens_layers=(7, 29), top_n=5)
    reqs = [srt.make_req(p, 4, temperature=0.0, ignore_eos=True) for p in prompts[8:10]]
    reqs[0].probe = probe
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    req = reqs[0]
    assert reqs[1].probe_records == [] and len(req.probe_records) == 4
    ref = reference(hf, prompts[8], req.output_ids)
    for layer in probe.hidden_layers:
        rows = [np.frombuffer(r.hidden[layer], dtype="<f4") for r in req.probe_records]
        check_hidden(rows, ref[layer])
    for layer in probe.lens_layers:
        check_lens(hf, [list(zip(*r.lens[layer])) for r in req.probe_records], ref[layer], 5)


# The default start (no --gguf-dequantize) runs the packed GGUF kernel with ~15-bit activations
# (docs/quantization.md): its numbers are the quantized forward's own. Measured 2026-12-02
# against HF float32 on the dequantized weights: attention probabilities within 2.8e-5, logit
# lens logprobs within 3.5e-3 (the LM head on quantized rows); docs/request_fields.md and
# docs/attention_tokens.md state these bounds.
PACKED_ATTENTION_TOL = 1e-4
PACKED_LENS_TOL = 5e-3


def test_packed_default_precision(setup):
    """The default start's attention tokens and logit lens against HF within the documented
    bounds (the exact path above is within 1e-4 / 1e-7)."""
    from sglang.srt.attention_capture import AttentionRequest
    from sglang.srt.managers.layer_probes import ProbeRequest
    from sglang.test.layer_probe_reference import lens_reference, reference

    _, prompts, hf, _, _ = setup
    srt = SRTRunner("smollm2-135m-instruct", max_total_tokens=4096, return_attention_tokens=True,
                    attention_capture_layers="all", attention_tokens_top_k=8)  # fmt: skip
    layers = (0, 15, 29)
    for p in (prompts[0], prompts[12]):
        ref, rows = hf.greedy_with_attention(p, 4)
        req = srt.make_req(p, 4, temperature=0.0, ignore_eos=True)
        req.attention = AttentionRequest(top_k=8, layers=layers)
        req.probe = ProbeRequest(lens_layers=(7, 29), top_n=5)
        srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
        assert req.output_ids == ref.output_ids
        for t, rec in enumerate(req.attention_records):
            hf_row = rows[t][list(layers)].mean(0)
            for pos, score in zip(rec.positions, rec.scores):
                assert abs(float(score) - hf_row[int(pos)].item()) < PACKED_ATTENTION_TOL
        streams = reference(hf, p, req.output_ids)
        for layer in (7, 29):
            lens = lens_reference(hf, streams[layer])
            for t, rec in enumerate(req.probe_records):
                ids, values = rec.lens[layer]
                for i, v in zip(ids, values):
                    assert abs(v - lens[t, i].item()) < PACKED_LENS_TOL
