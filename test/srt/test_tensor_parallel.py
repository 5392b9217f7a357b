"""Tensor parallelism on CPU with gloo, against TP 1 and HuggingFace float32.

- In a real two-rank gloo group (the scheduler driven in lockstep on both ranks), TP 2 gives the
  same greedy tokens as TP 1 and as HF, output and prompt logprobs within 1e-4 and the same
  attention tokens as TP 1, and both ranks agree exactly. Models: Llama with 2 KV heads (split),
  Llama with 1 KV head (tp > KV heads: replicated) and a vocabulary not divisible by the TP size,
  tied embeddings, Qwen2 (q/k/v biases), Qwen3 (q/k norms).
- Weight sharding from HF folders and GGUF files: every rank's parameter is exactly its slice.
- The server: `--tp 2` over HTTP answers like TP 1, with every rank checking it sampled the same
  tokens; killing one rank stops it with a clear message, a non-zero exit and no orphans. Two
  nodes (`--nnodes 2`) started as two `launch_server` processes on loopback answer like TP 1; node 1
  says what it waits for, serves no HTTP and exits cleanly when node 0 stops (0) or dies (1).
- Layouts that cannot work fail before starting, in one line.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import requests
import torch

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import initialize_model_parallel
from sglang.srt.distributed.placement import (
    ParallelConfigError,
    check_parallel_model,
    plan_node_ranks,
)
from sglang.srt.model_loader import get_model
from sglang.test.runners import HFRunner, SRTRunner, cpu_threads_hint, make_tiny_model
from sglang.test.test_utils import (
    descendants,
    find_free_port,
    kill_process_tree,
    popen_launch_server,
    terminate,
    wait_pids_gone,
)
from sglang.test.tp_runners import run_tp_group

STEPS = 12
TOL = 1e-4
CASES = {
    "llama_kv2": ("llama", {}),
    "llama_kv1_odd_vocab": ("llama", {"num_key_value_heads": 1, "vocab_size": 509}),
    "llama_tied": ("llama_tied", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
SERVER_ARGS = [
    "--skip-tokenizer-init",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--max-total-tokens",
    "2048",
    "--random-seed",
    "0",
    "--watchdog-timeout",
    "60",
]

cpu_threads_hint()


def make_prompts(n: int = 4, seed: int = 0, vocab: int = 509) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


PROMPTS = make_prompts()


def run_models(folders: dict[str, str], prompts: list[list[int]], steps: int) -> dict:
    """Greedy generation with logprobs and attention tokens for each model (on any TP layout)."""
    from sglang.srt.attention_capture import AttentionRequest

    results = {}
    for name, folder in folders.items():
        srt = SRTRunner(folder, return_attention_tokens=True, attention_capture_layers="all")
        reqs = [
            srt.make_req(
                p,
                steps,
                return_logprob=True,
                logprob_start_len=0,
                temperature=0.0,
                ignore_eos=True,
                attention=AttentionRequest(top_k=5, layers=(0, 1, 2)),
            )
            for p in prompts
        ]
        for req in reqs:
            srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
        srt.scheduler.check_memory()
        results[name] = [
            {
                "ids": list(r.output_ids),
                "out_lp": [lp for lp, _ in r.output_token_logprobs],
                "in_lp": [lp for lp, _ in r.input_token_logprobs],
                "attn": [(list(a.positions), list(a.scores)) for a in r.attention_records],
            }
            for r in reqs
        ]
    return results


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return {
        name: make_tiny_model(arch, str(tmp_path_factory.mktemp(name)), **overrides)
        for name, (arch, overrides) in CASES.items()
    }


@pytest.fixture(scope="module")
def tp1(folders) -> dict:
    return run_models(folders, PROMPTS, STEPS)


def _max_diff(a: list, b: list) -> float:
    """Largest absolute difference of two equally long lists (None entries are skipped)."""
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b) if x is not None and y is not None), default=0.0)


def test_tp2_matches_tp1_and_hf(folders, tp1):
    per_rank = run_tp_group(2, run_models, folders, PROMPTS, STEPS)
    assert per_rank[0] == per_rank[1], "TP ranks disagree"
    tp2 = per_rank[0]
    for name, folder in folders.items():
        hf = HFRunner(folder)
        for i, prompt in enumerate(PROMPTS):
            ours, ref = tp2[name][i], tp1[name][i]
            want = hf.greedy(prompt, STEPS)
            label = f"{name} prompt {i}"
            assert ours["ids"] == ref["ids"] == want.output_ids, f"{label}: greedy tokens differ"
            assert _max_diff(ours["out_lp"], want.output_logprobs) < TOL, label
            assert _max_diff(ours["out_lp"], ref["out_lp"]) < TOL, label
            assert _max_diff(ours["in_lp"], ref["in_lp"]) < TOL, label
            assert len(ours["attn"]) == STEPS
            for (pos, score), (ref_pos, ref_score) in zip(ours["attn"], ref["attn"]):
                assert pos == ref_pos, f"{label}: attention tokens differ"
                assert _max_diff(score, ref_score) < 1e-5, f"{label}: attention scores differ"


# ------------------------------------------------------------------------------ weight shards


def _expected_shard(name: str, full: torch.Tensor, rank: int, world: int, mc) -> torch.Tensor:
    """The slice of TP 1's (stacked) parameter that rank `rank` of `world` must hold."""
    heads, kv, d = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    if ".qkv_proj." in name:
        q, k, v = full.split([heads * d, kv * d, kv * d])
        nq = heads // world * d
        nk = max(1, kv // world) * d
        kv_index = rank // (world // kv) if world >= kv else rank
        parts = [q[rank * nq : (rank + 1) * nq]]
        parts += [t[kv_index * nk : (kv_index + 1) * nk] for t in (k, v)]
        return torch.cat(parts)
    if ".gate_up_proj." in name:
        n = full.shape[0] // 2 // world
        gate, up = full.chunk(2)
        return torch.cat([gate[rank * n : (rank + 1) * n], up[rank * n : (rank + 1) * n]])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        n = full.shape[1] // world
        return full[:, rank * n : (rank + 1) * n]
    if "embed_tokens" in name or "lm_head" in name:
        per = -(-full.shape[0] // world)
        rows = full[rank * per : (rank + 1) * per]
        return torch.cat([rows, rows.new_zeros(per - rows.shape[0], full.shape[1])])
    return full


def _load(path: str, rank: int, world: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    mc = ModelConfig(path, dtype="float32", device="cpu")
    initialize_model_parallel(rank, world)  # sharding needs only rank and size, no group
    try:
        model = get_model(model_config=mc, load_config=LoadConfig(), device="cpu")
    finally:
        initialize_model_parallel(0, 1)
    return mc, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", ["llama_kv1_odd_vocab", "llama_tied", "qwen2", "gguf"])
def test_weight_shards_are_slices(folders, tmp_path, name, monkeypatch):
    # The parameters as loaded: packing float32 weights for the CPU kernel would free them.
    monkeypatch.setenv("SGLANG_CPU_F32_GEMM", "0")
    if name == "gguf":
        from test_model_loader import _tiny_llama_config, _write_tiny_gguf
        from transformers import LlamaForCausalLM

        torch.manual_seed(3)
        config = _tiny_llama_config(head_dim=16, num_key_value_heads=1)
        path = str(tmp_path / "tiny.gguf")
        _write_tiny_gguf(
            tmp_path / "tiny.gguf", "llama", config, LlamaForCausalLM(config).state_dict()
        )
    else:
        path = folders[name]
    mc, full = _load(path, 0, 1)
    for world in (2, 4):
        for rank in range(world):
            _, shard = _load(path, rank, world)
            assert set(shard) == set(full)
            for key, tensor in shard.items():
                want = _expected_shard(key, full[key], rank, world, mc)
                assert torch.equal(tensor, want), f"{name} TP{rank}/{world}: {key}"


# ------------------------------------------------------------------------------ layouts


def _layout(**kw):
    args = dict(tp_size=1, dp_size=1, nnodes=1, node_rank=0, device="cpu", base_gpu_id=0)
    args.update(gpu_id_step=1, dist_init_addr=None)
    args.update(kw)
    return SimpleNamespace(**args)


def test_rank_plan():
    plan = plan_node_ranks(
        _layout(
            tp_size=4,
            nnodes=2,
            node_rank=1,
            device="cuda",
            base_gpu_id=2,
            gpu_id_step=2,
            dist_init_addr="10.0.0.1:5000",
        ),
        nccl_port=1234,
    )
    assert [(p.tp_rank, p.gpu_id, p.backend) for p in plan] == [(2, 2, "nccl"), (3, 4, "nccl")]
    assert {p.init_method for p in plan} == {"tcp://10.0.0.1:5000"}
    assert [p.tag for p in plan] == ["TP2", "TP3"]
    plan = plan_node_ranks(_layout(tp_size=2, dp_size=2, device="cuda"), nccl_port=1234)
    assert [(p.dp_rank, p.tp_rank, p.gpu_id) for p in plan] == [
        (0, 0, 0),
        (0, 1, 1),
        (1, 0, 2),
        (1, 1, 3),
    ]
    assert plan[0].init_method == "tcp://127.0.0.1:1234" != plan[2].init_method
    assert plan[2].tag == "DP1 TP0" and plan[2].is_leader and not plan[3].is_leader
    (single,) = plan_node_ranks(_layout(), nccl_port=1234)
    assert (single.tp_rank, single.gpu_id, single.init_method) == (0, None, None)


def test_model_layout_checks(folders):
    mc = ModelConfig(folders["llama_kv2"], device="cpu")  # 4 heads, 2 KV heads, MLP 160
    for tp in (1, 2, 4):
        check_parallel_model(mc, tp)
    with pytest.raises(ParallelConfigError, match="does not divide the model's 4 attention heads"):
        check_parallel_model(mc, 3)
    with pytest.raises(ParallelConfigError, match="pipeline parallelism"):
        check_parallel_model(mc, 1, pp_size=2)
    from sglang.srt.server_args import ServerArgs

    with pytest.raises(ValueError, match="divisible by nnodes"):
        ServerArgs(model_path="m", device="cpu", tp_size=3, nnodes=2, dist_init_addr="h:1")
    with pytest.raises(ValueError, match="dp_size > 1 runs on one node"):
        ServerArgs(
            model_path="m", device="cpu", tp_size=2, dp_size=2, nnodes=2, dist_init_addr="h:1"
        )


def test_bad_tp_fails_in_one_line(folders):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", folders["llama_kv2"]]
    cmd += ["--tp", "3", *SERVER_ARGS, "--port", str(find_free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "--tp 3 does not divide the model's 4 attention heads" in out
    assert "Traceback" not in out


# ------------------------------------------------------------------------------ the server


def _generate(url: str) -> list[dict]:
    body = {
        "input_ids": PROMPTS,
        "sampling_params": {"max_new_tokens": STEPS, "temperature": 0.0, "ignore_eos": True},
        "return_logprob": True,
    }
    resp = requests.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _assert_like_tp1(outs: list[dict], ref: list[dict], label: str) -> None:
    for i, (out, want) in enumerate(zip(outs, ref)):
        assert out["output_ids"] == want["ids"], f"{label}: prompt {i} tokens differ"
        lps = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert _max_diff(lps, want["out_lp"]) < TOL, f"{label}: prompt {i} logprobs differ"


def _pid_of(lines: list[str], tag: str) -> int:
    for line in lines:
        if f" {tag}] joined the TP group" in line:
            return int(line.rsplit("pid ", 1)[1])
    raise AssertionError(f"no {tag} start line in the log")


@pytest.fixture(scope="module")
def tp2_server(folders):
    url = f"http://127.0.0.1:{find_free_port()}"
    os.environ["SGLANG_TP_CHECK_TOKENS"] = "1"
    try:
        proc = popen_launch_server(
            folders["llama_kv2"], url, other_args=[*SERVER_ARGS, "--tp", "2"]
        )
    finally:
        del os.environ["SGLANG_TP_CHECK_TOKENS"]
    yield url, proc
    kill_process_tree(proc.pid)


def test_server_tp2_matches_tp1(tp2_server, tp1):
    url, proc = tp2_server
    _assert_like_tp1(_generate(url), tp1["llama_kv2"], "TP 2 server")
    info = requests.get(f"{url}/get_server_info", timeout=10).json()
    assert info["tp_size"] == 2
    # Sampling with a seed: every rank draws the same tokens (the ranks check it every step).
    body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 16, "temperature": 1.0}}
    assert requests.post(f"{url}/generate", json=body, timeout=60).status_code == 200
    assert requests.get(f"{url}/health_generate", timeout=60).status_code == 200
    assert any(" TP0] Prefill batch." in line for line in proc.log_lines)
    assert not any(" TP1] Prefill batch." in line for line in proc.log_lines)


def test_killing_a_rank_stops_the_server(tp2_server):
    url, proc = tp2_server
    family = descendants(proc.pid)
    os.kill(_pid_of(proc.log_lines, "TP1"), signal.SIGKILL)
    assert proc.wait(60) == 1
    log = "\n".join(proc.log_lines)
    assert "The scheduler TP1 process was killed by signal 9; the server cannot continue" in log
    assert wait_pids_gone(family) == [], "processes left behind"


@pytest.mark.parametrize("node0_exit", ["sigterm", "sigkill"])
def test_two_nodes_on_loopback(folders, tp1, node0_exit):
    folder = folders["llama_kv1_odd_vocab"]
    common = [*SERVER_ARGS, "--tp", "2", "--nnodes", "2"]
    common += ["--dist-init-addr", f"127.0.0.1:{find_free_port()}"]
    url0 = f"http://127.0.0.1:{find_free_port()}"
    url1 = f"http://127.0.0.1:{find_free_port()}"
    node1 = popen_launch_server(
        folder, url1, other_args=[*common, "--node-rank", "1"], wait_ready=False
    )
    node0 = None
    try:
        node0 = popen_launch_server(folder, url0, other_args=[*common, "--node-rank", "0"])
        _assert_like_tp1(_generate(url0), tp1["llama_kv1_odd_vocab"], "two nodes")
        log1 = "\n".join(node1.log_lines)
        assert "waiting for node 0 at tcp://127.0.0.1:" in log1
        assert "(no HTTP server on this node)" in log1
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url1}/health", timeout=5)
        node1_family = descendants(node1.pid)
        if node0_exit == "sigterm":  # node 0 ends the TP group: node 1 follows
            assert terminate(node0, signal.SIGTERM, timeout=60) == 0
            code = node1.wait(60)
            log1 = "\n".join(node1.log_lines)
            # NOTE: normally exit 0 after TP0's stop broadcast; on a starved machine node 0's
            # shutdown can kill TP0 first, and node 1 then stops with exit 1 and says why.
            if code == 0:
                assert "node 0 ended the TP group; node 1 exits" in log1
            else:
                assert code == 1 and "node 1 stops: lost the TP group" in log1
        else:  # node 0 vanishes: node 1 notices at once and stops, exit 1
            kill_process_tree(node0.pid)
            assert node1.wait(60) == 1
            assert "node 1 stops: lost the TP group" in "\n".join(node1.log_lines)
        assert wait_pids_gone(node1_family) == [], "node 1 left processes behind"
    finally:
        for proc in (node0, node1):
            if proc is not None:
                kill_process_tree(proc.pid)
