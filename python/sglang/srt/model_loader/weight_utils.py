"""Weight files of a model: find them, stream (HF name, tensor) pairs out of them, or fake them.

The loader calls `iterate_weights(model_path, load_format)` and hands the iterator to the model's
`load_weights`; tensors stay on CPU in their stored dtype (GGUF: float32) and the model copies
them into its parameters. Every failure is a ModelLoadError naming the file and the reason.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from sglang.srt.model_loader.resolve import ModelLoadError, is_gguf_path

SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"


def _files_from_index(folder: str, index_name: str) -> list[str]:
    index_path = os.path.join(folder, index_name)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"Cannot read checkpoint index {index_path}: {exc}") from exc
    files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    # NOTE: checked before any shard is read, so a half-copied checkpoint fails fast, not after
    # minutes of loading.
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise ModelLoadError(
            f"Checkpoint shard {missing[0]} listed in {index_path} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return files


def _safetensors_files(folder: str) -> list[str]:
    if os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX)):
        return _files_from_index(folder, SAFETENSORS_INDEX)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    # Mistral repos ship a second, differently named copy of the weights next to the HF shards.
    hf_files = [f for f in files if not os.path.basename(f).startswith("consolidated")]
    return hf_files or files


def _pt_files(folder: str) -> list[str]:
    if os.path.isfile(os.path.join(folder, PT_INDEX)):
        return _files_from_index(folder, PT_INDEX)
    return sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))


def resolve_load_format(model_path: str, load_format: str) -> str:
    """Turn `auto` into the concrete format used for `model_path`."""
    if load_format != "auto":
        return load_format
    if model_path.lower().endswith(".gguf"):
        return "gguf"
    if _safetensors_files(model_path):
        return "safetensors"
    return "pt"


def find_weight_files(model_path: str, load_format: str) -> list[str]:
    """The weight files to read, in order; ModelLoadError when there are none."""
    load_format = resolve_load_format(model_path, load_format)
    if load_format == "gguf":
        if not is_gguf_path(model_path):
            raise ModelLoadError(f"load format gguf needs a .gguf file, got {model_path}")
        return [model_path]
    if not os.path.isdir(model_path):
        raise ModelLoadError(f"Model folder {model_path} does not exist or is not a folder")
    if load_format == "safetensors":
        files, pattern = _safetensors_files(model_path), "*.safetensors"
    elif load_format == "pt":
        files, pattern = _pt_files(model_path), "pytorch_model*.bin"
    else:
        raise ModelLoadError(f"load format {load_format!r} has no weight files")
    if not files:
        looked_for = (
            "*.safetensors or pytorch_model*.bin" if pattern == "pytorch_model*.bin" else pattern
        )
        raise ModelLoadError(
            f"No weight files found in folder {model_path} (looked for {looked_for})"
        )
    return files


def iterate_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in tqdm(files, desc="Loading safetensors checkpoint shards", unit="shard"):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
            raise ModelLoadError(
                f"Cannot read safetensors file {path}: corrupt or truncated ({exc})"
            ) from exc


def iterate_pt(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in tqdm(files, desc="Loading pt checkpoint shards", unit="shard"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"Cannot read PyTorch weight file {path}: {exc}") from exc
        if not isinstance(state, dict):
            raise ModelLoadError(f"PyTorch weight file {path} does not hold a state dict")
        yield from state.items()
        del state


def iterate_weights(
    model_path: str, load_format: str = "auto"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of the model at `model_path` (a folder or a .gguf file).

    Files are located eagerly, so a missing or incomplete checkpoint raises here, at call time,
    rather than on the first `next()`.
    """
    load_format = resolve_load_format(model_path, load_format)
    files = find_weight_files(model_path, load_format)
    if load_format == "gguf":
        from sglang.srt.model_loader.gguf_utils import iterate_gguf_weights

        return iterate_gguf_weights(files[0])
    if load_format == "safetensors":
        return iterate_safetensors(files)
    return iterate_pt(files)


@torch.no_grad()
def fill_dummy_weights(
    model: torch.nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3
) -> None:
    """Fill every parameter with uniform values in [low, high), identical for identical models.

    Values are drawn on the parameter's own device, so a 70B benchmark model never round-trips
    through host memory; a fresh generator per parameter keeps each tensor independent of the
    others.
    """
    for index, (_, param) in enumerate(model.named_parameters()):
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed + index)
        param.uniform_(low, high, generator=generator)
