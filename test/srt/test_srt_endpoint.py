"""The real HTTP server on SmolLM2, launched as a subprocess and driven with plain HTTP.

Covers the startup contract (health 503 -> 200, ready line, Prefill log line), native /generate
(single, batch, streaming ending with [DONE], logprobs), 400 errors with the server healthy
afterwards, info/load/flush routes, API-key 401, a client disconnect freeing its request, and
SIGTERM stopping every process.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
import requests

from sglang.test.test_utils import (
    DEFAULT_MODEL_NAME_FOR_TEST,
    descendants,
    find_free_port,
    kill_process_tree,
    popen_launch_server,
    terminate,
    wait_pids_gone,
)

PROMPT = "The capital city of France is"
GREEDY = {"max_new_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def server():
    url = f"http://127.0.0.1:{find_free_port()}"
    proc = popen_launch_server(
        DEFAULT_MODEL_NAME_FOR_TEST, url, other_args=["--max-total-tokens", "4096"]
    )
    yield url, proc
    # SIGTERM first so the server removes its ipc directory; SIGKILL only as a fallback.
    try:
        terminate(proc, signal.SIGTERM, timeout=30)
    finally:
        kill_process_tree(proc.pid)


def test_startup_contract(server):
    url, proc = server
    assert 503 in proc.health_codes and proc.health_codes[-1] == 200, proc.health_codes
    deadline = time.time() + 5
    while time.time() < deadline and not any("ready to roll" in line for line in proc.log_lines):
        time.sleep(0.1)
    assert "The server is fired up and ready to roll!" in "\n".join(proc.log_lines)
    assert any("Prefill batch. #new-seq: 1, #new-token:" in line for line in proc.log_lines)
    assert requests.get(f"{url}/health_generate", timeout=30).status_code == 200


def test_generate_single_and_batch(server):
    url, _ = server
    r = requests.post(f"{url}/generate", json={"text": PROMPT, "sampling_params": GREEDY})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"].startswith(" Paris")
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) == 8
    r = requests.post(
        f"{url}/generate", json={"text": [PROMPT, "Hello"], "sampling_params": GREEDY}
    )
    outs = r.json()
    assert isinstance(outs, list) and len(outs) == 2 and outs[0]["text"] == out["text"]


def test_generate_streaming(server):
    url, _ = server
    body = {"text": PROMPT, "sampling_params": GREEDY, "stream": True}
    with requests.post(f"{url}/generate", json=body, stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[-1]["text"].startswith(" Paris")
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:]))


def test_logprobs(server):
    url, _ = server
    body = {
        "text": PROMPT,
        "sampling_params": GREEDY,
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 3,
        "return_text_in_logprobs": True,
    }
    meta = requests.post(f"{url}/generate", json=body).json()["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    lp, tid, text = meta["output_token_logprobs"][0]
    assert lp <= 0 and isinstance(tid, int) and text == " Paris"
    assert all(len(top) == 3 for top in meta["output_top_logprobs"])


@pytest.mark.parametrize(
    "body",
    [
        {"text": PROMPT, "sampling_params": {"temperature": -0.5}},
        {"text": PROMPT, "sampling_params": {"max_new_tokens": -1}},
        {"input_ids": [1] * 5000, "sampling_params": GREEDY},
        {"input_ids": [1] * 100, "sampling_params": {"max_new_tokens": 9000}},
        {"text": PROMPT, "sampling_params": {"bogus": 1}},
        {"sampling_params": GREEDY},
        "{not json",
    ],
)
def test_bad_requests_are_400(server, body):
    url, _ = server
    kwargs = {"data": body} if isinstance(body, str) else {"json": body}
    r = requests.post(f"{url}/generate", **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["object"] == "error" and err["type"] == "BadRequestError"
    assert err["code"] == 400 and err["param"] is None and err["message"]
    assert requests.get(f"{url}/health").status_code == 200


def test_hidden_states_need_the_server_flag(server):
    """This server runs without --enable-return-hidden-states: asking is a 400 naming the field."""
    url, _ = server
    body = {"text": PROMPT, "sampling_params": GREEDY, "return_hidden_states": True}
    r = requests.post(f"{url}/generate", json=body, timeout=30)
    assert r.status_code == 400 and "return_hidden_states" in r.json()["message"]
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    r = requests.post(
        f"{url}/v1/chat/completions", json={**chat, "return_hidden_states": True}, timeout=30
    )
    assert r.status_code == 400 and "--enable-return-hidden-states" in r.json()["message"]


def test_info_routes(server):
    url, _ = server
    info = requests.get(f"{url}/get_model_info").json()
    assert info["model_path"] == DEFAULT_MODEL_NAME_FOR_TEST and info["is_generation"] is True
    assert requests.get(f"{url}/model_info").json() == info
    sinfo = requests.get(f"{url}/get_server_info").json()
    assert sinfo["max_total_num_tokens"] == 4096 and sinfo["tp_size"] == 1
    assert sinfo["max_req_input_len"] > 0 and "version" in sinfo and sinfo["dp_size"] == 1
    models = requests.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["owned_by"] == "sglang"
    tok = requests.post(f"{url}/v1/tokenize", json={"prompt": PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) == 6
    detok = requests.post(f"{url}/v1/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["text"] == PROMPT


def test_load_and_flush(server):
    url, _ = server
    load = requests.get(f"{url}/get_load").json()
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    assert requests.get(f"{url}/v1/loads").json() == load
    assert requests.post(f"{url}/flush_cache").status_code == 200
    assert requests.get(f"{url}/flush_cache").status_code == 200


def test_client_disconnect_frees_request(server):
    url, _ = server
    body = {
        "text": PROMPT,
        "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0.0},
        "stream": True,
    }
    r = requests.post(f"{url}/generate", json=body, stream=True)
    lines = r.iter_lines()
    assert next(lines).startswith(b"data: ")
    assert requests.get(f"{url}/get_load").json()[0]["num_reqs"] == 1
    r.close()
    deadline = time.time() + 15
    while time.time() < deadline:
        load = requests.get(f"{url}/get_load").json()[0]
        if load["num_reqs"] == 0:
            break
        time.sleep(0.2)
    assert load["num_reqs"] == 0 and load["num_tokens"] == 0, load


def test_abort_request_route(server):
    url, _ = server
    body = {
        "text": PROMPT,
        "rid": "to-abort",
        "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
        "stream": True,
    }
    with requests.post(f"{url}/generate", json=body, stream=True) as r:
        lines = r.iter_lines()
        next(lines)
        assert requests.post(f"{url}/abort_request", json={"rid": "to-abort"}).status_code == 200
        events = [line for line in lines if line]
    assert events[-1] == b"data: [DONE]"
    last = json.loads(events[-2][len(b"data: ") :])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"


def test_api_key_and_sigterm():
    url = f"http://127.0.0.1:{find_free_port()}"
    proc = popen_launch_server(
        DEFAULT_MODEL_NAME_FOR_TEST,
        url,
        other_args=["--max-total-tokens", "2048", "--skip-server-warmup"],
        api_key="sk-test",
    )
    try:
        assert requests.get(f"{url}/health").status_code == 200
        assert requests.get(f"{url}/get_model_info").status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        r = requests.post(f"{url}/generate", json={"text": "hi"}, headers=bad)
        assert r.status_code == 401
        ok = {"Authorization": "Bearer sk-test"}
        r = requests.post(
            f"{url}/generate", json={"text": PROMPT, "sampling_params": GREEDY}, headers=ok
        )
        assert r.status_code == 200 and r.json()["text"].startswith(" Paris")
        children = descendants(proc.pid)
        assert len(children) >= 2
        terminate(proc, signal.SIGTERM, timeout=30)
        assert wait_pids_gone(children, timeout=15) == []
    finally:
        kill_process_tree(proc.pid)


def test_child_death_stops_server():
    url = f"http://127.0.0.1:{find_free_port()}"
    proc = popen_launch_server(
        DEFAULT_MODEL_NAME_FOR_TEST,
        url,
        other_args=["--max-total-tokens", "2048", "--skip-server-warmup"],
    )
    try:
        children = descendants(proc.pid)
        scheduler = [
            pid for pid in children if "spawn_main" in " ".join(psutil.Process(pid).cmdline())
        ][0]
        os.kill(scheduler, signal.SIGKILL)
        assert proc.wait(timeout=20) != 0
        assert wait_pids_gone(children, timeout=15) == []
        assert any("process was killed by signal 9" in line for line in proc.log_lines)
    finally:
        kill_process_tree(proc.pid)
