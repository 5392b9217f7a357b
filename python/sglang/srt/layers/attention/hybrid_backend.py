"""Hybrid attention backend: one backend for prefill (extend), another for decode.

Owns the dispatch behind `--prefill-attention-backend` / `--decode-attention-backend` when they
differ. Every call goes to the backend of the forward's mode: `init_forward_metadata` by
`forward_batch.forward_mode`, `forward_extend` to the prefill backend, `forward_decode` and the
CUDA-graph hooks (decode graphs only) to the decode backend. Both backends write the same paged
pool, so a request prefilled by one is decoded by the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend, AttnOutput

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode


class HybridAttnBackend(AttentionBackend):
    def __init__(self, prefill_backend: AttentionBackend, decode_backend: AttentionBackend) -> None:
        self.prefill_backend = prefill_backend
        self.decode_backend = decode_backend
        # Read by AttentionCapture: Triton is usable on this device if either side runs it.
        self.uses_triton_kernels = bool(
            getattr(prefill_backend, "uses_triton_kernels", False)
            or getattr(decode_backend, "uses_triton_kernels", False)
        )

    def _backend(self, forward_mode: "ForwardMode") -> AttentionBackend:
        return self.decode_backend if forward_mode.is_decode() else self.prefill_backend

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        self._backend(forward_batch.forward_mode).init_forward_metadata(forward_batch)

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
        return self.prefill_backend.forward_extend(
            q, k, v, layer, forward_batch, save_kv_cache, return_lse
        )

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
        return self.decode_backend.forward_decode(
            q, k, v, layer, forward_batch, save_kv_cache, return_lse
        )

    # ---- CUDA graphs: decode only ----------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        self.decode_backend.init_cuda_graph_state(max_bs, max_num_tokens)

    def init_forward_metadata_capture_cuda_graph(
        self,
        bs: int,
        num_tokens: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        forward_mode: "ForwardMode",
    ) -> None:
        self._backend(forward_mode).init_forward_metadata_capture_cuda_graph(
            bs, num_tokens, req_pool_indices, seq_lens, forward_mode
        )

    def init_forward_metadata_replay_cuda_graph(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_sum: int,
        forward_mode: "ForwardMode",
        seq_lens_cpu: Optional[torch.Tensor] = None,
    ) -> None:
        self._backend(forward_mode).init_forward_metadata_replay_cuda_graph(
            bs, req_pool_indices, seq_lens, seq_lens_sum, forward_mode, seq_lens_cpu
        )

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return self.decode_backend.get_cuda_graph_seq_len_fill_value()
