"""A request's state in the tokenizer manager, and the native output dicts made from it.

Owns `ReqState` (what has arrived for one request: text, ids, logprobs, attention records, hidden
states, layer probes, and how much of each a stream has already yielded) and `make_output`, which
turns it into a `/generate` output dict: cumulative or deltas, logprobs with or without token
text, the attention-token report (header, new entries, prompt entries) and the probe fields. The
tokenizer manager (tokenizer_manager.py) fills the state from the detokenizer's outputs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from sglang.srt.attention_capture.prompt import format_prompt_content
from sglang.srt.attention_capture.records import format_content, report_header
from sglang.srt.managers.io_struct import GenerateReqInput

# The text of one token id (the tokenizer manager's cached decode).
TokenText = Callable[[int], str]


@dataclass
class ReqState:
    obj: GenerateReqInput
    prompt_tokens: int
    created: float = field(default_factory=time.perf_counter)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finished_reason: Optional[dict[str, Any]] = None
    finished: bool = False
    completion_tokens: int = 0
    cached_tokens: int = 0
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[Any] = field(default_factory=list)
    input_token_logprobs: list[tuple[Optional[float], int]] = field(default_factory=list)
    input_top_logprobs: list[Any] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    # Offsets already yielded (for --stream-output deltas).
    yielded_text: int = 0
    yielded_ids: int = 0
    yielded_logprobs: int = 0  # output logprobs already yielded (stream_deltas)
    yielded_input_logprobs: bool = False
    last_token_time: Optional[float] = None  # when the latest output tokens arrived (metrics)
    # Attention tokens: validated options, the prompt's ids, the records not yielded yet (the
    # only copy: a stream drops them once sent, a non-streaming request holds all until the end),
    # and how many were yielded before them (the completion index of the first pending one).
    attention_options: Any = None
    prompt_ids: list[int] = field(default_factory=list)
    attention_records: list[Any] = field(default_factory=list)
    attention_yielded: int = 0
    # attention_prompt_positions: (query position, record) pairs not yielded yet.
    attention_prompt: list[Any] = field(default_factory=list)
    # Hidden states (return_hidden_states): entries as JSON-ready lists, and how many were yielded.
    hidden_states: list[Any] = field(default_factory=list)
    yielded_hidden: int = 0
    # hidden_states_layers / logit_lens: a layer_probes.ProbeOutput, None when not asked.
    probe: Any = None


def make_output(
    state: ReqState, stream_output: bool, token_text: TokenText, has_tokenizer: bool
) -> dict[str, Any]:
    """The native output dict for what `state` holds now, advancing its yielded offsets.

    A stream's text and ids are deltas with --stream-output (`stream_output`) or when the
    request asks for them (`stream_deltas`, the OpenAI routes), which also makes its logprobs
    deltas (the prompt's once); attention content is always a delta (`_attention_report`).
    """
    obj = state.obj
    incremental = obj.stream and (stream_output or obj.stream_deltas)
    if incremental:
        text = state.text[state.yielded_text :]
        output_ids = state.output_ids[state.yielded_ids :]
    else:
        text, output_ids = state.text, list(state.output_ids)
    state.yielded_text, state.yielded_ids = len(state.text), len(state.output_ids)
    meta: dict[str, Any] = {
        "id": obj.rid,
        "finish_reason": state.finished_reason,
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": state.completion_tokens,
        "cached_tokens": state.cached_tokens,
        "e2e_latency": time.perf_counter() - state.created,
    }
    if obj.return_logprob:
        with_text = obj.return_text_in_logprobs and has_tokenizer
        # Deltas: the prompt's logprobs once (they arrive with the first output), then only
        # the new tokens' logprobs in each output.
        deltas = obj.stream and obj.stream_deltas
        start = state.yielded_logprobs if deltas else 0
        state.yielded_logprobs = len(state.output_token_logprobs)
        inputs, input_tops = state.input_token_logprobs, state.input_top_logprobs
        if deltas and state.yielded_input_logprobs:
            inputs, input_tops = [], []
        state.yielded_input_logprobs = state.yielded_input_logprobs or bool(inputs)
        meta["input_token_logprobs"] = _fmt(inputs, with_text, token_text)
        meta["output_token_logprobs"] = _fmt(
            state.output_token_logprobs[start:], with_text, token_text
        )
        meta["input_top_logprobs"] = [
            _fmt(x, with_text, token_text) if x is not None else None for x in input_tops
        ]
        meta["output_top_logprobs"] = [
            _fmt(x, with_text, token_text) for x in state.output_top_logprobs[start:]
        ]
    if state.attention_options is not None:
        meta["attention_tokens"] = _attention_report(state, token_text)
    if obj.return_hidden_states:
        first = state.yielded_hidden if incremental else 0
        state.yielded_hidden = len(state.hidden_states)
        meta["hidden_states"] = state.hidden_states[first:]
    if state.probe is not None:
        state.probe.fill_meta(meta, token_text)
    return {"text": text, "output_ids": output_ids, "meta_info": meta}


def _attention_report(state: ReqState, token_text: TokenText) -> dict[str, Any]:
    """The header and the entries of the records not yielded before, which are dropped.

    NOTE: unlike the text, a stream's attention content is never cumulative (with or
    without --stream-output): re-sending every earlier entry in each chunk made a stream's
    size quadratic in its length. Each record is formatted once and not kept after."""
    records, state.attention_records = state.attention_records, []
    first = state.attention_yielded
    state.attention_yielded += len(records)
    report = report_header(state.attention_options, len(state.prompt_ids))
    report["content"] = format_content(
        records,
        first,
        state.attention_options,
        state.prompt_ids,
        state.output_ids,
        token_text,
    )
    if state.attention_prompt:
        # Sent once: the prefill's rows arrive with (or before) the first token.
        items, state.attention_prompt = state.attention_prompt, []
        report["prompt_content"] = format_prompt_content(
            items, state.attention_options, state.prompt_ids, token_text
        )
    if state.probe is not None:
        state.probe.attach_lens(report["content"], first, token_text)
    return report


def _fmt(pairs: list[Any], with_text: bool, token_text: TokenText) -> list[list[Any]]:
    if with_text:
        return [[lp, tid, token_text(tid)] for lp, tid in pairs]
    return [[lp, tid, None] for lp, tid in pairs]
