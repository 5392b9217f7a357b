"""The one-call CPU decode layers (python/sglang/srt/layers/cpu_decoder_layers.py) against the
layer modules they replace.

The C function makes the modules' kernel calls with the same arguments, so a decode step must
give bit-identical logits and the same greedy tokens either way: bf16 weights on the bf16 GEMM,
and GGUF Q4_1 blocks on the GGUF kernel with float32 and bfloat16 activations. Through a real
Scheduler, attention capture of one middle layer (that layer runs its module, the others in C),
hidden states and the logit lens (inside the attention entries) of probed layers (taken inside
the C call, so probes alone do not split the step) must equal a run with the path turned off, on
bf16 weights and on GGUF blocks with float32 activations. A dense float32 model keeps its
modules on PyTorch's matmul (`SGLANG_CPU_F32_GEMM=0`); with its weights packed for the float32
entry of the bf16 kernel (`=1`) it takes the call, bit-identical to its modules.
"""

from __future__ import annotations

import pytest
import torch

from sgl_kernel import cpu_layer
from sglang.srt.layers import cpu_decoder_layers
from sglang.test.decode_steps import greedy_steps

pytestmark = pytest.mark.skipif(
    not cpu_layer.usable(torch.ones(1)), reason="CPU layer kernels cannot be built here"
)

PROMPTS = [[1, 5, 9, 13, 2, 7, 11, 3, 4], [3, 4, 8], [6] * 20]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    from sglang.test.served_tiny import make_tiny_served_model

    return make_tiny_served_model(str(tmp_path_factory.mktemp("tiny")), num_layers=3)


def _runner(path: str, dtype: str):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import build_model_runner
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=path, dtype=dtype, max_total_tokens=1024)
    return build_model_runner(args, ModelConfig.from_server_args(args))


def _decode(runner, steps: int = 8) -> tuple[list, torch.Tensor, int]:
    """Greedy tokens, stacked logits and how many steps took the one-call path."""
    calls = []
    original = cpu_decoder_layers.CpuDecoderLayers.run

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    cpu_decoder_layers.CpuDecoderLayers.run = counted
    try:
        return (*greedy_steps(runner, PROMPTS, steps), len(calls))
    finally:
        cpu_decoder_layers.CpuDecoderLayers.run = original


def _fused_vs_modules(runner) -> None:
    fused = _decode(runner)
    cpu_decoder_layers.set_enabled(False)
    try:
        modules = _decode(runner)
    finally:
        cpu_decoder_layers.set_enabled(True)
    assert fused[2] == 7 and modules[2] == 0  # every decode step, and none when off
    assert fused[0] == modules[0]
    assert torch.equal(fused[1], modules[1])


