"""Quantized GGUF files of tiny HF models, for the packed GGUF path's tests.

`quantize` gives a float matrix's raw GGUF blocks: Q4_0, Q4_1 and Q8_0 through the `gguf`
package's own quantizers, Q4_K written here from the format (gguf-py only dequantizes it): per
super-block of 256 weights an fp16 d and dmin, eight 6-bit sub-block scales and mins packed in 12
bytes, and 128 bytes of codes, with w = d * sc * q - dmin * mn. `write_gguf` writes a Llama's
(or Qwen's) state dict the way llama.cpp's converter lays it out (names, and q/k row order for
the llama family), its linear weights in one type and everything else F32. `tiny_llama_gguf`
writes a random tiny Llama that way beside an HF folder of the weights the file holds;
`tiny_config` is the tiny shape those models (and the loader tests') share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """Raw blocks uint8 [rows, bytes per row] of float32 `w` [rows, cols] in `qtype`."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == "Q4_K":
        return quantize_q4_k(w)
    return gguf_quantize(w, GGMLQuantizationType[qtype])


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks of `w` [rows, cols % 256 == 0]: each 32-wide sub-block's min and range set
    its 6-bit min and scale codes against the super-block's fp16 dmin and d."""
    rows, cols = w.shape
    sub = w.reshape(rows, cols // 256, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / 15.0
    mins = -lo
    d = (scale.max(-1, keepdims=True) / 63.0).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63)
    mn = np.clip(np.rint(np.divide(mins, dmin32, out=np.zeros_like(mins), where=dmin32 > 0)), 0, 63)
    eff_scale = (d32 * sc)[..., None]
    eff_min = (dmin32 * mn)[..., None]
    q = np.divide(sub + eff_min, eff_scale, out=np.zeros_like(sub), where=eff_scale > 0)
    q = np.clip(np.rint(q), 0, 15).astype(np.uint8)  # [rows, supers, 8, 32]
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    packed_scales = np.concatenate(
        [
            (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6),
            (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4),
        ],
        axis=-1,
    )
    # Chunk c of 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones.
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(rows, cols // 256, 128)
    blocks = np.concatenate(
        [d.view(np.uint8), dmin.view(np.uint8), packed_scales, qs], axis=-1
    )  # [rows, supers, 144]
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def llamacpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's convert_hf_to_gguf writes for attn_q/attn_k."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(
    path: str | Path,
    config: Any,
    state: dict[str, torch.Tensor],
    linear_type: str = "F32",
    arch: str = "llama",
) -> dict[str, torch.Tensor]:
    """Write `state` as a GGUF of `arch` with its linear weights in `linear_type` (others F32).

    Returns the state with each linear weight replaced by its dequantized value (gguf-py's
    dequantizer), i.e. the weights the file holds, in HF layout.
    """
    import gguf
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    eos = config.eos_token_id
    writer.add_eos_token_id(int(eos) if isinstance(eos, int) else 5)
    qtype = GGMLQuantizationType[linear_type]
    dequantized: dict[str, torch.Tensor] = {}
    for hf_name, tensor in state.items():
        tensor = tensor.float()
        if hf_name == "model.embed_tokens.weight":
            name, part = "token_embd.weight", None
        elif hf_name == "model.norm.weight":
            name, part = "output_norm.weight", None
        elif hf_name == "lm_head.weight":
            name, part = "output.weight", None
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_PARTS[part]}.{kind}"
        heads = {
            "self_attn.q_proj": config.num_attention_heads,
            "self_attn.k_proj": config.num_key_value_heads,
        }.get(part or "")
        heads = heads if arch == "llama" else None  # only the llama family is permuted
        on_disk = llamacpp_permute(tensor, heads) if heads else tensor
        if linear_type != "F32" and hf_name.endswith("_proj.weight"):
            raw = quantize(on_disk.numpy(), linear_type)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            values = torch.from_numpy(np.array(dequantize(raw, qtype), dtype=np.float32))
            # Back to HF row order: the inverse of the permutation on a (half, 2) view.
            if heads:
                rows = values.shape[0]
                values = values.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2)
                values = values.reshape(rows, -1).contiguous()
            dequantized[hf_name] = values
        else:
            writer.add_tensor(name, on_disk.numpy())
            dequantized[hf_name] = tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized


# The tiny shape every GGUF test model shares; `tiny_config`'s callers set sizes and extras.
_TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen3": "Qwen3Config"}


def tiny_config(arch: str = "llama", **fields: Any) -> Any:
    """A transformers config of `arch` ("llama" | "qwen3", write_gguf's names) with two layers
    of 4 query / 2 KV heads, 128 tokens, hidden 64, MLP 96; every field overridable."""
    import transformers

    return getattr(transformers, _CONFIG_CLASSES[arch])(**{**_TINY_SHAPE, **fields})


def tiny_llama_gguf(folder: str | Path, qtype: str, **overrides: Any) -> tuple[str, str]:
    """A random tiny Llama (config fields overridable) written as GGUF with its linear weights in
    `qtype`, and an HF folder holding the dequantized weights the file stores: (gguf, folder)."""
    from transformers import LlamaForCausalLM

    config = tiny_config(
        "llama",
        **{
            "vocab_size": 384,
            "hidden_size": 256,
            "intermediate_size": 512,
            "head_dim": 64,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
            "initializer_range": 0.06,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **overrides,
        },
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny-{qtype}.gguf"
    model.load_state_dict(write_gguf(path, config, model.state_dict(), qtype))
    model.save_pretrained(folder / f"hf-{qtype}")
    return str(path), str(folder / f"hf-{qtype}")
