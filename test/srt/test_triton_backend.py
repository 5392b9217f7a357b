"""The triton attention backend against torch_native, and the engine on it against torch_native.

Part 1 builds the same random paged batch twice with test_torch_native_backend's `make_case`
(random rows, random single slots or pages, cached prefixes), runs `TorchNativeAttnBackend` on one
and `TritonAttnBackend` on the other, and compares outputs, per-head LSE (`return_lse=True`) and
the pool writes for extend with prefixes, decode, GQA/MHA/MQA, sliding windows, bfloat16 and
strided q/k slices; then the decode CUDA-graph hooks (static buffers, padded rows, replay with a
new batch: a real CUDA graph on a GPU), the hybrid prefill/decode dispatch and the backend choice.

Part 2 runs the engine in-process (ModelRunner + Scheduler) on tiny Llama, Qwen3 and Gemma 2
(soft-capped scores, alternating sliding windows) models with
`attention_backend="triton"`: greedy tokens and logprobs equal torch_native's, with separate
prefill/decode backends too, and attention-token records (fused capture kernel) equal
torch_native's (torch capture path); a float8 KV pool with per-tensor scales gives torch_native's
results too.

Runs on CUDA when present, else on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 and
SGLANG_TRITON_INTERPRET_OK=1 are set here before anything imports the kernels); skips when Triton
is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
from types import SimpleNamespace

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not HAS_CUDA:
    if os.environ.get("TRITON_INTERPRET", "1") in ("", "0"):
        pytest.skip("no CUDA device and TRITON_INTERPRET=0", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit runs
    os.environ["SGLANG_TRITON_INTERPRET_OK"] = "1"  # lets --device cpu pick the triton backend

from test_torch_native_backend import (  # noqa: E402
    BF16_TOL,
    F32_TOL,
    NUM_ROWS,
    assert_matches,
    make_case,
    make_layer,
    reference,
)

from sglang.srt.attention_capture import AttentionRequest  # noqa: E402
from sglang.srt.layers.attention import create_attention_backend  # noqa: E402
from sglang.srt.layers.attention.hybrid_backend import HybridAttnBackend  # noqa: E402
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.test.runners import (  # noqa: E402
    SRTRunner,
    assert_greedy_matches,
    cpu_threads_hint,
    make_tiny_model,
)

cpu_threads_hint()
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
HEADS = [(8, 2), (4, 4), (4, 1)]
HEADS_IDS = ["gqa8-2", "mha4-4", "mqa4-1"]


# ------------------------------------------------------------------ part 1: backend level
def triton_runner(case, splits: int = 4) -> SimpleNamespace:
    return SimpleNamespace(
        device=str(DEV),
        dtype=case.q[0].dtype,
        req_to_token_pool=case.req_pool,
        server_args=SimpleNamespace(triton_attention_num_kv_splits=splits),
        model_config=SimpleNamespace(num_attention_heads=case.hq, head_dim=case.d),
        tp_size=1,
    )


def on_triton(case, splits: int = 4):
    """Move a make_case batch to DEV and put a TritonAttnBackend behind its ForwardBatch."""
    case.req_pool.req_to_token = case.req_pool.req_to_token.to(DEV)
    kv = case.kv_pool
    kv.k_buffer = [t.to(DEV) for t in kv.k_buffer]
    kv.v_buffer = [t.to(DEV) for t in kv.v_buffer]
    kv.device = DEV
    moved = {
        f.name: getattr(case.fb, f.name).to(DEV)
        for f in dataclasses.fields(case.fb)
        if isinstance(getattr(case.fb, f.name), torch.Tensor)
    }
    backend = TritonAttnBackend(triton_runner(case, splits))
    case.fb = dataclasses.replace(case.fb, attn_backend=backend, **moved)
    backend.init_forward_metadata(case.fb)
    case.backend = backend
    case.q, case.k, case.v = ([t.to(DEV) for t in xs] for xs in (case.q, case.k, case.v))
    return case


def run_both(seed: int, window: int = -1, tol=None, **kw):
    """(torch_native case, triton case, (out, lse) of each) for the same random batch."""
    ref = make_case(seed, **kw)
    tri = on_triton(make_case(seed, **kw))
    layer = make_layer(ref, 0, window)
    ref_res = ref.backend.forward(ref.q[0], ref.k[0], ref.v[0], layer, ref.fb, return_lse=True)
    tri_res = tri.backend.forward(tri.q[0], tri.k[0], tri.v[0], layer, tri.fb, return_lse=True)
    out, lse = (t.cpu() for t in tri_res)
    tol = tol or F32_TOL
    assert out.dtype == ref_res[0].dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_res[0], **tol)
    torch.testing.assert_close(lse, ref_res[1], **tol)
    assert_matches(ref, out, lse, window=window, **tol)  # and the float64 reference
    for a, b in zip(ref.kv_pool.k_buffer + ref.kv_pool.v_buffer,
                    tri.kv_pool.k_buffer + tri.kv_pool.v_buffer):  # fmt: skip
        assert torch.equal(a, b.cpu()), "pool writes differ"
    return ref, tri, (out, lse)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEADS_IDS)
def test_extend_with_cached_prefixes(hq: int, hkv: int, page_size: int) -> None:
    run_both(hq * 10 + hkv + page_size, hq=hq, hkv=hkv, d=32, prefix_lens=[0, 5, 17, 3],
             extend_lens=[7, 1, 4, 12], page_size=page_size)  # fmt: skip


@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEADS_IDS)
def test_decode_at_random_slots(hq: int, hkv: int) -> None:
    seq_lens = [1, 9, 23, 40]
    run_both(hq + hkv, hq=hq, hkv=hkv, d=64, prefix_lens=[s - 1 for s in seq_lens],
             extend_lens=[1] * 4, mode=ForwardMode.DECODE, page_size=2)  # fmt: skip


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE], ids=["extend", "decode"])
@pytest.mark.parametrize("window", [1, 4])
def test_sliding_window(window: int, mode: ForwardMode) -> None:
    if mode.is_decode():
        prefix, ext = [1, 6, 29], [1, 1, 1]
    else:
        prefix, ext = [0, 6, 15], [9, 2, 5]
    run_both(window, window=window, hq=8, hkv=2, d=32, prefix_lens=prefix, extend_lens=ext,
             mode=mode)  # fmt: skip


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE], ids=["extend", "decode"])
def test_bfloat16(mode: ForwardMode) -> None:
    if mode.is_decode():
        prefix, ext = [2, 16, 7], [1, 1, 1]
    else:
        prefix, ext = [0, 7, 12], [6, 1, 3]
    run_both(13, tol=BF16_TOL, hq=8, hkv=2, d=64, prefix_lens=prefix, extend_lens=ext, mode=mode,
             q_dtype=torch.bfloat16, pool_dtype=torch.bfloat16)  # fmt: skip


def test_strided_qkv_views_and_no_lse() -> None:
    """Models pass q/k/v as column slices of one fused qkv; return_lse=False gives the tensor."""
    kw = dict(hq=8, hkv=2, d=32, prefix_lens=[2, 6], extend_lens=[4, 3])
    case = on_triton(make_case(37, **kw))
    q, k, v = torch.cat([case.q[0], case.k[0], case.v[0]], dim=-1).split([256, 64, 64], dim=-1)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = case.backend.forward(q, k, v, make_layer(case), case.fb)
    assert isinstance(out, torch.Tensor)
    ref_out = reference(make_case(37, **kw), 0)[0]  # on the CPU twin of the batch
    torch.testing.assert_close(out.cpu().double(), ref_out, **F32_TOL)


def test_decode_cuda_graph_hooks() -> None:
    """Static buffers at max_bs; a padded bs=4 batch captured, then replayed with the requests
    permuted (new req_pool_indices, seq_lens, q, K/V, slots): real rows match the reference, the
    padded row (seq_len fill value, an unused pool row, the padding slot) stays finite."""
    max_bs, bs, hq, hkv, d = 8, 4, 8, 2, 32
    seq_lens = [5, 17, 33]
    kw = dict(hq=hq, hkv=hkv, d=d, prefix_lens=[s - 1 for s in seq_lens], extend_lens=[1, 1, 1],
              mode=ForwardMode.DECODE)  # fmt: skip
    case = on_triton(make_case(53, **kw))
    backend: TritonAttnBackend = case.backend
    backend.init_cuda_graph_state(max_bs, max_bs)
    fill = backend.get_cuda_graph_seq_len_fill_value()
    used = {r.row for r in case.reqs}
    pad_row = next(r for r in range(NUM_ROWS) if r not in used)
    i64 = dict(dtype=torch.int64, device=DEV)
    static = SimpleNamespace(
        q=torch.zeros(max_bs, hq * d, device=DEV),
        k=torch.zeros(max_bs, hkv * d, device=DEV),
        v=torch.zeros(max_bs, hkv * d, device=DEV),
        loc=torch.zeros(max_bs, **i64),
        rows=torch.full((max_bs,), pad_row, **i64),
        lens=torch.full((max_bs,), fill, **i64),
    )
    fb = SimpleNamespace(token_to_kv_pool=case.kv_pool, out_cache_loc=static.loc[:bs],
                         forward_mode=ForwardMode.DECODE)  # fmt: skip
    layer = make_layer(case)
    ref_out, ref_lse = reference(make_case(53, **kw), 0)  # on the CPU twin of the batch

    def load(order: list[int]) -> None:
        n = len(order)
        static.q[:n] = case.q[0][order]
        static.k[:n] = case.k[0][order]
        static.v[:n] = case.v[0][order]
        static.loc[:n] = case.fb.out_cache_loc[order]
        static.rows[:n] = case.fb.req_pool_indices[order]
        static.lens[:n] = case.fb.seq_lens[order]
        static.q[n:bs] = 1.0  # padding: any values, slot 0, fill seq_len

    def step():
        return backend.forward_decode(static.q[:bs], static.k[:bs], static.v[:bs], layer, fb,
                                      return_lse=True)  # fmt: skip

    load([0, 1, 2])
    backend.init_forward_metadata_capture_cuda_graph(
        bs, bs, static.rows[:bs], static.lens[:bs], ForwardMode.DECODE
    )
    ptrs = (backend.forward_metadata.req_pool_indices.data_ptr(),
            backend.forward_metadata.mid_o.data_ptr())  # fmt: skip
    if HAS_CUDA:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = step()
    for order in ([0, 1, 2], [2, 0, 1]):
        load(order)
        backend.init_forward_metadata_replay_cuda_graph(
            bs, static.rows[:bs], static.lens[:bs], int(static.lens[:bs].sum()), ForwardMode.DECODE
        )
        md = backend.forward_metadata
        assert (md.req_pool_indices.data_ptr(), md.mid_o.data_ptr()) == ptrs
        if HAS_CUDA:
            graph.replay()
            torch.cuda.synchronize()
        else:
            out, lse = step()
        torch.testing.assert_close(out[:3].cpu().double(), ref_out[order], **F32_TOL)
        torch.testing.assert_close(lse[:3].cpu().double(), ref_lse[order], **F32_TOL)
        assert torch.isfinite(out[3]).all() and torch.isfinite(lse[3]).all()
    with pytest.raises(NotImplementedError):
        backend.init_forward_metadata_replay_cuda_graph(
            bs, static.rows[:bs], static.lens[:bs], 0, ForwardMode.EXTEND
        )
    with pytest.raises(ValueError):
        backend.init_forward_metadata_replay_cuda_graph(
            max_bs + 1, static.rows, static.lens, 0, ForwardMode.DECODE
        )


def test_hybrid_dispatches_by_forward_mode() -> None:
    """Prefill on torch_native, decode on triton: each call reaches its mode's backend."""
    calls: list[str] = []

    class Spy:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, attr: str):
            return lambda *a, **k: calls.append(f"{self.name}.{attr}")

    hybrid = HybridAttnBackend(Spy("prefill"), Spy("decode"))
    ext, dec = (SimpleNamespace(forward_mode=m) for m in (ForwardMode.EXTEND, ForwardMode.DECODE))
    hybrid.init_forward_metadata(ext)
    hybrid.forward(None, None, None, None, ext)
    hybrid.init_forward_metadata(dec)
    hybrid.forward(None, None, None, None, dec)
    hybrid.init_cuda_graph_state(8, 8)
    hybrid.init_forward_metadata_replay_cuda_graph(1, None, None, 1, ForwardMode.DECODE)
    assert calls == ["prefill.init_forward_metadata", "prefill.forward_extend",
                     "decode.init_forward_metadata", "decode.forward_decode",
                     "decode.init_cuda_graph_state",
                     "decode.init_forward_metadata_replay_cuda_graph"]  # fmt: skip


