"""Packed GGUF weights under tensor parallelism (layers/quantization/gguf_tp.py), two gloo ranks.

Tiny random Llamas written as GGUF (sglang.test.gguf_checkpoints) load packed on both ranks of a
real TP 2 group: q/k/v and gate/up keep their output rows, o_proj and down_proj their input
columns in whole 32-weight blocks (Q4_K's 256-weight super-blocks cut in the middle). Greedy
tokens equal TP 1 on the same packed file, and each rank reports every linear tensor packed
(float32 where sgl_kernel's GGUF kernel runs, else bfloat16 on PyTorch's int4 kernel). A model
whose down_proj input does not split in whole blocks is refused with one clear error: by the
launching process before any rank loads (one line, exit 1, like other --tp split errors), and by
a rank's loader if it gets there.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from sglang.srt.model_loader import ModelLoadError
from sglang.test.gguf_checkpoints import tiny_llama_gguf
from sglang.test.runners import SRTRunner
from sglang.test.test_utils import find_free_port
from sglang.test.tp_runners import run_tp_group

PROMPTS = [[1, 17, 200, 33, 9], [1, 5, 6, 7, 8, 9, 10, 300, 121]]
STEPS = 10
QTYPES = ["Q4_1", "Q4_K"]


def packed_greedy(paths: list[str], refused: str, dtype: str) -> tuple[list, str]:
    """On this rank: per GGUF path, (greedy ids, logprobs, quant tensor types); and the error
    loading `refused` gives."""
    results = []
    for path in paths:
        runner = SRTRunner(path, dtype=dtype)
        outs = runner.generate(PROMPTS, STEPS, return_logprob=True)
        types = runner.model_runner.model.quant_info["tensor_types"]
        results.append([(o.output_ids, o.output_logprobs, types) for o in outs])
        del runner
    try:
        SRTRunner(refused, dtype=dtype)
    except ModelLoadError as exc:
        return results, str(exc)
    return results, ""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-tp")
    # Larger weights than the default: peaked next-token distributions, so bf16 rounding does not
    # flip near ties of a flat random model.
    paths = [tiny_llama_gguf(root / q, q, initializer_range=0.3)[0] for q in QTYPES]
    # 480 columns of down_proj: 15 blocks, 7.5 per rank.
    refused = tiny_llama_gguf(root / "odd", "Q4_1", intermediate_size=480)[0]
    return paths, refused


@pytest.fixture(scope="module")
def dtype(files):
    """float32 where sgl_kernel's GGUF kernel packs it, else bfloat16 (PyTorch's int4 kernel)."""
    model = SRTRunner(files[0][0], dtype="float32").model_runner.model
    return "float32" if getattr(model, "quant_info", None) is not None else "bfloat16"


def test_tp2_packed_equals_tp1_packed(files, dtype):
    paths, refused = files
    tp1, tp1_error = packed_greedy(paths, refused, dtype)
    assert tp1_error == ""  # TP 1 keeps every layer whole: nothing to cut
    ranks = run_tp_group(2, packed_greedy, paths, refused, dtype)
    assert ranks[0] == ranks[1], "TP ranks disagree"
    tp2, error = ranks[0]
    for qtype, outs, base in zip(QTYPES, tp2, tp1):
        for (ids, lps, types), (ids1, lps1, types1) in zip(outs, base):
            assert types == types1 == {qtype: 14}  # 2 layers x 7 linear tensors, all packed
            same = next((i for i, (a, b) in enumerate(zip(ids, ids1)) if a != b), len(ids))
            diff = max(abs(a - b) for a, b in zip(lps[:same], lps1[:same]))
            logging.getLogger(__name__).warning(
                "%s %s TP 2 vs TP 1 packed: greedy equal for %d of %d tokens, max logprob "
                "diff %.3g", qtype, dtype, same, STEPS, diff,
            )  # fmt: skip
            # Peaked distributions: the same tokens. Logprobs: in float32 only the order of the
            # sums differs (one all-reduce per row-parallel layer), which may move one int8
            # rounding of the kernel's activations downstream (measured up to 6.8e-4); in
            # bfloat16 each rank's partial output is rounded too (2^-8 of logits of magnitude
            # ~10: measured up to 0.093), as with dense bf16 weights.
            assert ids == ids1, f"{qtype}: TP 2 packed greedy tokens differ from TP 1"
            assert diff < (5e-3 if dtype == "float32" else 0.15)
    assert "model.layers.0.mlp.down_proj splits its 480 input columns into 2 parts of 240" in error
    assert "--gguf-dequantize" in error and "\n" not in error


def test_server_refuses_a_split_inside_blocks_in_one_line(files, dtype):
    _, refused = files
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", refused, "--tp", "2"]
    cmd += ["--device", "cpu", "--dtype", dtype, "--skip-tokenizer-init"]
    cmd += ["--max-total-tokens", "4096"]
    proc = subprocess.run(
        cmd + ["--port", str(find_free_port())], capture_output=True, text=True, timeout=180
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    line = next(x for x in out.splitlines() if "--tp 2 splits" in x)
    assert "model.layers.0.mlp.down_proj.weight (Q4_1) into parts of 240" in line
    assert "--gguf-dequantize" in line
