"""sgl_kernel's Triton kernels against float64 torch references and the capture code itself.

Decode and extend attention (output and per-head LSE) are checked against the dense float64
reference of test_torch_native_backend on real pools built by its `make_case` (random rows, random
single slots or pages, cached prefixes, GQA/MHA/MQA, sliding windows, float32/bfloat16/float16).
The fused capture kernel is checked against `AttentionCapture.record` + `_rank` run on the same
inputs (score rows, top-k, excluded mass, per-layer rows, masked rows, windows, accumulation over
layers). The KV store is checked against `set_kv_buffer`.

Runs on CUDA when present, else on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 is
set here before the kernels are imported when there is no GPU); skips when Triton is missing.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not HAS_CUDA:
    if os.environ.get("TRITON_INTERPRET", "1") in ("", "0"):
        pytest.skip("no CUDA device and TRITON_INTERPRET=0", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit runs

from sgl_kernel.attention_capture import NOT_RANKED, capture_rank, capture_scores  # noqa: E402
from sgl_kernel.decode_attention import decode_attention_fwd  # noqa: E402
from sgl_kernel.extend_attention import extend_attention_fwd  # noqa: E402
from sgl_kernel.kv_store import store_kv_cache  # noqa: E402
from test_torch_native_backend import (  # noqa: E402
    BF16_TOL,
    F32_TOL,
    MAX_CONTEXT,
    NUM_ROWS,
    make_case,
    make_layer,
    reference,
)

from sglang.srt.attention_capture.capture import AttentionCapture, CaptureSpec  # noqa: E402
from sglang.srt.attention_capture.config import AttentionRequest  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

# The interpreter (numpy >= 1.25) warns on every loop with loaded bounds; numpy >= 2.4 refuses
# them, so the interpreter venv pins numpy < 2.4 (see sgl-kernel/README.md).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
HEADS = [(8, 2), (4, 4), (4, 1)]
HEADS_IDS = ["gqa8-2", "mha4-4", "mqa4-1"]
TOL = {torch.float32: F32_TOL, torch.bfloat16: BF16_TOL, torch.float16: dict(atol=5e-3, rtol=5e-3)}


def dev(x: torch.Tensor) -> torch.Tensor:
    return x.to(DEV)


def write_new_kv(case, layer: int = 0) -> None:
    """The new tokens' K/V into the pool (the backend stores before it attends)."""
    case.kv_pool.set_kv_buffer(layer, case.fb.out_cache_loc, case.k[layer], case.v[layer])


def pool_args(case, layer: int = 0):
    fb = case.fb
    return (
        dev(case.kv_pool.get_key_buffer(layer)),
        dev(case.kv_pool.get_value_buffer(layer)),
        dev(case.req_pool.req_to_token),
        dev(fb.req_pool_indices),
        dev(fb.seq_lens),
    )


def check(case, out, lse, window: int = -1, layer: int = 0, logit_cap: float = 0.0) -> None:
    ref_out, ref_lse = reference(case, layer, window, logit_cap)
    tol = TOL[case.q[layer].dtype]
    assert out.dtype == case.q[layer].dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.cpu().double(), ref_out, **tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, **tol)


def decode_case(seed: int, seq_lens: list[int], **kw):
    n = len(seq_lens)
    return make_case(seed, prefix_lens=[s - 1 for s in seq_lens], extend_lens=[1] * n,
                     mode=ForwardMode.DECODE, **kw)  # fmt: skip


# ---- decode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEADS_IDS)
@pytest.mark.parametrize("page_size", [1, 4])
def test_decode_matches_reference(hq: int, hkv: int, page_size: int) -> None:
    case = decode_case(hq * 10 + hkv + page_size, [1, 9, 23, 4, 40], hq=hq, hkv=hkv, d=32,
                       page_size=page_size)  # fmt: skip
    write_new_kv(case)
    out, lse = decode_attention_fwd(dev(case.q[0]), *pool_args(case), 32**-0.5, num_kv_splits=4)
    check(case, out, lse)


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_decode_split_counts_including_empty_splits(splits: int) -> None:
    """More splits than keys leaves some splits empty; the merge must ignore them."""
    case = decode_case(splits, [2, 7, 33], hq=8, hkv=2, d=64)
    write_new_kv(case)
    out, lse = decode_attention_fwd(dev(case.q[0]), *pool_args(case), 64**-0.5,
                                    num_kv_splits=splits, block_n=16)  # fmt: skip
    check(case, out, lse)


