"""Prefill admission: which waiting requests join the next prefill batch, and how much of each.

Owns the waiting-queue order (`fcfs`, or `lpm`: longest cached prefix first) and the PrefillAdder,
which admits requests while three budgets hold: KV tokens (free + evictable, minus what running
requests are expected to still decode), prefill tokens per batch (`--max-prefill-tokens`) and the
chunk size (`--chunked-prefill-size`, which splits one long prompt across batches).
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from sglang.srt.managers.schedule_batch import Req

# Cap on how many future tokens one running request is assumed to still need.
CLIP_MAX_NEW_TOKENS = 4096


class SchedulePolicy:
    def __init__(self, policy: str, tree_cache: Any, disable_radix_cache: bool) -> None:
        if policy not in ("fcfs", "lpm", "random", "dfs-weight", "lof"):
            raise ValueError(f"unknown schedule policy {policy!r}")
        # Without a radix cache prefix lengths are all zero; lpm degenerates to fcfs.
        self.policy = "fcfs" if (disable_radix_cache and policy == "lpm") else policy
        self.tree_cache = tree_cache

    def match_prefix(self, req: Req) -> None:
        """Set req.prefix_indices / last_node from the cache and req.fill_ids/extend_input_len."""
        tokens = req.origin_input_ids + req.output_ids
        # At least one token must be computed to produce logits; prompt logprobs need the logits
        # of every position from logprob_start_len - 1 on, so those cannot come from the cache.
        limit = len(tokens) - 1
        if req.wants_prompt_logprobs():
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        match = self.tree_cache.match_prefix(tokens)
        indices = match.device_indices
        if len(indices) > limit:
            indices = indices[:limit]
        req.prefix_indices = indices.to(torch.int64)
        req.last_node = match.last_node
        req.init_next_round_input()

    def calc_priority(self, waiting_queue: list[Req]) -> None:
        """Order the waiting queue in place; prefix matches are refreshed for lpm."""
        if self.policy == "lpm":
            for req in waiting_queue:
                self.match_prefix(req)
            waiting_queue.sort(key=lambda r: -len(r.prefix_indices))
        elif self.policy == "lof":
            waiting_queue.sort(key=lambda r: -r.sampling_params.max_new_tokens)
        elif self.policy == "random":
            random.shuffle(waiting_queue)
        # fcfs and dfs-weight keep arrival order (dfs-weight needs tree stats; fcfs is its fallback)


class PrefillAdder:
    def __init__(
        self,
        tree_cache: Any,
        allocator: Any,
        running_reqs: list[Req],
        new_token_ratio: float,
        max_prefill_tokens: int,
        chunked_prefill_size: Optional[int],
        max_new_reqs: int,
        page_size: int = 1,
    ) -> None:
        self.tree_cache = tree_cache
        self.page_size = page_size
        self.new_token_ratio = new_token_ratio
        reserved = sum(self._future_tokens(r) for r in running_reqs)
        self.rem_total_tokens = allocator.available_size() + tree_cache.evictable_size() - reserved
        self.rem_input_tokens = max_prefill_tokens
        self.rem_chunk_tokens = chunked_prefill_size if chunked_prefill_size and chunked_prefill_size > 0 else None
        self.max_new_reqs = max_new_reqs
        self.can_run_list: list[Req] = []
        self.new_chunked_req: Optional[Req] = None

    def _future_tokens(self, req: Req) -> int:
        left = req.sampling_params.max_new_tokens - len(req.output_ids)
        return int(min(max(left, 0), CLIP_MAX_NEW_TOKENS) * self.new_token_ratio) + self.page_size

    def _take(self, req: Req, extend_len: int) -> None:
        self.tree_cache.inc_lock_ref(req.last_node)
        # Locked prefix tokens are no longer evictable, so they leave the budget.
        self.rem_total_tokens -= extend_len + self._future_tokens(req)
        self.rem_input_tokens -= extend_len
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= extend_len
        self.can_run_list.append(req)

    def add_chunked_req(self, req: Req) -> Optional[Req]:
        """Continue a request whose prompt is being prefilled in chunks. Returns it if still unfinished."""
        req.init_next_round_input()
        budget = self._chunk_budget()
        truncated = req.extend_input_len > budget
        extend_len = min(req.extend_input_len, budget)
        req.extend_input_len = extend_len
        req.fill_ids = req.fill_ids[: len(req.prefix_indices) + extend_len]
        self.can_run_list.append(req)
        self.rem_total_tokens -= extend_len
        self.rem_input_tokens -= extend_len
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= extend_len
        return req if truncated else None

    def _chunk_budget(self) -> int:
        budget = min(self.rem_input_tokens, self.rem_total_tokens)
        if self.rem_chunk_tokens is not None:
            budget = min(budget, self.rem_chunk_tokens)
        return max(budget // self.page_size * self.page_size, 0) or max(budget, 0)

    def add_one_req(self, req: Req) -> bool:
        """Try to admit `req` (prefix already matched). False means stop admitting."""
        if len(self.can_run_list) >= self.max_new_reqs:
            return False
        extend_len = req.extend_input_len
        if extend_len + self._future_tokens(req) > self.rem_total_tokens:
            if not self.can_run_list and self.rem_chunk_tokens is not None and extend_len > self.rem_total_tokens:
                return self._admit_chunk(req)
            return False
        fits_chunk = self.rem_chunk_tokens is None or extend_len <= self.rem_chunk_tokens
        if extend_len > self.rem_input_tokens and self.can_run_list:
            return False
        if fits_chunk:
            self._take(req, extend_len)
            return True
        return self._admit_chunk(req)

    def _admit_chunk(self, req: Req) -> bool:
        budget = self._chunk_budget()
        if budget <= 0:
            return False
        self.tree_cache.inc_lock_ref(req.last_node)
        req.extend_input_len = budget
        req.fill_ids = req.fill_ids[: len(req.prefix_indices) + budget]
        self.rem_total_tokens -= budget
        self.rem_input_tokens -= budget
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= budget
        self.can_run_list.append(req)
        self.new_chunked_req = req
        return False
