"""The detokenizer process: token ids in, safe text deltas out.

Owns per-request incremental decoding. It receives `BatchTokenIDOut` from the scheduler, keeps
each rid's ids and offsets, and sends `BatchStrOut` to the tokenizer manager with only the text
that is final: text whose decoding ends in U+FFFD (a multi-byte character split across tokens)
is held back until the next token completes it, and a tail that could be the start of a stop
string is held back until it is clear it is not. On a stop-string finish the text is cut before
the stop string unless `no_stop_trim`. Attention-token records (one per output token) are passed
on in step with the text: with stop strings, a token's record is released once some of its text
has been shown, and on a stop-string finish the records of tokens cut away with the stop string
are dropped. `DecodeState` is pure and unit-testable.
"""

from __future__ import annotations

import bisect
import logging
import signal
import traceback
from dataclasses import dataclass, field
from typing import Any

import zmq

from sglang.srt.managers.io_struct import (
    BatchStrOut,
    BatchTokenIDOut,
    DetokenizeOptions,
    recv_msg,
    send_msg,
)
from sglang.srt.managers.step_profile import DETOKENIZE, HOP_SCHED_DETOK

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
# Leading tokens re-decoded as context, so tokenizers that add a space at a word start (SentencePiece)
# give the same characters as decoding the whole sequence.
CONTEXT_TOKENS = 5


@dataclass
class DecodeState:
    """Incremental decoding of one request's output ids."""

    options: DetokenizeOptions
    ids: list[int] = field(default_factory=list)
    text: str = ""  # everything decoded so far that is complete characters
    prefix_offset: int = 0  # ids[prefix_offset:read_offset] is context already in `text`
    read_offset: int = 0  # ids before this are in `text`
    emitted: int = 0  # characters of `text` already sent
    # Attention records: received and not yet released (released ones are not kept), how many
    # were released before them; where each token's text starts.
    attention: list[Any] = field(default_factory=list)
    attention_released: int = 0
    token_starts: list[int] = field(default_factory=list)

    def _decode(self, tokenizer: Any, ids: list[int]) -> str:
        kwargs: dict[str, Any] = {"skip_special_tokens": self.options.skip_special_tokens}
        if not self.options.spaces_between_special_tokens:
            kwargs["spaces_between_special_tokens"] = False
        return tokenizer.decode(ids, **kwargs)

    def add(self, tokenizer: Any, new_ids: list[int], finish: dict[str, Any] | None) -> str:
        """Append ids; return the newly showable text (all remaining text once finished)."""
        self.ids.extend(new_ids)
        if len(self.ids) > self.read_offset:
            context = self._decode(tokenizer, self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(tokenizer, self.ids[self.prefix_offset :])
            # A trailing U+FFFD means the last token ends inside a character: wait for more ids.
            if finish is not None or not full.endswith(REPLACEMENT_CHAR):
                if full.startswith(context):
                    self.text += full[len(context) :]
                else:
                    # Rare: the context decodes differently with more ids; fall back to a full decode.
                    self.text = self._decode(tokenizer, self.ids)
                self.read_offset = len(self.ids)
                self.prefix_offset = max(0, self.read_offset - CONTEXT_TOKENS)
        if finish is not None:
            end = len(self.text)
            matched = finish.get("matched") if finish.get("type") == "stop" else None
            if isinstance(matched, str) and matched and not self.options.no_stop_trim:
                # Search only where the stop string can start: after what was already sent.
                pos = self.text.find(matched, max(0, self.emitted - len(matched)))
                if pos >= 0:
                    end = max(pos, self.emitted)
        else:
            end = len(self.text) - self._stop_holdback()
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def release_attention(
        self, tokenizer: Any, new_records: list[Any], finish: dict[str, Any] | None
    ) -> list[Any]:
        """Take the records of new tokens; return those whose token's text is now final.

        Call after `add` for the same message. Without stop strings every record is final at once.
        """
        self.attention.extend(new_records)
        count = self.attention_released + len(self.attention)
        matched = finish.get("matched") if finish is not None else None
        trims = finish is None or (finish.get("type") == "stop" and isinstance(matched, str))
        if self.options.stop and not self.options.no_stop_trim and tokenizer is not None and trims:
            while len(self.token_starts) < len(self.ids):
                self.token_starts.append(self._token_start(tokenizer, len(self.token_starts)))
            # A token is shown once its text starts before what was emitted (the cut, at the end).
            count = min(count, bisect.bisect_left(self.token_starts, self.emitted))
        n = max(count - self.attention_released, 0)
        out, self.attention = self.attention[:n], self.attention[n:]
        self.attention_released += n
        return out

    def _token_start(self, tokenizer: Any, j: int) -> int:
        """Where token j's text starts: token j-1's start plus its text, decoded with at most
        CONTEXT_TOKENS ids before it, so the cost per token does not grow with the output
        (decoding the whole prefix for every token made long outputs with stop strings quadratic)."""
        if j == 0:
            return 0
        lo = max(0, j - 1 - CONTEXT_TOKENS)
        with_token = self._decode(tokenizer, self.ids[lo:j])
        without = self._decode(tokenizer, self.ids[lo : j - 1]) if j - 1 > lo else ""
        return self.token_starts[j - 1] + max(0, len(with_token) - len(without))

    def _stop_holdback(self) -> int:
        """Characters at the end of `text` that could still grow into a stop string."""
        if self.options.no_stop_trim:
            return 0
        hold = 0
        for stop in self.options.stop:
            # The whole stop string may already be present (finish arrives with this batch).
            if stop and stop in self.text[max(0, self.emitted - len(stop)) :]:
                hold = max(hold, len(self.text) - self.text.rfind(stop))
                continue
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return min(hold, len(self.text) - self.emitted)


class DetokenizerManager:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}

    def handle(self, batch: BatchTokenIDOut) -> BatchStrOut:
        texts: list[str] = []
        attention: list[Any] = []
        for i, rid in enumerate(batch.rids):
            state = self.states.get(rid)
            if state is None:
                state = DecodeState(batch.detokenize_options[i] or DetokenizeOptions())
                self.states[rid] = state
            finish = batch.finished_reasons[i]
            if self.tokenizer is None:
                texts.append("")
            else:
                texts.append(state.add(self.tokenizer, batch.new_output_ids[i], finish))
            records = batch.attention_records[i] if batch.attention_records else None
            if records is not None:
                if self.tokenizer is None:
                    state.ids.extend(batch.new_output_ids[i])
                records = state.release_attention(self.tokenizer, records, finish)
            attention.append(records)
            if finish is not None:
                del self.states[rid]
        return BatchStrOut(
            rids=batch.rids,
            new_texts=texts,
            new_output_ids=batch.new_output_ids,
            finished_reasons=batch.finished_reasons,
            prompt_tokens=batch.prompt_tokens,
            completion_tokens=batch.completion_tokens,
            cached_tokens=batch.cached_tokens,
            output_token_logprobs=batch.output_token_logprobs,
            output_top_logprobs=batch.output_top_logprobs,
            input_token_logprobs=batch.input_token_logprobs,
            input_top_logprobs=batch.input_top_logprobs,
            attention_records=attention,
            hidden_states=batch.hidden_states,
            attention_prompt=batch.attention_prompt,
            probe_records=batch.probe_records,
        )


