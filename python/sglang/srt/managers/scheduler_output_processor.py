"""Turns one forward's sampled tokens into request state: outputs, logprobs, finish, caching.

Owns the end of every scheduler step: appending sampled tokens, collecting output and prompt
logprobs (and hidden states, through hidden_states.py and layer_probes.py), deciding when a request is finished (length, EOS, stop token ids, stop strings),
handing finished requests' KV to the prefix cache, moving prefilled requests into the running batch,
and telling the listener (the serving layer's sender, or a test) which requests advanced.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

from sglang.srt.attention_capture.prompt import collect_prompt_records
from sglang.srt.managers import hidden_states, layer_probes
from sglang.srt.managers.schedule_batch import (
    FINISH_LENGTH,
    FINISH_MATCHED_STR,
    FINISH_MATCHED_TOKEN,
    Req,
    ScheduleBatch,
)

if TYPE_CHECKING:
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.layers.sampler import SamplerOutput
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, scheduler: "Scheduler", tokenizer: Any = None) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.finished_reqs: dict[str, Req] = {}
        # Called after every step with the requests that produced a token or finished.
        self.listener: Optional[Callable[[list[Req]], None]] = None

    # ---- per-step entry points -------------------------------------------------------------------
    def process_prefill_result(
        self, batch: ScheduleBatch, logits_output: "LogitsProcessorOutput", sample: "SamplerOutput"
    ) -> None:
        sched = self.scheduler
        self._collect_prompt_logprobs(batch, logits_output)
        hidden_states.collect_prefill(batch, logits_output.hidden_states)
        next_ids = sample.next_token_ids.tolist()
        out_logprobs = self._output_logprob_lists(batch, sample)
        records = self._attention_records(logits_output)
        collect_prompt_records(batch.reqs, getattr(logits_output, "attention_capture", None))
        probes = layer_probes.collect(logits_output)
        advanced: list[Req] = []
        to_running: list[Req] = []
        for i, req in enumerate(batch.reqs):
            if req.is_chunked:
                # Part of the prompt is done; its sampled token is meaningless.
                sched.tree_cache.cache_unfinished_req(req)
                continue
            req.is_retracted = False
            advanced.append(req)
            if req.sampling_params.max_new_tokens == 0:
                # Prompt-only request (e.g. loglikelihood scoring): the sample is discarded.
                req.finished_reason = FINISH_LENGTH(0)
                sched.tree_cache.cache_finished_req(req)
                continue
            self._append_token(req, next_ids[i], out_logprobs, i, records, probes)
            if self.check_finished(req):
                sched.tree_cache.cache_finished_req(req)
            else:
                sched.tree_cache.cache_unfinished_req(req)
                to_running.append(req)
        sched.running_batch.merge(to_running)
        self._emit(advanced)

    def process_decode_result(
        self,
        batch: ScheduleBatch,
        sample: "SamplerOutput",
        logits_output: Optional["LogitsProcessorOutput"] = None,
    ) -> None:
        sched = self.scheduler
        next_ids = sample.next_token_ids.tolist()
        out_logprobs = self._output_logprob_lists(batch, sample)
        records = self._attention_records(logits_output)
        hidden_states.collect_decode(batch, getattr(logits_output, "hidden_states", None))
        probes = layer_probes.collect(logits_output)
        advanced: list[Req] = []
        for i, req in enumerate(batch.reqs):
            if req.finished():
                # Overlap schedule: it finished at the step before this one; the row was spare.
                continue
            advanced.append(req)
            self._append_token(req, next_ids[i], out_logprobs, i, records, probes)
            if self.check_finished(req):
                sched.tree_cache.cache_finished_req(req)
        batch.filter_batch()
        self._emit(advanced)

    # ---- helpers ---------------------------------------------------------------------------------
    def _append_token(
        self,
        req: Req,
        token: int,
        logprobs: Optional[tuple],
        i: int,
        records: Optional[dict[int, Any]] = None,
        probes: Optional[dict[int, Any]] = None,
    ) -> None:
        req.output_ids.append(token)
        if req.grammar is not None and not req.grammar.accept_token(token):
            # Only when every allowed token was blocked too (min_new_tokens against EOS).
            logger.warning("request %s: token %d does not fit its grammar", req.rid, token)
        if records is not None and i in records:
            req.attention_records.append(records[i])
        if probes is not None and i in probes:
            req.probe_records.append(probes[i])
        if req.return_logprob and logprobs is not None:
            lp, top_val, top_idx = logprobs
            req.output_token_logprobs.append((lp[i], token))
            if req.top_logprobs_num > 0 and top_val is not None:
                k = req.top_logprobs_num
                req.output_top_logprobs.append(list(zip(top_val[i][:k], top_idx[i][:k])))

    @staticmethod
    def _attention_records(logits_output: Optional["LogitsProcessorOutput"]) -> Optional[dict]:
        """Batch index -> AttentionRecord of this forward's capturing rows (host copy here)."""
        result = getattr(logits_output, "attention_capture", None)
        if result is None:
            return None
        from sglang.srt.attention_capture.records import result_to_records

        return dict(zip(result.spec.batch_rows, result_to_records(result)))

    @staticmethod
    def _output_logprob_lists(batch: ScheduleBatch, sample: "SamplerOutput") -> Optional[tuple]:
        if sample.next_token_logprobs is None:
            return None
        top_val = sample.top_logprobs_val.tolist() if sample.top_logprobs_val is not None else None
        top_idx = sample.top_logprobs_idx.tolist() if sample.top_logprobs_idx is not None else None
        return sample.next_token_logprobs.tolist(), top_val, top_idx

    def _collect_prompt_logprobs(
        self, batch: ScheduleBatch, logits_output: "LogitsProcessorOutput"
    ) -> None:
        if logits_output.input_token_logprobs is None and not any(batch.extend_logprob_counts):
            for req in batch.reqs:
                self._finish_prompt_logprobs(req)
            return
        values = (
            logits_output.input_token_logprobs.tolist()
            if logits_output.input_token_logprobs is not None
            else []
        )
        top_val = logits_output.input_top_logprobs_val
        top_idx = logits_output.input_top_logprobs_idx
        top_val = top_val.tolist() if top_val is not None else None
        top_idx = top_idx.tolist() if top_idx is not None else None
        start = 0
        for req, count in zip(batch.reqs, batch.extend_logprob_counts):
            if count and req.wants_prompt_logprobs():
                first = len(req.prefix_indices)
                lo = max(first, req.logprob_start_len - 1, 0)
                for k in range(count):
                    target = req.origin_input_ids[lo + k + 1]
                    req.input_token_logprobs.append((values[start + k], target))
                    if req.top_logprobs_num > 0 and top_val is not None:
                        n = req.top_logprobs_num
                        req.input_top_logprobs.append(
                            list(zip(top_val[start + k][:n], top_idx[start + k][:n]))
                        )
            start += count
            self._finish_prompt_logprobs(req)

    @staticmethod
    def _finish_prompt_logprobs(req: Req) -> None:
        """Once the whole prompt is prefilled, prepend the unscored first token if it was asked for."""
        if req.is_chunked or not req.wants_prompt_logprobs():
            return
        if req.logprob_start_len == 0:
            req.input_token_logprobs.insert(0, (None, req.origin_input_ids[0]))
            if req.top_logprobs_num > 0:
                req.input_top_logprobs.insert(0, None)
        req.input_logprobs_done = True

    def check_finished(self, req: Req) -> bool:
        if req.finished():
            return True
        sp = req.sampling_params
        last = req.output_ids[-1]
        if len(req.output_ids) >= sp.max_new_tokens or req.seqlen >= self.scheduler.context_len:
            req.finished_reason = FINISH_LENGTH(len(req.output_ids))
            return True
        if len(req.output_ids) < sp.min_new_tokens:
            return False
        if req.grammar is not None and req.grammar.is_terminated():
            req.finished_reason = FINISH_MATCHED_TOKEN(last)
            return True
        if last in sp.stop_token_ids or (not sp.ignore_eos and last in req.eos_token_ids):
            req.finished_reason = FINISH_MATCHED_TOKEN(last)
            return True
        if sp.stop and self.tokenizer is not None:
            tail = self.tokenizer.decode(req.output_ids[-(sp.stop_str_max_len + 1) :])
            for stop in sp.stop:
                if stop and stop in tail:
                    req.finished_reason = FINISH_MATCHED_STR(stop)
                    return True
        return False

    def emit_finished(self, req: Req) -> None:
        self._emit([req])

    def _emit(self, reqs: list[Req]) -> None:
        for req in reqs:
            if req.finished():
                self.finished_reqs[req.rid] = req
        if self.listener is not None and reqs:
            self.listener(reqs)
