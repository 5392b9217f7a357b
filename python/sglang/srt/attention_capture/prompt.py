"""Prompt attention (`attention_prompt_positions`): the host side, without torch.

Owns what the field means and everything about it that runs on the CPU: its validation against
the prompt and `--attention-prompt-max-len` (`apply_prompt_positions`, tokenizer manager), the
prefix-cache rule (`prefix_limit`, the scheduler's prefix match), which query rows an extend
computes (`build_prompt_groups`, the batch's capture spec), the host records after the forward
(`collect_prompt_records`, output processor) and the response entries (`format_prompt_content`,
tokenizer manager). The device arithmetic is prompt_capture.py's.

Exactness with the prefix cache: a prompt row needs the query of its position, and a cached prefix
holds only K and V. So a request that asks positions never reuses the cache past its first asked
position still to compute: that one and everything after it are recomputed in the extend, which
gives their queries (and the backend's log-sum-exp) exactly as an uncached prefill would. Positions
before it keep the cache, and a request whose asked positions all lie past the cached prefix
loses nothing. Chunked prefill computes each position in the chunk that holds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from sglang.srt.attention_capture.config import AttentionRequest
from sglang.srt.attention_capture.records import AttentionRecord, format_content

if TYPE_CHECKING:
    from sglang.srt.attention_capture.capture import CaptureResult
    from sglang.srt.attention_capture.prompt_capture import PromptResult

ALL = "all"
FIELD = "attention_prompt_positions"


def apply_prompt_positions(
    attention: Optional[AttentionRequest], value: Any, prompt_len: int, max_len: int
) -> Optional[AttentionRequest]:
    """The request's options with its validated prompt positions (sorted, unique); raises
    ValueError (HTTP 400) when the field is wrong for this prompt or this server."""
    if value is None:
        return attention
    if attention is None:
        raise ValueError(f"{FIELD} needs return_attention_tokens: true")
    if not getattr(attention, "plain_heads", True):
        # The prompt rows are the plain head mean; other head selections are not computed there.
        raise ValueError(
            f"{FIELD} works with the default heads (attention_heads unset, "
            "attention_head_aggregation 'mean')"
        )
    if value == ALL:
        if prompt_len > max_len:
            raise ValueError(
                f"{FIELD} 'all' is allowed for prompts up to {max_len} tokens "
                f"(--attention-prompt-max-len); this prompt has {prompt_len}: list the "
                "positions you need"
            )
        return dataclasses.replace(attention, prompt_positions=tuple(range(prompt_len)))
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"{FIELD} must be a non-empty list of prompt positions or 'all', got {value!r}"
        )
    if any(isinstance(p, bool) or not isinstance(p, int) for p in value):
        raise ValueError(f"{FIELD} must hold integer positions, got {value!r}")
    positions = tuple(sorted(set(value)))
    bad = [p for p in positions if not 0 <= p < prompt_len]
    if bad:
        raise ValueError(
            f"{FIELD} {bad} out of range: the prompt has {prompt_len} tokens "
            f"(positions 0..{prompt_len - 1})"
        )
    if len(positions) > max_len:
        raise ValueError(
            f"{FIELD} allows at most {max_len} positions (--attention-prompt-max-len), "
            f"got {len(positions)}"
        )
    return dataclasses.replace(attention, prompt_positions=positions)


def pending_positions(req: Any) -> list[int]:
    """The request's asked prompt positions whose rows are not computed yet."""
    opt = req.attention
    if opt is None or not opt.prompt_positions:
        return []
    return [p for p in opt.prompt_positions if p >= req.prompt_attention_done]


def prefix_limit(req: Any) -> Optional[int]:
    """Most prefix-cache tokens the request may reuse: its first position still to compute
    (the module docstring says why), or None when it asks nothing more."""
    pending = pending_positions(req)
    return pending[0] if pending else None


@dataclass
class PromptGroup:
    """One request's prompt query rows in one extend."""

    batch_row: int  # the request's index in the batch
    pool_row: int  # its row in the req-to-token table
    options: AttentionRequest
    positions: list[int]  # absolute query positions, ascending
    token_index: list[int]  # each position's index among the extend's flattened tokens


def build_prompt_groups(reqs: list[Any]) -> list[PromptGroup]:
    """The prompt rows an extend computes: asked positions that lie in each request's segment.

    Called when the batch is prepared: `prefix_indices` and `extend_input_len` are this extend's.
    """
    groups: list[PromptGroup] = []
    start = 0
    for i, req in enumerate(reqs):
        prefix, length = len(req.prefix_indices), req.extend_input_len
        inside = [p for p in pending_positions(req) if prefix <= p < prefix + length]
        if inside:
            index = [start + p - prefix for p in inside]
            groups.append(PromptGroup(i, req.req_pool_idx, req.attention, inside, index))
        start += length
    return groups


def collect_prompt_records(reqs: list[Any], capture: Optional["CaptureResult"]) -> None:
    """Host records of an extend's prompt rows onto their requests (one transfer per group).
    `capture`: the forward's CaptureResult, None when nothing captured."""
    results: list[PromptResult] = (capture.prompt if capture is not None else None) or []
    for res in results:
        req = reqs[res.group.batch_row]
        req.prompt_attention_records.extend(zip(res.group.positions, res.to_records()))
        req.prompt_attention_done = res.group.positions[-1] + 1


def take_prompt_records(req: Any) -> Optional[list[tuple[int, AttentionRecord]]]:
    """The records not sent yet (the scheduler's output message takes them once)."""
    if req.attention is None or not req.prompt_attention_records:
        return None
    out, req.prompt_attention_records = req.prompt_attention_records, []
    return out


def format_prompt_content(
    items: list[tuple[int, AttentionRecord]],
    options: AttentionRequest,
    prompt_ids: list[int],
    token_text: Callable[[int], str],
) -> list[dict[str, Any]]:
    """`prompt_content`: one content-shaped entry per query position, `position` the query's."""
    # A prompt query attends only to prompt positions; format_content names each entry's token
    # from `output_ids`, so the queries' own prompt tokens stand in for it.
    query_ids = [prompt_ids[p] for p, _ in items]
    entries = format_content([r for _, r in items], 0, options, prompt_ids, query_ids, token_text)
    for entry, (p, _) in zip(entries, items):
        entry["position"] = p
    return entries
