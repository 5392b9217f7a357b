"""Per-request layer probes: `hidden_states_layers` and `logit_lens` (docs/request_fields.md).

Owns the host side of the two fields, from the request body to the response JSON:
- `parse_probe_request` validates a request's fields (the tokenizer manager turns its ValueError
  into HTTP 400) and checks the size limit of `--hidden-states-max-bytes`;
- `build_probe_spec` names, for one forward, the rows that probe and the token of each that is
  the query of its next generated token (ScheduleBatch calls it);
- `collect` turns a forward's packed probes (srt/layers/layer_probe.py; one host copy) into one
  `ProbeRecord` per probing row, which travels with the sampled token to the tokenizer manager;
- `ProbeOutput` (one per request in the tokenizer manager) formats the records: the rows of
  `meta_info.hidden_states_layers`, the `logit_lens` list beside the output, or the `logit_lens`
  key of each attention content entry when the request also asked for attention tokens.

Row t of every field belongs to completion token t: it comes from the forward that sampled it
(the last prompt position for t = 0, decode step t after). Streamed outputs carry only the rows
of tokens new since the previous output, as attention content does. Nothing here imports torch
at module level (the tokenizer manager's process formats records).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

if TYPE_CHECKING:
    from sglang.srt.layers.layer_probe import ProbeSpec
    from sglang.srt.managers.schedule_batch import Req

PROBE_FIELDS = ("hidden_states_layers", "hidden_states_format", "logit_lens")
HIDDEN_FORMATS = ("float", "base64")
DEFAULT_TOP_N = 5
MAX_TOP_N = 20
# Bytes per returned value: rows are float32 whatever the model's dtype.
FLOAT_BYTES = 4


@dataclass(frozen=True)
class ProbeRequest:
    """One request's validated probe options; layer ids are absolute."""

    hidden_layers: tuple[int, ...] = ()
    hidden_format: str = "float"
    lens_layers: tuple[int, ...] = ()
    top_n: int = DEFAULT_TOP_N


@dataclass
class ProbeRecord:
    """The probes of one generated token."""

    hidden: dict[int, bytes]  # layer -> the residual stream as little-endian float32 bytes
    lens: dict[int, tuple[list[int], list[float]]]  # layer -> top-n (token ids, logprobs)


def _layers(name: str, value: Any, num_layers: int) -> tuple[int, ...]:
    """Absolute, de-duplicated layer ids in the order given (negative ids count from the top)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a non-empty list of layer ids, got {value!r}")
    out: list[int] = []
    for layer in value:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{name} must hold integer layer ids, got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"{name}: layer {layer} is out of range; the model has {num_layers} layers "
                f"(0..{num_layers - 1}, or -{num_layers}..-1 from the top)"
            )
        layer = layer % num_layers
        if layer not in out:
            out.append(layer)
    return tuple(out)


def parse_probe_request(
    fields: Mapping[str, Any],
    *,
    num_layers: int,
    hidden_size: int,
    max_new_tokens: int,
    max_bytes: int,
) -> Optional[ProbeRequest]:
    """Validate a request's probe fields; None when it asks for neither. Raises ValueError."""
    hidden_value = fields.get("hidden_states_layers")
    fmt = fields.get("hidden_states_format")
    lens_value = fields.get("logit_lens")
    if fmt is not None and hidden_value is None:
        raise ValueError("hidden_states_format needs hidden_states_layers")
    if hidden_value is None and lens_value is None:
        return None
    hidden_layers: tuple[int, ...] = ()
    if hidden_value is not None:
        hidden_layers = _layers("hidden_states_layers", hidden_value, num_layers)
        fmt = "float" if fmt is None else fmt
        if fmt not in HIDDEN_FORMATS:
            raise ValueError(f"hidden_states_format must be one of {HIDDEN_FORMATS}, got {fmt!r}")
        size = len(hidden_layers) * hidden_size * FLOAT_BYTES * max_new_tokens
        if size > max_bytes:
            raise ValueError(
                f"hidden_states_layers would return up to {size} bytes ({len(hidden_layers)} "
                f"layers x {hidden_size} floats x {max_new_tokens} max_new_tokens x 4), over the "
                f"server's --hidden-states-max-bytes {max_bytes}; ask for fewer layers or tokens"
            )
    lens_layers: tuple[int, ...] = ()
    top_n = DEFAULT_TOP_N
    if lens_value is not None:
        if not isinstance(lens_value, Mapping):
            raise ValueError(
                f'logit_lens must be an object {{"layers": [...], "top_n": n}}, got {lens_value!r}'
            )
        unknown = sorted(set(lens_value) - {"layers", "top_n"})
        if unknown:
            raise ValueError(f"logit_lens: unknown key {unknown[0]!r} (keys: layers, top_n)")
        lens_layers = _layers("logit_lens.layers", lens_value.get("layers"), num_layers)
        top_n = lens_value.get("top_n", DEFAULT_TOP_N)
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= MAX_TOP_N:
            raise ValueError(
                f"logit_lens.top_n must be an integer in [1, {MAX_TOP_N}], got {top_n!r}"
            )
    return ProbeRequest(hidden_layers, fmt or "float", lens_layers, top_n)


