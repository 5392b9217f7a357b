"""sglang.Engine end to end on SmolLM2: the three-process pipeline without HTTP.

Covers sync/async/streaming generation (same dicts as /generate), batches and n, stop-string
trimming, validation errors, incremental detokenization of multi-byte text, the KV invariant after
many mixed requests with aborts, and that shutdown leaves no child process.
"""

from __future__ import annotations

import asyncio
import random

import psutil
import pytest

import sglang as sgl
from sglang.attention_tokens import merge_stream_chunks
from sglang.srt.managers.detokenizer_manager import DecodeState
from sglang.srt.managers.io_struct import DetokenizeOptions

PROMPT = "The capital city of France is"
GREEDY = {"max_new_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def engine():
    eng = sgl.Engine(
        model_path="smollm2-135m-instruct",
        max_total_tokens=4096,
        return_attention_tokens=True,
        attention_tokens_top_k=5,
    )
    yield eng
    eng.shutdown()


def test_generate_single_greedy(engine):
    out = engine.generate(PROMPT, GREEDY)
    assert out["text"].startswith(" Paris"), out
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == len(out["output_ids"]) == 8
    assert meta["prompt_tokens"] == 6 and meta["e2e_latency"] > 0
    again = engine.generate(PROMPT, GREEDY)
    assert again["output_ids"] == out["output_ids"]
    assert again["meta_info"]["cached_tokens"] > 0  # radix cache hit on the repeat


def test_batch_and_n(engine):
    outs = engine.generate([PROMPT, "1, 2, 3,"], GREEDY)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["text"].startswith(" Paris")
    ids = engine.generate(input_ids=[[1, 2, 3], [4, 5, 6]], sampling_params=GREEDY)
    assert [len(o["output_ids"]) for o in ids] == [8, 8]
    sampled = engine.generate(PROMPT, {"max_new_tokens": 4, "n": 3, "temperature": 1.0})
    assert len(sampled) == 3 and len({o["meta_info"]["id"] for o in sampled}) == 3


def test_streaming_is_cumulative(engine):
    full = engine.generate(PROMPT, GREEDY)
    chunks = list(engine.generate(PROMPT, GREEDY, stream=True))
    assert len(chunks) >= 2
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"])
        assert a["meta_info"]["finish_reason"] is None
    assert chunks[-1]["text"] == full["text"]
    assert chunks[-1]["output_ids"] == full["output_ids"]


def test_stop_string_trimmed(engine):
    params = {"max_new_tokens": 16, "temperature": 0.0, "stop": "United"}
    out = engine.generate(PROMPT, params)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "United"}
    assert "United" not in out["text"] and out["text"].startswith(" Paris")
    texts = [c["text"] for c in engine.generate(PROMPT, params, stream=True)]
    assert all("Unit" not in t for t in texts) and texts[-1] == out["text"]
    kept = engine.generate(PROMPT, dict(params, no_stop_trim=True))
    assert kept["text"].endswith("United")


def test_logprobs(engine):
    out = engine.generate(
        PROMPT,
        GREEDY,
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(e[0] <= 0 and isinstance(e[2], str) for e in meta["output_token_logprobs"])
    assert all(len(t) == 2 for t in meta["output_top_logprobs"])


def test_validation_errors(engine):
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(PROMPT, {"temperature": -1})
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[1] * 5000, sampling_params=GREEDY)
    with pytest.raises(ValueError, match="Exactly one"):
        engine.generate(sampling_params=GREEDY)
    assert engine.generate(PROMPT, GREEDY)["text"].startswith(" Paris")


def test_async_generate(engine):
    async def run():
        out = await engine.async_generate(PROMPT, GREEDY)
        chunks = [c async for c in await engine.async_generate(PROMPT, GREEDY, stream=True)]
        both = await asyncio.gather(*[engine.async_generate(PROMPT, GREEDY) for _ in range(3)])
        return out, chunks, both

    out, chunks, both = asyncio.run(run())
    assert out["text"].startswith(" Paris")
    assert chunks[-1]["text"] == out["text"]
    assert all(b["output_ids"] == out["output_ids"] for b in both)


def test_attention_tokens_as_engine_kwargs(engine):
    out = engine.generate(PROMPT, GREEDY, return_attention_tokens=True, attention_tokens_top_k=3,
                          attention_exclude_sink=1)  # fmt: skip
    report = out["meta_info"]["attention_tokens"]
    assert report["top_k"] == 3 and report["layers"] == [29] and report["exclude_sink"] == 1
    content = report["content"]
    assert [e["token_id"] for e in content] == out["output_ids"]
    assert all(len(e["top_attention"]) == 3 and "excluded_mass" in e for e in content)
    assert all(x["position"] >= 1 for e in content for x in e["top_attention"])
    plain = engine.generate(PROMPT, GREEDY)
    assert "attention_tokens" not in plain["meta_info"] and plain["text"] == out["text"]
    chunks = list(engine.generate(PROMPT, GREEDY, stream=True, return_attention_tokens=True,
                                  attention_tokens_top_k=3, attention_exclude_sink=1))  # fmt: skip
    # Each chunk carries only its new tokens' entries; together they are the whole report.
    streamed = [e for c in chunks for e in c["meta_info"]["attention_tokens"]["content"]]
    assert streamed == content and merge_stream_chunks(chunks) == report
    with pytest.raises(ValueError, match="between 1 and 5"):
        engine.generate(PROMPT, GREEDY, return_attention_tokens=True, attention_tokens_top_k=6)


def test_incremental_detokenization_multibyte(engine):
    tok = engine.tokenizer_manager.tokenizer
    text = "héllo wörld — 你好，世界 🎉🚀 ok"
    ids = tok.encode(text)
    state = DecodeState(DetokenizeOptions())
    deltas = [state.add(tok, [t], None) for t in ids[:-1]]
    deltas.append(state.add(tok, [ids[-1]], {"type": "length", "length": len(ids)}))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_many_requests_with_aborts_keep_kv_intact(engine):
    rng = random.Random(0)
    words = "alpha beta gamma delta the of and France capital city river".split()

    async def one(i: int) -> None:
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        params = {"max_new_tokens": rng.randint(1, 12), "temperature": rng.choice([0.0, 0.8])}
        kind = rng.random()
        if kind < 0.3:  # abandon a stream after its first chunk
            stream = await engine.async_generate(prompt, params, stream=True)
            async for _ in stream:
                break
            await stream.aclose()
        elif kind < 0.45:  # abort through the control path while it may be running
            task = asyncio.ensure_future(
                engine.async_generate(prompt, dict(params, max_new_tokens=64))
            )
            await asyncio.sleep(rng.random() * 0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            out = await engine.async_generate(prompt, params)
            assert out["meta_info"]["finish_reason"] is not None

    async def run():
        await asyncio.gather(*[one(i) for i in range(200)])

    asyncio.run(run())
    engine.abort_request(abort_all=True)
    for _ in range(100):
        (load,) = engine.get_load(check_memory=True)  # one entry per DP rank
        if load.num_reqs == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert load.num_reqs == 0 and load.num_tokens == 0, load
    assert load.memory_error is None, load.memory_error
    assert engine.flush_cache()
    assert engine.generate(PROMPT, GREEDY)["text"].startswith(" Paris")


def test_shutdown_leaves_no_children(engine):
    # The multiprocessing resource tracker is a child too, but lives as long as this interpreter.
    children = [
        p
        for p in psutil.Process().children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ]
    assert len(children) == 2, children
    engine.shutdown()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
    with pytest.raises(RuntimeError):
        engine.generate(PROMPT, GREEDY)
