"""Which layers are captured and what one request asks for: the feature's validated options.

Owns the mapping of `--attention-capture-layers` (last | all | auto | explicit ids) to layer ids
for a model of known depth, and the check of a request's attention fields against the server's
settings. Every rule here produces a message that says what to change; the tokenizer manager turns
it into HTTP 400. Nothing here touches tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

AGGREGATIONS = ("mean", "none")
HEAD_AGGREGATIONS = ("mean", "max", "none")
# Most heads with attention_head_aggregation "none": each is its own top-k list per token (and
# per layer), and its own score row on the device.
MAX_SPLIT_HEADS = 8
# Most spans per request: each is a name in every content entry's span_mass.
MAX_SPANS = 256
# Per-entry statistics of `attention_stats`, in the order the device computes them.
STAT_NAMES = ("entropy", "sink_mass", "prompt_mass", "completion_mass", "mean_distance")
AUTO_LAYER_COUNT = 4
# Largest --attention-tokens-top-k: the per-layer top-k buffers hold 12 bytes per entry for every
# captured layer and running request (all layers of an 8B model, 1024 rows, k=1024: 384 MiB), and
# a ranked list longer than this is a dump of the row, not a top-k.
MAX_TOP_K = 1024


def check_server_top_k(top_k: int) -> None:
    """Start-up check of --attention-tokens-top-k's upper bound (ValueError naming the flag)."""
    if int(top_k) > MAX_TOP_K:
        raise ValueError(f"attention_tokens_top_k must be at most {MAX_TOP_K}, got {top_k}")


def resolve_capture_layers(spec: Any, num_layers: int) -> tuple[int, ...]:
    """Layer ids captured by the server for `--attention-capture-layers` on a model this deep.

    `spec` is the flag's value: "last", "all", "auto", "i,j,k" or a tuple of ids. `auto` spreads about
    four layers over the depth and always includes the last one.
    """
    if num_layers < 1:
        raise ValueError("the model has no layers to capture")
    if isinstance(spec, str):
        from sglang.srt.server_args import parse_attention_capture_layers

        spec = parse_attention_capture_layers(spec)
    if spec in (None, "last"):
        return (num_layers - 1,)
    if spec == "all":
        return tuple(range(num_layers))
    if spec == "auto":
        count = min(AUTO_LAYER_COUNT, num_layers)
        # Evenly spaced from the top: L-1, then every L/count layers down, never layer -1.
        step = num_layers / count
        return tuple(sorted({num_layers - 1 - int(i * step) for i in range(count)}))
    ids = tuple(sorted(set(int(i) for i in spec)))
    bad = [i for i in ids if i < 0 or i >= num_layers]
    if bad:
        raise ValueError(
            f"--attention-capture-layers {','.join(map(str, ids))}: the model has {num_layers} "
            f"layers (0..{num_layers - 1}); {bad} is out of range"
        )
    return ids


@dataclass(frozen=True)
class AttentionRequest:
    """One request's validated attention-token options (what the scheduler acts on)."""

    top_k: int
    layers: tuple[int, ...]  # absolute layer ids, a non-empty subset of the captured set
    aggregation: str = "mean"  # "mean" over the selected layers, or "none" (one list per layer)
    exclude_sink: int = 0  # leading positions left out of the ranking
    # Global query-head ids the head aggregation runs over; None: every head (the plain mean).
    heads: Optional[tuple[int, ...]] = None
    head_aggregation: str = "mean"  # "mean" | "max" over `heads`, or "none" (a list per head)
    spans: tuple[tuple[str, int, int], ...] = ()  # (name, start, end) prompt ranges, end exclusive
    stats: bool = False  # entropy, sink/prompt/completion mass, mean distance per entry
    # attention_prompt_positions, validated by prompt.py: prompt query positions, ascending.
    prompt_positions: tuple[int, ...] = ()

    @property
    def per_layer(self) -> bool:
        return self.aggregation == "none"

    @property
    def per_head(self) -> bool:
        return self.head_aggregation == "none"

    @property
    def plain_heads(self) -> bool:
        """The default head aggregation: the mean over every head."""
        return self.heads is None and self.head_aggregation == "mean"