@pytest.mark.parametrize("window", [1, 4, 10])
def test_decode_sliding_window(window: int) -> None:
    case = decode_case(window, [2, 7, 30], hq=8, hkv=2, d=32)
    write_new_kv(case)
    out, lse = decode_attention_fwd(dev(case.q[0]), *pool_args(case), 32**-0.5, num_kv_splits=3,
                                    sliding_window=window)  # fmt: skip
    check(case, out, lse, window=window)


@pytest.mark.parametrize(
    "q_dtype,pool_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
     (torch.bfloat16, torch.float32)],
    ids=["bf16", "fp16", "bf16-q-f32-pool"],
)  # fmt: skip
def test_decode_half_dtypes(q_dtype: torch.dtype, pool_dtype: torch.dtype) -> None:
    case = decode_case(5, [3, 17, 8, 50], hq=8, hkv=2, d=64, q_dtype=q_dtype,
                       pool_dtype=pool_dtype)  # fmt: skip
    write_new_kv(case)
    out, lse = decode_attention_fwd(dev(case.q[0]), *pool_args(case), 64**-0.5, num_kv_splits=4)
    check(case, out, lse)


def test_decode_preallocated_buffers_padding_row_and_head_dim_not_pow2() -> None:
    """CUDA-graph style call: every buffer passed in, a padded row of length 0 (output 0, LSE
    -inf, no NaN), head_dim 80 (padded to 128 inside the kernel)."""
    case = decode_case(9, [5, 12], hq=4, hkv=2, d=80)
    write_new_kv(case)
    bs, splits = 3, 4
    out = torch.full((bs, 4 * 80), float("nan"), device=DEV)
    lse = torch.full((bs, 4), float("nan"), device=DEV)
    mid_o = torch.empty(bs, 4, splits, 80, device=DEV)
    mid_lse = torch.empty(bs, 4, splits, device=DEV)
    k_buf, v_buf, r2t, pool_idx, seq_lens = pool_args(case)
    pool_idx = torch.cat([pool_idx, pool_idx[:1]])
    seq_lens = torch.cat([seq_lens, seq_lens.new_zeros(1)])
    q = torch.cat([dev(case.q[0]), torch.zeros(1, 4 * 80, device=DEV)])
    res = decode_attention_fwd(q, k_buf, v_buf, r2t, pool_idx, seq_lens, 80**-0.5,
                               num_kv_splits=splits, out=out, lse=lse, mid_o=mid_o,
                               mid_lse=mid_lse)  # fmt: skip
    assert res[0] is out and res[1] is lse
    check(case, out[:2], lse[:2])
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))


# ---- extend ----------------------------------------------------------------------------------
def run_extend(case, window: int = -1, layer: int = 0, **kw):
    fb = case.fb
    return extend_attention_fwd(
        dev(case.q[layer]), *pool_args(case, layer), dev(fb.extend_seq_lens),
        dev(fb.extend_start_loc), case.d**-0.5, max(fb.extend_seq_lens_cpu),
        sliding_window=window, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEADS_IDS)
@pytest.mark.parametrize("page_size", [1, 4])
def test_extend_with_cached_prefixes(hq: int, hkv: int, page_size: int) -> None:
    case = make_case(hq * 10 + hkv + page_size, hq=hq, hkv=hkv, d=32,
                     prefix_lens=[0, 5, 17, 3, 9], extend_lens=[7, 1, 4, 20, 2],
                     page_size=page_size)  # fmt: skip
    write_new_kv(case)
    out, lse = run_extend(case, block_rows=16, block_n=16)  # several tiles per request
    check(case, out, lse)


