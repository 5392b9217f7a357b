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

from sglang.srt.attention_capture import prompt as prompt_attention
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
        if req.wants_prompt_hidden():
            limit = 0  # hidden states of the whole prompt are returned: compute all of it
        first_asked = prompt_attention.prefix_limit(req)
        if first_asked is not None:
            limit = min(limit, first_asked)  # prompt attention rows need their queries
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
        # fcfs keeps arrival order; dfs-weight is refused at start-up (server_args.REFUSED_VALUES)


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
        self.has_running = bool(running_reqs)
        self.rem_total_tokens = allocator.available_size() + tree_cache.evictable_size() - reserved
        self.rem_input_tokens = max_prefill_tokens
        self.rem_chunk_tokens = (
            chunked_prefill_size if chunked_prefill_size and chunked_prefill_size > 0 else None
        )
        self.max_new_reqs = max_new_reqs
        self.can_run_list: list[Req] = []
        self.new_chunked_req: Optional[Req] = None

    def _future_tokens(self, req: Req) -> int:
        left = req.sampling_params.max_new_tokens - len(req.output_ids)
        return int(min(max(left, 0), CLIP_MAX_NEW_TOKENS) * self.new_token_ratio) + self.page_size

    def _commit(self, req: Req, extend_len: int, locked: int, future: int) -> None:
        # Prefix tokens just locked are no longer evictable, so they leave the budget too.
        self.rem_total_tokens -= locked + extend_len + future
        self.rem_input_tokens -= extend_len
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= extend_len
        self.can_run_list.append(req)

    def _chunk_budget(self) -> int:
        budget = min(self.rem_input_tokens, self.rem_total_tokens)
        if self.rem_chunk_tokens is not None:
            budget = min(budget, self.rem_chunk_tokens)
        return max(budget, 0)

    def add_chunked_req(self, req: Req) -> Optional[Req]:
        """Continue a prompt being prefilled in chunks (its prefix is already locked).

        Returns the request if part of its prompt is still left after this batch."""
        req.init_next_round_input()
        budget = self._chunk_budget()
        if budget <= 0:
            return req  # no room this round; running requests decode and free memory first
        extend_len = min(req.extend_input_len, budget)
        truncated = req.extend_input_len > extend_len
        req.extend_input_len = extend_len
        req.fill_ids = req.fill_ids[: len(req.prefix_indices) + extend_len]
        self._commit(req, extend_len, 0, 0 if truncated else self._future_tokens(req))
        return req if truncated else None

    def add_one_req(self, req: Req) -> bool:
        """Try to admit `req` (prefix already matched). False means stop admitting."""
        if len(self.can_run_list) >= self.max_new_reqs:
            return False
        locked = -self.tree_cache.inc_lock_ref(req.last_node)
        avail = self.rem_total_tokens - locked
        extend_len = req.extend_input_len
        future = self._future_tokens(req)
        # Alone, a request is admitted if its prompt fits; retraction covers its decode later.
        needed = extend_len + (self.page_size if self.alone() else future)
        too_big_for_batch = extend_len > self.rem_input_tokens and bool(self.can_run_list)
        if needed > avail or too_big_for_batch:
            self.tree_cache.dec_lock_ref(req.last_node)
            return False
        if self.rem_chunk_tokens is not None and extend_len > self.rem_chunk_tokens:
            budget = min(self.rem_chunk_tokens, self.rem_input_tokens)
            if budget <= 0:
                self.tree_cache.dec_lock_ref(req.last_node)
                return False
            req.extend_input_len = budget
            req.fill_ids = req.fill_ids[: len(req.prefix_indices) + budget]
            self._commit(req, budget, locked, 0)
            self.new_chunked_req = req
            return False
        self._commit(req, extend_len, locked, future)
        return True

    def alone(self) -> bool:
        return not self.can_run_list and not self.has_running
