"""Deployment examples as users run them: the Slurm sbatch files, their launcher, its Makefile and
the madengine-style wrapper (examples/slurm, examples/madengine, docs/deploy/slurm.md).

The sbatch dry runs need no Slurm: every printed launch command is parsed with the server's own
argument parser and built into ServerArgs, so the flags are the ones `launch_server` accepts and
the layout passes its checks. The Makefile's start/health/stop cycle and the wrapper's offline
mode run for real on SmolLM2 with tiny workloads.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import psutil
import pytest

from sglang.srt.server_args import ServerArgs, build_parser
from sglang.test.test_utils import DEFAULT_MODEL_NAME_FOR_TEST, find_free_port

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "examples" / "slurm"
ONE_NODE = SLURM / "llama3-70b-tp8-1node.sbatch"
TWO_NODES = SLURM / "llama3-70b-tp16-2nodes.sbatch"
WRAPPER = REPO / "examples" / "madengine" / "run_sglang.py"
DEFAULT_70B = "meta-llama/Llama-3.1-70B-Instruct"
LAUNCHER_VARS = (
    "MODEL_PATH TP_SIZE NNODES HOST PORT DIST_INIT_HOST DIST_INIT_PORT SERVER_ARGS SRUN_ARGS "
    "PYTHON DRY_RUN SGLANG_SLURM_DIR PID_FILE LOG_FILE RUN_DIR"
).split()
NUM = r"([0-9]+(?:\.[0-9]+)?)"


def clean_env(**overrides: str) -> dict[str, str]:
    """The caller's environment without Slurm's variables or the launcher's settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS
    }
    env["OMP_NUM_THREADS"] = "2"
    env.update(overrides)
    return env


def run_bash(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args], env=clean_env(**env), capture_output=True, text=True, timeout=timeout
    )


def launch_commands(stdout: str) -> list[list[str]]:
    """The printed launch_server commands (every line that is not a comment)."""
    cmds = [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]
    for cmd in cmds:
        assert cmd[1:3] == ["-m", "sglang.launch_server"], cmd
    return cmds


def server_args_of(cmd: list[str]) -> ServerArgs:
    """Parse with launch_server's own parser and build (and so validate) ServerArgs."""
    namespace = build_parser().parse_args(cmd[3:])
    return ServerArgs.from_cli_args(namespace)


