"""triton attention backend: sgl_kernel's paged Triton kernels behind the AttentionBackend interface.

Owns the GPU attention path. Per forward, `init_forward_metadata` keeps the batch's index tensors
(and, for an extend, the host-side longest extension that sizes the kernel grid); per layer, the
new tokens' K/V go into the pool with `store_kv_cache`, then `extend_attention_fwd` (new tokens
over their cached prefix, causal) or `decode_attention_fwd` (one query per request, split over the
KV length into `--triton-attention-num-kv-splits` pieces) reads every key through `req_to_token`.
Both kernels return each head's natural-log LSE, which `return_lse=True` hands to the attention
capture (docs/attention_tokens.md). A float8 pool is stored through the pool's scaled cast;
the kernels read its float8 view and widen it, with the per-tensor scales folded into the softmax
scale and the output.

CUDA graphs (decode only): `init_cuda_graph_state` allocates static index buffers and the
split-softmax scratch for the largest batch; the capture and replay hooks copy the graph runner's
req_pool_indices / seq_lens into them, so a graph captured at batch size bs reads the same
addresses on every replay and nothing depends on host values. Padded rows carry the runner's fill
value (`get_cuda_graph_seq_len_fill_value`: seq_len 1 at a dummy row; the runner points their
new K/V at the pool's padding slot) or seq_len 0 (output 0, LSE -inf); both are harmless.
Triton is imported lazily through sgl_kernel when the backend is built; this module imports
without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend, AttnOutput

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode


@dataclass
class TritonMetadata:
    decode: bool
    req_pool_indices: torch.Tensor  # [bs]
    seq_lens: torch.Tensor  # [bs] KV length after this forward
    extend_seq_lens: Optional[torch.Tensor] = None  # [bs] (extend only)
    extend_start_loc: Optional[torch.Tensor] = None  # [bs] (extend only)
    max_extend_len: int = 0  # host int: sizes the extend grid
    mid_o: Optional[torch.Tensor] = None  # [bs, Hq, splits, D] float32 decode scratch
    mid_lse: Optional[torch.Tensor] = None  # [bs, Hq, splits] float32


def _scaled(out: torch.Tensor, v_scale: float, lse: torch.Tensor, return_lse: bool) -> AttnOutput:
    """The kernel output times a float8 pool's value scale (the key scale is folded into the
    softmax scale the kernel gets, so its LSE is already that of the true scores)."""
    if v_scale != 1.0:
        out = out * v_scale
    return (out, lse) if return_lse else out


class TritonAttnBackend(AttentionBackend):
    # Read by AttentionCapture: with Triton usable here, the fused capture kernel runs too.
    uses_triton_kernels = True

    def __init__(self, model_runner: Any) -> None:
        from sgl_kernel.decode_attention import decode_attention_fwd
        from sgl_kernel.extend_attention import extend_attention_fwd
        from sgl_kernel.kv_store import store_kv_cache
        from sgl_kernel.triton_common import triton_usable

        self.device = torch.device(model_runner.device)
        if not triton_usable(self.device):
            raise RuntimeError(
                "the triton attention backend needs Triton with a CUDA device "
                "(or TRITON_INTERPRET=1 for CPU tests)"
            )
        self._decode_fwd = decode_attention_fwd
        self._extend_fwd = extend_attention_fwd
        self._store_kv = store_kv_cache
        self.req_to_token: torch.Tensor = model_runner.req_to_token_pool.req_to_token
        args = getattr(model_runner, "server_args", None)
        self.num_kv_splits = int(getattr(args, "triton_attention_num_kv_splits", 8) or 8)
        # Heads of this rank, known when a real runner builds us (tests may pass a bare namespace).
        mc = getattr(model_runner, "model_config", None)
        tp_size = int(getattr(model_runner, "tp_size", 1) or 1)
        self.num_q_heads: Optional[int] = mc.num_attention_heads // tp_size if mc else None
        self.head_dim: Optional[int] = mc.head_dim if mc else None
        self.forward_metadata: Optional[TritonMetadata] = None
        self.cuda_graph_max_bs = 0

    # ---- per forward ---------------------------------------------------------------------------
    def _decode_scratch(self, bs: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Split-softmax scratch shared by every layer of one decode forward (layers run in
        stream order, so one buffer serves them all); None lets the kernel allocate."""
        if self.num_q_heads is None or self.head_dim is None:
            return None, None
        f32, splits = torch.float32, self.num_kv_splits
        mid_o = torch.empty(
            bs, self.num_q_heads, splits, self.head_dim, dtype=f32, device=self.device
        )
        mid_lse = torch.empty(bs, self.num_q_heads, splits, dtype=f32, device=self.device)
        return mid_o, mid_lse

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        fb = forward_batch
        if fb.forward_mode.is_decode():
            mid_o, mid_lse = self._decode_scratch(fb.batch_size)
            self.forward_metadata = TritonMetadata(
                decode=True,
                req_pool_indices=fb.req_pool_indices,
                seq_lens=fb.seq_lens,
                mid_o=mid_o,
                mid_lse=mid_lse,
            )
            return
        self.forward_metadata = TritonMetadata(
            decode=False,
            req_pool_indices=fb.req_pool_indices,
            seq_lens=fb.seq_lens,
            extend_seq_lens=fb.extend_seq_lens,
            extend_start_loc=fb.extend_start_loc,
            max_extend_len=max(fb.extend_seq_lens_cpu, default=0),
        )

    def _store(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
    ) -> None:
        pool = forward_batch.token_to_kv_pool
        if pool.store_dtype != pool.dtype:
            # Byte-stored pool dtypes (float8) go through the pool's own scaled, saturating cast.
            k_scale, v_scale = pool.kv_scales(layer)
            pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k, v, k_scale, v_scale)
            return
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        self._store_kv(k, v, k_buf, v_buf, forward_batch.out_cache_loc)

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
        return_lse: bool = False,
    ) -> AttnOutput:
        md = self.forward_metadata
        assert md is not None and not md.decode, "init_forward_metadata(extend) must run first"
        # NOTE: the extend kernel reads every key from the pool, the new ones included.
        if save_kv_cache:
            self._store(k, v, layer, forward_batch)
        pool = forward_batch.token_to_kv_pool
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        k_scale, v_scale = pool.kv_scales(layer)
        out, lse = self._extend_fwd(
            q,
            k_buf,
            v_buf,
            self.req_to_token,
            md.req_pool_indices,
            md.seq_lens,
            md.extend_seq_lens,
            md.extend_start_loc,
            layer.scaling * k_scale,
            md.max_extend_len,
            sliding_window=layer.sliding_window_size,
            logit_cap=layer.logit_cap,
        )
        return _scaled(out, v_scale, lse, return_lse)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
        return_lse: bool = False,
    ) -> AttnOutput:
        md = self.forward_metadata
        assert md is not None and md.decode, "init_forward_metadata(decode) must run first"
        if md.mid_o is not None:
            # NOTE: the scratch is sized from the model config; a mismatch would write out of it.
            want = (layer.tp_q_head_num, self.num_kv_splits, layer.head_dim)
            assert tuple(md.mid_o.shape[1:]) == want, f"decode scratch {md.mid_o.shape} != {want}"
        if save_kv_cache:
            self._store(k, v, layer, forward_batch)
        pool = forward_batch.token_to_kv_pool
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        k_scale, v_scale = pool.kv_scales(layer)
        out, lse = self._decode_fwd(
            q,
            k_buf,
            v_buf,
            self.req_to_token,
            md.req_pool_indices,
            md.seq_lens,
            layer.scaling * k_scale,
            num_kv_splits=self.num_kv_splits,
            sliding_window=layer.sliding_window_size,
            logit_cap=layer.logit_cap,
            mid_o=md.mid_o,
            mid_lse=md.mid_lse,
        )
        return _scaled(out, v_scale, lse, return_lse)

    # ---- CUDA graphs (decode) ------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        if self.num_q_heads is None or self.head_dim is None:
            raise RuntimeError("CUDA-graph state needs the model runner's model_config")
        dev, i64, f32 = self.device, torch.int64, torch.float32
        hq, d, splits = self.num_q_heads, self.head_dim, self.num_kv_splits
        self.cuda_graph_max_bs = max_bs
        self.cuda_graph_req_pool_indices = torch.zeros(max_bs, dtype=i64, device=dev)
        self.cuda_graph_seq_lens = torch.full(
            (max_bs,), self.get_cuda_graph_seq_len_fill_value(), dtype=i64, device=dev
        )
        self.cuda_graph_mid_o = torch.zeros(max_bs, hq, splits, d, dtype=f32, device=dev)
        self.cuda_graph_mid_lse = torch.zeros(max_bs, hq, splits, dtype=f32, device=dev)

    def _graph_metadata(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        forward_mode: "ForwardMode",
    ) -> TritonMetadata:
        """Copy the runner's (padded) batch into the static buffers; metadata views of them."""
        if not forward_mode.is_decode():
            raise NotImplementedError("the triton backend captures decode CUDA graphs only")
        if not 0 < bs <= self.cuda_graph_max_bs:
            raise ValueError(
                f"batch size {bs} is outside the CUDA-graph state (max {self.cuda_graph_max_bs}); "
                "call init_cuda_graph_state first"
            )
        idx = self.cuda_graph_req_pool_indices[:bs]
        lens = self.cuda_graph_seq_lens[:bs]
        idx.copy_(req_pool_indices[:bs], non_blocking=True)
        lens.copy_(seq_lens[:bs], non_blocking=True)
        return TritonMetadata(
            decode=True,
            req_pool_indices=idx,
            seq_lens=lens,
            mid_o=self.cuda_graph_mid_o[:bs],
            mid_lse=self.cuda_graph_mid_lse[:bs],
        )

    def init_forward_metadata_capture_cuda_graph(
        self,
        bs: int,
        num_tokens: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        forward_mode: "ForwardMode",
    ) -> None:
        if num_tokens != bs:
            raise ValueError(f"decode graphs take one token per request ({num_tokens} != {bs})")
        self.forward_metadata = self._graph_metadata(bs, req_pool_indices, seq_lens, forward_mode)

    def init_forward_metadata_replay_cuda_graph(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_sum: int,
        forward_mode: "ForwardMode",
        seq_lens_cpu: Optional[torch.Tensor] = None,
    ) -> None:
        self.forward_metadata = self._graph_metadata(bs, req_pool_indices, seq_lens, forward_mode)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        # NOTE: a padded row attends to one key (position 0 of whatever row it points at: a read
        # that changes nothing); seq_len 0 would also be safe in the kernels (output 0, LSE
        # -inf), but the runner derives positions as seq_len - 1, which must stay >= 0.
        return 1
