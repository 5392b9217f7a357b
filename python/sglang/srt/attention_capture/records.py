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

from sglang.srt.attention_capture.config import STAT_NAMES, AttentionRequest

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
    heads: Optional[dict[int, Ranked]] = None  # per-head lists (head aggregation "none")
    layer_heads: Optional[dict[int, dict[int, Ranked]]] = None  # per layer, then per head
    span_mass: Optional[list[float]] = None  # one per requested span, in the request's order
    stats: Optional[list[float]] = None  # values of config.STAT_NAMES, in that order


def _top(positions: list[int], scores: list[float], k: int) -> tuple[list[int], list[float]]:
    """The first k ranked entries, without the padding ranked after every real position."""
    pos, val = positions[:k], scores[:k]
    n = len(val)
    while n and val[n - 1] < 0:
        n -= 1
    return pos[:n], val[:n]


def _lists(t: Any) -> Any:
    return None if t is None else t.tolist()


def _ranked(pos: list[int], val: list[float], excluded: float, k: int) -> Ranked:
    top_pos, top_val = _top(pos, val, k)
    return top_pos, top_val, excluded


def result_to_records(result: CaptureResult) -> list[AttentionRecord]:
    """One record per capture row; the only device-to-host copy of the capture."""
    values, indices = result.values.tolist(), result.indices.tolist()
    excluded = result.excluded.tolist()
    lv, li, lx = map(_lists, (result.layer_values, result.layer_indices, result.layer_excluded))
    hv, hi, hx = map(_lists, (result.head_values, result.head_indices, result.head_excluded))
    lhv, lhi, lhx = map(
        _lists,
        (result.layer_head_values, result.layer_head_indices, result.layer_head_excluded),
    )
    spans, stats = _lists(result.span_mass), _lists(result.stats)
    records: list[AttentionRecord] = []
    for i, req in enumerate(result.spec.requests):
        rec = AttentionRecord([], [], 0.0)
        slots = list(enumerate(req.heads or ()))
        layer_slots = [(c, layer) for c, layer in enumerate(result.layers) if layer in req.layers]
        if req.per_head and req.per_layer and lhv is not None:
            rec.layer_heads = {
                layer: {h: _ranked(lhi[c][i][s], lhv[c][i][s], lhx[c][i][s], req.top_k)
                        for s, h in slots}
                for c, layer in layer_slots
            }  # fmt: skip
        elif req.per_head and hv is not None:
            rec.heads = {h: _ranked(hi[i][s], hv[i][s], hx[i][s], req.top_k) for s, h in slots}
        elif req.per_layer and lv is not None:
            rec.layers = {
                layer: _ranked(li[c][i], lv[c][i], lx[c][i], req.top_k) for c, layer in layer_slots
            }
        else:
            rec.positions, rec.scores = _top(indices[i], values[i], req.top_k)
            rec.excluded_mass = excluded[i]
        if req.spans and spans is not None:
            rec.span_mass = spans[i][: len(req.spans)]
        if req.stats and stats is not None:
            rec.stats = stats[i]
        records.append(rec)
    return records


def report_header(options: AttentionRequest, prompt_tokens: int) -> dict[str, Any]:
    header: dict[str, Any] = {
        "top_k": options.top_k,
        "layers": list(options.layers),
        "layer_aggregation": options.aggregation,
        "head_aggregation": options.head_aggregation,
        "prompt_tokens": prompt_tokens,
        "exclude_sink": options.exclude_sink,
    }
    if options.heads is not None:
        header["heads"] = list(options.heads)
    if options.spans:
        header["spans"] = [{"name": n, "start": a, "end": b} for n, a, b in options.spans]
    if options.stats:
        header["stats"] = True
    return header


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
        if rec.layer_heads is not None:
            entry["captured_mass"] = {
                str(layer): {str(h): sum(r[1]) for h, r in heads.items()}
                for layer, heads in rec.layer_heads.items()
            }
            if options.exclude_sink:
                entry["excluded_mass"] = {
                    str(layer): {str(h): r[2] for h, r in heads.items()}
                    for layer, heads in rec.layer_heads.items()
                }
            entry["layers"] = {
                str(layer): {"heads": {str(h): attended(r[0], r[1]) for h, r in heads.items()}}
                for layer, heads in rec.layer_heads.items()
            }
        elif rec.heads is not None or rec.layers is not None:
            lists = rec.heads if rec.heads is not None else rec.layers
            keys = [str(x) for x in lists]
            ranked = list(lists.values())
            entry["captured_mass"] = {k: sum(r[1]) for k, r in zip(keys, ranked)}
            if options.exclude_sink:
                entry["excluded_mass"] = {k: r[2] for k, r in zip(keys, ranked)}
            name = "heads" if rec.heads is not None else "layers"
            entry[name] = {k: attended(r[0], r[1]) for k, r in zip(keys, ranked)}
        else:
            entry["captured_mass"] = sum(rec.scores)
            if options.exclude_sink:
                entry["excluded_mass"] = rec.excluded_mass
            entry["top_attention"] = attended(rec.positions, rec.scores)
        if rec.span_mass is not None:
            entry["span_mass"] = {s[0]: m for s, m in zip(options.spans, rec.span_mass)}
        if rec.stats is not None:
            entry.update(zip(STAT_NAMES, rec.stats))
        content.append(entry)
    return content
