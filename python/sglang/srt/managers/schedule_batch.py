"""Request and batch bookkeeping owned by the scheduler.

`Req` is one generation request as the scheduler sees it (token ids, sampling params, KV rows,
prefix-cache handles, finish state, logprob outputs). `ScheduleBatch` is the set of requests that
run one forward step together; it is CPU-side bookkeeping and turns itself into a
`ModelWorkerBatch` (what one forward needs) for the model runner.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang.srt.managers.layer_probes import build_probe_spec
from sglang.srt.model_executor.forward_batch_info import ForwardMode, ModelWorkerBatch
from sglang.srt.sampling.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sglang.srt.attention_capture.config import AttentionRequest
    from sglang.srt.managers.layer_probes import ProbeRequest
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
    # Set when the server, not the client, ended the request (500: its batch failed, 503: the
    # queue was full); the tokenizer manager turns it into that HTTP error (request_errors.py).
    status_code: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "abort", "message": self.message}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        return out


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
        attention: Optional["AttentionRequest"] = None,
        return_hidden_states: bool = False,
        probe: Optional["ProbeRequest"] = None,
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

        # Logprobs (filled by the output processor).
        self.return_logprob = return_logprob
        self.logprob_start_len = logprob_start_len
        self.top_logprobs_num = top_logprobs_num
        self.input_token_logprobs: list[tuple[Optional[float], int]] = []
        self.input_top_logprobs: list[Optional[list[tuple[float, int]]]] = []
        self.input_logprobs_done = False
        self.output_token_logprobs: list[tuple[float, int]] = []
        self.output_top_logprobs: list[list[tuple[float, int]]] = []

        # Text state for stop strings (the scheduler decodes the tail it needs).
        self.decoded_text = ""

        # Attention tokens (srt/attention_capture): options, and one record per output token.
        self.attention = attention
        self.attention_records: list[Any] = []
        # attention_prompt_positions (attention_capture/prompt.py): rows computed below this
        # position, and (position, record) pairs not sent yet.
        self.prompt_attention_done = 0
        self.prompt_attention_records: list[Any] = []

        # Hidden states (managers/hidden_states.py): the whole prompt's [N, hidden] first, then
        # one [hidden] vector per decode step; chunks of a prompt still being prefilled.
        self.return_hidden_states = return_hidden_states
        self.hidden_states: list[torch.Tensor] = []
        self.prompt_hidden_chunks: list[torch.Tensor] = []
        # Layer probes (managers/layer_probes.py): options, and one ProbeRecord per output token.
        self.probe = probe
        self.probe_records: list[Any] = []

        # Constrained decoding (constrained/): the request's grammar matcher, once compiled.
        self.grammar: Any = None

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def finished(self) -> bool:
        return self.finished_reason is not None

    def wants_prompt_hidden(self) -> bool:
        """The prompt's hidden states are still to be computed (no prefix may come from cache)."""
        return self.return_hidden_states and not self.hidden_states

    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.input_logprobs_done

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


