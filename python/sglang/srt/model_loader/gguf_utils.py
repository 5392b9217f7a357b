"""GGUF files: metadata -> transformers config, tensors -> (HF name, float32 tensor) pairs.

Used by hf_transformers_utils.get_config (config) and the weight iterators (weights). The `gguf`
package is imported only here and only when a GGUF file is actually opened, so machines without it
can still serve HF folders. Tensors are dequantized to float32 (the model casts them to its dtype),
except those the caller keeps packed: their raw 4-bit blocks are yielded as GGUFBlocks
(layers/quantization/gguf.py).

llama.cpp's converter reorders the rows of attn_q/attn_k of llama-family models (per head, it
interleaves the two rotary halves); `unpermute_rotary` restores HuggingFace's layout so the same
model code serves HF folders and GGUF files.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sglang.srt.model_loader.gguf_index import GGUFIndex
from sglang.srt.model_loader.resolve import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF `general.architecture` maps onto transformers."""

    hf_architecture: str
    # llama.cpp permutes q/k rows only for the llama family (Llama, Mistral, SmolLM2 ...).
    rotary_permuted: bool
    accepts_head_dim: bool


GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", rotary_permuted=True, accepts_head_dim=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", rotary_permuted=False, accepts_head_dim=False),
    "qwen3": GGUFArch("Qwen3ForCausalLM", rotary_permuted=False, accepts_head_dim=True),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# Tensors that carry nothing the HF layout stores as a weight (llama3 rope factors are derived from
