"""torch_native attention backend against a dense per-request reference.

Builds real ReqToTokenPool / MHATokenToKVPool objects, places every request's KV at random,
non-contiguous slots (random single slots or random whole pages), pre-writes cached prefixes into
the pool, then runs `TorchNativeAttnBackend` on extend and decode batches. The reference is plain
float64 softmax attention looped over requests, on exactly the K/V the pool holds (cast to the
query dtype, as the backend reads them); it checks the output, the per-head log-sum-exp
(`return_lse=True`, the attention-capture contract), the pool writes at `out_cache_loc`, GQA/MHA/MQA
head mapping, sliding windows and mixed dtypes. `sdpa_with_lse` alone: test_sdpa_with_lse.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import (
    ForwardBatch,
    ForwardMode,
    ModelWorkerBatch,
)

HEADS = [(8, 2), (4, 4), (4, 1)]  # (q heads, kv heads): GQA, MHA, MQA
HEADS_IDS = ["gqa8-2", "mha4-4", "mqa4-1"]
F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
MAX_CONTEXT = 64
NUM_ROWS = 8


@dataclass
class Req:
    row: int  # ReqToTokenPool row
    prefix_len: int
    extend_len: int
    slots: torch.Tensor  # [seq_len] KV slot of each position
    k: list[torch.Tensor]  # per layer [seq_len, hkv, d]: what the pool holds after the forward
    v: list[torch.Tensor]

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.extend_len


@dataclass
class Case:
    backend: TorchNativeAttnBackend
    req_pool: ReqToTokenPool
    kv_pool: MHATokenToKVPool
    fb: ForwardBatch
    reqs: list[Req]
    q: list[torch.Tensor]  # per layer [num_tokens, hq * d]
    k: list[torch.Tensor]  # per layer [num_tokens, hkv * d]: new tokens' K as the model passes it
    v: list[torch.Tensor]
    hq: int
    hkv: int
    d: int


def make_case(
    seed: int,
    *,
    hq: int,
    hkv: int,
    d: int,
    prefix_lens: list[int],
    extend_lens: list[int],
    mode: ForwardMode = ForwardMode.EXTEND,
    q_dtype: torch.dtype = torch.float32,
    pool_dtype: torch.dtype = torch.float32,
    page_size: int = 1,
    num_layers: int = 1,
) -> Case:
    """A batch whose prefixes are already in the pool; new K/V are returned, not yet written."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
    pages_per_req = [-(-s // page_size) for s in seq_lens]
    num_pages = 2 * sum(pages_per_req) + 3  # spare pages so the layout has holes
    req_pool = ReqToTokenPool(NUM_ROWS, MAX_CONTEXT, "cpu")
    kv_pool = MHATokenToKVPool(
        num_pages * page_size, page_size, pool_dtype, hkv, d, num_layers, "cpu"
    )
    # The pool is allocated uninitialized; zeroed here so whole-pool comparisons see only writes.
    for buf in kv_pool.k_buffer + kv_pool.v_buffer:
        buf.zero_()
    runner = SimpleNamespace(device="cpu", dtype=q_dtype, req_to_token_pool=req_pool)
    backend = TorchNativeAttnBackend(runner)

    # Random rows and random pages (page 0 is the pool's padding page, never handed out).
    rows = torch.randperm(NUM_ROWS, generator=gen)[: len(seq_lens)].tolist()
    page_order = (torch.randperm(num_pages, generator=gen) + 1).tolist()
    reqs: list[Req] = []
    qs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    ks: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    vs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    out_locs: list[torch.Tensor] = []
    for row, pre, ext, npages in zip(rows, prefix_lens, extend_lens, pages_per_req, strict=True):
        pages = torch.tensor([page_order.pop() for _ in range(npages)], dtype=torch.int64)
        slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)[: pre + ext]
        req_pool.req_to_token[row, : pre + ext] = slots
        req = Req(row, pre, ext, slots, [], [])
        for layer in range(num_layers):
            k_full = torch.randn(pre + ext, hkv, d, generator=gen)
            v_full = torch.randn(pre + ext, hkv, d, generator=gen)
            # Prefix: already cached in the pool.
            kv_pool.set_kv_buffer(layer, slots[:pre], k_full[:pre], v_full[:pre])
            # New tokens: what the model hands the layer (in the activation dtype).
            k_new, v_new = k_full[pre:].to(q_dtype), v_full[pre:].to(q_dtype)
            ks[layer].append(k_new.reshape(ext, hkv * d))
            vs[layer].append(v_new.reshape(ext, hkv * d))
            qs[layer].append(torch.randn(ext, hq * d, generator=gen).to(q_dtype))
            req.k.append(torch.cat([k_full[:pre].to(pool_dtype), k_new.to(pool_dtype)]))
            req.v.append(torch.cat([v_full[:pre].to(pool_dtype), v_new.to(pool_dtype)]))
        out_locs.append(slots[pre:])
        reqs.append(req)

    num_tokens = sum(extend_lens)
    batch = ModelWorkerBatch(
        forward_mode=mode,
        input_ids=torch.zeros(num_tokens, dtype=torch.int64),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64),
        seq_lens=seq_lens,
        out_cache_loc=torch.cat(out_locs),
        extend_prefix_lens=list(prefix_lens),
        extend_seq_lens=list(extend_lens),
    )
    fb = ForwardBatch.init_new(
        batch,
        device=torch.device("cpu"),
        req_to_token_pool=req_pool,
        token_to_kv_pool=kv_pool,
        attn_backend=backend,
    )
    return Case(
        backend=backend,
        req_pool=req_pool,
        kv_pool=kv_pool,
        fb=fb,
        reqs=reqs,
        q=[torch.cat(x) for x in qs],
        k=[torch.cat(x) for x in ks],
        v=[torch.cat(x) for x in vs],
        hq=hq,
        hkv=hkv,
        d=d,
    )


