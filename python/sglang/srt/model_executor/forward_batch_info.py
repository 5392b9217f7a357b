"""What one forward pass sees: the forward mode, the worker batch and the device-side batch.

`ModelWorkerBatch` is built by the scheduler on the CPU (lists and small tensors);
`ForwardBatch.init_new` turns it into device tensors for the model runner, attention backend and
logits processor. Models receive `forward(input_ids, positions, forward_batch)`; nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo


class ForwardMode(IntEnum):
    EXTEND = auto()  # prefill, possibly on top of a cached prefix or as one chunk of a prompt
    DECODE = auto()  # one new token per request
    IDLE = auto()  # nothing to run (kept for TP/DP ranks without work)

    def is_extend(self) -> bool:
        return self == ForwardMode.EXTEND

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE

    def is_idle(self) -> bool:
        return self == ForwardMode.IDLE


@dataclass
class ModelWorkerBatch:
    """CPU description of one forward: built by ScheduleBatch, consumed by the model runner."""

    forward_mode: ForwardMode
    input_ids: torch.Tensor  # [num_tokens] int64
    req_pool_indices: torch.Tensor  # [bs] int64
    seq_lens: list[int]  # KV length of each request after this forward
    out_cache_loc: torch.Tensor  # [num_tokens] int64: KV slot of each new token
    extend_prefix_lens: list[int]  # tokens already in the KV cache per request (extend only)
    extend_seq_lens: list[int]  # new tokens per request (1 each in decode)
    sampling_info: Optional["SamplingBatchInfo"] = None
    # Logprobs: output logprobs for requests that ask; prompt logprobs are computed at
    # `input_logprob_indices` (flat token indices of this forward) for `input_logprob_targets`.
    return_logprob: bool = False
    top_logprobs_nums: list[int] = field(default_factory=list)
    input_logprob_indices: Optional[list[int]] = None
    input_logprob_targets: Optional[list[int]] = None
    input_logprob_top_nums: Optional[list[int]] = None
    # Seam for the attention-capture feature: a CaptureSpec naming the rows that capture in this
    # forward (srt/attention_capture); None when no request in the batch captures now.
    attention_capture: Any = None
    # Some request asked for return_hidden_states: the logits processor hands back the final
    # hidden states of every token of this forward (managers/hidden_states.py slices them).
    capture_hidden_states: bool = False
    # Rows asking for hidden_states_layers / logit_lens: a layers.layer_probe.ProbeSpec, or None.
    layer_probe: Any = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: list[int]
    out_cache_loc: torch.Tensor
    extend_prefix_lens: torch.Tensor
    extend_seq_lens: torch.Tensor
    extend_prefix_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]
    extend_start_loc: torch.Tensor
    req_to_token_pool: "ReqToTokenPool"
    token_to_kv_pool: "MHATokenToKVPool"
    attn_backend: "AttentionBackend"
    sampling_info: Optional["SamplingBatchInfo"] = None
    return_logprob: bool = False
    top_logprobs_nums: list[int] = field(default_factory=list)
    input_logprob_indices: Optional[torch.Tensor] = None
    input_logprob_targets: Optional[torch.Tensor] = None
    input_logprob_top_nums: Optional[list[int]] = None
    # The runner's AttentionCapture while this forward captures (set by the model runner).
    attention_capture: Any = None
    capture_hidden_states: bool = False  # see ModelWorkerBatch
    # The LayerProbe the models' layer loops tap this forward (None: no row probes).
    layer_probe: Any = None

    @classmethod
    def init_new(
        cls,
        batch: ModelWorkerBatch,
        *,
        device: torch.device,
        req_to_token_pool: "ReqToTokenPool",
        token_to_kv_pool: "MHATokenToKVPool",
        attn_backend: "AttentionBackend",
        init_attn_metadata: bool = True,
    ) -> "ForwardBatch":
        """Device tensors of `batch`; `init_attn_metadata=False` leaves the backend's metadata
        alone (a CUDA-graph replay sets it from the graph runner's static buffers instead)."""
        prefix = torch.tensor(batch.extend_prefix_lens, dtype=torch.int64)
        ext = torch.tensor(batch.extend_seq_lens, dtype=torch.int64)
        start_loc = torch.cumsum(ext, 0) - ext
        # Absolute position of every new token: its request's prefix length plus its offset.
        offsets = torch.arange(int(ext.sum()), dtype=torch.int64) - torch.repeat_interleave(
            start_loc, ext
        )
        positions = torch.repeat_interleave(prefix, ext) + offsets

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        def opt(xs: Optional[list[int]]) -> Optional[torch.Tensor]:
            return None if xs is None else dev(torch.tensor(xs, dtype=torch.int64))

        fb = cls(
            forward_mode=batch.forward_mode,
            batch_size=batch.batch_size,
            input_ids=dev(batch.input_ids),
            positions=dev(positions),
            req_pool_indices=dev(batch.req_pool_indices),
            seq_lens=dev(torch.tensor(batch.seq_lens, dtype=torch.int64)),
            seq_lens_cpu=list(batch.seq_lens),
            out_cache_loc=dev(batch.out_cache_loc),
            extend_prefix_lens=dev(prefix),
            extend_seq_lens=dev(ext),
            extend_prefix_lens_cpu=list(batch.extend_prefix_lens),
            extend_seq_lens_cpu=list(batch.extend_seq_lens),
            extend_start_loc=dev(start_loc),
            req_to_token_pool=req_to_token_pool,
            token_to_kv_pool=token_to_kv_pool,
            attn_backend=attn_backend,
            sampling_info=batch.sampling_info,
            return_logprob=batch.return_logprob,
            top_logprobs_nums=list(batch.top_logprobs_nums),
            input_logprob_indices=opt(batch.input_logprob_indices),
            input_logprob_targets=opt(batch.input_logprob_targets),
            input_logprob_top_nums=batch.input_logprob_top_nums,
            capture_hidden_states=batch.capture_hidden_states,
        )
        if batch.layer_probe is not None:
            from sglang.srt.layers.layer_probe import LayerProbe

            fb.layer_probe = LayerProbe(batch.layer_probe, device)
        if init_attn_metadata:
            attn_backend.init_forward_metadata(fb)
        return fb
