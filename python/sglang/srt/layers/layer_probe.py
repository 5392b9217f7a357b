"""Layer probes: the residual stream after chosen layers, and the logit lens, inside one forward.

Owns the device side of `hidden_states_layers` and `logit_lens` (docs/request_fields.md). The
scheduler describes the rows that probe in a `ProbeSpec` (host lists); `ForwardBatch.init_new`
turns it into a `LayerProbe`, which every model's layer loop feeds through `tap_layer` after each
decoder layer (the one-call CPU decode layers, layers/cpu_decoder_layers.py, take the same rows
inside their C call, with the same norm call, and hand them over through `take`). A tap keeps only the query row of each probing request (the last prompt token of a
prefill, the single token of a decode step): the residual stream after that layer, i.e. the
layer's output plus the residual the model carries separately (fused add-RMSNorm models), before
any final norm. For logit-lens layers it also applies the model's own final norm (its fused
add-and-norm form where the model keeps the residual apart, the very call the model makes after
its last layer). The logits processor runs the lens rows through its own LM head (TP gather,
vocabulary trim and final-logit softcap included) in the same call as the rows it samples from;
a lens layer whose final-normed rows are bit-identical to the sampled rows (the last layer) adds
no rows, it reads the sampled rows' logits. `finish` takes the top-n of each lens row's
log_softmax where the rows lie (sgl_kernel.cpu_log_softmax_topk on CPU) and packs everything
into one float32 tensor, so a step costs one device-to-host copy (`unpack` reads it back on the
host).

Cheap when nobody asks: `tap_layer` reads one attribute and returns. Batches that probe run
eagerly (the CUDA-graph runner and torch.compile path refuse them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from sgl_kernel.cpu_log_softmax_topk import log_softmax_topk


@dataclass
class ProbeSpec:
    """Which rows of a forward probe and what the union of their requests asks for."""

    batch_rows: list[int]  # batch index of each probing request
    token_index: list[int]  # flat token index (in this forward) of each row's query
    hidden_layers: tuple[int, ...]  # layers whose residual stream goes to the host
    lens_layers: tuple[int, ...]  # layers whose logit lens is computed
    top_n: int  # the largest top_n asked for (0 without lens layers)
    options: list[Any]  # each row's own layer_probes.ProbeRequest (what the host keeps)

    @property
    def tapped(self) -> frozenset[int]:
        return frozenset(self.hidden_layers) | frozenset(self.lens_layers)


class ProbeResult(NamedTuple):
    """What the logits processor hands back: the spec and the packed device tensor."""

    spec: ProbeSpec
    packed: torch.Tensor


class ProbeHost(NamedTuple):
    """One forward's probes on the host, row-major as in the spec."""

    hidden: Any  # numpy float32 [len(hidden_layers), rows, hidden]
    lens_values: Any  # numpy float32 [len(lens_layers), rows, top_n]
    lens_ids: Any  # numpy int32 [len(lens_layers), rows, top_n]