def reference(
    case: Case, layer: int, window: int = -1, logit_cap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention per request in float64: ([num_tokens, hq*d], lse [num_tokens, hq]);
    logit_cap > 0 soft-caps the scaled scores (cap * tanh(s / cap))."""
    hq, hkv, d = case.hq, case.hkv, case.d
    q_dtype = case.q[layer].dtype
    group = hq // hkv
    scale = d**-0.5
    outs, lses = [], []
    start = 0
    for r in case.reqs:
        q = case.q[layer][start : start + r.extend_len].view(r.extend_len, hq, d).double()
        start += r.extend_len
        # The backend reads the pool cast to the query dtype; query head h uses kv head h // group.
        k = r.k[layer].to(q_dtype).double().repeat_interleave(group, dim=1)  # [S, hq, d]
        v = r.v[layer].to(q_dtype).double().repeat_interleave(group, dim=1)
        out = torch.empty(r.extend_len, hq, d, dtype=torch.float64)
        lse = torch.empty(r.extend_len, hq, dtype=torch.float64)
        for i in range(r.extend_len):
            q_pos = r.prefix_len + i
            j = torch.arange(r.seq_len)
            allowed = j <= q_pos
            if window > 0:
                allowed &= (q_pos - j) < window
            for h in range(hq):
                s = (k[:, h] @ q[i, h]) * scale
                if logit_cap > 0:
                    s = torch.tanh(s / logit_cap) * logit_cap
                s = s.masked_fill(~allowed, float("-inf"))
                lse[i, h] = torch.logsumexp(s, dim=0)
                out[i, h] = torch.softmax(s, dim=0) @ v[:, h]
        outs.append(out.reshape(r.extend_len, hq * d))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def make_layer(
    case: Case, layer_id: int = 0, window: int = -1, logit_cap: float = 0.0
) -> RadixAttention:
    return RadixAttention(
        case.hq, case.d, case.d**-0.5, case.hkv, layer_id, logit_cap, sliding_window_size=window
    )


def run(
    case: Case, layer_id: int = 0, window: int = -1, save_kv_cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    layer = make_layer(case, layer_id, window)
    out, lse = case.backend.forward(
        case.q[layer_id],
        case.k[layer_id],
        case.v[layer_id],
        layer,
        case.fb,
        save_kv_cache=save_kv_cache,
        return_lse=True,
    )
    return out, lse


def assert_matches(
    case: Case,
    out: torch.Tensor,
    lse: torch.Tensor,
    layer: int = 0,
    window: int = -1,
    logit_cap: float = 0.0,
    **tol: Any,
) -> None:
    tol = tol or F32_TOL
    ref_out, ref_lse = reference(case, layer, window, logit_cap)
    num_tokens = case.fb.input_ids.shape[0]
    assert out.shape == (num_tokens, case.hq * case.d)
    assert out.dtype == case.q[layer].dtype
    assert lse.shape == (num_tokens, case.hq)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)


def assert_pool_holds_batch(case: Case, layer: int = 0) -> None:
    """Every request's positions (prefix and new) sit at their slots; unused slots stay zero."""
    # Compared in float32 (exact for every pool dtype; float8 has no torch.equal on CPU).
    kb = case.kv_pool.get_key_buffer(layer).float()
    vb = case.kv_pool.get_value_buffer(layer).float()
    used = torch.zeros(kb.shape[0], dtype=torch.bool)
    for r in case.reqs:
        assert torch.equal(kb[r.slots], r.k[layer].float())
        assert torch.equal(vb[r.slots], r.v[layer].float())
        used[r.slots] = True
    assert not kb[~used].any() and not vb[~used].any()


# ---- extend ----------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 32])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEADS_IDS)
@pytest.mark.parametrize("page_size", [1, 4])
def test_extend_with_cached_prefixes(hq: int, hkv: int, head_dim: int, page_size: int) -> None:
    case = make_case(
        seed=hq * 100 + hkv * 10 + head_dim + page_size,
        hq=hq,
        hkv=hkv,
        d=head_dim,
        prefix_lens=[0, 5, 17, 3, 9],
        extend_lens=[7, 1, 4, 12, 2],
        page_size=page_size,
    )
    out, lse = run(case)
    assert_matches(case, out, lse)
    # out_cache_loc got exactly the new tokens' K/V; prefixes and free slots are untouched.
    kb, vb = case.kv_pool.get_key_buffer(0), case.kv_pool.get_value_buffer(0)
    loc = case.fb.out_cache_loc
    assert torch.equal(kb[loc], case.k[0].view(-1, hkv, head_dim))
    assert torch.equal(vb[loc], case.v[0].view(-1, hkv, head_dim))
    assert_pool_holds_batch(case)


def test_extend_single_request_no_prefix() -> None:
    case = make_case(7, hq=4, hkv=2, d=32, prefix_lens=[0], extend_lens=[13])
    out, lse = run(case)
    assert_matches(case, out, lse)


def test_lse_is_logsumexp_of_scaled_scores() -> None:
    """exp(q.k * scale - lse) over the allowed keys is the true softmax: it sums to 1 per head."""
    case = make_case(11, hq=8, hkv=2, d=32, prefix_lens=[6, 0], extend_lens=[3, 5])
    _, lse = run(case)
    start = 0
    for r in case.reqs:
        q = case.q[0][start : start + r.extend_len].view(r.extend_len, 8, 32)
        k = r.k[0].repeat_interleave(4, dim=1)
        for i in range(r.extend_len):
            q_pos = r.prefix_len + i
            s = torch.einsum("hd,jhd->hj", q[i], k[: q_pos + 1]) * 32**-0.5
            probs = torch.exp(s - lse[start + i][:, None])
            torch.testing.assert_close(probs.sum(-1), torch.ones(8), atol=1e-5, rtol=0)
        start += r.extend_len


# ---- decode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 32])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEADS_IDS)
def test_decode_at_random_slots(hq: int, hkv: int, head_dim: int) -> None:
    seq_lens = [1, 9, 23, 4, 40]
    case = make_case(
        seed=hq + hkv + head_dim,
        hq=hq,
        hkv=hkv,
        d=head_dim,
        prefix_lens=[s - 1 for s in seq_lens],
        extend_lens=[1] * len(seq_lens),
        mode=ForwardMode.DECODE,
    )
    assert case.fb.forward_mode.is_decode()
    out, lse = run(case)
    assert out.shape == (len(seq_lens), hq * head_dim)
    assert_matches(case, out, lse)
    assert_pool_holds_batch(case)


def test_decode_paged_layout() -> None:
    seq_lens = [5, 8, 13]
    case = make_case(
        3,
        hq=4,
        hkv=1,
        d=64,
        prefix_lens=[s - 1 for s in seq_lens],
        extend_lens=[1, 1, 1],
        mode=ForwardMode.DECODE,
        page_size=4,
    )
    out, lse = run(case)
    assert_matches(case, out, lse)


# ---- sliding window --------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 4, 10])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEADS_IDS)
def test_sliding_window_extend(hq: int, hkv: int, window: int) -> None:
    case = make_case(
        window * 7 + hq,
        hq=hq,
        hkv=hkv,
        d=32,
        prefix_lens=[0, 6, 15],
        extend_lens=[9, 2, 5],
    )
    out, lse = run(case, window=window)
    assert_matches(case, out, lse, window=window)
    # The window matters here: full attention gives a different answer.
    ref_full, _ = reference(case, 0, -1)
    assert not torch.allclose(out.double(), ref_full, atol=1e-3)


@pytest.mark.parametrize("window", [1, 4])
def test_sliding_window_decode(window: int) -> None:
    seq_lens = [2, 7, 30]
    case = make_case(
        window,
        hq=8,
        hkv=2,
        d=64,
        prefix_lens=[s - 1 for s in seq_lens],
        extend_lens=[1, 1, 1],
        mode=ForwardMode.DECODE,
    )
    out, lse = run(case, window=window)
    assert_matches(case, out, lse, window=window)


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE], ids=["extend", "decode"])
@pytest.mark.parametrize("window", [-1, 5])
def test_logit_softcap(mode: ForwardMode, window: int) -> None:
    """Gemma 2's soft-capped scores: output and LSE are those of cap * tanh(s / cap), fresh
    prompts (which skip the pool otherwise) and cached prefixes alike."""
    prefix, ext = ([0, 0, 6], [9, 3, 4]) if mode.is_extend() else ([8, 19, 2], [1, 1, 1])
    case = make_case(17, hq=4, hkv=2, d=16, prefix_lens=prefix, extend_lens=ext, mode=mode)
    layer = make_layer(case, 0, window, logit_cap=1.5)
    out, lse = case.backend.forward(case.q[0], case.k[0], case.v[0], layer, case.fb,
                                    return_lse=True)  # fmt: skip
    assert_matches(case, out, lse, window=window, logit_cap=1.5)
    uncapped = reference(case, 0, window)[1]
    assert (lse.double() - uncapped).abs().max() > 0.1, "the cap should change the scores"