@pytest.mark.parametrize("window", [1, 4, 10])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1)], ids=["gqa8-2", "mqa4-1"])
def test_extend_sliding_window(hq: int, hkv: int, window: int) -> None:
    case = make_case(window * 7 + hq, hq=hq, hkv=hkv, d=32, prefix_lens=[0, 6, 15],
                     extend_lens=[9, 2, 21])  # fmt: skip
    write_new_kv(case)
    out, lse = run_extend(case, window, block_rows=16, block_n=16)
    check(case, out, lse, window=window)


@pytest.mark.parametrize(
    "q_dtype,pool_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
     (torch.float32, torch.bfloat16)],
    ids=["bf16", "fp16", "f32-q-bf16-pool"],
)  # fmt: skip
def test_extend_dtypes(q_dtype: torch.dtype, pool_dtype: torch.dtype) -> None:
    case = make_case(13, hq=8, hkv=2, d=64, prefix_lens=[0, 7, 12], extend_lens=[6, 1, 3],
                     q_dtype=q_dtype, pool_dtype=pool_dtype)  # fmt: skip
    write_new_kv(case)
    out, lse = run_extend(case)
    check(case, out, lse)


def test_extend_strided_q_and_group_of_eight() -> None:
    """q as a column slice of a fused qkv (models pass that); 8 query heads on one KV head."""
    case = make_case(37, hq=8, hkv=1, d=32, prefix_lens=[2, 6], extend_lens=[4, 3])
    write_new_kv(case)
    qkv = torch.cat([case.q[0], case.k[0], case.v[0]], dim=-1)
    q = dev(qkv)[:, : 8 * 32]
    assert not q.is_contiguous()
    fb = case.fb
    out, lse = extend_attention_fwd(q, *pool_args(case), dev(fb.extend_seq_lens),
                                    dev(fb.extend_start_loc), 32**-0.5, 4)  # fmt: skip
    check(case, out, lse)


# ---- KV store --------------------------------------------------------------------------------
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_store_kv_cache_matches_set_kv_buffer(pool_dtype: torch.dtype) -> None:
    case = make_case(3, hq=4, hkv=2, d=32, prefix_lens=[3, 0], extend_lens=[5, 4],
                     pool_dtype=pool_dtype)  # fmt: skip
    # Copies (on CPU `dev` returns the tensor itself), so the kernel's writes are compared with
    # set_kv_buffer's rather than with themselves.
    k_buf, v_buf = (dev(case.kv_pool.get_key_buffer(0).clone()),
                    dev(case.kv_pool.get_value_buffer(0).clone()))  # fmt: skip
    qkv = dev(torch.cat([case.q[0], case.k[0], case.v[0]], dim=-1))
    k, v = qkv[:, 4 * 32 : 6 * 32], qkv[:, 6 * 32 :]  # strided, as the models pass them
    store_kv_cache(k, v.view(-1, 2, 32), k_buf, v_buf, dev(case.fb.out_cache_loc))
    write_new_kv(case)
    # Triton's interpreter casts float32 to bfloat16 by truncation, torch (and the GPU) round to
    # nearest: there the written values may differ by one bfloat16 step, elsewhere they are equal.
    tol = dict(rtol=2**-7, atol=0) if pool_dtype == torch.bfloat16 and not HAS_CUDA else None
    for ours, ref in ((k_buf, case.kv_pool.get_key_buffer(0)),
                      (v_buf, case.kv_pool.get_value_buffer(0))):  # fmt: skip
        if tol:
            torch.testing.assert_close(ours.cpu(), ref, **tol)
        else:
            assert torch.equal(ours.cpu(), ref)