class LayerProbe:
    """The taps of one forward (created per forward by ForwardBatch.init_new)."""

    def __init__(self, spec: ProbeSpec, device: torch.device) -> None:
        self.spec = spec
        self.layers = spec.tapped
        self.index = torch.tensor(spec.token_index, dtype=torch.int64).to(device, non_blocking=True)
        self.batch_index = torch.tensor(spec.batch_rows, dtype=torch.int64).to(
            device, non_blocking=True
        )
        self.stream: dict[int, torch.Tensor] = {}
        self.normed: dict[int, torch.Tensor] = {}
        # Per lens layer (layer-major), per probing row: its row of the LM head's output.
        self.lens_at: list[int] = []

    def record(
        self,
        layer_id: int,
        hidden: torch.Tensor,
        residual: Optional[torch.Tensor],
        norm: Callable[..., Any],
    ) -> None:
        # Gathering copies the rows, so in-place kernels of later layers cannot change them.
        rows = hidden[self.index]
        lens = layer_id in self.spec.lens_layers
        if residual is None:
            if lens:
                self.normed[layer_id] = norm(rows)
        elif lens:
            # The model's final call, norm(hidden, residual) -> (normed, hidden + residual).
            self.normed[layer_id], rows = norm(rows, residual[self.index])
        else:
            rows = rows + residual[self.index]
        if layer_id in self.spec.hidden_layers:
            self.stream[layer_id] = rows

    def take(self, stream: torch.Tensor, normed: torch.Tensor, skip: list[bool]) -> None:
        """The rows `record` would keep, computed elsewhere (the one-call CPU decode layers):
        stream [len(hidden_layers), rows, hidden] and normed [len(lens_layers), rows, hidden],
        slot-major as in the spec; layers with `skip[layer]` were recorded already."""
        for slot, layer in enumerate(self.spec.hidden_layers):
            if not skip[layer]:
                self.stream[layer] = stream[slot]
        for slot, layer in enumerate(self.spec.lens_layers):
            if not skip[layer]:
                self.normed[layer] = normed[slot]

    def lens_rows(self, final: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows the LM head adds to `final` (the rows the logits processor samples from)
        for the lens: the final-normed rows of each lens layer, stacked layer-major; None when
        no layer needs any.

        The deepest lens layer adds none when its rows equal the probing requests' rows of
        `final` bit for bit (the model's last layer: the same final norm of the same stream),
        and reads their logits instead; one LM-head call serves everything, so the head's
        weight is read once per step."""
        spec = self.spec
        self.lens_at = []
        if not spec.lens_layers:
            return None
        rows, base, extra = len(spec.batch_rows), final.shape[0], []
        deepest = max(spec.lens_layers)
        for layer in spec.lens_layers:
            normed = self.normed[layer].to(final.dtype)
            if layer == deepest and torch.equal(normed, final[self.batch_index]):
                self.lens_at += spec.batch_rows
                continue
            self.lens_at += range(base, base + rows)
            base += rows
            extra.append(normed)
        return torch.cat(extra) if extra else None

    def finish(self, logits: Optional[torch.Tensor]) -> ProbeResult:
        """Everything the host needs, packed into one flat float32 tensor (see `unpack`).

        `logits` are the logits processor's float32 logits of its own rows followed by
        `lens_rows()`; they are only read."""
        spec = self.spec
        parts = [self.stream[i].float().reshape(-1) for i in spec.hidden_layers]
        if spec.lens_layers:
            assert logits is not None
            values, ids = log_softmax_topk(logits, self.lens_at, spec.top_n)
            # int32 ids ride bit-for-bit in the float32 buffer (a view, not a conversion).
            parts += [values.reshape(-1), ids.view(torch.float32).reshape(-1)]
        return ProbeResult(spec, torch.cat(parts))


def tap_layer(
    forward_batch: Any,
    layer_id: int,
    hidden: torch.Tensor,
    residual: Optional[torch.Tensor],
    norm: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Called by a model after decoder layer `layer_id`: `hidden` (+ `residual`, when the model
    keeps it apart) is the residual stream; `norm` is the model's final norm."""
    probe = forward_batch.layer_probe
    if probe is not None and layer_id in probe.layers:
        probe.record(layer_id, hidden, residual, norm)


def unpack(spec: ProbeSpec, packed: torch.Tensor) -> ProbeHost:
    """The one host copy of a forward's probes, split back into its parts."""
    flat = packed.cpu().numpy()
    rows = len(spec.batch_rows)
    shape = (len(spec.lens_layers), rows, spec.top_n)
    n_lens = shape[0] * rows * spec.top_n
    n_hidden = flat.size - 2 * n_lens
    hidden_size = n_hidden // max(len(spec.hidden_layers) * rows, 1)
    hidden = flat[:n_hidden].reshape(len(spec.hidden_layers), rows, hidden_size)
    values = flat[n_hidden : n_hidden + n_lens].reshape(shape)
    ids = flat[n_hidden + n_lens :].view("<i4").reshape(shape)
    return ProbeHost(hidden, values, ids)
