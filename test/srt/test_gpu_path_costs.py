"""GPU-path costs checked on CPU: host reads per decode step, capture sizes that follow the batch.

What would be a device-to-host copy on CUDA is counted here on CPU: scalar reads of tensors
(`aten._local_scalar_dense`: `int()`, `.item()`) and gathers of the req_to_token table (which the
scheduler reads back on the host) in `ScheduleBatch.prepare_for_decode`. The static (CUDA-graph)
capture's width follows the batch's longest capturing sequence and its layers the rows'
selection; per-layer ("none") batches take the graph path; the KV pool's budget leaves room for
req_to_token (int32) and the capture buffers; the torch capture arithmetic is chunked; the
server refuses a top-k above the bound and CUDA without Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_cuda_graph_runner import GraphHookTorchNative, attention_for, lockstep, prompts_for
from torch.utils._python_dispatch import TorchDispatchMode

from sglang.bench_one_batch import BatchDriver
from sglang.srt.attention_capture import AttentionCapture, AttentionRequest, CaptureSpec
from sglang.srt.attention_capture import torch_scores
from sglang.srt.attention_capture.config import MAX_TOP_K
from sglang.srt.attention_capture.static import static_buffer_bytes, static_widths
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.layers.attention import TritonMissingError
from sglang.srt.server_args import ServerArgs, check_gpu_extra
from sglang.test.runners import SRTRunner, cpu_threads_hint, make_tiny_model

cpu_threads_hint()


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return make_tiny_model("llama", seed=5)


# ------------------------------------------------------------------ host reads per decode step


class HostReads(TorchDispatchMode):
    """Counts what would be device-to-host reads on CUDA: scalar reads of any tensor and
    gathers of `table` (the req_to_token table, read back on the host by the scheduler)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.storage = table.untyped_storage().data_ptr()
        self.scalar_reads = 0
        self.table_gathers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        elif func is torch.ops.aten.index.Tensor and self._on_table(args[0]):
            self.table_gathers += 1
        return func(*args, **(kwargs or {}))

    def _on_table(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == self.storage


@pytest.mark.parametrize("page_size", [1, 4])
def test_decode_step_host_reads(tiny_path: str, page_size: int) -> None:
    """No per-request read of req_to_token: page size 1 reads nothing, a paged pool at most one
    gather per step (the old code did one scalar read per request per step)."""
    srt = SRTRunner(tiny_path, page_size=page_size, max_running_requests=8)
    mr = srt.model_runner
    driver = BatchDriver(mr)
    batch = driver.make_batch(prompts_for(6, seed=3), 8)
    try:
        out, _ = mr.forward(batch.prepare_for_extend())
        for step in range(6):
            for req, tok in zip(batch.reqs, out.next_token_logits.argmax(-1).tolist()):
                req.output_ids.append(tok)
            with HostReads(mr.req_to_token_pool.req_to_token) as reads:
                work = batch.prepare_for_decode()
            assert reads.scalar_reads == 0, f"step {step}"
            assert reads.table_gathers == (0 if page_size == 1 else 1), f"step {step}"
            out, _ = mr.forward(work)
        for req, tok in zip(batch.reqs, out.next_token_logits.argmax(-1).tolist()):
            req.output_ids.append(tok)
    finally:
        driver.release(batch)
    assert mr.token_to_kv_pool_allocator.available_size() == mr.max_total_num_tokens


# ------------------------------------------------------------------ static capture shapes


def test_static_widths() -> None:
    assert static_widths(100) == [100]
    assert static_widths(256) == [256]
    assert static_widths(2304) == [256, 512, 1024, 2048, 2304]


def test_static_shape_follows_the_batch(tiny_path: str) -> None:
    """Graph width = bucket of the longest capturing row; layers = those some row selected;
    per-layer batches ("none") replay through the static path too."""
    srt = SRTRunner(tiny_path, max_running_requests=8, cuda_graph_max_bs=8,
                    return_attention_tokens=True, attention_capture_layers="all",
                    attention_tokens_top_k=8)  # fmt: skip
    mr = srt.model_runner
    mr.attn_backend = GraphHookTorchNative(mr)
    graphs = CudaGraphRunner(mr, use_graphs=False)
    cap = mr.attention_capture
    last = mr.model_config.num_hidden_layers - 1
    assert cap.static_widths[0] == 256 and cap.static_widths[-1] == mr.context_len
    graph_bytes = sum(t.numel() * t.element_size() for name, t in vars(cap).items()
                      if name.startswith("g_"))  # fmt: skip
    assert graph_bytes == static_buffer_bytes(last + 1, 8, mr.context_len, 8)  # as budgeted

    only_last = AttentionRequest(top_k=4, layers=(last,))
    spec = CaptureSpec([1], [only_last])
    assert cap.static_shape(spec, [900, 20]).width == 256  # row 0 does not capture
    assert cap.static_shape(spec, [20, 256]).width == 256
    assert cap.static_shape(spec, [20, 257]).width == 512
    assert cap.static_shape(spec, [20, 257]).layers == (last,)
    both = CaptureSpec([0, 1], [only_last, AttentionRequest(4, (0,), aggregation="none")])
    shape = cap.static_shape(both, [5, 5])
    assert shape.layers == (0, last) and shape.per_layer

    per_layer = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=2,
                                attention_capture=both, layer_probe=None)  # fmt: skip
    assert graphs.can_run(per_layer)

    # A real decode through the static path: a 300-token prompt puts the batch in bucket 512.
    mr.cuda_graph_runner = graphs
    prompts = prompts_for(2, seed=1)
    prompts[0] = prompts[0] + list(range(3, 303))
    lockstep(mr, prompts, 2, [only_last, None])
    assert cap.graph_shape.width == 512 and cap.graph_shape.layers == (last,)
    lockstep(mr, prompts_for(3, seed=2), 2, attention_for(3, last + 1))
    assert cap.graph_shape.width == 256 and cap.graph_shape.per_layer