# ---- fused capture ---------------------------------------------------------------------------
def run_reference_capture(case, requests, batch_rows, num_layers, window=-1, logit_cap=0.0):
    """capture.py on the CPU: (score rows, per-layer probabilities, ranked result, q/lse used)."""
    cap = AttentionCapture(tuple(range(num_layers)), num_layers, NUM_ROWS, MAX_CONTEXT, 16,
                           case.hq, device="cpu")  # fmt: skip
    cap.begin(CaptureSpec(batch_rows, requests), case.fb)
    lses, layer_rows = [], []
    for layer_id in range(num_layers):
        layer = make_layer(case, layer_id, window, logit_cap)
        _, lse = case.backend.forward(case.q[layer_id], case.k[layer_id], case.v[layer_id], layer,
                                      case.fb, return_lse=True)  # fmt: skip
        lses.append(lse)
        before = cap.rows[: len(batch_rows), : cap.max_kv].clone()
        cap.record(layer, case.q[layer_id], lse, case.fb)
        w = cap.weights[:, layer_id : layer_id + 1]
        after = cap.rows[: len(batch_rows), : cap.max_kv]
        layer_rows.append(torch.where(w > 0, (after - before) / w.clamp_min(1e-30), 0.0))
    state = dict(q_index=cap.q_index, seq_lens=cap.seq_lens, weights=cap.weights,
                 exclude=cap.exclude, k=cap.k, max_kv=cap.max_kv)  # fmt: skip
    rows = cap.rows[: len(batch_rows), : cap.max_kv].clone()
    return rows, cap.finish(), lses, state


def run_kernel_capture(case, batch_rows, lses, state, num_layers, window=-1, pad_rows=0,
                       logit_cap=0.0):  # fmt: skip
    """The Triton path on a static layout: R = rows + pad_rows, masked padding rows."""
    num = len(batch_rows)
    r_total = num + pad_rows
    pad = [0] * pad_rows
    fb = case.fb
    rows_idx = torch.tensor(batch_rows + pad)
    row_mask = dev(torch.tensor([1] * num + pad, dtype=torch.int32))
    seq_lens = dev(fb.seq_lens[rows_idx])
    q_index = dev(torch.cat([state["q_index"], torch.zeros(pad_rows, dtype=torch.int64)]))
    weights = dev(torch.cat([state["weights"], torch.zeros(pad_rows, num_layers)]))
    # Garbage in the buffers: the first layer overwrites, padding rows are never ranked.
    rows = torch.full((r_total + 1, MAX_CONTEXT), 7.0, device=DEV)
    k_buf = [dev(case.kv_pool.get_key_buffer(i)) for i in range(num_layers)]
    req_to_token = dev(case.req_pool.req_to_token)
    pool_idx = dev(fb.req_pool_indices[rows_idx])
    layer_rows = []
    for layer_id in range(num_layers):
        lr = torch.full((r_total, MAX_CONTEXT), 5.0, device=DEV)
        capture_scores(dev(case.q[layer_id]), dev(lses[layer_id]), k_buf[layer_id], req_to_token,
                       pool_idx, seq_lens, q_index, row_mask, weights[:, layer_id], rows,
                       case.d**-0.5, case.hq, sliding_window=window, logit_cap=logit_cap,
                       accumulate=layer_id > 0, layer_rows=lr, block_n=16)  # fmt: skip
        layer_rows.append(lr)
    exclude = dev(torch.cat([state["exclude"], torch.zeros(pad_rows, dtype=torch.int64)]))
    ranked = capture_rank(rows, seq_lens, row_mask, exclude, state["k"])
    return rows, layer_rows, ranked