def dry_run(script: Path, *args: str, **env: str) -> tuple[str, list[ServerArgs]]:
    proc = run_bash(str(script), *args, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, [server_args_of(cmd) for cmd in launch_commands(proc.stdout)]


@pytest.mark.parametrize(
    "script", sorted(SLURM.glob("*.sh")) + sorted(SLURM.glob("*.sbatch")), ids=lambda p: p.name
)
def test_scripts_pass_bash_n(script: Path):
    proc = run_bash("-n", str(script))
    assert proc.returncode == 0, proc.stderr


def test_one_node_tp8_dry_run():
    stdout, (args,) = dry_run(ONE_NODE, DRY_RUN="1")
    assert args.model_path == DEFAULT_70B
    assert args.tp_size == 8
    assert (args.nnodes, args.node_rank, args.dist_init_addr) == (1, 0, None)
    assert (args.host, args.port) == ("0.0.0.0", 30000)
    assert "srun" not in stdout  # one node runs in the batch shell itself
    assert "curl -fsS http://node01:30000/health" in stdout


@pytest.mark.parametrize(
    "nodelist, head", [(None, "node01"), ("gpu[07-08]", "gpu07"), ("a12,b3", "a12")]
)
def test_two_nodes_tp16_dry_run(nodelist: Optional[str], head: str):
    env = {"DRY_RUN": "1"} if nodelist is None else {"DRY_RUN": "1", "SLURM_JOB_NODELIST": nodelist}
    stdout, per_node = dry_run(TWO_NODES, **env)
    assert [a.node_rank for a in per_node] == [0, 1]
    for args in per_node:
        assert args.model_path == DEFAULT_70B
        assert (args.tp_size, args.nnodes) == (16, 2)
        assert args.dist_init_addr == f"{head}:50000"
        assert (args.host, args.port) == ("0.0.0.0", 30000)
    srun = next(line for line in stdout.splitlines() if line.startswith("# srun "))
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    assert srun.endswith("launch_sglang.sh node")
    assert f"HTTP on {head}:30000" in stdout


def test_dry_run_overrides_and_flag_form():
    stdout, per_node = dry_run(
        TWO_NODES,
        "--dry-run",
        MODEL_PATH="/shared/models/Llama-3.1-70B-Instruct",
        PORT="8000",
        DIST_INIT_PORT="6000",
        SLURM_JOB_NODELIST="gpu-[3-4]",
        SERVER_ARGS="--mem-fraction-static 0.85 --enable-metrics",
        PYTHON="/opt/venv/bin/python",
    )
    assert stdout.count("/opt/venv/bin/python -m sglang.launch_server") == 2
    for rank, args in enumerate(per_node):
        assert args.model_path == "/shared/models/Llama-3.1-70B-Instruct"
        assert (args.node_rank, args.port, args.dist_init_addr) == (rank, 8000, "gpu-3:6000")
        assert args.mem_fraction_static == 0.85 and args.enable_metrics


def test_node_mode_prints_its_own_rank():
    proc = run_bash(
        str(SLURM / "launch_sglang.sh"),
        "node",
        DRY_RUN="1",
        SLURM_NODEID="1",
        SLURM_JOB_NODELIST="gpu[07-08]",
        NNODES="2",
        TP_SIZE="16",
    )
    assert proc.returncode == 0, proc.stderr
    (cmd,) = launch_commands(proc.stdout)
    args = server_args_of(cmd)
    assert (args.node_rank, args.nnodes, args.dist_init_addr) == (1, 2, "gpu07:50000")


def test_bad_layout_is_one_clear_error():
    proc = run_bash(str(TWO_NODES), DRY_RUN="1", TP_SIZE="15")
    assert proc.returncode == 1
    assert "TP_SIZE (15) must be divisible by NNODES (2)" in proc.stderr


def test_makefile_dry_run_prints_both_layouts():
    proc = subprocess.run(
        ["make", "-s", "-C", str(SLURM), "dry-run"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert [server_args_of(c).tp_size for c in launch_commands(proc.stdout)] == [8, 16, 16]


def test_makefile_start_health_stop(tmp_path: Path):
    port = str(find_free_port())

    def make(target: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [
            "make", "-s", "-C", str(SLURM), target,
            f"PYTHON={sys.executable}",
            f"PORT={port}",
            f"RUN_DIR={tmp_path}",
            "SERVER_ARGS=--max-total-tokens 2048",
        ]  # fmt: skip
        return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)

    started = make("start-server", timeout=300)
    pid_file = tmp_path / f"sglang-server-{port}.pid"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "The server is fired up and ready to roll!" in started.stderr
        pid = int(pid_file.read_text())
        server = psutil.Process(pid)
        tree = [server, *server.children(recursive=True)]
        health = make("health-check")
        assert health.returncode == 0, health.stdout + health.stderr
        assert "health: ok" in health.stdout
        assert f'"model_path":"{DEFAULT_MODEL_NAME_FOR_TEST}"' in health.stdout
        again = make("start-server")
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        stopped = make("stop-server")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not pid_file.exists()
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert make("health-check").returncode != 0


def test_madengine_wrapper_offline():
    cmd = [
        sys.executable, str(WRAPPER),
        "--mode", "offline",
        "--model-path", DEFAULT_MODEL_NAME_FOR_TEST,
        "--num-prompts", "8",
        "--random-input-len", "32",
        "--random-output-len", "16",
        "--max-total-tokens", "2048",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last_two = proc.stdout.strip().splitlines()[-2:]
    perf = re.fullmatch(rf"performance: {NUM} requests_per_second", last_two[0])
    tokens = re.fullmatch(rf"tokens_per_second: {NUM}", last_two[1])
    assert perf and tokens, last_two
    assert float(perf.group(1)) > 0 and float(tokens.group(1)) > 0
    assert " Offline Throughput Benchmark Result " in proc.stdout