def test_window_longer_than_context_is_full_attention() -> None:
    case = make_case(5, hq=4, hkv=2, d=32, prefix_lens=[3, 0], extend_lens=[4, 6])
    out_w, lse_w = run(case, window=1000)
    out, lse = run(case)
    torch.testing.assert_close(out_w, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_w, lse, atol=1e-6, rtol=1e-6)


def test_layers_share_metadata_with_different_windows() -> None:
    """One init_forward_metadata serves every layer; per-layer windows and buffers stay separate."""
    case = make_case(
        21, hq=8, hkv=2, d=32, prefix_lens=[4, 11, 0], extend_lens=[5, 1, 8], num_layers=3
    )
    windows = [3, -1, 6]
    results = [run(case, layer_id=i, window=w) for i, w in enumerate(windows)]
    for i, w in enumerate(windows):
        assert_matches(case, *results[i], layer=i, window=w)
        assert_pool_holds_batch(case, layer=i)


# ---- dtypes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q_dtype,pool_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
    ids=["bf16-q-bf16-pool", "bf16-q-f32-pool", "f32-q-bf16-pool"],
)
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE], ids=["extend", "decode"])
def test_mixed_dtypes(q_dtype: torch.dtype, pool_dtype: torch.dtype, mode: ForwardMode) -> None:
    if mode.is_decode():
        seq_lens = [3, 17, 8]
        prefix_lens, extend_lens = [s - 1 for s in seq_lens], [1, 1, 1]
    else:
        prefix_lens, extend_lens = [0, 7, 12], [6, 1, 3]
    case = make_case(
        13,
        hq=8,
        hkv=2,
        d=64,
        prefix_lens=prefix_lens,
        extend_lens=extend_lens,
        mode=mode,
        q_dtype=q_dtype,
        pool_dtype=pool_dtype,
    )
    out, lse = run(case)
    tol = F32_TOL if q_dtype == torch.float32 else BF16_TOL
    assert_matches(case, out, lse, **tol)
    assert case.kv_pool.get_key_buffer(0).dtype == pool_dtype
    assert_pool_holds_batch(case)