def test_backend_choice(monkeypatch, caplog) -> None:
    case = make_case(1, hq=4, hkv=2, d=16, prefix_lens=[0], extend_lens=[3])
    runner = triton_runner(case)
    assert isinstance(create_attention_backend("triton", runner), TritonAttnBackend)
    if not HAS_CUDA:  # without the opt-in, CPU keeps the reference backend (with a warning)
        monkeypatch.delenv("SGLANG_TRITON_INTERPRET_OK")
        assert isinstance(create_attention_backend("triton", runner), TorchNativeAttnBackend)
        assert "using torch_native" in caplog.text
    fallback = create_attention_backend("flashinfer", runner)  # not built: warns, falls back
    assert isinstance(fallback, TritonAttnBackend if HAS_CUDA else TorchNativeAttnBackend)


# ------------------------------------------------------------------ part 2: engine level
STEPS = 4


def rand_prompts(n: int, seed: int, lo: int = 4, hi: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def engine(path: str, **kwargs) -> SRTRunner:
    """The engine on the triton backend (on DEV), small enough for the interpreter."""
    kwargs.setdefault("attention_backend", "triton")
    return SRTRunner(path, device=DEV.type, max_total_tokens=1024, max_running_requests=8,
                     triton_attention_num_kv_splits=2, **kwargs)  # fmt: skip


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma2"])
def tiny(request):
    return request.param, make_tiny_model(request.param, seed=5, max_position_embeddings=256)


LOGPROB_TOL = 1e-3 if HAS_CUDA else 1e-4


def test_greedy_tokens_and_logprobs_match_torch_native(tiny) -> None:
    arch, path = tiny
    prompts = rand_prompts(3, seed=7)
    srt = engine(path)
    assert isinstance(srt.model_runner.attn_backend, TritonAttnBackend)
    outs = srt.generate(prompts, STEPS, return_logprob=True)
    refs = SRTRunner(path).generate(prompts, STEPS, return_logprob=True)
    assert_greedy_matches(outs, refs, f"{arch} triton", tol=LOGPROB_TOL)
    # A prefix-cache hit: the extend kernel reads the cached prefix from the pool.
    hit = srt.generate([prompts[0] + [9, 10]], STEPS, return_logprob=True)
    assert hit[0].cached_tokens > 0
    ref_hit = SRTRunner(path).generate([prompts[0] + [9, 10]], STEPS, return_logprob=True)
    assert_greedy_matches(hit, ref_hit, f"{arch} triton prefix hit", tol=LOGPROB_TOL)


def test_separate_prefill_and_decode_backends(tiny) -> None:
    arch, path = tiny
    prompts = rand_prompts(2, seed=8)
    srt = engine(path, prefill_attention_backend="torch_native", decode_attention_backend="triton")
    backend = srt.model_runner.attn_backend
    assert isinstance(backend, HybridAttnBackend)
    assert isinstance(backend.prefill_backend, TorchNativeAttnBackend)
    assert isinstance(backend.decode_backend, TritonAttnBackend)
    outs = srt.generate(prompts, STEPS, return_logprob=True)
    refs = SRTRunner(path).generate(prompts, STEPS, return_logprob=True)
    assert_greedy_matches(outs, refs, f"{arch} hybrid", tol=LOGPROB_TOL)


def assert_ranked_close(pos_a, val_a, pos_b, val_b, tol: float, label: str) -> None:
    """Same top-k up to the order of (near-)ties: scores rank by rank, and any position only one
    side lists scores within tol of the last one listed."""
    assert len(pos_a) == len(pos_b), f"{label}: lengths"
    for x, y in zip(val_a, val_b):
        assert abs(x - y) < tol, f"{label}: scores {val_a} vs {val_b}"
    a, b = dict(zip(pos_a, val_a)), dict(zip(pos_b, val_b))
    for p in a.keys() & b.keys():
        assert abs(a[p] - b[p]) < tol, f"{label}: position {p}"
    for p, s in [(p, a[p]) for p in a.keys() - b.keys()] + [(p, b[p]) for p in b.keys() - a.keys()]:
        assert abs(s - min(val_a)) < tol, f"{label}: position {p} listed on one side only"


def test_attention_tokens_match_torch_native(tiny) -> None:
    """Records from the fused capture kernel (triton) equal the torch capture path's."""
    arch, path = tiny
    prompts = rand_prompts(3, seed=9)
    options = [
        AttentionRequest(top_k=5, layers=(2,)),
        AttentionRequest(top_k=6, layers=(0, 1, 2), exclude_sink=1),
        AttentionRequest(top_k=3, layers=(0, 2), aggregation="none"),
    ]
    cap = dict(return_attention_tokens=True, attention_capture_layers="all",
               attention_tokens_top_k=8)  # fmt: skip
    runners = (engine(path, **cap), SRTRunner(path, **cap))
    assert runners[0].model_runner.attention_capture.use_kernel
    assert not runners[1].model_runner.attention_capture.use_kernel
    results = []
    for srt in runners:
        reqs = [srt.make_req(p, STEPS, attention=o, temperature=0.0, ignore_eos=True)
                for p, o in zip(prompts, options)]  # fmt: skip
        for req in reqs:
            srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
        results.append(reqs)
    tol = 1e-4 if HAS_CUDA else 1e-5
    for i, (tri, ref) in enumerate(zip(*results)):
        assert tri.output_ids == ref.output_ids, f"{arch} request {i}: tokens"
        assert len(tri.attention_records) == len(ref.attention_records) == STEPS
        for t, (a, b) in enumerate(zip(tri.attention_records, ref.attention_records)):
            label = f"{arch} request {i} token {t}"
            assert abs(a.excluded_mass - b.excluded_mass) < tol, label
            assert_ranked_close(a.positions, a.scores, b.positions, b.scores, tol, label)
            assert (a.layers is None) == (b.layers is None)
            for layer in b.layers or {}:
                (pa, va, xa), (pb, vb, xb) = a.layers[layer], b.layers[layer]
                assert abs(xa - xb) < tol
                assert_ranked_close(pa, va, pb, vb, tol, f"{label} layer {layer}")


def test_fp8_kv_cache_matches_torch_native() -> None:
    """A float8 pool (--kv-cache-dtype fp8_e4m3, scales other than 1): the kernels read the
    float8 view with the layer's scales folded in, the fused capture kernel too; tokens, logprobs
    and records equal torch_native's."""
    kv, k_scale, v_scale = "fp8_e4m3", 0.5, 2.0
    path = make_tiny_model("llama", seed=5, max_position_embeddings=256)
    prompts = rand_prompts(2, seed=10)
    opt = AttentionRequest(top_k=5, layers=(0, 1, 2))
    kw = dict(kv_cache_dtype=kv, return_attention_tokens=True, attention_capture_layers="all")
    results = []
    for srt in (engine(path, **kw), SRTRunner(path, **kw)):
        for module in srt.model_runner.model.modules():
            if isinstance(module, RadixAttention):
                module.k_scale, module.v_scale = k_scale, v_scale
        reqs = [srt.make_req(p, STEPS, return_logprob=True, attention=opt, temperature=0.0,
                             ignore_eos=True) for p in prompts]  # fmt: skip
        for req in reqs:
            srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
        results.append(reqs)
    tol = 1e-4 if HAS_CUDA else 1e-5
    for i, (tri, ref) in enumerate(zip(*results)):
        assert tri.output_ids == ref.output_ids, f"{kv} request {i}: tokens"
        lp_tri = [lp for lp, _ in tri.output_token_logprobs]
        lp_ref = [lp for lp, _ in ref.output_token_logprobs]
        assert lp_tri == pytest.approx(lp_ref, abs=LOGPROB_TOL), f"{kv} request {i}: logprobs"
        for t, (a, b) in enumerate(zip(tri.attention_records, ref.attention_records)):
            assert_ranked_close(a.positions, a.scores, b.positions, b.scores, tol,
                                f"{kv} request {i} token {t}")  # fmt: skip


def test_static_capture_kernel_path_matches_torch_native() -> None:
    """Decode steps through the graph runner's static path (no graphs on CPU: the same code
    a graph records) run the fused kernel over the shape's width, per-layer lists included, and
    give torch_native's records."""
    from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner

    path = make_tiny_model("llama", seed=5, max_position_embeddings=256)
    options = [AttentionRequest(top_k=4, layers=(2,)),
               AttentionRequest(top_k=3, layers=(0, 2), aggregation="none", exclude_sink=1)]  # fmt: skip
    cap = dict(return_attention_tokens=True, attention_capture_layers="all",
               attention_tokens_top_k=8, cuda_graph_max_bs=2)  # fmt: skip
    runners = (engine(path, **cap), SRTRunner(path, **cap))
    mr = runners[0].model_runner
    if mr.cuda_graph_runner is None:  # CPU: the static path without graphs
        mr.cuda_graph_runner = CudaGraphRunner(mr, use_graphs=False)
    results = []
    for srt in runners:
        reqs = [srt.make_req(p, STEPS, attention=o, temperature=0.0, ignore_eos=True)
                for p, o in zip(rand_prompts(2, seed=11), options)]  # fmt: skip
        for req in reqs:
            srt.scheduler.add_request(req)
        srt.scheduler.run_until_idle()
        results.append(reqs)
    shape = runners[0].model_runner.attention_capture.graph_shape
    assert shape is not None and shape.per_layer and shape.layers == (0, 2)
    tol = 1e-4 if HAS_CUDA else 1e-5
    for i, (tri, ref) in enumerate(zip(*results)):
        assert tri.output_ids == ref.output_ids, f"request {i}: tokens"
        for t, (a, b) in enumerate(zip(tri.attention_records, ref.attention_records, strict=True)):
            label = f"request {i} token {t}"
            assert abs(a.excluded_mass - b.excluded_mass) < tol, label
            assert_ranked_close(a.positions, a.scores, b.positions, b.scores, tol, label)
            for layer in b.layers or {}:
                (pa, va, xa), (pb, vb, xb) = a.layers[layer], b.layers[layer]
                assert abs(xa - xb) < tol, label
                assert_ranked_close(pa, va, pb, vb, tol, f"{label} layer {layer}")


@pytest.mark.skipif(not HAS_CUDA, reason="sgl_kernel routes to the Triton kernels on CUDA only")
def test_norm_and_activation_ops_run_the_triton_kernels_on_cuda() -> None:
    """The model's RMSNorm / SiLU-and-mul (sgl_kernel's package ops) are norm_act's kernels on a
    GPU: bitwise their outputs, within one bf16 unit of the torch references."""
    import sgl_kernel
    from sgl_kernel import norm_act, ref

    gen = torch.Generator().manual_seed(0)
    x, res = (torch.randn(7, 576, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(576, generator=gen)).to(DEV, torch.bfloat16)
    assert torch.equal(sgl_kernel.rmsnorm(x, w, 1e-6), norm_act.rmsnorm(x, w, 1e-6))
    for a, b in zip(sgl_kernel.fused_add_rmsnorm(x, res, w, 1e-6),
                    norm_act.fused_add_rmsnorm(x, res, w, 1e-6)):  # fmt: skip
        assert torch.equal(a, b)
    gate_up = torch.randn(3, 2 * 576, generator=gen).to(DEV, torch.bfloat16)
    assert torch.equal(sgl_kernel.silu_and_mul(gate_up), norm_act.silu_and_mul(gate_up))
    tol = dict(atol=1.6e-2, rtol=8e-3)
    torch.testing.assert_close(sgl_kernel.rmsnorm(x, w, 1e-6), ref.rmsnorm(x, w, 1e-6), **tol)
