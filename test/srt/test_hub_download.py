"""Hub ids downloaded over HTTP: huggingface_hub against a local server in the hub's API layout.

`HF_ENDPOINT` points at sglang.test.hub_server.FakeHub (real HTTP, the routes and headers
huggingface_hub requests) and `HF_HOME` at an empty folder. Checked: a download lands in the hub
cache layout and is then found offline; `--revision` by branch and by commit hash; a sharded
safetensors model fetches its index and the shards it names, not a second copy of the weights; a
`.bin`-only model falls back to `.bin`, a model with both fetches only safetensors; an unknown repo
or revision is a one-line error; and one server started from the hub id with `--revision` and
`--download-dir` logs its download progress, loads the tokenizer from the download and generates
HF's greedy tokens on the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from sglang.srt.model_loader import ModelLoadError, resolve_model_path
from sglang.srt.model_loader.weight_utils import iterate_weights
from sglang.test.hub_server import FakeHub
from sglang.test.runners import HFRunner, cpu_threads_hint, make_tiny_model
from sglang.test.test_utils import (
    DEFAULT_URL_FOR_TEST,
    find_free_port,
    kill_process_tree,
    popen_launch_server,
    terminate,
)

REPO = "tiny-org/tiny-llama"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

cpu_threads_hint()


def write_tokenizer(folder: Path, vocab_size: int = 512) -> None:
    """A word-level tokenizer over `w4 .. w511` (ids 0-3 special), saved the transformers way."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(str(folder))


def sharded_copy(src: Path, dst: Path) -> Path:
    """`src` as two safetensors shards with an index, plus an unindexed consolidated copy (as some
    hub repos ship) that a download must leave out, plus a tokenizer."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(str(src / "model.safetensors"))
    names = sorted(state)
    halves = {SHARDS[0]: names[::2], SHARDS[1]: names[1::2]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(dst / shard), metadata={"format": "pt"})
    index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(src / "model.safetensors", dst / "consolidated.safetensors")
    write_tokenizer(dst)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-download")
    main = Path(make_tiny_model("llama", str(root / "main")))
    v2 = Path(make_tiny_model("llama", str(root / "v2"), seed=1, num_hidden_layers=2))
    binary, both = root / "bin", root / "both"
    for folder in (binary, both):
        folder.mkdir()
        shutil.copy(main / "config.json", folder / "config.json")
        torch.save(load_file(str(main / "model.safetensors")), folder / "pytorch_model.bin")
    shutil.copy(main / "model.safetensors", both / "model.safetensors")
    return {
        "main": main,
        "v2": v2,
        "main-sharded": sharded_copy(main, root / "main-sharded"),
        "v2-sharded": sharded_copy(v2, root / "v2-sharded"),
        "bin": binary,
        "both": both,
    }


@pytest.fixture(scope="module")
def hub(models):
    with FakeHub() as fake:
        fake.add(REPO, models["main-sharded"], "main")
        fake.add(REPO, models["v2-sharded"], "v2")
        fake.add("org/bin", models["bin"])
        fake.add("org/both", models["both"])
        yield fake


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """huggingface_hub pointed at the fake hub, with an empty HF_HOME; yields that home."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def same_weights(folder: str, reference: Path) -> bool:
    loaded = dict(iterate_weights(folder))
    state = load_file(str(reference / "model.safetensors"))
    return sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_download_lands_in_the_cache_and_is_then_found_offline(hub, models, online, monkeypatch):
    from sglang.srt.configs.model_config import ModelConfig

    folder = resolve_model_path(REPO)
    repo = online / "hub" / f"models--{REPO.replace('/', '--')}"
    assert folder == str(repo / "snapshots" / hub.repos[REPO].branches["main"])
    assert (repo / "refs" / "main").read_text() == hub.repos[REPO].branches["main"]
    fetched = set(hub.fetched(REPO))
    assert {"model.safetensors.index.json", *SHARDS, "tokenizer.json"} <= fetched
    assert "consolidated.safetensors" not in fetched  # not named by the index
    assert same_weights(folder, models["main"])
    assert ModelConfig(REPO, device="cpu").num_hidden_layers == 3

    asked = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path(REPO) == folder
    assert len(hub.requests) == asked


