"""Hostile and malformed requests against one real server, and the clients users point at it.

One server for the module (SmolLM2 with --return-attention-tokens and an 8192-token pool):
- a table of malformed requests on every route, each answered 400 (or 413) with the OpenAI error
  body naming what to fix, never 5xx, with the server healthy and the log free of tracebacks after;
- unknown fields are tolerated the way upstream's clients rely on (router and bench_serving extras);
- a big prompt is tokenized off the event loop: /health keeps answering meanwhile;
- /openapi.json publishes the request bodies, and schemathesis fuzzing them finds no 5xx;
- upstream's sglang-router in front of the server, and the exact bodies bench_serving sends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from sglang.test.test_utils import (
    DEFAULT_MODEL_NAME_FOR_TEST,
    find_free_port,
    kill_process_tree,
    popen_launch_server,
    terminate,
)

PROMPT = "The capital city of France is"
GREEDY = {"max_new_tokens": 4, "temperature": 0.0}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def server():
    url = f"http://127.0.0.1:{find_free_port()}"
    args = ["--return-attention-tokens", "--max-total-tokens", "8192"]
    proc = popen_launch_server(DEFAULT_MODEL_NAME_FOR_TEST, url, other_args=args)
    yield url, proc
    try:
        terminate(proc, signal.SIGTERM, timeout=30)
    finally:
        kill_process_tree(proc.pid)


def gen(**kw: Any) -> dict[str, Any]:
    return {"text": PROMPT, "sampling_params": dict(GREEDY), **kw}


def gen_sp(**sp: Any) -> dict[str, Any]:
    return {"text": PROMPT, "sampling_params": {**GREEDY, **sp}}


def cmpl(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": PROMPT, "max_tokens": 4, **kw}


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": CHAT, "max_tokens": 4, **kw}


ATTN = {"return_attention_tokens": True}
BIG = 50 * 1024 * 1024

# (route, body: a dict sent as JSON or raw bytes, status, words the error message must contain)
CASES: list[tuple[str, Any, int, str]] = [
    # ---- /generate: types and shapes
    ("/generate", {"text": 5}, 400, "text"),
    ("/generate", {"sampling_params": GREEDY}, 400, "text or input_ids"),
    ("/generate", {"text": ""}, 400, "empty"),
    ("/generate", {"input_ids": [1, -5]}, 400, "input_ids"),
    ("/generate", gen(stream="yes"), 400, "stream"),
    ("/generate", gen(rid=["a", "b"]), 400, "rid"),
    ("/generate", gen_sp(temperature="hot"), 400, "temperature"),
    # ---- /generate: out-of-range sampling values
    ("/generate", gen_sp(temperature=-1), 400, "temperature"),
    ("/generate", gen_sp(top_p=0), 400, "top_p"),
    ("/generate", gen_sp(top_p=1.5), 400, "top_p"),
    ("/generate", gen_sp(top_k=0), 400, "top_k"),
    ("/generate", gen_sp(min_p=2), 400, "min_p"),
    ("/generate", gen_sp(repetition_penalty=0), 400, "repetition_penalty"),
    ("/generate", gen_sp(frequency_penalty=3), 400, "frequency_penalty"),
    ("/generate", gen_sp(max_new_tokens=-1), 400, "max_new_tokens"),
    ("/generate", gen_sp(max_new_tokens=10**9), 400, "context length"),
    ("/generate", gen_sp(n=0), 400, "n must be"),
    ("/generate", gen_sp(n=100000), 400, "[1, 128]"),
    ("/generate", gen_sp(stop=[f"s{i}" for i in range(100)]), 400, "at most 64"),
    ("/generate", gen_sp(stop=""), 400, "stop"),
    ("/generate", gen_sp(logit_bias={"5": 1e6}), 400, "logit_bias"),
    ("/generate", gen_sp(stop_token_ids=[10**9]), 400, "stop_token_ids"),
    ("/generate", gen(return_logprob=True, top_logprobs_num=100000), 400, "top_logprobs_num"),
    ("/generate", gen(logprob_start_len=10**6, return_logprob=True), 400, "logprob_start_len"),
    ("/generate", {"input_ids": [1] * 9000, "sampling_params": GREEDY}, 400, "context length"),
    ("/generate", {"text": "hello " * 10000, "sampling_params": GREEDY}, 400, "context length"),
    # ---- /generate: constraints that do not compile (the compiler's message), or two at once
    ("/generate", gen_sp(json_schema="{bad"), 400, "json_schema is not valid JSON"),
    ("/generate", gen_sp(regex="(a"), 400, "parenthesis is not closed"),
    ("/generate", gen_sp(ebnf="root ::= foo"), 400, 'Rule "foo" is not defined'),
    ("/generate", gen_sp(regex="a", ebnf='root ::= "a"'), 400, "only one of"),
    # ---- /generate: not supported (yet)
    ("/generate", gen(lora_path="adapter"), 400, "lora_path"),
    ("/generate", gen(image_data="http://x/cat.png"), 400, "image_data"),
    ("/generate", gen(return_routed_experts=True), 400, "return_routed_experts"),
    # ---- /generate: attention-token fields
    ("/generate", gen(**ATTN, attention_tokens_top_k=-1), 400, "attention_tokens_top_k"),
    ("/generate", gen(**ATTN, attention_tokens_top_k=10**6), 400, "--attention-tokens-top-k"),
    ("/generate", gen(**ATTN, attention_layers=[99]), 400, "attention_layers"),
    ("/generate", gen(**ATTN, attention_layers="abc"), 400, "attention_layers"),
    ("/generate", gen(**ATTN, attention_layer_aggregation="max"), 400, "'mean' or 'none'"),
    ("/generate", gen(**ATTN, attention_exclude_sink=-3), 400, "attention_exclude_sink"),
    # ---- /generate: misspelt and misplaced fields
    ("/generate", gen(return_attention_token=True), 400, "did you mean 'return_attention_tokens'"),
    ("/generate", gen(attention_token_top_k=3), 400, "did you mean 'attention_tokens_top_k'"),
    ("/generate", gen(attention_tokens_topk=3), 400, "did you mean 'attention_tokens_top_k'"),
    ("/generate", gen(sampling_param={}), 400, "did you mean 'sampling_params'"),
    ("/generate", gen(temperature=0.5), 400, "inside sampling_params"),
    ("/generate", gen_sp(max_tokens=3), 400, "did you mean 'max_new_tokens'"),
    # ---- bodies that are not JSON objects we can read
    ("/generate", b'{"text": "\\ud800 lone surrogate"}', 400, "surrogate"),
    ("/generate", b'{"text": "bad \xff\xfe utf-8"}', 400, "UTF-8"),
    ("/generate", b'{"text": "a", "sampling_params": {"temperature": NaN}}', 400, "NaN"),
    ("/generate", b'{"text": "a", "sampling_params": {"top_p": 1e999}}', 400, "out of range"),
    ("/generate", b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
    ("/generate", b"[1, 2]", 400, "JSON object"),
    ("/generate", b"{not json", 400, "Malformed JSON"),
    ("/generate", b'{"text": "' + b"a" * BIG + b'"}', 413, "larger than"),
    # ---- /v1/completions
    ("/v1/completions", cmpl(n=0), 400, "n"),
    ("/v1/completions", cmpl(n=1000), 400, "n"),
    ("/v1/completions", cmpl(best_of=3), 400, "best_of"),
    ("/v1/completions", cmpl(logprobs=50), 400, "logprobs"),
    ("/v1/completions", cmpl(temperature=-2), 400, "temperature"),
    ("/v1/completions", cmpl(max_tokens=10**7), 400, "context length"),
    ("/v1/completions", cmpl(stop=["x"] * 100), 400, "stop"),
    ("/v1/completions", cmpl(prompt=[]), 400, "prompt"),
    ("/v1/completions", cmpl(prompt="hello " * 10000), 400, "context length"),
    ("/v1/completions", cmpl(regex="[0-9"), 400, "Regex parsing error"),
    ("/v1/completions", cmpl(lora_path="adapter"), 400, "lora_path"),
    ("/v1/completions", cmpl(max_token=3), 400, "did you mean 'max_tokens'"),
    ("/v1/completions", cmpl(**ATTN, attention_layers=[-99]), 400, "attention_layers"),
    ("/v1/completions", b'{"prompt": "\\udfff"}', 400, "surrogate"),
    ("/v1/completions", b'{"prompt": "' + b"a" * BIG + b'"}', 413, "larger than"),
    # ---- /v1/chat/completions
    ("/v1/chat/completions", chat(messages=[]), 400, "messages"),
    ("/v1/chat/completions", chat(messages=[{"role": "user"}]), 400, "needs content"),
    ("/v1/chat/completions", chat(messages=[{"role": "system"}, *CHAT]), 400, "needs content"),
    ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
    ("/v1/chat/completions", chat(messages=[{"content": "x"}]), 400, "role"),
    ("/v1/chat/completions", chat(messages="hi"), 400, "messages"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("/v1/chat/completions", chat(n=1000), 400, "n"),
    ("/v1/chat/completions", chat(temperature="hot"), 400, "temperature"),
    (
        "/v1/chat/completions",
        chat(response_format={"type": "json_object"}, regex="a"),
        400,
        "one constraint",
    ),
    (
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        400,
        "json_schema.schema",
    ),
    ("/v1/chat/completions", chat(tools=[TOOL]), 400, "tool_choice 'auto' are not supported yet"),
    ("/v1/chat/completions", chat(tools=[TOOL], tool_choice="auto"), 400, "tools"),
    ("/v1/chat/completions", chat(tool_choice="required"), 400, "tool_choice"),
    ("/v1/chat/completions", chat(json_schema="{bad"), 400, "not valid JSON"),
    ("/v1/chat/completions", chat(ebnf="x"), 400, "EBNF parser error"),
    ("/v1/chat/completions", chat(stream=True, ebnf="x"), 400, "EBNF parser error"),
    (
        "/v1/chat/completions",
        chat(stream=True, stream_options={"continuous_usage_stats": True}),
        400,
        "continuous_usage_stats",
    ),
    ("/v1/chat/completions", chat(**ATTN, attention_tokens_top_k=0), 400, "between 1 and"),
    ("/v1/chat/completions", chat(return_attention_token=True), 400, "did you mean"),
    ("/v1/chat/completions", chat(reasoning_effort="high"), 400, "reasoning_effort"),
    ("/v1/chat/completions", b'{"messages": [{"content": "\\ud83d"}]}', 400, "surrogate"),
    # ---- other POST routes
    ("/v1/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/v1/detokenize", {"tokens": [-1]}, 400, "token ids"),
    ("/v1/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/abort_request", {"rid": 5}, 400, "rid"),
]


def _id(case: tuple[str, Any, int, str]) -> str:
    return f"{case[0]}:{case[3]}"


def post(url: str, route: str, body: Any, **kw: Any) -> requests.Response:
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        return requests.post(url + route, data=body, headers=headers, timeout=120, **kw)
    return requests.post(url + route, json=body, timeout=120, **kw)


def assert_error_body(resp: requests.Response, status: int, needle: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert body["object"] == "error" and body["code"] == status, body
    assert body["param"] is None and isinstance(body["type"], str), body
    assert needle in body["message"], body["message"]


@pytest.mark.parametrize("route,body,status,needle", CASES, ids=[_id(c) for c in CASES])
def test_hostile_request_is_refused(server, route, body, status, needle):
    url, _ = server
    assert_error_body(post(url, route, body), status, needle)


def test_chunked_body_over_the_cap_is_413(server):
    """Without Content-Length the cap applies as the body streams in."""
    url, _ = server

    def chunks():
        yield b'{"text": "'
        for _ in range(40):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    resp = requests.post(f"{url}/v1/completions", data=chunks(), timeout=120)
    assert_error_body(resp, 413, "larger than")


def test_server_healthy_after_the_table(server):
    """Runs after the table (file order): no 5xx left the server broken or logged a traceback."""
    url, proc = server
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    out = post(url, "/generate", gen()).json()
    assert out["text"].startswith(" Paris"), out
    load = requests.get(f"{url}/get_load", params={"check_memory": "true"}, timeout=30).json()
    assert load[0]["num_reqs"] == 0 and load[0]["memory_error"] is None, load
    log = "\n".join(proc.log_lines)
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


def test_table_is_big_enough():
    assert len(CASES) >= 30
    routes = {route for route, *_ in CASES}
    assert routes >= {"/generate", "/v1/completions", "/v1/chat/completions"}


def test_engine_kwargs_follow_the_same_table():
    """Engine.generate keyword arguments: refused as ValueError, unknown names as TypeError."""
    from sglang.srt.entrypoints.request_fields import screen_engine_kwargs

    kept = screen_engine_kwargs({"return_logprob": True, "log_metrics": True, "lora_path": None})
    assert kept == {"return_logprob": True, "lora_path": None}
    with pytest.raises(ValueError, match="image_data is not supported"):
        screen_engine_kwargs({"image_data": "cat.png"})
    with pytest.raises(ValueError, match="inside sampling_params"):
        screen_engine_kwargs({"temperature": 0.0})
    with pytest.raises(TypeError, match="did you mean 'return_attention_tokens'"):
        screen_engine_kwargs({"return_attention_token": True})
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        screen_engine_kwargs({"bogus": 1})


# ---------------------------------------------------------------------------- tolerated fields


def test_unknown_and_default_valued_fields_are_accepted(server):
    """What routers and clients add: upstream fields at their defaults, metadata, vendor extras."""
    url, _ = server
    extras = {"model": None, "log_metrics": True, "background": False, "no_logs": False,
              "return_bytes": False, "return_entropy": False, "return_routed_experts": False,
              "lora_path": None, "custom_labels": {"team": "a"}, "vendor_field": {"x": 1}}  # fmt: skip
    out = post(url, "/generate", gen(**extras)).json()
    assert out["text"].startswith(" Paris"), out
    for route, body in (
        ("/v1/completions", cmpl(best_of=1, user="u", store=False, vendor_field=1)),
        ("/v1/chat/completions", chat(separate_reasoning=True, metadata={"a": "b"}, vendor=1)),
        ("/v1/chat/completions", chat(tools=[TOOL], tool_choice="none", service_tier="auto")),
        ("/v1/chat/completions", chat(messages=[{"role": "User", "content": "Hi"}])),
    ):
        resp = post(url, route, body)
        assert resp.status_code == 200, (route, resp.text)


def test_models_route_and_openapi(server):
    url, _ = server
    served = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    assert requests.get(f"{url}/v1/models/{served}", timeout=10).json()["id"] == served
    resp = requests.get(f"{url}/v1/models/no-such-model", timeout=10)
    assert_error_body(resp, 404, "no-such-model")
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/tokenize",
                 "/v1/detokenize", "/abort_request"):  # fmt: skip
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        name = schema["schema"]["$ref"].rsplit("/", 1)[-1]
        assert spec["components"]["schemas"][name]["properties"], path
    generate = spec["components"]["schemas"]["GenerateReqInput"]["properties"]
    assert "return_attention_tokens" in generate and "sampling_params" in generate


def test_big_prompt_does_not_block_the_event_loop(server):
    """A ~3 MB prompt takes seconds to tokenize (then fails the context check); /health answers
    meanwhile. Loose bound: a blocked loop would hold /health for the whole tokenization."""
    url, _ = server
    result: dict[str, Any] = {}

    def big() -> None:
        start = time.monotonic()
        body = {"text": "hello world. " * 250_000, "sampling_params": GREEDY}
        result["resp"] = post(url, "/generate", body)
        result["seconds"] = time.monotonic() - start

    worker = threading.Thread(target=big)
    worker.start()
    time.sleep(0.5)  # let the upload and parse finish; tokenization takes the rest
    latencies = []
    while worker.is_alive():
        start = time.monotonic()
        assert requests.get(f"{url}/health", timeout=60).status_code == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.1)
    worker.join()
    assert_error_body(result["resp"], 400, "context length")
    assert result["seconds"] > 1.0, result  # it really did take a while
    assert latencies and max(latencies) < result["seconds"] / 2, (latencies, result["seconds"])


# ---------------------------------------------------------------------------- bench_serving


def _events(resp: requests.Response) -> list[Any]:
    lines = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


@pytest.mark.parametrize("stream", [True, False])
def test_bench_serving_bodies(server, stream):
    """The exact payloads of upstream's bench_serving backends (sglang, sglang-oai,
    sglang-oai-chat; default flags: ignore_eos on, streaming unless --disable-stream)."""
    url, _ = server
    sglang = {"text": PROMPT, "sampling_params": {"temperature": 0.0, "max_new_tokens": 8,
              "ignore_eos": True}, "stream": stream, "lora_path": None, "return_logprob": False,
              "return_routed_experts": False, "logprob_start_len": -1}  # fmt: skip
    oai = {"model": "m", "prompt": PROMPT, "best_of": 1, "max_tokens": 8, "stream": stream,
           "temperature": 0.0, "ignore_eos": True}  # fmt: skip
    oai_chat = {"model": "m", "messages": [{"role": "user", "content": PROMPT}],
                "max_completion_tokens": 8, "stream": stream, "temperature": 0.0,
                "ignore_eos": True}  # fmt: skip
    for route, body in (("/generate", sglang), ("/v1/completions", oai),
                        ("/v1/chat/completions", oai_chat)):  # fmt: skip
        with post(url, route, body, stream=stream) as resp:
            assert resp.status_code == 200, (route, resp.text)
            if not stream:
                out = resp.json()
                text = out["text"] if route == "/generate" else str(out["choices"][0])
                assert text, out
                continue
            events = _events(resp)
        if route == "/generate":
            assert events[-1]["meta_info"]["completion_tokens"] == 8
            assert events[-1]["text"].startswith(" Paris")
        elif route == "/v1/completions":
            assert "".join(e["choices"][0]["text"] for e in events).startswith(" Paris")
        else:
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events)


# ---------------------------------------------------------------------------- sglang-router


@pytest.fixture(scope="module")
def router(server):
    # `make install` puts upstream's wheel beside this repository's sglang_router (sgl-model-gateway/),
    # which the plain module name imports.
    upstream = Path(__file__).resolve().parents[2] / ".venv" / "upstream-router"
    if not (upstream / "sglang_router").is_dir():
        pytest.skip("upstream sglang-router 0.3.2 is not in .venv/upstream-router (make install)")
    url, _ = server
    port = find_free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", url,
           "--host", "127.0.0.1", "--port", str(port), "--prometheus-port",
           str(find_free_port()), "--log-level", "warn"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(upstream)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"sglang-router exited with {proc.returncode}"
        try:
            if requests.get(f"{base}/v1/models", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    else:
        kill_process_tree(proc.pid)
        pytest.fail("sglang-router did not come up within 120 s")
    yield base
    kill_process_tree(proc.pid)


def test_through_sglang_router(server, router):
    """Upstream's Rust router (sglang-router 0.3.2) re-serializes /generate and chat bodies from
    its own structs, adding `model`, `log_metrics`, `background`, ... (accepted here) and dropping
    our attention fields; /v1/completions passes unknown fields through, so attention tokens
    arrive there."""
    out = requests.post(f"{router}/generate", json=gen(**ATTN), timeout=120).json()
    assert out["text"].startswith(" Paris"), out
    assert "attention_tokens" not in out["meta_info"]  # the router dropped the field
    with requests.post(f"{router}/generate", json=gen(stream=True), stream=True, timeout=120) as r:
        assert r.status_code == 200 and _events(r)[-1]["text"].startswith(" Paris")

    body = cmpl(temperature=0, **ATTN, attention_tokens_top_k=2)
    choice = requests.post(f"{router}/v1/completions", json=body, timeout=120).json()["choices"][0]
    assert choice["text"].startswith(" Paris")
    report = choice["attention_tokens"]
    assert report["top_k"] == 2 and len(report["content"]) == 4

    resp = requests.post(f"{router}/v1/chat/completions", json=chat(temperature=0, **ATTN),
                         timeout=120)  # fmt: skip
    assert resp.status_code == 200, resp.text
    direct = post(server[0], "/v1/chat/completions", chat(temperature=0)).json()
    assert resp.json()["choices"][0]["message"] == direct["choices"][0]["message"]
    assert "attention_tokens" not in resp.json()["choices"][0]  # dropped by the router
    with requests.post(f"{router}/v1/chat/completions", json=chat(stream=True), stream=True,
                       timeout=120) as r:  # fmt: skip
        assert r.status_code == 200 and _events(r)

    # Errors come back as ours: status and OpenAI body.
    bad = requests.post(f"{router}/generate", json=gen_sp(temperature=-1), timeout=60)
    assert bad.status_code == 400 and "temperature" in bad.json()["message"]


# ---------------------------------------------------------------------------- schemathesis

# What a generated body may ask of the engine: the fuzzing is about status codes, not long
# generations, so counts and lengths are capped before sending.
_CAPS = {"n": 2, "max_new_tokens": 4, "max_tokens": 4, "max_completion_tokens": 4}


def _tame(body: Any) -> Any:
    if isinstance(body, list):
        return [_tame(item) for item in body]
    if not isinstance(body, dict):
        return body
    out = {}
    for key, value in body.items():
        cap = _CAPS.get(key)
        if cap is not None and isinstance(value, int) and not isinstance(value, bool):
            value = min(value, cap)
        out[key] = _tame(value)
    if out.get("abort_all") is True:
        out["abort_all"] = False  # other tests' requests are not the fuzzer's to abort
    return out


def test_schemathesis_finds_no_5xx(server):
    """Every operation in /openapi.json, 10 schema-valid and 10 schema-violating examples each."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    url, _ = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[Any] = []
    statuses: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:

            @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                if isinstance(case.body, (dict, list)):
                    case.body = _tame(case.body)
                resp = case.call(base_url=url, timeout=120)
                statuses.setdefault(operation.label, set()).add(resp.status_code)
                if resp.status_code >= 500:
                    failures.append((operation.label, case.body, resp.status_code, resp.text))

            try:
                run()
            except Unsatisfiable:
                # Nothing to violate: an operation without parameters or body (GET /health).
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
    assert not failures, failures[:5]
    assert statuses.get("POST /generate") and statuses.get("POST /v1/chat/completions"), statuses
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
