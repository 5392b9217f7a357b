"""Hugging Face hub ids (`org/name`) as model paths: the local cache first, else a download.

`resolve_model_path` (resolve.py) calls `snapshot_folder` for a `--model-path` that is neither a
local path nor a packaged short name but looks like a hub id. The cache is the one
`huggingface_hub` uses (`--download-dir`, else `$HF_HUB_CACHE`, else `$HF_HOME/hub`, read when
called, so a changed environment counts); a snapshot there that holds a config and all its weight
files is used without any network access. Otherwise, unless `HF_HUB_OFFLINE=1`, the files the
server needs (configs, tokenizer, and safetensors weights, else `.bin` weights) are downloaded into
the cache with huggingface_hub's progress bars. The result is the snapshot folder, read like any
local model folder; every failure is a one-line ModelLoadError naming the id and the cache.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from sglang.srt.model_loader.resolve import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
# Everything but weights that a model folder may need: configs, tokenizer files, chat templates.
SIDE_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*"]
_TRUE = ("1", "true", "yes", "on")


def looks_like_hub_id(name: str) -> bool:
    return HUB_ID.match(name) is not None and ".." not in name


def hub_cache_dir(download_dir: Optional[str] = None) -> str:
    """The cache folder huggingface_hub would use, from the environment as it is now."""
    if download_dir:
        return os.path.abspath(os.path.expanduser(download_dir))
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _weights_complete(folder: str) -> bool:
    """True when the folder has a config and every weight file its index (if any) names."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    names = os.listdir(folder)
    for index, suffix in ((SAFETENSORS_INDEX, ".safetensors"), (PT_INDEX, ".bin")):
        if index in names:
            try:
                with open(os.path.join(folder, index), encoding="utf-8") as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError):
                return False
            return all(os.path.isfile(os.path.join(folder, s)) for s in shards)
        if any(n.endswith(suffix) for n in names):
            return True
    return False


def _cached_snapshot(repo_id: str, revision: Optional[str], cache_dir: str) -> Optional[str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None
    return folder if _weights_complete(folder) else None


def _download(repo_id: str, revision: Optional[str], cache_dir: str) -> str:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    files = HfApi().list_repo_files(repo_id, revision=revision)
    patterns = list(SIDE_FILES)
    for index, suffix in ((SAFETENSORS_INDEX, ".safetensors"), (PT_INDEX, ".bin")):
        if index in files:
            # Only the shards the index names: some repos ship a second copy of the weights.
            path = hf_hub_download(repo_id, index, revision=revision, cache_dir=cache_dir)
            with open(path, encoding="utf-8") as f:
                patterns += sorted(set(json.load(f)["weight_map"].values()))
            break
        if any(name.endswith(suffix) for name in files):
            patterns.append(f"*{suffix}")
            break
    else:
        raise ModelLoadError(
            f"Hub model {repo_id!r} has no safetensors or .bin weights (files: {files[:10]})"
        )
    return snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns
    )


def resolve_server_paths(server_args: Any) -> None:
    """Resolve `--model-path` and `--tokenizer-path` once, before any child process starts.

    A download then happens once, in the launching process, and a missing model is one error
    there. The tokenizer path becomes the local folder (it follows `--revision` when it is the
    model's id); the model path keeps its spelling for /get_model_info and is found in the cache
    again by each process that builds a ModelConfig.
    """
    from sglang.srt.model_loader.resolve import resolve_model_path

    model = server_args.model_path
    resolve_model_path(model, revision=server_args.revision, download_dir=server_args.download_dir)
    tokenizer = server_args.tokenizer_path
    if tokenizer and not os.path.exists(os.path.expanduser(tokenizer)):
        server_args.tokenizer_path = resolve_model_path(
            tokenizer,
            revision=server_args.revision if tokenizer == model else None,
            download_dir=server_args.download_dir,
        )


def snapshot_folder(
    repo_id: str, revision: Optional[str] = None, download_dir: Optional[str] = None
) -> str:
    """The local snapshot folder of hub model `repo_id` at `revision` (default: main)."""
    cache_dir = hub_cache_dir(download_dir)
    at = f" at revision {revision!r}" if revision else ""
    folder = _cached_snapshot(repo_id, revision, cache_dir)
    if folder is not None:
        return folder
    if hub_offline():
        raise ModelLoadError(
            f"Model {repo_id!r}{at} is not in the Hugging Face cache {cache_dir} (with its "
            "config and weights), and HF_HUB_OFFLINE=1 forbids downloading it"
        )
    try:
        folder = _download(repo_id, revision, cache_dir)
    except ModelLoadError:
        raise
    except Exception as exc:  # network, authentication, missing repo or revision
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"Model {repo_id!r}{at} is not in the Hugging Face cache {cache_dir} and could not "
            f"be downloaded: {type(exc).__name__}: {reason}"
        ) from exc
    if not _weights_complete(folder):
        raise ModelLoadError(f"Downloaded model {repo_id!r}{at} in {folder} has no config/weights")
    return folder
