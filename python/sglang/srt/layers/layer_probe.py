"""Layer probes: the residual stream after chosen layers, and the logit lens, inside one forward.

Owns the device side of `hidden_states_layers` and `logit_lens` (docs/request_fields.md). The
scheduler describes the rows that probe in a `ProbeSpec` (host lists); `ForwardBatch.init_new`
turns it into a `LayerProbe`, which every model's layer loop feeds through `tap_layer` after each
decoder layer. A tap keeps only the query row of each probing request (the last prompt token of a
prefill, the single token of a decode step): the residual stream after that layer, i.e. the
layer's output plus the residual the model carries separately (fused add-RMSNorm models), before
any final norm. For logit-lens layers it also applies the model's own final norm. The logits
processor runs the lens rows through its own LM head (TP gather, vocabulary trim and final-logit
softcap included) in the same call as the rows it samples from, and hands their logits to
`finish`, which takes the top-n of their log_softmax and packs everything into one float32
tensor, so a step costs one device-to-host copy (`unpack` reads it back on the host).

Cheap when nobody asks: `tap_layer` reads one attribute and returns. Batches that probe run
eagerly (the CUDA-graph runner and torch.compile path refuse them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch


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
        self.stream: dict[int, torch.Tensor] = {}
        self.normed: dict[int, torch.Tensor] = {}

    def record(
        self,
        layer_id: int,
        hidden: torch.Tensor,
        residual: Optional[torch.Tensor],
        norm: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        # Gathering copies the rows, so in-place kernels of later layers cannot change them.
        rows = hidden[self.index]
        if residual is not None:
            rows = rows + residual[self.index]
        if layer_id in self.spec.hidden_layers:
            self.stream[layer_id] = rows
        if layer_id in self.spec.lens_layers:
            self.normed[layer_id] = norm(rows)

    def lens_rows(self) -> Optional[torch.Tensor]:
        """The final-normed rows of every lens layer, stacked layer-major (None without lens).

        The logits processor appends them to its own rows, so one LM-head call serves both and
        the head's weight is read once per step."""
        if not self.spec.lens_layers:
            return None
        return torch.cat([self.normed[i] for i in self.spec.lens_layers])

    def finish(self, lens_logits: Optional[torch.Tensor]) -> ProbeResult:
        """Everything the host needs, packed into one flat float32 tensor (see `unpack`).

        `lens_logits` are the logits processor's float32 logits of `lens_rows()`; they are
        overwritten here (the log-sum-exp works in place: a fresh buffer of that size costs
        more than the arithmetic on CPU)."""
        spec = self.spec
        parts = [self.stream[i].float().reshape(-1) for i in spec.hidden_layers]
        if spec.lens_layers:
            assert lens_logits is not None
            values, ids = _top_n(lens_logits, spec.top_n)
            # log_softmax's own formula at the top-n: x - max - log(sum(exp(x - max))).
            top = values[:, :1]
            log_sum = lens_logits.sub_(top).exp_().sum(-1, keepdim=True).log_()
            values = values - top - log_sum
            # int32 ids ride bit-for-bit in the float32 buffer (a view, not a conversion).
            parts += [values.reshape(-1), ids.to(torch.int32).view(torch.float32).reshape(-1)]
        return ProbeResult(spec, torch.cat(parts))


# Columns per block of `_top_n`'s first pass.
TOP_N_BLOCK = 256


def _top_n(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact `logits.topk(n, dim=-1)` of a wide matrix, in two narrow passes.

    The n largest entries of a row lie in the n blocks with the largest maxima (an entry outside
    them has n larger block maxima above it), so a block-max pass picks n * TOP_N_BLOCK candidate
    columns (plus the ragged tail) and topk runs on those alone: topk over a whole vocabulary
    row spends most of its time building a per-row buffer of the row's size on CPU."""
    rows, width = logits.shape
    blocks = width // TOP_N_BLOCK
    if blocks <= 2 * n:
        return logits.topk(n, dim=-1)
    body = blocks * TOP_N_BLOCK
    maxima = logits[:, :body].reshape(rows, blocks, TOP_N_BLOCK).amax(-1)
    chosen = maxima.topk(n, dim=-1).indices
    offsets = torch.arange(TOP_N_BLOCK, device=logits.device)
    cols = (chosen[:, :, None] * TOP_N_BLOCK + offsets).reshape(rows, -1)
    if body < width:
        tail = torch.arange(body, width, device=logits.device).expand(rows, -1)
        cols = torch.cat([cols, tail], dim=1)
    values, at = logits.gather(1, cols).topk(n, dim=-1)
    return values, cols.gather(1, at)


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
