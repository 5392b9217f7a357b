"""CudaGraphRunner: buckets, padded static replay equal to eager decode, capture inside graphs.

On CPU (per-commit-cpu) the runner's static, padded path runs without graphs
(`use_graphs=False`) on a torch_native backend that implements the three graph hooks, so padding,
the static buffers, the logits slice and the static attention capture are checked against plain
eager decode. On CUDA (per-commit-1-gpu) real graphs are captured with the default (triton)
backend and every bucket's replay is compared with eager torch_native decode (the torch capture
path), with and without attention capture, on a tiny random Llama in float32.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch

from sglang.bench_one_batch import BatchDriver
from sglang.srt.attention_capture import AttentionRequest, result_to_records
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner, graph_batch_sizes
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.test.runners import SRTRunner, cpu_threads_hint, make_tiny_model

cpu_threads_hint()
HAS_CUDA = torch.cuda.is_available()
STEPS = 4


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(12, [1, 3, 40]) == [1, 3, 12]
    assert graph_batch_sizes(0) == []


class GraphHookTorchNative(TorchNativeAttnBackend):
    """torch_native with the graph hooks, for the runner's no-graph static path on CPU."""

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        self.max_bs = max_bs

    def init_forward_metadata_capture_cuda_graph(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing is captured on CPU")

    def init_forward_metadata_replay_cuda_graph(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_sum: int,
        forward_mode: ForwardMode,
        seq_lens_cpu: Optional[torch.Tensor] = None,
    ) -> None:
        assert seq_lens_cpu is not None and int(seq_lens_cpu.sum()) == seq_lens_sum
        assert torch.equal(seq_lens_cpu, seq_lens.cpu())
        ones = torch.ones(bs, dtype=torch.int64)
        fb = SimpleNamespace(
            batch_size=bs,
            forward_mode=forward_mode,
            input_ids=ones,
            positions=seq_lens - 1,
            req_pool_indices=req_pool_indices,
            seq_lens=seq_lens,
            seq_lens_cpu=seq_lens_cpu.tolist(),
            extend_seq_lens=ones,
            extend_seq_lens_cpu=[1] * bs,
            extend_prefix_lens=seq_lens - 1,
            extend_prefix_lens_cpu=(seq_lens_cpu - 1).tolist(),
            extend_start_loc=torch.arange(bs),
        )
        self.init_forward_metadata(fb)


def lockstep(
    runner: Any, prompts: list[list[int]], steps: int, attention: list[Any], tokens=None
) -> tuple[list[torch.Tensor], list[list[int]], list[list[Any]]]:
    """Prefill + `steps` decodes; per step the logits (host), tokens fed, capture records.

    `tokens` (from another run) forces the tokens appended, so two runners see the same inputs.
    """
    driver = BatchDriver(runner)
    batch = driver.make_batch(prompts, steps + 2)
    for req, att in zip(batch.reqs, attention):
        req.attention = att
    logits, fed, records = [], [], []
    try:
        work = batch.prepare_for_extend()
        for step in range(steps + 1):
            out, _fb = runner.forward(work)
            ids = out.next_token_logits.argmax(-1).tolist()
            if tokens is not None:
                ids = tokens[step]
            fed.append(ids)
            if step > 0:
                logits.append(out.next_token_logits.float().cpu())
            recs = []
            if out.attention_capture is not None:
                recs = result_to_records(out.attention_capture)
            records.append(recs)
            for req, tok in zip(batch.reqs, ids):
                req.output_ids.append(tok)
            if step < steps:
                work = batch.prepare_for_decode()
    finally:
        driver.release(batch)
    return logits, fed, records


def prompts_for(bs: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 20, (bs,), generator=gen).tolist()
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lens]


def attention_for(bs: int, num_layers: int) -> list[Any]:
    """Every other row asks (alternating last layer / all layers with a sink excluded, every
    third asking row per-layer lists: aggregation "none" replays graphs too)."""
    out: list[Any] = []
    for i in range(bs):
        if i % 2 == 1:
            out.append(None)
        elif i % 4 == 0:
            out.append(AttentionRequest(top_k=6, layers=(num_layers - 1,)))
        else:
            aggregation = "none" if i % 3 == 2 else "mean"
            out.append(AttentionRequest(top_k=4, layers=tuple(range(num_layers)), exclude_sink=1,
                                        aggregation=aggregation))  # fmt: skip
    return out


def compare(a, b, tol: float) -> None:
    (la, fa, ra), (lb, fb, rb) = a, b
    assert fa == fb
    for step, (x, y) in enumerate(zip(la, lb, strict=True)):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=f"step {step}")
    for step, (xs, ys) in enumerate(zip(ra, rb, strict=True)):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert x.positions == y.positions, f"step {step}"
            assert x.scores == pytest.approx(y.scores, rel=tol, abs=tol)
            assert x.excluded_mass == pytest.approx(y.excluded_mass, rel=tol, abs=tol)
            assert (x.layers is None) == (y.layers is None)
            for layer, (pos, scores, excluded) in (x.layers or {}).items():
                assert pos == y.layers[layer][0], f"step {step} layer {layer}"
                assert scores == pytest.approx(y.layers[layer][1], rel=tol, abs=tol)
                assert excluded == pytest.approx(y.layers[layer][2], rel=tol, abs=tol)


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return make_tiny_model("llama", seed=5)


