"""Constrained decoding inside the scheduler: chunked prefill, prefix hits, retraction, mixed batches.

In-process scheduler on a tiny random-weight Llama with the default model's tokenizer (49152
tokens), so the grammar is real and the model is cheap. Random weights produce junk text; the
grammar alone makes it valid, which is what is under test. A tight KV pool forces retraction
while a short prefill chunk splits every prompt, and the prompts share a prefix for cache hits.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest

from sglang.srt.hf_transformers_utils import get_tokenizer
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.model_loader import resolve_model_path
from sglang.test.runners import SRTRunner, cpu_threads_hint, make_tiny_model

ENUM_SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "digits": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 8,
            "maxItems": 8,
        },
    },
    "required": ["sentiment", "digits"],
}
# Long enough (digits are one token each) that constrained rows grow the KV pool too.
REGEX = r"[0-9]{30}-[a-z]{1,4}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cpu_threads_hint()
    folder = make_tiny_model("llama", str(tmp_path_factory.mktemp("tiny")), vocab_size=49152)
    tokenizer = get_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    return folder, tokenizer


def runner(tiny, **kwargs) -> SRTRunner:
    folder, tokenizer = tiny
    srt = SRTRunner(folder, constrained_json_disable_any_whitespace=True, **kwargs)
    srt.scheduler = Scheduler(srt.server_args, srt.model_runner, tokenizer)
    return srt


def test_constraints_hold_through_chunking_prefix_hits_and_retraction(tiny):
    _, tokenizer = tiny
    srt = runner(tiny, max_total_tokens=200, schedule_conservativeness=0.05, chunked_prefill_size=8)
    rng = random.Random(0)
    shared = [rng.randrange(100, 40000) for _ in range(12)]
    reqs = []
    for i in range(8):
        prompt = shared + [rng.randrange(100, 40000) for _ in range(8)]
        if i % 4 == 0:
            sp = {"json_schema": json.dumps(ENUM_SCHEMA)}
        elif i % 4 == 1:
            sp = {"regex": REGEX}
        else:
            sp = {"ignore_eos": True}  # unconstrained rows in the same batches
        reqs.append(srt.make_req(prompt, 64, temperature=1.0, sampling_seed=i, **sp))
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    srt.scheduler.check_memory()
    assert srt.scheduler.num_retractions > 0, "the pool never ran dry: retraction is not tested"
    assert any(r.cached_tokens > 0 for r in reqs), "no prefix hit"
    for i, req in enumerate(reqs):
        text = tokenizer.decode(req.output_ids, skip_special_tokens=True)
        assert req.finished_reason.to_json()["type"] in ("stop", "length")
        if i % 4 == 0:
            assert req.finished_reason.to_json()["type"] == "stop", (text, req.finished_reason)
            jsonschema.validate(json.loads(text), ENUM_SCHEMA)
        elif i % 4 == 1:
            assert re.fullmatch(REGEX, text), text
        else:
            assert len(req.output_ids) == 64
    # Every constrained request ended on the grammar's stop token, not the length cap.
    assert all(reqs[i].finished_reason.to_json()["type"] == "stop" for i in (0, 1, 4, 5))


SAMPLING_MODES = [
    {"temperature": 0.0},
    {"temperature": 0.8, "top_k": 5},
    {"temperature": 1.0, "top_p": 0.5},
    {"temperature": 1.0, "min_p": 0.2},
    {"temperature": 1.2, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
    {"temperature": 1.0, "presence_penalty": 1.0, "logit_bias": {"15": 8.0, "33": -8.0}},
]


def test_every_sampling_mode_follows_the_grammar(tiny):
    """Top-k/p, min-p, penalties and logit_bias act on the logits around the grammar's mask;
    whatever they do, only the grammar's tokens can be sampled."""
    _, tokenizer = tiny
    srt = runner(tiny)
    reqs = []
    for i, mode in enumerate(SAMPLING_MODES):
        for constraint in ({"regex": REGEX}, {"json_schema": json.dumps(ENUM_SCHEMA)}):
            reqs.append(srt.make_req([5, 6, 7, 8], 64, sampling_seed=i, **mode, **constraint))
    for req in reqs:
        srt.scheduler.add_request(req)
    srt.scheduler.run_until_idle()
    for req in reqs:
        text = tokenizer.decode(req.output_ids, skip_special_tokens=True)
        assert req.finished_reason.to_json()["type"] == "stop", (text, req.sampling_params)
        if req.sampling_params.regex:
            assert re.fullmatch(REGEX, text), (text, req.sampling_params)
        else:
            jsonschema.validate(json.loads(text), ENUM_SCHEMA)


def test_compile_is_cached_and_a_bad_grammar_aborts_with_400(tiny):
    srt = runner(tiny)
    sched = srt.scheduler
    good = [srt.make_req([5, 6, 7], 30, temperature=0.0, regex=REGEX) for _ in range(3)]
    bad = srt.make_req([5, 6, 7], 4, regex="(unclosed")
    for req in good + [bad]:
        sched.add_request(req)
    assert sched.grammar_manager.has_waiting() or sched.waiting_queue
    sched.run_until_idle()
    assert sched.grammar_manager.backend.compile_count == 2  # one per distinct text
    assert isinstance(bad.finished_reason, FINISH_ABORT)
    assert bad.finished_reason.status_code == 400
    assert "parenthesis" in bad.finished_reason.message
    assert len({tuple(r.output_ids) for r in good}) == 1  # same greedy path, fresh matchers


def test_grammar_backend_none_refuses(tiny):
    srt = runner(tiny, grammar_backend="none")
    req = srt.make_req([5, 6, 7], 4, regex="a+")
    srt.scheduler.add_request(req)
    assert req.finished_reason.status_code == 400
    assert "--grammar-backend none" in req.finished_reason.message


def engine_main(folder: str, tokenizer_path: str) -> None:
    """Engine.generate with constraints (run in a fresh interpreter: the Engine spawns)."""
    import sglang as sgl

    engine = sgl.Engine(
        model_path=folder,
        tokenizer_path=tokenizer_path,
        max_total_tokens=2048,
        log_level="error",
        constrained_json_disable_any_whitespace=True,  # random weights would pad with spaces
    )
    try:
        outs = engine.generate(
            prompt=["Sentiment:", "Code:"],
            sampling_params=[
                {"json_schema": json.dumps(ENUM_SCHEMA), "max_new_tokens": 64},
                {"regex": REGEX, "max_new_tokens": 64},
            ],
        )
        jsonschema.validate(json.loads(outs[0]["text"]), ENUM_SCHEMA)
        assert re.fullmatch(REGEX, outs[1]["text"]), outs[1]["text"]
        try:
            engine.generate(prompt="x", sampling_params={"regex": "(a", "max_new_tokens": 2})
        except ValueError as e:
            assert "parenthesis" in str(e)
        else:
            raise AssertionError("a bad regex must raise ValueError")
    finally:
        engine.shutdown()


def test_engine_generate_with_constraints(tiny):
    import subprocess
    import sys

    folder, _ = tiny
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from test_structured_output_scheduler import engine_main; engine_main(*sys.argv[2:])"
    )
    here = str(Path(__file__).resolve().parent)
    tok = resolve_model_path("smollm2-135m-instruct")
    proc = subprocess.run(
        [sys.executable, "-c", code, here, folder, tok], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