def test_float8_pool() -> None:
    """A float8 pool (stored as bytes) is read back through its float8 view and upcast."""
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is None:
        pytest.skip("no float8 in this torch")
    case = make_case(19, hq=8, hkv=2, d=32, prefix_lens=[5, 0], extend_lens=[2, 6], pool_dtype=f8)
    out, lse = run(case)
    assert case.kv_pool.get_key_buffer(0).dtype == f8
    assert_matches(case, out, lse)  # the reference reads the same float8-rounded K/V
    assert_pool_holds_batch(case)


def test_bf16_sliding_window() -> None:
    case = make_case(
        17,
        hq=4,
        hkv=1,
        d=32,
        prefix_lens=[2, 9],
        extend_lens=[8, 3],
        q_dtype=torch.bfloat16,
        pool_dtype=torch.bfloat16,
    )
    out, lse = run(case, window=3)
    assert_matches(case, out, lse, window=3, **BF16_TOL)


# ---- KV writes and API -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE], ids=["extend", "decode"])
def test_save_kv_cache_false_leaves_pool_untouched(mode: ForwardMode) -> None:
    """With save_kv_cache=False the caller already wrote K/V; the backend only reads the pool."""
    if mode.is_decode():
        prefix_lens, extend_lens = [4, 10], [1, 1]
    else:
        prefix_lens, extend_lens = [4, 0], [3, 6]
    case = make_case(
        23, hq=8, hkv=2, d=32, prefix_lens=prefix_lens, extend_lens=extend_lens, mode=mode
    )
    loc = case.fb.out_cache_loc
    case.kv_pool.set_kv_buffer(0, loc, case.k[0], case.v[0])
    k_before = case.kv_pool.get_key_buffer(0).clone()
    v_before = case.kv_pool.get_value_buffer(0).clone()
    real_k, real_v = case.k[0], case.v[0]
    # Pass different K/V: if the backend wrote them, the pool and the output would both change.
    case.k[0], case.v[0] = real_k + 5.0, real_v - 5.0
    out, lse = run(case, save_kv_cache=False)
    assert torch.equal(case.kv_pool.get_key_buffer(0), k_before)
    assert torch.equal(case.kv_pool.get_value_buffer(0), v_before)
    assert_matches(case, out, lse)  # the reference uses the K/V in the pool


