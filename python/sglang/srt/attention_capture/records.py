"""Per-token attention records: from device tensors to host records to the response JSON.

Owns the two host-side forms of a capture. `AttentionRecord` is one generated token's ranked
positions and scores (per layer too, when asked); the scheduler makes one per sampled token from a
`CaptureResult` (a single transfer per forward, with the sampled ids) and they travel to the
detokenizer and the tokenizer manager with the tokens. `report_header` and `format_content` build
the report object of docs/attention_tokens.md (token text, source, captured and excluded mass)
from records and token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from sglang.srt.attention_capture.config import AttentionRequest

if TYPE_CHECKING:  # the HTTP process formats records and must not import torch for it
    from sglang.srt.attention_capture.capture import CaptureResult

# One ranked list: (positions, scores, summed score of the excluded leading positions).
Ranked = tuple[list[int], list[float], float]


@dataclass
class AttentionRecord:
    """The attention report of one generated token (its query is the position before it)."""

    positions: list[int]
    scores: list[float]
    excluded_mass: float = 0.0
    layers: Optional[dict[int, Ranked]] = None  # per-layer lists ("none" aggregation)


def _top(positions: list[int], scores: list[float], k: int) -> tuple[list[int], list[float]]:
    """The first k ranked entries, without the padding ranked after every real position."""
    pos, val = positions[:k], scores[:k]
    n = len(val)
    while n and val[n - 1] < 0:
        n -= 1
    return pos[:n], val[:n]


def result_to_records(result: CaptureResult) -> list[AttentionRecord]:
    """One record per capture row; the only device-to-host copy of the capture."""
    values, indices = result.values.tolist(), result.indices.tolist()
    excluded = result.excluded.tolist()
    per_layer = result.layer_values is not None
    if per_layer:
        lv, li = result.layer_values.tolist(), result.layer_indices.tolist()
        lx = result.layer_excluded.tolist()
    records: list[AttentionRecord] = []
    for i, req in enumerate(result.spec.requests):
        if req.per_layer and per_layer:
            layers: dict[int, Ranked] = {}
            for c, layer in enumerate(result.layers):
                if layer in req.layers:
                    pos, val = _top(li[c][i], lv[c][i], req.top_k)
                    layers[layer] = (pos, val, lx[c][i])
            records.append(AttentionRecord([], [], 0.0, layers))
        else:
            pos, val = _top(indices[i], values[i], req.top_k)
            records.append(AttentionRecord(pos, val, excluded[i]))
    return records


def report_header(options: AttentionRequest, prompt_tokens: int) -> dict[str, Any]:
    return {
        "top_k": options.top_k,
        "layers": list(options.layers),
        "layer_aggregation": options.aggregation,
        "head_aggregation": "mean",
        "prompt_tokens": prompt_tokens,
        "exclude_sink": options.exclude_sink,
    }


def format_content(
    records: list[AttentionRecord],
    first_index: int,
    options: AttentionRequest,
    prompt_ids: list[int],
    output_ids: list[int],
    token_text: Callable[[int], str],
) -> list[dict[str, Any]]:
    """Content entries for records[i] = completion token first_index + i."""
    n_prompt = len(prompt_ids)

    def attended(pos: list[int], scores: list[float]) -> list[dict[str, Any]]:
        out = []
        for p, s in zip(pos, scores):
            in_prompt = p < n_prompt
            tid = prompt_ids[p] if in_prompt else output_ids[p - n_prompt]
            out.append(
                {
                    "position": p,
                    "token_id": tid,
                    "token": token_text(tid),
                    "source": "prompt" if in_prompt else "completion",
                    "score": s,
                }
            )
        return out

    content = []
    for i, rec in enumerate(records):
        t = first_index + i
        tid = output_ids[t]
        entry: dict[str, Any] = {
            "token": token_text(tid),
            "token_id": tid,
            "position": n_prompt + t,
        }
        if rec.layers is not None:
            keys = [str(layer) for layer in rec.layers]
            ranked = list(rec.layers.values())
            entry["captured_mass"] = {k: sum(r[1]) for k, r in zip(keys, ranked)}
            if options.exclude_sink:
                entry["excluded_mass"] = {k: r[2] for k, r in zip(keys, ranked)}
            entry["layers"] = {k: attended(r[0], r[1]) for k, r in zip(keys, ranked)}
        else:
            entry["captured_mass"] = sum(rec.scores)
            if options.exclude_sink:
                entry["excluded_mass"] = rec.excluded_mass
            entry["top_attention"] = attended(rec.positions, rec.scores)
        content.append(entry)
    return content