# the config on the HF side).
_SKIPPED_TENSORS = {"rope_freqs.weight"}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None when the name is not known."""
    match = _BLOCK_RE.match(name)
    if match:
        layer, part, kind = match.groups()
        hf_part = _LAYER_TENSORS.get(part)
        return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{kind}"
    match = _GLOBAL_RE.match(name)
    if match and match.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[match.group(1)]}.{match.group(2)}"
    return None


def unpermute_rotary(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row permutation.

    The converter viewed each head's rows as (2 halves, head_dim/2) and swapped those axes, turning
    HF's "rotate half" layout into llama.cpp's interleaved-pairs layout. Swapping them back on the
    (head_dim/2, 2) view restores HF rows. Works for weights (2-D) and biases (1-D).
    """
    rows = tensor.shape[0]
    rest = tuple(tensor.shape[1:])
    if rows % (2 * num_heads):
        raise ModelLoadError(f"cannot un-permute a tensor of {rows} rows over {num_heads} heads")
    grouped = tensor.reshape(num_heads, rows // num_heads // 2, 2, *rest)
    return grouped.transpose(1, 2).reshape(rows, *rest).contiguous()


def _file_key(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _cached_reader(key: tuple[str, int, int]) -> GGUFIndex:
    # Config and weights read the same file, so one header walk is shared (the cache key changes
    # when the file does).
    return GGUFIndex(key[0])


def open_gguf(path: str) -> GGUFIndex:
    """A cached GGUFIndex for `path`; ModelLoadError names the file when it cannot be read."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path} does not exist")
    return _cached_reader(_file_key(path))


def read_metadata(reader: GGUFIndex) -> dict[str, Any]:
    """Scalar and small metadata fields; the big tokenizer arrays only as `<key>.count`."""
    return dict(reader.metadata)


def _uniform(value: Any, what: str, path: str) -> int:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError(f"{path}: per-layer {what} {value} is not supported")
        value = value[0]
    return int(value)


def gguf_config(path: str) -> PretrainedConfig:
    """Build the transformers config of a GGUF model from its metadata.

    NOTE: a plain `PreTrainedConfig` holding every field the models read, not the architecture's
    class (LlamaConfig ...): importing those pulls in much of transformers' modeling code, ~3 s of
    CPU in each of the two processes that read the config at every start."""
    from transformers.configuration_utils import PreTrainedConfig

    reader = open_gguf(path)
    meta = read_metadata(reader)
    arch_name = meta.get("general.architecture")
    arch = GGUF_ARCHITECTURES.get(arch_name)
    if arch is None:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch_name!r} is not supported "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch_name}.{key}", default)

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(get("embedding_length"))
    heads = _uniform(get("attention.head_count"), "head count", path)
    kv_heads = _uniform(get("attention.head_count_kv", heads), "KV head count", path)
    head_dim = int(get("attention.key_length") or hidden // heads)
    vocab = get("vocab_size") or meta.get("tokenizer.ggml.tokens.count")
    if vocab is None:
        vocab = int(reader.tensors[0].shape[-1]) if reader.tensors else 0

    rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(get("rope.freq_base", 10000.0)),
    }
    if get("rope.scaling.type") == "linear" and get("rope.scaling.factor"):
        rope = {**rope, "rope_type": "linear", "factor": float(get("rope.scaling.factor"))}

    eos_ids = [
        int(meta[key])
        for key in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        if key in meta
    ]
    eos_ids = list(dict.fromkeys(eos_ids))
    kwargs: dict[str, Any] = dict(
        architectures=[arch.hf_architecture],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        # What the architecture classes default to, for all three families.
        hidden_act="silu",
        mlp_bias=False,
    )
    if arch.accepts_head_dim:
        kwargs["head_dim"] = head_dim
    if arch_name == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config = PreTrainedConfig(**kwargs)
    config.model_type = arch_name
    config.name_or_path = path
    return config


def _block_of(name: str) -> int | None:
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) if match else None


def gguf_tensor_types(path: str) -> dict[str, str]:
    """HF name -> GGUF type name (Q4_1, F32, ...) of every tensor the loader maps."""
    names = ((gguf_to_hf_name(t.name), t.tensor_type.name) for t in open_gguf(path).tensors)
    return {hf: qtype for hf, qtype in names if hf is not None}


def iterate_gguf_weights(
    path: str, packed: frozenset[str] = frozenset()
) -> Iterator[tuple[str, Any]]:
    """Yield (HF name, float32 tensor) for every weight in the file, in HF layout; tensors named
    in `packed` come as GGUFBlocks (raw blocks, rows in HF order) instead."""
    from gguf.quants import dequantize

    from sglang.srt.layers.quantization.gguf import GGUFBlocks

    config = gguf_config(path)
    reader = open_gguf(path)
    arch_name = reader.metadata["general.architecture"]
    permuted = GGUF_ARCHITECTURES[arch_name].rotary_permuted

    # One progress tick per transformer block (plus one for embeddings/norm/head), not per tensor.
    groups: dict[int | None, list[Any]] = {}
    for tensor in reader.tensors:
        groups.setdefault(_block_of(tensor.name), []).append(tensor)
    bar = tqdm(groups.values(), desc="Loading GGUF tensor groups", unit="group", total=len(groups))
    for group in bar:
        for tensor in group:
            if tensor.name in _SKIPPED_TENSORS:
                logger.warning("%s: ignoring GGUF tensor %s", path, tensor.name)
                continue
            hf_name = gguf_to_hf_name(tensor.name)
            if hf_name is None:
                raise ModelLoadError(
                    f"{path}: unknown GGUF tensor {tensor.name!r} for architecture {arch_name}"
                )
            # GGUF lists dimensions fastest-first; torch wants them slowest-first.
            shape = [int(d) for d in reversed(tensor.shape.tolist())]
            if hf_name in packed:
                # One row of blocks per output row: the rotary un-permutation moves whole rows.
                raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
                if permuted and (".q_proj." in hf_name or ".k_proj." in hf_name):
                    raw = unpermute_rotary(raw, _rotary_heads(config, hf_name))
                yield hf_name, GGUFBlocks(raw, tensor.tensor_type.name, shape[-1])
                continue
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
            except Exception as exc:
                raise ModelLoadError(
                    f"{path}: cannot dequantize tensor {tensor.name}: {exc}"
                ) from exc
            if array.dtype != np.float32:
                array = array.astype(np.float32)
            elif not array.flags.writeable:
                # F32 tensors come back as views of the read-only memory map.
                array = array.copy()
            weight = torch.from_numpy(array).reshape(shape)
            if permuted and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
                weight = unpermute_rotary(weight, _rotary_heads(config, hf_name))
            yield hf_name, weight


def _rotary_heads(config: PretrainedConfig, hf_name: str) -> int:
    return config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