def test_revision_by_branch_and_commit(hub, models, online):
    from sglang.srt.configs.model_config import ModelConfig

    snapshots = online / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert resolve_model_path(REPO, revision="v2") == str(
        snapshots / hub.repos[REPO].branches["v2"]
    )
    assert ModelConfig(REPO, device="cpu", revision="v2").num_hidden_layers == 2
    folder = resolve_model_path(REPO, revision=hub.repos[REPO].branches["main"])
    assert folder == str(snapshots / hub.repos[REPO].branches["main"])
    assert same_weights(folder, models["main"])
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(REPO, revision="v3")
    message = str(info.value)
    assert "at revision 'v3'" in message and "no such revision" in message
    assert "\n" not in message


def test_bin_fallback_and_safetensors_preferred(hub, models, online, monkeypatch):
    assert same_weights(resolve_model_path("org/bin"), models["main"])
    assert "pytorch_model.bin" in hub.fetched("org/bin")
    folder = resolve_model_path("org/both")
    assert "model.safetensors" in hub.fetched("org/both")
    assert "pytorch_model.bin" not in hub.fetched("org/both")
    assert same_weights(folder, models["main"])
    # The filtered snapshot (no .bin copy) is a complete cache entry, offline too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("org/both") == folder


def test_unknown_repo_is_one_line(hub, online):
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("no-org/no-model")
    message = str(info.value)
    assert "'no-org/no-model'" in message and str(online / "hub") in message
    assert hub.endpoint in message and "no such repository" in message
    assert "\n" not in message


def test_server_downloads_revision_into_download_dir(hub, models, tmp_path):
    """One server from the hub id: --revision v2 (sharded), --download-dir; progress in its log,
    tokenizer from the download, greedy tokens equal HF float32 on v2's weights."""
    from transformers import PreTrainedTokenizerFast

    home, download = tmp_path / "home", tmp_path / "downloads"
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home)}
    prompt = "w5 w9 w33 w100 w7 w250"
    ids = [int(word[1:]) for word in prompt.split()]
    ref = HFRunner(str(models["v2"])).greedy(ids, 10).output_ids
    args = ["--revision", "v2", "--download-dir", str(download), "--device", "cpu"]
    args += ["--dtype", "float32", "--max-total-tokens", "8192"]
    url = f"{DEFAULT_URL_FOR_TEST}:{find_free_port()}"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        proc = popen_launch_server(REPO, url, other_args=args)
    try:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}}  # fmt: skip
        out = requests.post(f"{url}/generate", json=body, timeout=120).json()
        info = requests.get(f"{url}/get_model_info", timeout=30).json()
    finally:
        try:
            terminate(proc)
        finally:
            kill_process_tree(proc.pid)
    assert out["output_ids"] == ref
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(models["v2-sharded"]))
    assert out["text"] == tokenizer.decode(ref, skip_special_tokens=True)
    assert info["model_path"] == REPO
    snapshot = (
        download
        / f"models--{REPO.replace('/', '--')}"
        / "snapshots"
        / hub.repos[REPO].branches["v2"]
    )
    assert (snapshot / SHARDS[1]).is_file() and not (snapshot / "consolidated.safetensors").exists()
    assert not home.exists() or not any(home.rglob("*.safetensors"))
    log = "\n".join(proc.log_lines)  # type: ignore[attr-defined]
    assert f"Downloading {REPO} (revision {hub.repos[REPO].branches['v2']})" in log
    wanted = len(list(models["v2-sharded"].iterdir())) - 1  # all but the consolidated copy
    assert f"Fetching {wanted} files: 100%" in log, log[-3000:]