def test_bf16_weights_bit_identical(tiny_path: str) -> None:
    _fused_vs_modules(_runner(tiny_path, "bfloat16"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_packed_bit_identical(tmp_path, dtype: str) -> None:
    from sglang.test.gguf_checkpoints import tiny_llama_gguf

    path, _ = tiny_llama_gguf(tmp_path, "Q4_1", num_hidden_layers=3, attention_bias=True)
    _fused_vs_modules(_runner(path, dtype))


def test_dense_float32_on_torch_matmul_keeps_the_modules(tiny_path: str, monkeypatch) -> None:
    monkeypatch.setenv("SGLANG_CPU_F32_GEMM", "0")
    runner = _runner(tiny_path, "float32")
    assert _decode(runner, 3)[2] == 0
    assert not isinstance(
        runner.model.model.__dict__.get("_cpu_decoder_layers"), cpu_decoder_layers.CpuDecoderLayers
    )


def test_dense_float32_packed_bit_identical(tiny_path: str, monkeypatch) -> None:
    monkeypatch.setenv("SGLANG_CPU_F32_GEMM", "1")
    _fused_vs_modules(_runner(tiny_path, "float32"))


def _scheduled(
    path: str,
    dtype: str = "bfloat16",
    captured: tuple[int, ...] = (1,),
    probe=None,
    probing: tuple[int, ...] = (0, 1, 2),
) -> tuple[list, list[tuple[int, int]]]:
    """Requests run by a real Scheduler, `captured` layers captured and layers 0 and 2 probed
    (or `probe`) by the requests `probing`, and the (start, stop) layer ranges the C side ran."""
    from sglang.srt.attention_capture import AttentionRequest
    from sglang.srt.managers.layer_probes import ProbeRequest
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.test.runners import SRTRunner

    srt = SRTRunner(path, dtype=dtype, return_attention_tokens=True,
                    attention_capture_layers="all", attention_tokens_top_k=4)  # fmt: skip
    attention = AttentionRequest(top_k=4, layers=captured) if captured else None
    probe = probe or ProbeRequest(hidden_layers=(0,), lens_layers=(0, 2), top_n=3)
    params = dict(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    reqs = [
        Req(
            f"r{i}",
            p,
            SamplingParams(**params),
            attention=attention,
            probe=probe if i in probing else None,
        )
        for i, p in enumerate(PROMPTS)
    ]
    ranges: list[tuple[int, int]] = []
    original = cpu_layer.decoder_layers

    def recorded(step, table, start, stop, *rest):
        ranges.append((start, stop))
        return original(step, table, start, stop, *rest)

    cpu_layer.decoder_layers = recorded
    try:
        for req in reqs:
            srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
    finally:
        cpu_layer.decoder_layers = original
    return reqs, ranges


def _records(req) -> tuple:
    att = [
        (list(map(int, r.positions)), [float(x) for x in r.scores]) for r in req.attention_records
    ]
    return req.output_ids, att, repr(req.probe_records)


def test_capture_and_probes_same_as_modules(tiny_path: str) -> None:
    """Layer 1 captured (runs its module), layers 0 and 2 probed: C segments [0, 1) and [2, 3)."""
    fused, ranges = _scheduled(tiny_path)
    cpu_decoder_layers.set_enabled(False)
    try:
        modules, none = _scheduled(tiny_path)
    finally:
        cpu_decoder_layers.set_enabled(True)
    assert none == [] and ranges and set(ranges) == {(0, 1), (2, 3)}
    for a, b in zip(fused, modules):
        assert len(a.attention_records) == 6 and len(a.probe_records) == 6
        assert _records(a) == _records(b)


@pytest.mark.parametrize("model", ["bf16", "gguf-float32"])
def test_probes_inside_the_call(tiny_path: str, tmp_path, model: str) -> None:
    """Probes without capture: one C call per step takes every probed layer's rows (a layer
    that is both hidden and lens, one that is hidden only, the last as lens) of the requests
    that probe (the middle one does not), the same records as the modules'."""
    from sglang.srt.managers.layer_probes import ProbeRequest

    path, dtype = tiny_path, "bfloat16"
    if model == "gguf-float32":
        from sglang.test.gguf_checkpoints import tiny_llama_gguf

        path, dtype = tiny_llama_gguf(tmp_path, "Q4_1", num_hidden_layers=3)[0], "float32"
    probe = ProbeRequest(hidden_layers=(0, 1), lens_layers=(0, 2), top_n=3)
    fused, ranges = _scheduled(path, dtype, captured=(), probe=probe, probing=(0, 2))
    cpu_decoder_layers.set_enabled(False)
    try:
        modules, none = _scheduled(path, dtype, captured=(), probe=probe, probing=(0, 2))
    finally:
        cpu_decoder_layers.set_enabled(True)
    assert none == [] and ranges and set(ranges) == {(0, 3)}
    for i, (a, b) in enumerate(zip(fused, modules)):
        assert a.attention_records == [] and len(a.probe_records) == (0 if i == 1 else 6)
        assert _records(a) == _records(b)
