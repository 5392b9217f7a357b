"""Prompt attention rows on the triton backend equal torch_native's (test_attention_prompt.py checks
torch_native against HF).

The triton backend hands the capture its own query and log-sum-exp of every extend token; the
prompt rows are then scored by the same torch arithmetic (prompt_capture.py). Checked in-process
on tiny Gemma 2 (soft-capped scores, alternating sliding windows) with chunked prefill: the mean
over layers with an excluded sink, and per-layer lists for "all". Runs on CUDA when present, else
under Triton's interpreter (set up by test_triton_backend, imported first); skips without Triton.
"""

from __future__ import annotations

from test_triton_backend import assert_ranked_close, engine  # noqa: I001 (sets up the interpreter)

from sglang.srt.attention_capture import AttentionRequest
from sglang.srt.attention_capture.prompt import apply_prompt_positions
from sglang.test.runners import SRTRunner, make_tiny_model

TOL = 1e-5


def test_prompt_rows_match_torch_native() -> None:
    path = make_tiny_model("gemma2", seed=5, max_position_embeddings=256)
    cap = dict(return_attention_tokens=True, attention_capture_layers="all",
               attention_tokens_top_k=8, chunked_prefill_size=16)  # fmt: skip
    prompt = [(i * 37) % 500 + 3 for i in range(40)]
    options = [
        AttentionRequest(top_k=5, layers=(0, 1, 2, 3), exclude_sink=1),
        AttentionRequest(top_k=3, layers=(1, 3), aggregation="none"),
    ]
    options = [
        apply_prompt_positions(options[0], [0, 9, 16, 30, 39], len(prompt), 512),
        apply_prompt_positions(options[1], "all", len(prompt), 512),
    ]
    runners = (engine(path, **cap), SRTRunner(path, **cap))
    assert runners[0].model_runner.attention_capture.use_kernel
    results = []
    for srt in runners:
        reqs = [srt.make_req(prompt, 2, attention=o, temperature=0.0) for o in options]
        for req in reqs:
            srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
        results.append(reqs)
    for tri, ref in zip(*results):
        assert [p for p, _ in tri.prompt_attention_records] == list(
            ref.attention.prompt_positions
        ) == [p for p, _ in ref.prompt_attention_records]  # fmt: skip
        for (p, a), (_, b) in zip(tri.prompt_attention_records, ref.prompt_attention_records):
            if b.layers is None:
                assert abs(a.excluded_mass - b.excluded_mass) < TOL
                assert_ranked_close(a.positions, a.scores, b.positions, b.scores, TOL, f"q {p}")
                continue
            for layer in b.layers:
                (pa, va, _), (pb, vb, _) = a.layers[layer], b.layers[layer]
                assert_ranked_close(pa, va, pb, vb, TOL, f"q {p} layer {layer}")
