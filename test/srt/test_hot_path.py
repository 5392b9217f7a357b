"""The serving hot path's mechanisms, counted rather than timed (docs/step_profile.md).

One server on a tiny random-weight Llama with the default model's tokenizer, started with
`--enable-step-profile`: an idle server burns (almost) no CPU; the scheduler sends one output
message per step however many requests advanced; `/step_profile` reports every stage.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import psutil
import pytest
import requests

from sglang.test.served_tiny import make_tiny_served_model
from sglang.test.test_utils import find_free_port, popen_launch_server, terminate

STREAMS, TOKENS = 8, 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_served_model(str(tmp_path_factory.mktemp("tiny-served")))
    url = f"http://127.0.0.1:{find_free_port()}"
    proc = popen_launch_server(
        model, url, other_args=["--enable-step-profile", "--max-total-tokens", "8192"]
    )
    yield url, proc
    terminate(proc)


def _tree_cpu_seconds(pid: int) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def test_idle_server_uses_no_cpu(server):
    url, proc = server
    requests.get(url + "/health_generate", timeout=120)
    time.sleep(2)  # let the last request's tail settle
    before = _tree_cpu_seconds(proc.pid)
    time.sleep(5)
    used = _tree_cpu_seconds(proc.pid) - before
    # 2 % of one core over 5 s; a polling loop anywhere would use far more.
    assert used < 0.1, f"idle server used {used:.3f} CPU seconds in 5 s"


def _stream(url: str, seed: int) -> tuple[int, int]:
    """(chunks received, completion tokens at the end) of one streamed request."""
    body = {
        "input_ids": [100 + seed, 200, 300, 400],
        "stream": True,
        "sampling_params": {"max_new_tokens": TOKENS, "temperature": 0.0, "ignore_eos": True},
    }
    chunks, last = 0, {}
    with requests.post(url + "/generate", json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                chunks += 1
                last = json.loads(line[len(b"data: ") :])
    return chunks, last["meta_info"]["completion_tokens"]


def test_one_output_message_per_step(server):
    url, _ = server
    requests.get(url + "/step_profile", params={"reset": "true"}, timeout=30).raise_for_status()
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(lambda s: _stream(url, s), range(STREAMS)))
    assert [tokens for _, tokens in results] == [TOKENS] * STREAMS
    chunks = sum(c for c, _ in results)
    phases = requests.get(url + "/step_profile", timeout=30).json()["phases"]
    steps = sum(
        phases.get(f"scheduler {kind} forward", {}).get("count", 0)
        for kind in ("decode", "prefill")
    )
    messages = phases["scheduler output message"]["count"]
    # Every step that advanced a stream sends exactly one message for all of its requests.
    assert messages <= steps, (messages, steps)
    assert messages < STREAMS * TOKENS
    # Each message passes each stage once; every chunk sent is one HTTP write.
    for stage in ("zmq scheduler->detokenizer", "detokenizer", "tokenizer manager"):
        assert phases[stage]["count"] == messages, stage
    assert phases["http write"]["count"] >= chunks


def test_step_profile_reset_empties_it(server):
    url, _ = server
    requests.get(url + "/step_profile", params={"reset": "true"}, timeout=30).raise_for_status()
    assert requests.get(url + "/step_profile", timeout=30).json() == {"phases": {}}


def test_cpu_binding_env_parsing():
    """SGLANG_CPU_OMP_THREADS_BIND: one core group per local rank; malformed is one clear error."""
    import os

    from sglang.srt.distributed.placement import ParallelConfigError
    from sglang.srt.managers.tp_worker import cpu_binding

    allowed = sorted(os.sched_getaffinity(0))
    first = allowed[0]
    assert cpu_binding("", 0, 1) is None
    assert cpu_binding(f"{first}", 0, 1) == [first]
    assert cpu_binding(f"{first}-{first}|{first}", 1, 2) == [first]
    for spec, ranks, match in (
        ("0-1", 2, "one group per rank"),
        ("a-b", 1, "not a list of cores"),
        ("100000", 1, "may not use"),
    ):
        with pytest.raises(ParallelConfigError, match=match):
            cpu_binding(spec, 0, ranks)


def test_default_cpu_threads():
    """One core is left to the HTTP process and the detokenizer; ranks on a node share the rest,
    at least one thread each."""
    from sglang.srt.managers.tp_worker import default_cpu_threads

    assert [default_cpu_threads(c, 1) for c in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert default_cpu_threads(16, 2) == 7 and default_cpu_threads(2, 4) == 1


def test_cpu_weights_column_major_same_values(tmp_path, monkeypatch):
    """After loading on CPU, dense matmul weights live in transposed storage with the same shape
    and values, and every linear layer gives the checkpoint layout's output within float32
    rounding (layers/cpu_weight_layout.py). Model-level exactness: the HF parity tests."""
    import torch
    import torch.nn.functional as F

    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.cpu_weight_layout import LAYOUT_ENV
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.model_loader import get_model
    from sglang.test.runners import make_tiny_model

    folder = make_tiny_model("llama", str(tmp_path / "m"))
    # The weights left to PyTorch's matmul (non-Intel CPUs pack float32 ones for our kernel).
    monkeypatch.setenv("SGLANG_CPU_F32_GEMM", "0")
    linears = {}
    for layout in ("row", "column"):
        monkeypatch.setenv(LAYOUT_ENV, layout)
        cfg = ModelConfig(folder, dtype="float32", device="cpu")
        model = get_model(model_config=cfg, load_config=LoadConfig(), device="cpu")
        linears[layout] = [m.weight for m in model.modules() if isinstance(m, LinearBase)]
        assert linears[layout]
        assert all(w.is_contiguous() == (layout == "row") for w in linears[layout])
    gen = torch.Generator().manual_seed(0)
    for row, col in zip(linears["row"], linears["column"]):
        assert torch.equal(row, col)
        x = torch.randn(5, row.shape[1], generator=gen)
        torch.testing.assert_close(F.linear(x, col), F.linear(x, row), rtol=1e-5, atol=1e-6)