def test_save_kv_cache_false_with_empty_slots_reads_the_pool() -> None:
    """Nothing written at out_cache_loc: the new tokens' keys are the zeros that are there."""
    case = make_case(29, hq=4, hkv=4, d=32, prefix_lens=[5], extend_lens=[3])
    out, lse = run(case, save_kv_cache=False)
    loc = case.fb.out_cache_loc
    assert not case.kv_pool.get_key_buffer(0)[loc].any()
    r = case.reqs[0]
    r.k[0][r.prefix_len :] = 0
    r.v[0][r.prefix_len :] = 0
    assert_matches(case, out, lse)


def test_return_lse_false_returns_only_output() -> None:
    case = make_case(31, hq=8, hkv=2, d=64, prefix_lens=[3, 8], extend_lens=[5, 2])
    layer = make_layer(case)
    out = case.backend.forward(case.q[0], case.k[0], case.v[0], layer, case.fb)
    assert isinstance(out, torch.Tensor)
    ref_out, _ = reference(case, 0)
    torch.testing.assert_close(out.double(), ref_out, **F32_TOL)


def test_split_qkv_views_like_the_models() -> None:
    """Models pass q/k as non-contiguous column slices of one fused qkv projection."""
    case = make_case(37, hq=8, hkv=2, d=32, prefix_lens=[2, 6], extend_lens=[4, 3])
    qkv = torch.cat([case.q[0], case.k[0], case.v[0]], dim=-1)
    q, k, v = qkv.split([8 * 32, 2 * 32, 2 * 32], dim=-1)
    assert not q.is_contiguous() and not k.is_contiguous()
    out, lse = case.backend.forward(
        q, k, v.contiguous(), make_layer(case), case.fb, return_lse=True
    )
    assert_matches(case, out, lse)
    assert_pool_holds_batch(case)


def test_radix_attention_hands_lse_to_capture() -> None:
    """RadixAttention asks for LSE only for the layers the capture object wants."""

    class Capture:
        def __init__(self) -> None:
            self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def wants_layer(self, layer_id: int) -> bool:
            return layer_id == 1

        def record(
            self, layer: RadixAttention, q: torch.Tensor, lse: torch.Tensor, fb: Any
        ) -> None:
            self.records.append((layer.layer_id, q, lse))

    case = make_case(41, hq=4, hkv=2, d=32, prefix_lens=[3, 0], extend_lens=[2, 4], num_layers=2)
    capture = Capture()
    case.fb.attention_capture = capture
    outs = []
    for layer_id in range(2):
        layer = make_layer(case, layer_id)
        outs.append(layer(case.q[layer_id], case.k[layer_id], case.v[layer_id], case.fb))
    assert [r[0] for r in capture.records] == [1]
    _, q_rec, lse_rec = capture.records[0]
    assert q_rec is case.q[1]
    for layer_id in range(2):
        ref_out, ref_lse = reference(case, layer_id)
        assert isinstance(outs[layer_id], torch.Tensor)
        torch.testing.assert_close(outs[layer_id].double(), ref_out, **F32_TOL)
    torch.testing.assert_close(lse_rec.double(), reference(case, 1)[1], **F32_TOL)
