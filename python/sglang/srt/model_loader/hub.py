"""Hugging Face hub ids (`org/name`) as model paths: the local cache first, else a download.

`resolve_model_path` (resolve.py) calls `snapshot_folder` for a `--model-path` that is neither a
local path nor a packaged short name but looks like a hub id. The cache is the one
`huggingface_hub` uses (`--download-dir`, else `$HF_HUB_CACHE`, else `$HF_HOME/hub`, read when
called, so a changed environment counts); a snapshot there that holds a config and all its weight
files is used without any network access. Otherwise, unless `HF_HUB_OFFLINE=1`, the files the
server needs (configs, tokenizer, and safetensors weights, else `.bin` weights) are downloaded into
the cache from `$HF_ENDPOINT` (default huggingface.co, also read when called), with
huggingface_hub's progress bars on a terminal and the same progress as periodic log lines when
stderr is a pipe or a file (a server's log). The result is the snapshot folder, read like any local
model folder; every failure is a one-line ModelLoadError naming the id and the cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from typing import Any, Iterator, Optional

from tqdm import tqdm

from sglang.srt.model_loader.resolve import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
# Everything but weights that a model folder may need: configs, tokenizer files, chat templates.
SIDE_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*"]
_TRUE = ("1", "true", "yes", "on")
# Seconds between two log lines of one progress bar when stderr is not a terminal.
LOG_PROGRESS_INTERVAL_S = 5.0

logger = logging.getLogger(__name__)


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
    # Not snapshot_download(local_files_only=True): after a download it checks the snapshot
    # against the repo's whole file listing, so one we filtered (safetensors without the .bin
    # copy, index shards without consolidated files) would count as incomplete and never be used.
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if not isinstance(config, str):
        return None
    folder = os.path.dirname(config)
    return folder if _weights_complete(folder) else None


def _endpoint() -> Optional[str]:
    # huggingface_hub reads HF_ENDPOINT once, at import; passing it makes the current value count.
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return endpoint or None


class LoggedProgress(tqdm):
    """A progress bar that writes itself as log lines instead of redrawing a terminal line, so a
    download shows in a server log: its first state, then at most one line per
    LOG_PROGRESS_INTERVAL_S, and its final state when closed; a state equal to the last one logged
    is not repeated. HF_HUB_DISABLE_PROGRESS_BARS=1 turns it off like huggingface_hub's bars.
    `opened` lists the bars made, for the caller to close (snapshot_download leaves its byte
    bars open until garbage collection, which would log their final state much later)."""

    opened: list["LoggedProgress"] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from huggingface_hub.utils import are_progress_bars_disabled

        self._last_text: Optional[str] = None
        self._last_time = 0.0
        kwargs.pop("name", None)
        kwargs["disable"] = kwargs.get("disable") is True or are_progress_bars_disabled()
        kwargs.update(file=io.StringIO(), ascii=True, ncols=80)
        kwargs.update(mininterval=LOG_PROGRESS_INTERVAL_S, miniters=1)
        super().__init__(*args, **kwargs)
        self.opened.append(self)

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        if msg == "":  # tqdm clears a bar with an empty message; there is no line to clear
            return True
        text = (msg or str(self)).rstrip()
        now = time.monotonic()
        final = self.disable  # close() sets it before drawing the last state
        due = self._last_text is None or now - self._last_time >= LOG_PROGRESS_INTERVAL_S
        if text != self._last_text and (final or due):
            logger.info("%s", text)
            self._last_text, self._last_time = text, now
        return True


def _progress_class() -> Optional[type[LoggedProgress]]:
    """None (huggingface_hub's own bars) on a terminal, else a LoggedProgress class of its own."""
    if sys.stderr is not None and sys.stderr.isatty():
        return None
    return type("LoggedProgress", (LoggedProgress,), {"opened": []})


@contextlib.contextmanager
def _quiet_http_log() -> Iterator[None]:
    # huggingface_hub's HTTP client logs every request at INFO, which would bury the progress.
    http_log = logging.getLogger("httpx2")
    level = http_log.level
    http_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        http_log.setLevel(level)


def _download(repo_id: str, revision: Optional[str], cache_dir: str) -> str:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    endpoint, progress = _endpoint(), _progress_class()
    info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
    files = [sibling.rfilename for sibling in info.siblings or ()]
    patterns = list(SIDE_FILES)
    for index, suffix in ((SAFETENSORS_INDEX, ".safetensors"), (PT_INDEX, ".bin")):
        if index in files:
            # Only the shards the index names: some repos ship a second copy of the weights.
            path = hf_hub_download(
                repo_id, index, revision=info.sha, cache_dir=cache_dir, endpoint=endpoint,
                tqdm_class=progress,
            )  # fmt: skip
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
    logger.info("Downloading %s (revision %s) into %s", repo_id, info.sha, cache_dir)
    try:
        return snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
            endpoint=endpoint, tqdm_class=progress,
        )  # fmt: skip
    finally:
        for bar in progress.opened if progress is not None else ():
            bar.close()


def _download_failure(exc: Exception) -> str:
    """One line saying why the hub did not give the model."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return "the hub has no such revision"
    if isinstance(exc, RepositoryNotFoundError):
        return "the hub has no such repository (or it is private or gated: set HF_TOKEN)"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


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
        with _quiet_http_log():
            folder = _download(repo_id, revision, cache_dir)
    except ModelLoadError:
        raise
    except Exception as exc:  # network, authentication, missing repo or revision
        where = _endpoint() or "https://huggingface.co"
        raise ModelLoadError(
            f"Model {repo_id!r}{at} is not in the Hugging Face cache {cache_dir} and could not "
            f"be downloaded from {where}: {_download_failure(exc)}"
        ) from exc
    if not _weights_complete(folder):
        raise ModelLoadError(f"Downloaded model {repo_id!r}{at} in {folder} has no config/weights")
    return folder