# ---- scheduler side -----------------------------------------------------------------------------
def build_probe_spec(reqs: list[Req], ext_lens: Optional[list[int]]) -> Optional[ProbeSpec]:
    """The probing rows of a forward; `ext_lens` per request for an extend, None for a decode."""
    rows = [i for i, req in enumerate(reqs) if req.probe is not None]
    if not rows:
        return None
    from sglang.srt.layers.layer_probe import ProbeSpec

    if ext_lens is None:
        token_index = rows
    else:
        ends, total = [], 0
        for length in ext_lens:
            total += length
            ends.append(total - 1)
        token_index = [ends[i] for i in rows]
    options = [reqs[i].probe for i in rows]
    hidden = sorted({layer for o in options for layer in o.hidden_layers})
    lens = sorted({layer for o in options for layer in o.lens_layers})
    top_n = max((o.top_n for o in options if o.lens_layers), default=0)
    return ProbeSpec(rows, token_index, tuple(hidden), tuple(lens), top_n, options)


def collect(logits_output: Any) -> Optional[dict[int, ProbeRecord]]:
    """Batch index -> ProbeRecord of a forward's probing rows (the step's one host copy)."""
    result = getattr(logits_output, "layer_probe", None)
    if result is None:
        return None
    from sglang.srt.layers.layer_probe import unpack

    spec = result.spec
    host = unpack(spec, result.packed)
    hidden_at = {layer: c for c, layer in enumerate(spec.hidden_layers)}
    lens_at = {layer: c for c, layer in enumerate(spec.lens_layers)}
    records: dict[int, ProbeRecord] = {}
    for k, (row, options) in enumerate(zip(spec.batch_rows, spec.options)):
        hidden = {
            layer: host.hidden[hidden_at[layer], k].astype("<f4").tobytes()
            for layer in options.hidden_layers
        }
        n = options.top_n
        lens = {
            layer: (
                host.lens_ids[lens_at[layer], k, :n].tolist(),
                host.lens_values[lens_at[layer], k, :n].tolist(),
            )
            for layer in options.lens_layers
        }
        records[row] = ProbeRecord(hidden, lens)
    return records


# ---- tokenizer-manager side ---------------------------------------------------------------------
def _lens_entries(
    lens: dict[int, tuple[list[int], list[float]]], token_text: Callable[[int], str]
) -> dict[str, list[dict[str, Any]]]:
    return {
        str(layer): [
            {"token_id": tid, "token": token_text(tid), "logprob": lp} for tid, lp in zip(ids, lps)
        ]
        for layer, (ids, lps) in lens.items()
    }


class ProbeOutput:
    """One request's probe records in the tokenizer manager, until they are yielded."""

    def __init__(self, options: ProbeRequest, with_attention: bool) -> None:
        self.options = options
        # With attention tokens the lens goes into the content entries (by completion index),
        # which may lag the records (the detokenizer holds entries back on a stop string).
        self.with_attention = with_attention
        self.pending: list[ProbeRecord] = []
        self.lens_by_index: dict[int, dict[int, tuple[list[int], list[float]]]] = {}
        self.received = 0

    def add(self, records: list[ProbeRecord]) -> None:
        for record in records:
            if self.with_attention and record.lens:
                self.lens_by_index[self.received] = record.lens
            self.pending.append(record)
            self.received += 1

    def fill_meta(self, meta: dict[str, Any], token_text: Callable[[int], str]) -> None:
        """Put the rows of the tokens not yielded before into `meta`; they are dropped."""
        records, self.pending = self.pending, []
        options = self.options
        if options.hidden_layers:
            encode = _encode_base64 if options.hidden_format == "base64" else _encode_floats
            meta["hidden_states_layers"] = {
                str(layer): [encode(r.hidden[layer]) for r in records]
                for layer in options.hidden_layers
            }
        if options.lens_layers and not self.with_attention:
            meta["logit_lens"] = [_lens_entries(r.lens, token_text) for r in records]

    def attach_lens(
        self, content: list[dict[str, Any]], first_index: int, token_text: Callable[[int], str]
    ) -> None:
        """Add `logit_lens` to attention content entries first_index, first_index + 1, ..."""
        if not self.options.lens_layers:
            return
        for i, entry in enumerate(content):
            lens = self.lens_by_index.pop(first_index + i, None)
            if lens is not None:
                entry["logit_lens"] = _lens_entries(lens, token_text)


def _encode_floats(raw: bytes) -> list[float]:
    import numpy as np

    return np.frombuffer(raw, dtype="<f4").tolist()


def _encode_base64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def openai_extras(meta: Mapping[str, Any], stream: bool = False) -> dict[str, Any]:
    """The probe fields of a native output, as OpenAI choice fields (absent when not asked).

    A stream chunk carries the rows of its new tokens only, and no field when it has none."""
    out = {name: meta[name] for name in ("hidden_states_layers", "logit_lens") if name in meta}
    if stream:
        rows = out.get("hidden_states_layers")
        if rows is not None and not any(rows.values()):
            del out["hidden_states_layers"]
        if not out.get("logit_lens", True):
            del out["logit_lens"]
    return out
