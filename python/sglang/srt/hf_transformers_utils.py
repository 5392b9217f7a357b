"""Bridges to transformers: model config, tokenizer and context length for a local model.

Callers: ModelConfig (config, context length) and the TokenizerManager/detokenizer (tokenizer).
Everything is read from local files only; a GGUF file supplies config, tokenizer and chat template
from its own metadata (its tokenizer is converted once and cached on disk, see `cache_root`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from sglang.srt.model_loader.resolve import ModelLoadError, is_gguf_path, resolve_model_path

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Where configs keep the trained context window, most specific first.
CONTEXT_LENGTH_KEYS = (
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "model_max_length",
    "max_position_embeddings",
    "n_positions",
)
DEFAULT_CONTEXT_LENGTH = 2048


def get_config(model_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The transformers config of a local HF folder or GGUF file (short names are resolved)."""
    path = resolve_model_path(model_path)
    if is_gguf_path(path):
        from sglang.srt.model_loader.gguf_utils import gguf_config

        return gguf_config(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"Model folder {path} has no config.json")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=True
    )


def get_tokenizer(
    tokenizer_path: str,
    tokenizer_mode: str = "auto",
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer (with its chat template) from a local folder or GGUF file.

    tokenizer_mode: "auto" prefers the fast (Rust) tokenizer, "slow" forces the Python one.
    """
    from transformers import AutoTokenizer

    if tokenizer_mode not in ("auto", "slow"):
        raise ValueError(f"Unknown tokenizer mode {tokenizer_mode!r}; expected 'auto' or 'slow'")
    if tokenizer_mode == "slow":
        kwargs.setdefault("use_fast", False)
    path = resolve_model_path(tokenizer_path)
    if is_gguf_path(path):
        cached = _gguf_tokenizer_cache(path) if not kwargs else None
        if cached is not None and os.path.isfile(os.path.join(cached, _CACHE_COMPLETE)):
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        folder, name = os.path.split(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, gguf_file=name, local_files_only=True, **kwargs
            )
        except (ValueError, OSError) as exc:
            raise ModelLoadError(f"Cannot read the tokenizer from GGUF file {path}: {exc}") from exc
        if cached is not None:
            _save_tokenizer_cache(tokenizer, cached)
        return tokenizer
    return AutoTokenizer.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=True, **kwargs
    )


# A GGUF file's tokenizer, converted once and saved as a HF tokenizer folder: converting it
# (parsing every vocabulary string of the file) took seconds in each of the three processes that
# load it at every start. The folder's name depends on the file (path, size, mtime) and the
# transformers version, so a changed file or library converts again. SGLANG_CACHE_DIR moves it.
_CACHE_COMPLETE = "sglang-cache-complete"


def cache_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "sglang")
    return os.environ.get("SGLANG_CACHE_DIR") or default


def _gguf_tokenizer_cache(path: str) -> str:
    import transformers

    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(cache_root(), "gguf_tokenizers", digest)


def _save_tokenizer_cache(tokenizer: Any, folder: str) -> None:
    """Write the folder under a temporary name and rename it: concurrent starts never see half
    of one. A failure (read-only home, full disk) only costs the next start the conversion."""
    tmp = f"{folder}.tmp{os.getpid()}"
    try:
        tokenizer.save_pretrained(tmp)
        open(os.path.join(tmp, _CACHE_COMPLETE), "w").close()
        os.replace(tmp, folder)
    except OSError as exc:  # includes another process having renamed its copy first
        logger.debug("tokenizer cache not written to %s: %s", folder, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def _rope_factor(hf_config: PretrainedConfig) -> float:
    # transformers 5 keeps rope settings in rope_parameters; older configs in rope_scaling.
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return 1.0
    rope_type = rope.get("rope_type", rope.get("type"))
    # These schemes already report the extended window in max_position_embeddings.
    if rope_type in (None, "default", "llama3") or "original_max_position_embeddings" in rope:
        return 1.0
    return float(rope.get("factor", 1.0) or 1.0)


def get_context_length(hf_config: PretrainedConfig) -> int:
    """The longest context the model was built for, including linear/dynamic rope scaling."""
    config = getattr(hf_config, "text_config", None) or hf_config
    for key in CONTEXT_LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return int(value * _rope_factor(config))
    return DEFAULT_CONTEXT_LENGTH
