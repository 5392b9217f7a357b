"""The attention-backend interface every implementation plugs into.

Owns the contract between RadixAttention and a backend: `init_forward_metadata` once per forward,
then `forward_extend` / `forward_decode` per layer, writing the new K/V into the paged pool and
returning the attention output. With `return_lse=True` a backend also returns each head's
log-sum-exp of the scaled scores for the queries it computed ([num_tokens, num_heads], float32):
the attention-capture feature turns q.K into exact probabilities with it (docs/attention_tokens.md).
The three CUDA-graph hooks carry upstream's names; backends without graph support refuse them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

AttnOutput = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class AttentionBackend(ABC):
    @abstractmethod
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        """Precompute per-forward index/mask data shared by all layers."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
        return_lse: bool = False,
    ) -> AttnOutput:
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, return_lse)
        return self.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, return_lse)

    @abstractmethod
    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
        return_lse: bool = False,
    ) -> AttnOutput: ...

    @abstractmethod
    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
        return_lse: bool = False,
    ) -> AttnOutput: ...

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_capture_cuda_graph(
        self,
        bs: int,
        num_tokens: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        forward_mode: "ForwardMode",
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_replay_cuda_graph(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_sum: int,
        forward_mode: "ForwardMode",
        seq_lens_cpu: Optional[torch.Tensor] = None,
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1