# ------------------------------------------------------------------ CPU: static path, no graphs


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "capture"])
def test_static_padded_path_equals_eager_on_cpu(tiny_path: str, capture: bool) -> None:
    kwargs = dict(max_running_requests=8, cuda_graph_max_bs=8)
    if capture:
        kwargs.update(return_attention_tokens=True, attention_capture_layers="all",
                      attention_tokens_top_k=8)  # fmt: skip
    srt = SRTRunner(tiny_path, **kwargs)
    mr = srt.model_runner
    mr.attn_backend = GraphHookTorchNative(mr)
    graphs = CudaGraphRunner(mr, use_graphs=False)
    assert graphs.batch_sizes == [1, 2, 4, 8]
    layers = mr.model_config.num_hidden_layers
    for bs in (1, 3, 5, 8):  # 3 -> bucket 4, 5 -> bucket 8: padded rows
        prompts = prompts_for(bs, seed=bs)
        att = attention_for(bs, layers) if capture else [None] * bs
        mr.cuda_graph_runner = None
        eager = lockstep(mr, prompts, STEPS, att)
        mr.cuda_graph_runner = graphs
        static = lockstep(mr, prompts, STEPS, att, tokens=eager[1])
        compare(static, eager, 1e-5)
        if capture:
            assert any(static[2][1:]), "the static path produced no records"
    assert srt.model_runner.token_to_kv_pool_allocator.available_size() == mr.max_total_num_tokens


# ------------------------------------------------------------------ CUDA: real graphs


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("capture", [False, True], ids=["plain", "capture"])
def test_graph_replay_equals_eager_every_bucket(tiny_path: str, capture: bool) -> None:
    kwargs = dict(device="cuda", dtype="float32", max_running_requests=16, cuda_graph_max_bs=16,
                  max_total_tokens=8192, mem_fraction_static=None)  # fmt: skip
    if capture:
        kwargs.update(return_attention_tokens=True, attention_capture_layers="all",
                      attention_tokens_top_k=8)  # fmt: skip
    srt = SRTRunner(tiny_path, **kwargs)
    mr = srt.model_runner
    graphs = mr.cuda_graph_runner
    assert graphs is not None, "CUDA graphs were not captured"
    assert graphs.batch_sizes == [1, 2, 4, 8, 16]
    # The reference is the torch path (torch_native attention, torch capture arithmetic, eager),
    # so the kernels inside the graphs are compared with the torch reference, not with themselves.
    ref = SRTRunner(tiny_path, attention_backend="torch_native", **kwargs).model_runner
    assert ref.cuda_graph_runner is None and not getattr(ref.attention_capture, "use_kernel", 0)
    layers = mr.model_config.num_hidden_layers
    for bs in (1, 2, 3, 4, 7, 8, 11, 16):
        prompts = prompts_for(bs, seed=100 + bs)
        att = attention_for(bs, layers) if capture else [None] * bs
        eager = lockstep(ref, prompts, STEPS, att)
        replay = lockstep(mr, prompts, STEPS, att, tokens=eager[1])
        compare(replay, eager, 1e-4)


def test_disable_cuda_graph_padding_runs_unmatched_sizes_eagerly(tiny_path: str) -> None:
    """--disable-cuda-graph-padding: sizes with their own bucket replay, the others run eagerly."""
    srt = SRTRunner(tiny_path, max_running_requests=8, cuda_graph_max_bs=8,
                    disable_cuda_graph_padding=True)  # fmt: skip
    mr = srt.model_runner
    mr.attn_backend = GraphHookTorchNative(mr)
    graphs = CudaGraphRunner(mr, use_graphs=False)
    decode = [SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=bs,
                              attention_capture=None, layer_probe=None)
              for bs in range(1, 10)]  # fmt: skip
    assert [b.batch_size for b in decode if graphs.can_run(b)] == [1, 2, 4, 8]
    graphs.disable_padding = False
    assert [b.batch_size for b in decode if graphs.can_run(b)] == list(range(1, 9))
    # A batch with layer probes (hidden_states_layers, logit_lens) always runs eagerly.
    for b in decode:
        b.layer_probe = object()
    assert not any(graphs.can_run(b) for b in decode)


def test_static_path_returns_hidden_states(tiny_path: str) -> None:
    """--enable-return-hidden-states: the padded static (graph) decode hands back the same
    final hidden states as eager decode, sliced to the real rows."""
    srt = SRTRunner(tiny_path, max_running_requests=8, cuda_graph_max_bs=8,
                    enable_return_hidden_states=True)  # fmt: skip
    mr = srt.model_runner
    mr.attn_backend = GraphHookTorchNative(mr)
    graphs = CudaGraphRunner(mr, use_graphs=False)
    prompts = prompts_for(3, seed=7)

    def decode_hidden(graph_runner: Optional[CudaGraphRunner]) -> torch.Tensor:
        mr.cuda_graph_runner = graph_runner
        driver = BatchDriver(mr)
        batch = driver.make_batch(prompts, 4)
        for req in batch.reqs:
            req.return_hidden_states = True
        try:
            out, _ = mr.forward(batch.prepare_for_extend())
            for req, tok in zip(batch.reqs, out.next_token_logits.argmax(-1).tolist()):
                req.output_ids.append(tok)
            work = batch.prepare_for_decode()
            assert work.capture_hidden_states and graphs.can_run(work)
            out, _ = mr.forward(work)
            for req, tok in zip(batch.reqs, out.next_token_logits.argmax(-1).tolist()):
                req.output_ids.append(tok)  # so release frees exactly the slots written
            return out.hidden_states.clone()
        finally:
            driver.release(batch)

    eager, static = decode_hidden(None), decode_hidden(graphs)
    assert static.shape == (3, mr.model_config.hidden_size)
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