def assert_same_ranking(vals, idx, excl, ref_vals, ref_idx, ref_excl, ref_rows, tol) -> None:
    vals, idx, excl = vals.cpu(), idx.cpu(), excl.cpu()
    torch.testing.assert_close(vals, ref_vals, **tol)
    torch.testing.assert_close(excl, ref_excl, **tol)
    ranked = vals > NOT_RANKED
    assert torch.equal(ranked, ref_vals > NOT_RANKED)
    # Same positions up to ties: each returned position carries its returned score.
    picked = ref_rows.gather(1, idx.clamp_max(ref_rows.shape[1] - 1))
    torch.testing.assert_close(torch.where(ranked, picked, 0.0), torch.where(ranked, vals, 0.0),
                               **tol)  # fmt: skip
    # Where a score is clear of its neighbours, the position must be the same.
    gap_prev = ref_vals.diff(dim=1, prepend=ref_vals[:, :1] + 1).abs()
    gap_next = ref_vals.diff(dim=1, append=ref_vals[:, -1:] - 1).abs()
    distinct = ranked & gap_prev.gt(1e-4) & gap_next.gt(1e-4)
    assert torch.equal(torch.where(distinct, idx, 0), torch.where(distinct, ref_idx, 0))


CAPTURE_REQUESTS = [
    AttentionRequest(top_k=5, layers=(1,)),
    AttentionRequest(top_k=8, layers=(0, 1)),
    AttentionRequest(top_k=3, layers=(0,), exclude_sink=2),
    AttentionRequest(top_k=16, layers=(0, 1), exclude_sink=1),
]


@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEADS_IDS)
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE], ids=["extend", "decode"])
def test_capture_matches_capture_py(hq: int, hkv: int, mode: ForwardMode) -> None:
    if mode.is_extend():
        prefix, ext = [0, 5, 17, 30], [7, 3, 1, 12]
    else:
        prefix, ext = [9, 20, 3, 40], [1, 1, 1, 1]
    case = make_case(3 + hq, hq=hq, hkv=hkv, d=32, prefix_lens=prefix, extend_lens=ext,
                     mode=mode, num_layers=2, page_size=2)  # fmt: skip
    _check_capture(case, CAPTURE_REQUESTS, [0, 1, 2, 3], num_layers=2, pad_rows=2)


def _check_capture(case, requests, batch_rows, num_layers, window=-1, pad_rows=0, tol=None,
                   logit_cap=0.0):  # fmt: skip
    tol = tol or dict(atol=1e-6, rtol=1e-5)
    ref_rows, res, lses, state = run_reference_capture(case, requests, batch_rows, num_layers,
                                                       window, logit_cap)  # fmt: skip
    rows, layer_rows, (vals, idx, excl) = run_kernel_capture(
        case, batch_rows, lses, state, num_layers, window, pad_rows, logit_cap
    )
    num, max_kv = len(batch_rows), state["max_kv"]
    seq_lens = case.fb.seq_lens[torch.tensor(batch_rows)]
    valid = torch.arange(max_kv)[None, :] < seq_lens[:, None]
    got = torch.where(valid, rows[:num, :max_kv].cpu(), 0.0)
    torch.testing.assert_close(got, ref_rows, **tol)
    assert torch.all(rows[num:].cpu() == 7.0), "masked and spare rows must stay untouched"
    n_k = state["k"]
    ref_full = torch.full((num, MAX_CONTEXT), NOT_RANKED)
    ref_full[:, :max_kv] = ref_rows
    assert_same_ranking(vals[:num, :n_k], idx[:num, :n_k], excl[:num], res.values, res.indices,
                        res.excluded, ref_full, tol)  # fmt: skip
    assert torch.all(vals[num:] == NOT_RANKED) and torch.all(excl[num:] == 0)
    _ = layer_rows  # per-layer rows: checked in test_capture_per_layer_rows


