"""Legacy `sglang.Runtime`: starts the HTTP server on a free port, generates, shuts down cleanly.

Also checks that a server without `--enable-metrics` has no `/metrics` route.
"""

from __future__ import annotations

import pytest
import requests

import sglang
from sglang.test.test_utils import DEFAULT_MODEL_NAME_FOR_TEST, descendants, wait_pids_gone

GREEDY = {"max_new_tokens": 4, "temperature": 0.0}


def test_runtime_generate_and_shutdown():
    with sglang.Runtime(model_path=DEFAULT_MODEL_NAME_FOR_TEST, max_total_tokens=2048) as rt:
        assert rt.url.startswith("http://127.0.0.1:")
        assert requests.get(f"{rt.url}/health", timeout=5).status_code == 200
        pids = [rt.pid, *descendants(rt.pid)]
        assert len(pids) >= 3  # server, scheduler, detokenizer

        out = rt.generate("The capital city of France is", sampling_params=GREEDY)
        assert isinstance(out, dict)
        assert out["text"].startswith(" Paris")
        assert out["meta_info"]["completion_tokens"] == 4
        assert out["meta_info"]["finish_reason"]["type"] == "length"

        outs = rt.generate(["Hello", "The capital city of France is"], sampling_params=GREEDY)
        assert isinstance(outs, list) and len(outs) == 2
        assert outs[1]["text"] == out["text"]

        with pytest.raises(RuntimeError, match="400"):
            rt.generate("Hello", sampling_params={"temperature": -1.0})
        assert rt.get_server_info()["max_total_num_tokens"] == 2048
        assert requests.get(f"{rt.url}/metrics", timeout=5).status_code == 404
    assert wait_pids_gone(pids) == []
    rt.shutdown()  # idempotent


def test_runtime_rejects_bad_args():
    with pytest.raises(TypeError):
        sglang.Runtime(model_path=DEFAULT_MODEL_NAME_FOR_TEST, no_such_flag=1)