class ScheduleBatch:
    """Requests that run one forward together, and the KV bookkeeping to run them.

    Owns turning requests into a ModelWorkerBatch: request rows, KV slots for the new tokens
    (evicting from the prefix cache when the allocator runs short), req_to_token writes, and the
    prompt-logprob index lists. Decode batches persist across steps; extend batches are one-shot.
    """

    def __init__(
        self,
        reqs: list[Req],
        req_to_token_pool: Any,
        allocator: Any,
        tree_cache: Any,
        vocab_size: int,
        device: str,
    ) -> None:
        self.reqs = reqs
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.tree_cache = tree_cache
        self.vocab_size = vocab_size
        self.device = device
        self.forward_mode = ForwardMode.DECODE
        self.extend_logprob_counts: list[int] = []

    def __len__(self) -> int:
        return len(self.reqs)

    def is_empty(self) -> bool:
        return not self.reqs

    # ---- memory helpers ------------------------------------------------------------------------
    def _ensure_available(self, num_tokens: int) -> None:
        """Evict unlocked prefix-cache entries until `num_tokens` slots are free (if possible)."""
        short = num_tokens - self.allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)

    def _last_locs(self, lengths: list[int]) -> list[int]:
        """Slot of each request's token at position lengths[i] - 1, where the paged allocator
        continues a partial page (-1 elsewhere). req_to_token lives on the device, so this is one
        gathered read per step (never one per request); page size 1 reads nothing."""
        page = getattr(self.allocator, "page_size", 1)
        locs = [-1] * len(lengths)
        if page <= 1:
            return locs
        need = [i for i, n in enumerate(lengths) if n > 0 and n % page]
        if need:
            table = self.req_to_token_pool.req_to_token
            rows = torch.tensor([self.reqs[i].req_pool_idx for i in need], dtype=torch.int64)
            cols = torch.tensor([lengths[i] - 1 for i in need], dtype=torch.int64)
            read = table[rows.to(table.device), cols.to(table.device)].tolist()
            for i, loc in zip(need, read):
                locs[i] = int(loc)
        return locs

    # ---- extend --------------------------------------------------------------------------------
    def prepare_for_extend(self) -> ModelWorkerBatch:
        self.forward_mode = ForwardMode.EXTEND
        rows = self.req_to_token_pool.req_to_token
        new_rows = [r for r in self.reqs if r.req_pool_idx is None]
        if new_rows:
            idxs = self.req_to_token_pool.alloc(len(new_rows))
            if idxs is None:
                raise RuntimeError(
                    "out of request rows; admission must respect max_running_requests"
                )
            for req, idx in zip(new_rows, idxs):
                req.req_pool_idx = idx
        prefix_lens = [len(r.prefix_indices) for r in self.reqs]
        ext_lens = [r.extend_input_len for r in self.reqs]
        seq_lens = [p + e for p, e in zip(prefix_lens, ext_lens)]
        last_locs = self._last_locs(prefix_lens)
        page = getattr(self.allocator, "page_size", 1)
        self._ensure_available(sum(ext_lens) + (page - 1) * len(self.reqs))
        out_loc = self.allocator.alloc_extend(prefix_lens, seq_lens, last_locs, sum(ext_lens))
        if out_loc is None:
            raise RuntimeError(
                "KV cache exhausted during prefill; admission must reserve enough tokens"
            )
        input_ids: list[int] = []
        start = 0
        for req, p, e in zip(self.reqs, prefix_lens, ext_lens):
            row = req.req_pool_idx
            if p:
                rows[row, :p] = req.prefix_indices.to(rows.device)
            rows[row, p : p + e] = out_loc[start : start + e]
            input_ids += req.fill_ids[p : p + e]
            start += e

        idx, targets, tops = self._prompt_logprob_positions(prefix_lens, ext_lens)
        return ModelWorkerBatch(
            forward_mode=ForwardMode.EXTEND,
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            req_pool_indices=torch.tensor([r.req_pool_idx for r in self.reqs], dtype=torch.int64),
            seq_lens=seq_lens,
            out_cache_loc=out_loc,
            extend_prefix_lens=prefix_lens,
            extend_seq_lens=ext_lens,
            sampling_info=self._sampling_info(),
            return_logprob=any(r.return_logprob for r in self.reqs),
            top_logprobs_nums=[r.top_logprobs_num if r.return_logprob else 0 for r in self.reqs],
            input_logprob_indices=idx,
            input_logprob_targets=targets,
            input_logprob_top_nums=tops,
            attention_capture=self._capture_spec(extend=True),
            capture_hidden_states=any(r.return_hidden_states for r in self.reqs),
            layer_probe=build_probe_spec(self.reqs, ext_lens),
        )

    def _prompt_logprob_positions(self, prefix_lens: list[int], ext_lens: list[int]):
        """Flat positions whose logits score the next prompt token, for requests that ask."""
        idx: list[int] = []
        targets: list[int] = []
        tops: list[int] = []
        self.extend_logprob_counts = []
        start = 0
        for req, p, e in zip(self.reqs, prefix_lens, ext_lens):
            count = 0
            if req.wants_prompt_logprobs():
                prompt = req.origin_input_ids
                lo = max(p, req.logprob_start_len - 1, 0)
                hi = min(p + e, len(prompt) - 1)
                for j in range(lo, hi):
                    idx.append(start + j - p)
                    targets.append(prompt[j + 1])
                    tops.append(req.top_logprobs_num)
                count = max(hi - lo, 0)
            self.extend_logprob_counts.append(count)
            start += e
        if not idx:
            return None, None, None
        return idx, targets, tops

    # ---- decode --------------------------------------------------------------------------------
    def decode_slots_needed(self) -> int:
        page = getattr(self.allocator, "page_size", 1)
        return len(self.reqs) * page

    def prepare_for_decode(self, future_ids: Optional[list[int]] = None) -> ModelWorkerBatch:
        """The next decode step. With `future_ids` (overlap schedule), each request's last token
        is still being sampled by the forward in flight: its sequence length counts that token
        and its input is that placeholder (managers/tp_worker_overlap_thread.py)."""
        self.forward_mode = ForwardMode.DECODE
        pending = 0 if future_ids is None else 1
        seq_lens = [r.seqlen + pending for r in self.reqs]
        last_locs = self._last_locs([s - 1 for s in seq_lens])
        self._ensure_available(self.decode_slots_needed())
        out_loc = self.allocator.alloc_decode(seq_lens, last_locs)
        if out_loc is None:
            raise RuntimeError("KV cache exhausted during decode; the scheduler must retract first")
        rows = torch.tensor([r.req_pool_idx for r in self.reqs], dtype=torch.int64)
        pos = torch.tensor(seq_lens, dtype=torch.int64) - 1
        table = self.req_to_token_pool.req_to_token
        table[rows.to(table.device), pos.to(table.device)] = out_loc.to(table.dtype)
        return ModelWorkerBatch(
            forward_mode=ForwardMode.DECODE,
            input_ids=torch.tensor(
                future_ids if future_ids is not None else [r.output_ids[-1] for r in self.reqs],
                dtype=torch.int64,
            ),
            req_pool_indices=rows,
            seq_lens=seq_lens,
            out_cache_loc=out_loc,
            extend_prefix_lens=[s - 1 for s in seq_lens],
            extend_seq_lens=[1] * len(self.reqs),
            sampling_info=self._sampling_info(),
            return_logprob=any(r.return_logprob for r in self.reqs),
            top_logprobs_nums=[r.top_logprobs_num if r.return_logprob else 0 for r in self.reqs],
            attention_capture=self._capture_spec(extend=False),
            capture_hidden_states=any(r.return_hidden_states for r in self.reqs),
            layer_probe=build_probe_spec(self.reqs, None),
        )

    def _capture_spec(self, extend: bool) -> Any:
        """The attention-capture rows of this forward (None when no request captures now)."""
        if not any(r.attention is not None for r in self.reqs):
            return None
        from sglang.srt.attention_capture.capture import build_capture_spec

        return build_capture_spec(self.reqs, extend)

    def _sampling_info(self) -> "SamplingBatchInfo":
        from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

        return SamplingBatchInfo.from_reqs(self.reqs, self.vocab_size, self.device)

    # ---- membership ----------------------------------------------------------------------------
    def filter_batch(self, keep: Optional[list[Req]] = None) -> None:
        self.reqs = [r for r in (keep if keep is not None else self.reqs) if not r.finished()]

    def merge(self, reqs: list[Req]) -> None:
        self.reqs.extend(reqs)

    def release_req(self, req: Req) -> None:
        """Free a request's own KV slots, row and lock without caching them (retraction, abort)."""
        kv_len = len(req.fill_ids) if req.is_chunked else req.seqlen - (1 if req.output_ids else 0)
        self.tree_cache.release_req(req, kv_len)
