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

    @property
    def per_layer(self) -> bool:
        return self.aggregation == "none"


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
) -> Optional[AttentionRequest]:
    """Validate a request's attention fields; None when it does not ask. Raises ValueError.

    `fields` holds return_attention_tokens, attention_tokens_top_k, attention_layers,
    attention_layer_aggregation and attention_exclude_sink (missing keys mean defaults).
    """
    if not fields.get("return_attention_tokens"):
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
    return AttentionRequest(top_k=k, layers=selected, aggregation=aggregation, exclude_sink=sink)
