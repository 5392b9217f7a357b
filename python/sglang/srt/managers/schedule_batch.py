"""Request and batch bookkeeping owned by the scheduler.

`Req` is one generation request as the scheduler sees it (token ids, sampling params, KV rows,
prefix-cache handles, finish state, logprob outputs). `ScheduleBatch` is the set of requests that
run one forward step together; it is CPU-side bookkeeping and turns itself into a
`ModelWorkerBatch` (what one forward needs) for the model runner.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo


class BaseFinishReason:
    """Why a request stopped; `to_json` is the `meta_info.finish_reason` object."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class FINISH_MATCHED_TOKEN(BaseFinishReason):
    matched: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "stop", "matched": self.matched}


@dataclass
class FINISH_MATCHED_STR(BaseFinishReason):
    matched: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "stop", "matched": self.matched}


@dataclass
class FINISH_LENGTH(BaseFinishReason):
    length: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "length", "length": self.length}


@dataclass
class FINISH_ABORT(BaseFinishReason):
    message: str = "Aborted"

    def to_json(self) -> dict[str, Any]:
        return {"type": "abort", "message": self.message}


class Req:
    """One request inside the scheduler.

    NOTE: the tokens whose KV lives in the cache are always a prefix of
    `origin_input_ids + output_ids`; the last sampled token has no KV until the next decode step.
    """

    def __init__(
        self,
        rid: str,
        origin_input_ids: list[int],
        sampling_params: SamplingParams,
        origin_input_text: Optional[str] = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        stream: bool = False,
        eos_token_ids: Optional[set[int]] = None,
    ) -> None:
        self.rid = rid
        self.origin_input_text = origin_input_text
        self.origin_input_ids = list(origin_input_ids)
        self.output_ids: list[int] = []
        self.sampling_params = sampling_params
        self.stream = stream
        self.eos_token_ids: set[int] = set(eos_token_ids or ())
        # A seed for every request keeps one sampling path; an explicit one makes it reproducible.
        seed = sampling_params.sampling_seed
        self.sampling_seed: int = seed if seed is not None else random.getrandbits(63)

        # Tokens to be in the KV cache after the next extend, and that extend's length.
        self.fill_ids: list[int] = []
        self.extend_input_len = 0
        # KV memory: row in ReqToTokenPool, matched prefix slots, radix node holding the lock.
        self.req_pool_idx: Optional[int] = None
        self.prefix_indices: torch.Tensor = torch.empty(0, dtype=torch.int64)
        self.last_node: Any = None
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (first admission)
        self.is_chunked = 0  # > 0 while a chunked prefill of this request is in flight
        self.is_retracted = False
        self.retraction_count = 0

        self.finished_reason: Optional[BaseFinishReason] = None
        self.to_abort_message: Optional[str] = None

        # Logprobs (filled by the output processor).
        self.return_logprob = return_logprob
        self.logprob_start_len = logprob_start_len
        self.top_logprobs_num = top_logprobs_num
        self.input_token_logprobs: Optional[list[tuple[float, int]]] = None
        self.input_top_logprobs: Optional[list[Optional[list[tuple[float, int]]]]] = None
        self.output_token_logprobs: list[tuple[float, int]] = []
        self.output_top_logprobs: list[list[tuple[float, int]]] = []

        # Text state for stop strings (the scheduler decodes the tail it needs).
        self.decoded_text = ""

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def finished(self) -> bool:
        return self.finished_reason is not None

    def init_next_round_input(self) -> None:
        """Set `fill_ids` to every token that needs KV before the next token can be sampled."""
        self.fill_ids = self.origin_input_ids + self.output_ids
        self.extend_input_len = len(self.fill_ids) - len(self.prefix_indices)

    def reset_for_retract(self) -> None:
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.last_node = None
        self.req_pool_idx = None
        self.extend_input_len = 0
        self.fill_ids = []
        self.is_chunked = 0
        self.is_retracted = True
        self.retraction_count += 1

    def __repr__(self) -> str:
        return (
            f"Req(rid={self.rid!r}, input_len={len(self.origin_input_ids)}, "
            f"output_len={len(self.output_ids)})"
        )