def run_detokenizer_process(server_args: Any, port_args: Any, parent_pid: int) -> None:
    """Process entry: forward every scheduler output as text until the parent exits."""
    from sglang.srt.managers.scheduler_process import (
        PARENT_CHECK_MS,
        configure_child_logging,
        set_process_name,
        watch_parent,
    )

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_child_logging(server_args.log_level, "Detokenizer")
    set_process_name("sglang-detok")
    tokenizer = None
    if not server_args.skip_tokenizer_init:
        from sglang.srt.hf_transformers_utils import get_tokenizer

        tokenizer = get_tokenizer(
            server_args.tokenizer_path,
            tokenizer_mode=server_args.tokenizer_mode,
            trust_remote_code=server_args.trust_remote_code,
        )
    ctx = zmq.Context(2)
    recv = ctx.socket(zmq.PULL)
    recv.bind(port_args.detokenizer_ipc_name)
    send = ctx.socket(zmq.PUSH)
    send.connect(port_args.tokenizer_ipc_name)
    manager = DetokenizerManager(tokenizer)
    poller = zmq.Poller()
    poller.register(recv, zmq.POLLIN)
    try:
        while True:
            if not poller.poll(PARENT_CHECK_MS):
                if not watch_parent(parent_pid):
                    return
                continue
            msg = recv_msg(recv)
            if isinstance(msg, BatchTokenIDOut):
                stamp = msg.profile
                started = stamp.received(HOP_SCHED_DETOK) if stamp is not None else 0.0
                out = manager.handle(msg)
                if stamp is not None:
                    stamp.forwarded(DETOKENIZE, started)
                    out.profile = stamp
                send_msg(send, out)
            else:
                logger.error("detokenizer got an unknown message %r", type(msg).__name__)
    except Exception:
        logger.error("Detokenizer hit an exception:\n%s", traceback.format_exc())
        raise SystemExit(1)