def _int_field(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def parse_attention_request(
    fields: Mapping[str, Any],
    *,
    enabled: bool,
    max_top_k: int,
    captured_layers: tuple[int, ...],
    num_layers: int,
    num_heads: int = 0,
    prompt_len: int = 0,
) -> Optional[AttentionRequest]:
    """Validate a request's attention fields; None when it does not ask. Raises ValueError.

    `fields` holds return_attention_tokens, attention_tokens_top_k, attention_layers,
    attention_layer_aggregation, attention_exclude_sink, attention_heads,
    attention_head_aggregation, attention_spans and attention_stats (missing keys mean
    defaults). `num_heads`: the model's query heads (all TP ranks); `prompt_len`: the prompt's
    token count, which spans must lie in.
    """
    if not fields.get("return_attention_tokens"):
        extra = [name for name in _NEEDS_REPORT if fields.get(name) not in (None, False)]
        if extra:
            raise ValueError(f"{extra[0]} needs return_attention_tokens: true")
        return None
    if not enabled:
        raise ValueError(
            "return_attention_tokens needs a server started with --return-attention-tokens"
        )
    k = fields.get("attention_tokens_top_k")
    k = max_top_k if k is None else _int_field("attention_tokens_top_k", k)
    if k < 1 or k > max_top_k:
        raise ValueError(
            f"attention_tokens_top_k must be between 1 and {max_top_k} (the server's "
            f"--attention-tokens-top-k), got {k}; lower it or restart the server with a larger "
            "--attention-tokens-top-k"
        )
    layers = fields.get("attention_layers")
    if layers is None:
        selected = captured_layers
    else:
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(
                f"attention_layers must be a non-empty list of layer indices, got {layers!r}"
            )
        ids = []
        for layer in layers:
            layer = _int_field("attention_layers", layer)
            # Negative ids count from the top, as in Python: -1 is the last layer.
            ids.append(layer + num_layers if layer < 0 else layer)
        missing = sorted({i for i in ids if i not in captured_layers})
        if missing:
            raise ValueError(
                f"attention_layers {sorted(set(ids))} includes layers {missing} that this server "
                f"does not capture; captured layers are {list(captured_layers)} (choose a subset, "
                "or restart with --attention-capture-layers covering them)"
            )
        selected = tuple(sorted(set(ids)))
    aggregation = fields.get("attention_layer_aggregation") or "mean"
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"attention_layer_aggregation must be 'mean' or 'none', got {aggregation!r}"
        )
    sink = fields.get("attention_exclude_sink")
    sink = 0 if sink is None else _int_field("attention_exclude_sink", sink)
    if sink < 0:
        raise ValueError(f"attention_exclude_sink must be >= 0 (a count of positions), got {sink}")
    heads, head_aggregation = _parse_heads(fields, num_heads)
    spans = _parse_spans(fields.get("attention_spans"), prompt_len)
    stats = fields.get("attention_stats")
    if stats is not None and not isinstance(stats, bool):
        raise ValueError(f"attention_stats must be true or false, got {stats!r}")
    stats = bool(stats)
    if head_aggregation != "mean":
        asked = "attention_spans" if spans else "attention_stats" if stats else None
        if asked:
            raise ValueError(
                f"{asked} needs attention_head_aggregation 'mean' (span mass and statistics are "
                f"of the head-mean row), got {head_aggregation!r}"
            )
    return AttentionRequest(
        top_k=k,
        layers=selected,
        aggregation=aggregation,
        exclude_sink=sink,
        heads=heads,
        head_aggregation=head_aggregation,
        spans=spans,
        stats=stats,
    )


# Fields that only mean something with return_attention_tokens (a 400 without it).
_NEEDS_REPORT = (
    "attention_heads",
    "attention_head_aggregation",
    "attention_spans",
    "attention_stats",
)


def _parse_heads(
    fields: Mapping[str, Any], num_heads: int
) -> tuple[Optional[tuple[int, ...]], str]:
    """(heads, head aggregation) of a request: global query-head ids, or None for all heads."""
    aggregation = fields.get("attention_head_aggregation") or "mean"
    if aggregation not in HEAD_AGGREGATIONS:
        raise ValueError(
            f"attention_head_aggregation must be 'mean', 'max' or 'none', got {aggregation!r}"
        )
    heads = fields.get("attention_heads")
    if heads is None:
        if aggregation == "none" and num_heads > MAX_SPLIT_HEADS:
            raise ValueError(
                f"attention_head_aggregation 'none' returns a list per head, at most "
                f"{MAX_SPLIT_HEADS}; the model has {num_heads} heads, so name at most "
                f"{MAX_SPLIT_HEADS} in attention_heads"
            )
        # A list per head names its heads; mean and max over all heads need no list.
        return (tuple(range(num_heads)) if aggregation == "none" else None), aggregation
    if not isinstance(heads, (list, tuple)) or not heads:
        raise ValueError(f"attention_heads must be a non-empty list of head indices, got {heads!r}")
    ids = sorted({_int_field("attention_heads", h) for h in heads})
    bad = [h for h in ids if h < 0 or h >= num_heads]
    if bad:
        raise ValueError(
            f"attention_heads {bad} out of range: the model has {num_heads} query heads "
            f"(0..{num_heads - 1})"
        )
    if aggregation == "none" and len(ids) > MAX_SPLIT_HEADS:
        raise ValueError(
            f"attention_head_aggregation 'none' allows at most {MAX_SPLIT_HEADS} attention_heads, "
            f"got {len(ids)}"
        )
    return tuple(ids), aggregation


def _parse_spans(spans: Any, prompt_len: int) -> tuple[tuple[str, int, int], ...]:
    """Validated (name, start, end) prompt ranges of `attention_spans`."""
    if spans is None:
        return ()
    if spans == "messages":
        raise ValueError(
            "attention_spans 'messages' works only on /v1/chat/completions (the chat template "
            "knows where each message is); elsewhere give a list of {name, start, end}"
        )
    if not isinstance(spans, (list, tuple)) or not spans:
        raise ValueError(
            'attention_spans must be a non-empty list of {"name", "start", "end"} '
            f'prompt token ranges (or "messages" on the chat route), got {spans!r}'
        )
    if len(spans) > MAX_SPANS:
        raise ValueError(f"attention_spans allows at most {MAX_SPANS} spans, got {len(spans)}")
    out, names = [], set()
    for span in spans:
        if not isinstance(span, Mapping) or set(span) != {"name", "start", "end"}:
            raise ValueError(
                f"attention_spans items must be objects with exactly name, start and end, got "
                f"{span!r}"
            )
        name = span["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"attention_spans names must be non-empty strings, got {name!r}")
        if name in names:
            raise ValueError(f"attention_spans names must be unique; {name!r} repeats")
        names.add(name)
        start = _int_field("attention_spans start", span["start"])
        end = _int_field("attention_spans end", span["end"])
        if not 0 <= start < end <= prompt_len:
            raise ValueError(
                f"attention_spans {name!r} [{start}, {end}) must satisfy 0 <= start < end <= "
                f"{prompt_len} (the prompt's token count; end is exclusive)"
            )
        out.append((name, start, end))
    return tuple(out)
