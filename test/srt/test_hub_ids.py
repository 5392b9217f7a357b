"""Hugging Face hub ids as `--model-path`, resolved from a hub cache laid out on disk (no network).

The test writes a cache the way huggingface_hub lays it out (`models--org--name/blobs/<hash>`,
`snapshots/<commit>/<file>` as relative symlinks into blobs, `refs/<branch>` holding the commit)
and checks: found offline through HF_HUB_CACHE, HF_HOME and --download-dir; --revision picks the
snapshot (branch name or commit hash); sharded safetensors and .bin snapshots load; a missing or
incomplete model offline is a one-line error naming the id and the cache; and one server started
with a hub id, --revision and an AWQ checkpoint (--quantization awq_marlin) generates HF's greedy
tokens on the dequantized weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from sglang.srt.model_loader import ModelLoadError, resolve_model_path
from sglang.srt.model_loader.weight_utils import iterate_weights
from sglang.test.quantized_checkpoints import write_quantized
from sglang.test.runners import HFRunner, cpu_threads_hint, make_tiny_model
from sglang.test.test_utils import running_server

REPO = "tiny-org/tiny-llama"
COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40

cpu_threads_hint()


def add_snapshot(cache: Path, repo_id: str, commit: str, folder: Path, refs=()) -> Path:
    """Copy `folder`'s files into `cache` as snapshot `commit` of `repo_id`; point `refs` at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for src in sorted(folder.iterdir()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / src.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two revisions of a tiny Llama: main (3 layers) and v2 (2 layers, AWQ int4)."""
    root = tmp_path_factory.mktemp("hub-models")
    main = Path(make_tiny_model("llama", str(root / "main")))
    tiny2 = make_tiny_model("llama", str(root / "tiny2"), seed=1, num_hidden_layers=2)
    write_quantized(tiny2, str(root / "v2"), str(root / "v2-dequantized"), method="awq")
    return main, root / "v2", root / "v2-dequantized"


@pytest.fixture(scope="module")
def cache(models, tmp_path_factory):
    main, v2, _ = models
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    snapshots = {
        COMMIT_MAIN: add_snapshot(cache, REPO, COMMIT_MAIN, main, refs=("main",)),
        COMMIT_V2: add_snapshot(cache, REPO, COMMIT_V2, v2, refs=("v2",)),
    }
    return cache, snapshots


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF environment pointing nowhere useful and offline; tests set the cache they mean."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return monkeypatch


def test_found_offline_via_hf_hub_cache_and_hf_home(cache, offline):
    from sglang.srt.configs.model_config import ModelConfig

    hub, snapshots = cache
    offline.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model_path(REPO) == str(snapshots[COMMIT_MAIN])
    assert ModelConfig(REPO, device="cpu").num_hidden_layers == 3
    offline.delenv("HF_HUB_CACHE")
    offline.setenv("HF_HOME", str(hub.parent))  # the cache is $HF_HOME/hub
    assert resolve_model_path(REPO) == str(snapshots[COMMIT_MAIN])


def test_revision_picks_the_snapshot(cache, offline):
    from sglang.srt.configs.model_config import ModelConfig

    hub, snapshots = cache
    offline.setenv("HF_HUB_CACHE", str(hub))
    for revision in ("v2", COMMIT_V2):
        assert resolve_model_path(REPO, revision=revision) == str(snapshots[COMMIT_V2])
    config = ModelConfig(REPO, device="cpu", revision="v2")
    assert config.num_hidden_layers == 2 and config.quantization == "awq"
    assert resolve_model_path(REPO, revision="main") == str(snapshots[COMMIT_MAIN])
    with pytest.raises(ModelLoadError, match="at revision 'v3'"):
        resolve_model_path(REPO, revision="v3")


def test_download_dir_is_the_cache(cache, offline):
    hub, snapshots = cache
    assert resolve_model_path(REPO, download_dir=str(hub)) == str(snapshots[COMMIT_MAIN])
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(REPO)
    message = str(info.value)
    assert REPO in message and str(Path(os.environ["HF_HOME"]) / "hub") in message
    assert "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_sharded_safetensors_and_bin_snapshots(models, tmp_path, offline):
    main, _, _ = models
    state = load_file(str(main / "model.safetensors"))
    names = sorted(state)
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    for folder in (sharded, binary):
        folder.mkdir()
        (folder / "config.json").write_bytes((main / "config.json").read_bytes())
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(sharded / shard), metadata={"format": "pt"})
    index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(state, binary / "pytorch_model.bin")

    hub = tmp_path / "hub"
    offline.setenv("HF_HUB_CACHE", str(hub))
    for repo_id, folder in (("org/sharded", sharded), ("org/bin", binary)):
        add_snapshot(hub, repo_id, COMMIT_MAIN, folder, refs=("main",))
        loaded = dict(iterate_weights(resolve_model_path(repo_id)))
        assert sorted(loaded) == names and all(torch.equal(loaded[k], state[k]) for k in names)

    # A snapshot missing a shard its index names is not a usable cache entry.
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        (incomplete / name).write_bytes((sharded / name).read_bytes())
    add_snapshot(hub, "org/incomplete", COMMIT_MAIN, incomplete, refs=("main",))
    with pytest.raises(ModelLoadError, match="with its config and weights"):
        resolve_model_path("org/incomplete")


def test_missing_model_offline_exits_2_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", "no-org/no-model"]
        + ["--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'no-org/no-model'" in errors[0] and str(tmp_path / "cache") in errors[0]


def test_server_with_hub_id_revision_and_awq(models, cache):
    """One server: hub id from the cache offline, --revision v2 (AWQ), --quantization awq_marlin;
    greedy tokens equal HF float32 on the dequantized weights."""
    hub, _ = cache
    _, _, dequantized = models
    prompt = [1, 5, 9, 33, 100, 7]
    ref = HFRunner(str(dequantized)).greedy(prompt, 12).output_ids
    args = ["--revision", "v2", "--quantization", "awq_marlin", "--device", "cpu"]
    args += ["--dtype", "float32", "--max-total-tokens", "8192", "--skip-tokenizer-init"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_CACHE", str(hub))
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("SGLANG_INT4_MATMUL", "dequant")
        with running_server(REPO, args) as url:
            body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}  # fmt: skip
            out = requests.post(f"{url}/generate", json=body, timeout=120).json()
            info = requests.get(f"{url}/get_model_info", timeout=30).json()
    assert out["output_ids"] == ref
    assert info["model_path"] == REPO
    # /get_model_info names the quantization, its matmul and the KV cache dtype.
    quant = info["quantization"]
    assert (quant["method"], quant["bits"], quant["group_size"]) == ("awq", 4, 32), quant
    assert quant["kernel"].startswith("dequant") and "Marlin" in quant["kernel"], quant
    assert quant["kv_scales"] == "1.0" and info["kv_cache_dtype"] == "float32"