def test_capture_per_layer_rows_and_windows() -> None:
    case = make_case(5, hq=8, hkv=2, d=16, prefix_lens=[4, 0, 11], extend_lens=[6, 9, 2],
                     num_layers=2)  # fmt: skip
    req = AttentionRequest(top_k=4, layers=(0, 1), aggregation="none", exclude_sink=1)
    for window in (-1, 4):
        ref_rows, res, lses, state = run_reference_capture(case, [req, req], [2, 0], 2, window)
        rows, layer_rows, _ = run_kernel_capture(case, [2, 0], lses, state, 2, window, pad_rows=1)
        max_kv = state["max_kv"]
        seq_lens = case.fb.seq_lens[torch.tensor([2, 0])]
        valid = torch.arange(max_kv)[None, :] < seq_lens[:, None]
        for layer in range(2):
            per_layer = torch.where(valid, layer_rows[layer][:2, :max_kv].cpu(), 0.0)
            v, i, e = capture_rank(layer_rows[layer], dev(torch.cat([seq_lens, seq_lens[:1]])),
                                   dev(torch.tensor([1, 1, 0])), dev(torch.tensor([1, 1, 0])),
                                   state["k"])  # fmt: skip
            torch.testing.assert_close(v[:2].cpu(), res.layer_values[layer], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(e[:2].cpu(), res.layer_excluded[layer], atol=1e-6,
                                       rtol=1e-5)  # fmt: skip
            # The mean row is the layer rows' weighted sum.
            if layer == 1:
                mean = torch.where(valid, rows[:2, :max_kv].cpu(), 0.0)
                torch.testing.assert_close(mean, ref_rows, atol=1e-6, rtol=1e-5)
            assert per_layer.ge(0).all()
        if window > 0:
            j = torch.arange(max_kv)[None, :]
            outside = valid & (j <= (seq_lens - 1 - window)[:, None])
            assert torch.all(rows[:2, :max_kv].cpu()[outside] == 0)


@pytest.mark.parametrize("window", [3, 9])
def test_capture_sliding_window(window: int) -> None:
    case = make_case(7, hq=4, hkv=2, d=16, prefix_lens=[12, 3], extend_lens=[5, 1], num_layers=1)
    req = AttentionRequest(top_k=16, layers=(0,))
    _check_capture(case, [req, req], [0, 1], num_layers=1, window=window, pad_rows=1)


@pytest.mark.parametrize("window", [-1, 4])
def test_softcap_in_every_kernel(window: int) -> None:
    """Gemma 2's soft-capped scores in decode, extend and the fused capture: outputs and LSE of
    cap * tanh(s / cap) (float64 reference), capture rows equal to capture.py's."""
    cap = 1.5
    case = decode_case(21, [3, 12, 30], hq=8, hkv=2, d=32)
    write_new_kv(case)
    out, lse = decode_attention_fwd(dev(case.q[0]), *pool_args(case), 32**-0.5, num_kv_splits=3,
                                    sliding_window=window, logit_cap=cap)  # fmt: skip
    check(case, out, lse, window=window, logit_cap=cap)
    case = make_case(22, hq=4, hkv=1, d=32, prefix_lens=[0, 6, 13], extend_lens=[11, 2, 5])
    write_new_kv(case)
    out, lse = run_extend(case, window, block_rows=16, block_n=16, logit_cap=cap)
    check(case, out, lse, window=window, logit_cap=cap)
    case = make_case(23, hq=4, hkv=2, d=16, prefix_lens=[12, 3], extend_lens=[5, 1], num_layers=2)
    req = AttentionRequest(top_k=16, layers=(0, 1))
    _check_capture(case, [req, req], [0, 1], num_layers=2, window=window, pad_rows=1,
                   logit_cap=cap)  # fmt: skip


def test_capture_bf16() -> None:
    case = make_case(9, hq=8, hkv=2, d=32, prefix_lens=[10, 0], extend_lens=[4, 8],
                     q_dtype=torch.bfloat16, pool_dtype=torch.bfloat16, num_layers=2)  # fmt: skip
    req = AttentionRequest(top_k=6, layers=(0, 1))
    _check_capture(case, [req, req], [0, 1], num_layers=2, tol=dict(atol=2e-5, rtol=1e-4))


# ---- fused RMSNorm / SiLU-and-mul ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("hidden", [64, 576])
def test_rmsnorm_and_silu_match_ref(dtype: torch.dtype, hidden: int) -> None:
    from sgl_kernel import ref
    from sgl_kernel.norm_act import fused_add_rmsnorm, rmsnorm, silu_and_mul

    gen = torch.Generator().manual_seed(hidden)
    x = dev(torch.randn(5, hidden, generator=gen).to(dtype))
    res = dev(torch.randn(5, hidden, generator=gen).to(dtype))
    w = dev((1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype))
    # float32: rounding-level agreement; bfloat16: one unit in the last place on the GPU. The
    # interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even): two units there.
    exact = HAS_CUDA or dtype == torch.float32
    if dtype == torch.float32:
        tol = dict(atol=1e-5, rtol=1e-5)
    else:
        tol = dict(atol=1.6e-2, rtol=8e-3) if HAS_CUDA else dict(atol=3.2e-2, rtol=1.6e-2)
    torch.testing.assert_close(rmsnorm(x, w, 1e-6), ref.rmsnorm(x, w, 1e-6), **tol)
    out, new_res = fused_add_rmsnorm(x, res, w, 1e-5)
    ref_out, ref_res = ref.fused_add_rmsnorm(x, res, w, 1e-5)
    res_tol = dict(atol=0, rtol=0) if exact else dict(atol=1.6e-2, rtol=8e-3)
    torch.testing.assert_close(new_res, ref_res, **res_tol)
    torch.testing.assert_close(out, ref_out, **tol)
    gate_up = dev(torch.randn(3, 2, 2 * hidden, generator=gen).to(dtype))
    torch.testing.assert_close(silu_and_mul(gate_up), ref.silu_and_mul(gate_up), **tol)


# ---- head selection in the fused capture -----------------------------------------------------
HEAD_REQUESTS = [
    AttentionRequest(top_k=5, layers=(0, 1), heads=(1, 6)),
    AttentionRequest(top_k=4, layers=(1,), heads=(0, 3, 5), head_aggregation="max"),
    AttentionRequest(
        top_k=3,
        layers=(0, 1),
        aggregation="none",
        heads=(2, 7),
        head_aggregation="none",
        exclude_sink=1,
    ),  # fmt: skip
    AttentionRequest(top_k=4, layers=(0,), heads=(4,), head_aggregation="none"),
    AttentionRequest(top_k=6, layers=(0, 1), spans=(("a", 0, 3), ("b", 2, 5)), stats=True),
]


def _capture_heads(case, use_kernel: bool, window: int):
    cap = AttentionCapture((0, 1), 2, NUM_ROWS, MAX_CONTEXT, 16, case.hq, device="cpu",
                           use_kernel=use_kernel)  # fmt: skip
    spec = CaptureSpec([0, 1, 2, 3, 4], HEAD_REQUESTS, [3, 5, 4, 6, 5])
    cap.begin(spec, case.fb)
    for layer_id in range(2):
        layer = make_layer(case, layer_id, window)
        _, lse = case.backend.forward(case.q[layer_id], case.k[layer_id], case.v[layer_id], layer,
                                      case.fb, return_lse=True)  # fmt: skip
        cap.record(layer, case.q[layer_id], lse, case.fb)
    return cap.finish()


@pytest.mark.skipif(HAS_CUDA, reason="drives AttentionCapture on the CPU pools of make_case")
@pytest.mark.parametrize("window", [-1, 4])
def test_capture_heads_kernel_matches_torch(window: int) -> None:
    """Chosen-head mean, maximum and per-head rows (per layer too) from the fused kernel equal
    the torch path's, and so do span mass and statistics computed from its rows."""
    case = make_case(31, hq=8, hkv=2, d=16, prefix_lens=[4, 0, 11, 7, 9], extend_lens=[6, 9, 2, 1, 3],
                     num_layers=2)  # fmt: skip
    ref, got = _capture_heads(case, False, window), _capture_heads(case, True, window)
    tol = dict(atol=1e-6, rtol=1e-5)
    for name in ("values", "excluded", "head_values", "head_excluded", "layer_head_values",
                 "layer_head_excluded", "layer_values", "span_mass", "stats"):  # fmt: skip
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=name)
    assert got.head_values.shape[1] == 2 and got.layer_head_values.shape[:3] == (2, 5, 2)