# ------------------------------------------------------------------ memory budget


def test_kv_budget_leaves_room_for_req_to_token_and_capture(tiny_path: str) -> None:
    kwargs = dict(max_total_tokens=256, mem_fraction_static=0.5, max_running_requests=64)
    plain = SRTRunner(tiny_path, **kwargs).model_runner
    capture = SRTRunner(tiny_path, return_attention_tokens=True, attention_capture_layers="all",
                        attention_tokens_top_k=64, **kwargs).model_runner  # fmt: skip
    mc = plain.model_config
    table = plain.req_to_token_pool.req_to_token
    assert table.dtype == torch.int32
    assert plain.fixed_buffer_bytes() == table.numel() * 4  # (64 + 1) x (context + 4) int32

    cap = capture.attention_capture
    allocated = sum(t.numel() * t.element_size() for t in
                    (cap.rows, cap.layer_values, cap.layer_indices, cap.layer_excluded))  # fmt: skip
    counted = capture.fixed_buffer_bytes() - plain.fixed_buffer_bytes()
    assert counted == AttentionCapture.buffer_bytes(mc.num_hidden_layers, 64, mc.context_len, 64)
    assert allocated <= counted  # the capture's rows span min(context, pool) <= context columns

    memory = 8 * 2**30
    cell = MHATokenToKVPool.cell_size_bytes(
        mc.get_num_kv_heads(1), mc.head_dim, mc.num_hidden_layers, plain.kv_dtype
    )
    assert plain.profile_max_num_token(memory) == (memory * 0.5 - plain.weight_bytes - table.numel()
                                                   * 4) // cell  # fmt: skip
    fewer = plain.profile_max_num_token(memory) - capture.profile_max_num_token(memory)
    assert counted // cell <= fewer <= counted // cell + 1


# ------------------------------------------------------------------ chunked torch capture


def test_torch_capture_arithmetic_is_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path gathers keys a chunk of positions at a time; chunking changes nothing."""
    gen = torch.Generator().manual_seed(0)
    rows, width, hq, hkv, d = 3, 50, 4, 2, 8
    q = torch.randn(rows, hq * d, generator=gen)
    keys = torch.randn(200, hkv, d, generator=gen)
    slots = torch.randint(1, 200, (rows, width), generator=gen)
    allowed = torch.arange(width)[None, :] < torch.tensor([[50], [7], [31]])
    scores = torch.einsum("rhgd,rjhd->rhgj", q.view(rows, hkv, 2, d), keys[slots]) * 0.3
    lse = scores.masked_fill(~allowed[:, None, None, :], float("-inf")).logsumexp(-1)
    lse = lse.reshape(rows, hq)
    whole = torch_scores.head_summed_probs(q, lse, keys, slots, allowed, 0.3, 0.0, hq)
    torch.testing.assert_close(whole.sum(1), torch.full((rows,), 1.0))  # each row sums to 1
    monkeypatch.setattr(torch_scores, "CHUNK_BYTES", 4 * rows * (hkv * d + 2 * hq) * 7)
    assert torch_scores.chunk_positions(rows, hq, hkv, d) == 7  # 8 chunks of <= 7 positions
    chunked = torch_scores.head_summed_probs(q, lse, keys, slots, allowed, 0.3, 0.0, hq)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)  # float32 rounding only


# ------------------------------------------------------------------ start-up refusals


def test_top_k_upper_bound() -> None:
    ServerArgs(model_path="m", attention_tokens_top_k=MAX_TOP_K).check_server_args()
    with pytest.raises(ValueError, match=f"at most {MAX_TOP_K}"):
        ServerArgs(model_path="m", attention_tokens_top_k=MAX_TOP_K + 1).check_server_args()


def test_cuda_without_triton_refuses_to_start() -> None:
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        pytest.skip("Triton is installed in this environment")
    check_gpu_extra(ServerArgs(model_path="m", device="cuda", attention_backend="torch_native"))
    with pytest.raises(TritonMissingError, match="gpu extra"):
        check_gpu_extra(ServerArgs(model_path="m", device="cuda"))  # triton by default on CUDA
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", "m", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "gpu extra" in errors[0] and "sglang[gpu]" in errors[0]
