"""ModelConfig: the model facts the engine needs, derived once from the model's config.

Built from ServerArgs by the engine and each scheduler; consumed by the model runner (shapes for
the KV pool, dtype), the loader (path, architectures) and the tokenizer manager (context length,
EOS ids). It reads only local files: the model path is resolved by the loader's resolver (a hub
id to its snapshot folder in the Hugging Face cache, downloaded there first when online).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from sglang.srt.hf_transformers_utils import get_config, get_context_length
from sglang.srt.model_loader.quantization import check_quantization_config
from sglang.srt.model_loader.resolve import ModelLoadError, is_gguf_path, resolve_model_path

logger = logging.getLogger(__name__)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}
_AUTO_ACCEPTED = (torch.float16, torch.bfloat16, torch.float32)
# Architectures with a learned absolute position table: it has no row past its length.
_LEARNED_POSITIONS = {"GPT2LMHeadModel"}


def _config_dtype(hf_config: Any) -> torch.dtype | None:
    # transformers 5 calls it `dtype`, 4.x `torch_dtype`; either may be a string or a torch.dtype.
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: str) -> torch.dtype:
    """Map a `--dtype` value to a torch dtype.

    "auto" on CPU is float32 (CPU half-precision matmuls are slow and inexact); on an accelerator it
    is the checkpoint's own dtype when that is fp16/bf16/fp32, else bfloat16 (GGUF, unknown).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.lower().removeprefix("torch.")
    if name == "auto":
        if device == "cpu":
            return torch.float32
        config_dtype = _config_dtype(hf_config)
        return config_dtype if config_dtype in _AUTO_ACCEPTED else torch.bfloat16
    if name not in _DTYPE_NAMES:
        raise ValueError(
            f"Unknown dtype {dtype!r}; expected auto or one of {', '.join(_DTYPE_NAMES)}"
        )
    return _DTYPE_NAMES[name]


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value if v is not None}


class ModelConfig:
    """Model facts for one served model; attribute names follow upstream SGLang."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        context_length: int | None = None,
        trust_remote_code: bool = False,
        load_format: str = "auto",
        device: str | None = None,
        quantization: str | None = None,
        revision: str | None = None,
        download_dir: str | None = None,
    ) -> None:
        self.model_path = resolve_model_path(
            model_path, revision=revision, download_dir=download_dir
        )
        self.gguf_file: str | None = self.model_path if is_gguf_path(self.model_path) else None
        self.load_format = load_format
        self.trust_remote_code = trust_remote_code
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(device).split(":")[0]

        self.hf_config = get_config(self.model_path, trust_remote_code=trust_remote_code)
        # The parsed AWQ/GPTQ config (None: plain weights); unsupported methods raise here.
        self.quant_config = check_quantization_config(self.hf_config, self.model_path, quantization)
        self.quantization: str | None = quantization or getattr(self.quant_config, "method", None)
        # Multimodal configs nest the language model's fields; the engine only serves the text part.
        text_config = getattr(self.hf_config, "text_config", None) or self.hf_config
        self.hf_text_config = text_config
        self.architectures: list[str] = list(getattr(self.hf_config, "architectures", None) or [])
        self.dtype = resolve_dtype(dtype, self.hf_config, self.device)
        int4 = getattr(self.quant_config, "method", None) in ("awq", "gptq")
        if int4 and self.device == "cpu" and str(dtype) == "auto":
            # The CPU int4 kernel is fast with bfloat16 activations only; with float32 it was
            # 5-20x slower (docs/quantization.md). --dtype float32 still picks the exact path.
            self.dtype = torch.bfloat16
            logger.info("%s checkpoint on CPU: --dtype auto is bfloat16", self.quantization)

        self.context_len = self._context_len(context_length)
        self.hidden_size: int = text_config.hidden_size
        self.num_hidden_layers: int = text_config.num_hidden_layers
        self.num_attention_heads: int = text_config.num_attention_heads
        self.num_key_value_heads: int = (
            getattr(text_config, "num_key_value_heads", None) or self.num_attention_heads
        )
        self.head_dim: int = getattr(text_config, "head_dim", None) or (
            self.hidden_size // self.num_attention_heads
        )
        self.vocab_size: int = text_config.vocab_size
        self.eos_token_ids: set[int] = self._eos_token_ids()

    @classmethod
    def from_server_args(cls, server_args: Any) -> "ModelConfig":
        return cls(
            server_args.model_path,
            dtype=server_args.dtype,
            context_length=server_args.context_length,
            trust_remote_code=server_args.trust_remote_code,
            load_format=server_args.load_format,
            device=server_args.device,
            quantization=server_args.quantization,
            revision=server_args.revision,
            download_dir=server_args.download_dir,
        )

    def _context_len(self, requested: int | None) -> int:
        derived = get_context_length(self.hf_text_config)
        if requested is None:
            return derived
        if requested > derived and set(self.architectures) & _LEARNED_POSITIONS:
            raise ModelLoadError(
                f"--context-length {requested} exceeds the {derived} learned positions of "
                f"{self.architectures[0]}; use at most {derived}"
            )
        if requested > derived:
            # Allowed (rope extrapolates), but quality past the trained window is not guaranteed.
            logger.warning(
                "context_length %d is larger than the model's maximum %d; "
                "outputs past %d tokens may be wrong",
                requested,
                derived,
                derived,
            )
        return int(requested)

    def _eos_token_ids(self) -> set[int]:
        ids = _as_id_set(getattr(self.hf_config, "eos_token_id", None))
        if self.gguf_file is None:
            # Chat models often list extra stop ids (e.g. <|eot_id|>) only in
            # generation_config.json.
            gen_path = os.path.join(self.model_path, "generation_config.json")
            if os.path.isfile(gen_path):
                try:
                    with open(gen_path, encoding="utf-8") as f:
                        ids |= _as_id_set(json.load(f).get("eos_token_id"))
                except (OSError, ValueError, TypeError) as exc:
                    logger.warning("Ignoring unreadable %s: %s", gen_path, exc)
        return ids

    def get_num_kv_heads(self, tp_size: int) -> int:
        """KV heads held by one TP rank; heads are replicated when there are fewer than ranks."""
        return max(1, self.num_key_value_heads // tp_size)

    def __repr__(self) -> str:
        return (
            f"ModelConfig(model_path={self.model_path!r}, architectures={self.architectures}, "
            f"dtype={self.dtype}, context_len={self.context_len}, layers={self.num_hidden_layers}, "
            f"hidden={self.hidden_size}, "
            f"heads={self.num_attention_heads}/{self.num_key_value_heads})"
        )
