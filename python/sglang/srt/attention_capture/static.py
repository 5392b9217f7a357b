"""Static-shape attention capture, the graph mode (docs/attention_tokens.md, rule 3).

Owns the capture path that CUDA graphs record. `init_static(max_bs, max_width)` allocates, once,
a per-row capture mask, the excluded-sink counts and the layer weights of every batch row
([max_bs] / [max_bs, C]), the top-k outputs ([max_bs, k] with the server's k, and [C, max_bs, k]
for per-layer lists) and one unweighted score row per batch row for per-layer ranking. A capture
graph is recorded for a `StaticShape`: the width (key positions zeroed, scored, all-reduced and
ranked per row: the batch's longest capturing sequence rounded up to a bucket of `static_widths`,
as graphs round the batch size up to a bucket), the captured layers some row selected (the only
layers that launch anything) and whether some row wants per-layer lists ("none" aggregation).
So the capture's cost follows the batch's lengths and selection, not the context length. Per
decode step:

  * `static_shape(spec, seq_lens)` and `load_static(spec, bs)` (outside the graph, before replay)
    pick the shape and write the mask, exclusions and weights of the padded batch; rows that do
    not capture get mask 0 and weight 0;
  * `static_begin(bs, shape)` (inside the graph) zeroes the score rows over the shape's width;
  * `record_static` (inside the graph, per selected layer) adds the head-summed probabilities of
    every row (masked rows contribute nothing), through sgl_kernel's `capture_scores` when the
    capture uses the Triton kernel, else through the shared torch arithmetic (torch_scores.py),
    and ranks that layer's own rows when the shape is per-layer;
  * `static_finish(fb, bs)` (inside the graph) ranks the [bs, width] rows with the shape's k;
  * `static_result(spec, seq_lens)` (outside the graph) gathers the capturing rows into the same
    `CaptureResult` the eager path returns.

Tensor shapes depend only on (bs, shape), never on the batch's values, and nothing reads host
values, so the same code runs eagerly on CPU (how the tests check it equals the eager path) and
inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from sgl_kernel.attention_scores import key_visible

from sglang.srt.attention_capture.config import MAX_SPANS, STAT_NAMES
from sglang.srt.attention_capture.row_stats import row_stats, span_mass
from sglang.srt.attention_capture.torch_scores import head_summed_probs
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)

if TYPE_CHECKING:
    from sglang.srt.attention_capture.capture import CaptureResult, CaptureSpec
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

# Smallest capture-graph width; buckets double from here up to the largest width.
MIN_STATIC_WIDTH = 256


def static_widths(max_width: int) -> list[int]:
    """Width buckets of the capture graphs: 256, 512, ... (doubling) below max_width, then it."""
    widths, width = [], MIN_STATIC_WIDTH
    while width < max_width:
        widths.append(width)
        width *= 2
    widths.append(int(max_width))
    return widths


@dataclass(frozen=True)
class StaticShape:
    """What one capture graph is recorded for (with its batch-size bucket)."""

    width: int  # key positions per row: a bucket >= the longest capturing sequence
    layers: tuple[int, ...]  # captured layers some row selected, the only ones launched
    per_layer: bool  # some row wants one list per layer ("none" aggregation)
    reduces: bool = False  # some row asks for span mass or statistics (row_stats.py)


def score_scale(layer: "RadixAttention", forward_batch: "ForwardBatch") -> float:
    """The scale that turns q . K read from the pool into the layer's scaled scores: its softmax
    scale times the key scale a float8 pool stores K under (the backend's LSE is of these)."""
    k_scale, _ = forward_batch.token_to_kv_pool.kv_scales(layer)
    return layer.scaling * k_scale


def static_buffer_bytes(num_cap: int, max_bs: int, max_width: int, max_top_k: int) -> int:
    """Bytes `init_static` allocates (the model runner counts them before sizing the KV pool)."""
    per_row = 4 + 8 + 4 + 8 + num_cap * 4  # mask, exclude, excluded, q index, weights
    per_layer = num_cap * 4  # each layer's excluded mass
    top_k = (num_cap + 1) * max_top_k * 12  # values (4) and indices (8), mean and per layer
    # Prompt length, span bounds and masses, statistics.
    reductions = 8 + MAX_SPANS * (16 + 4) + len(STAT_NAMES) * 4
    return max_bs * (per_row + per_layer + top_k + reductions + max_width * 4)  # + layer row


class StaticCaptureMixin:
    """Graph-mode methods of AttentionCapture (uses its rows, layers, slot_of_layer, max_*)."""

    # Set by AttentionCapture.__init__; declared here for the type checker.
    layers: tuple[int, ...]
    slot_of_layer: list[int]
    max_rows: int
    max_context: int
    max_top_k: int
    num_q_heads_total: int
    device: torch.device
    rows: torch.Tensor

    graph_active: bool = False  # True between static_begin and static_finish
    static_max_bs: int = 0
    graph_shape: Optional[StaticShape] = None  # the shape of the running (or last) static forward

    def init_static(self, max_bs: int, max_width: Optional[int] = None) -> None:
        """Allocate the graph-mode buffers for batches of up to `max_bs` rows whose sequences
        are at most `max_width` long (default: the context length)."""
        if max_bs > self.max_rows:
            raise ValueError(f"graph batch {max_bs} exceeds the {self.max_rows} capture rows")
        dev, f32, i64 = self.device, torch.float32, torch.int64
        num_cap = max(len(self.layers), 1)
        k = self.max_top_k
        self.static_max_bs = max_bs
        self.static_widths = static_widths(
            min(int(max_width or self.max_context), self.max_context)
        )
        width = self.static_widths[-1]
        self.g_row_mask = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.g_exclude = torch.zeros(max_bs, dtype=i64, device=dev)
        self.g_weights = torch.zeros(max_bs, num_cap, dtype=f32, device=dev)
        self.g_q_index = torch.arange(max_bs, dtype=i64, device=dev)
        self.g_values = torch.zeros(max_bs, k, dtype=f32, device=dev)
        self.g_indices = torch.zeros(max_bs, k, dtype=i64, device=dev)
        self.g_excluded = torch.zeros(max_bs, dtype=f32, device=dev)
        self.g_layer_values = torch.zeros(num_cap, max_bs, k, dtype=f32, device=dev)
        self.g_layer_indices = torch.zeros(num_cap, max_bs, k, dtype=i64, device=dev)
        self.g_layer_excluded = torch.zeros(num_cap, max_bs, dtype=f32, device=dev)
        self.g_layer_row = torch.zeros(max_bs, width, dtype=f32, device=dev)
        self.g_prompt_lens = torch.zeros(max_bs, dtype=i64, device=dev)
        self.g_spans = torch.zeros(max_bs, MAX_SPANS, 2, dtype=i64, device=dev)
        self.g_span_mass = torch.zeros(max_bs, MAX_SPANS, dtype=f32, device=dev)
        self.g_stats = torch.zeros(max_bs, len(STAT_NAMES), dtype=f32, device=dev)

    # ---- outside the graph -------------------------------------------------------------------
    def static_shape(self, spec: "CaptureSpec", seq_lens_cpu: list[int]) -> StaticShape:
        """The graph shape for a batch: width bucket of its longest capturing row, the captured
        layers some row selected, per-layer lists or not."""
        longest = max(seq_lens_cpu[i] for i in spec.batch_rows)
        width = next((w for w in self.static_widths if w >= longest), None)
        if width is None:
            raise ValueError(f"sequence of {longest} exceeds the static width {self.static_widths}")
        wanted = set().union(*(r.layers for r in spec.requests))
        layers = tuple(layer for layer in self.layers if layer in wanted)
        reduces = any(r.spans or r.stats for r in spec.requests)
        return StaticShape(width, layers, spec.per_layer, reduces)

    def load_static(self, spec: Optional["CaptureSpec"], bs: int) -> None:
        """Fill mask, exclusions and weights of the (padded) batch's first `bs` rows."""
        if bs > self.static_max_bs:
            raise ValueError(f"batch {bs} exceeds the static capture size {self.static_max_bs}")
        num_cap = self.g_weights.shape[1]
        mask = [0] * bs
        exclude = [0] * bs
        weights = [[0.0] * num_cap for _ in range(bs)]
        prompt_lens = [0] * bs
        spans = [[(0, 0)] * MAX_SPANS for _ in range(bs)]
        if spec is not None:
            for i, (row, req) in enumerate(zip(spec.batch_rows, spec.requests)):
                mask[row] = 1
                exclude[row] = req.exclude_sink
                w = 1.0 / len(req.layers)
                weights[row] = [w if layer in req.layers else 0.0 for layer in self.layers]
                if spec.prompt_lens:
                    prompt_lens[row] = spec.prompt_lens[i]
                for s, (_, start, end) in enumerate(req.spans):
                    spans[row][s] = (start, end)
        dev = self.device
        self.g_row_mask[:bs].copy_(torch.tensor(mask, dtype=torch.int32), non_blocking=True)
        self.g_exclude[:bs].copy_(torch.tensor(exclude, dtype=torch.int64), non_blocking=True)
        w_host = torch.tensor(weights, dtype=torch.float32).view(bs, num_cap)
        self.g_weights[:bs].copy_(w_host.to(dev, non_blocking=True), non_blocking=True)
        if spec is not None and any(r.spans or r.stats for r in spec.requests):
            lens = torch.tensor(prompt_lens, dtype=torch.int64)
            self.g_prompt_lens[:bs].copy_(lens, non_blocking=True)
            self.g_spans[:bs].copy_(torch.tensor(spans, dtype=torch.int64), non_blocking=True)

    def static_result(self, spec: "CaptureSpec", seq_lens_cpu: list[int]) -> "CaptureResult":
        """The capturing rows of the last static run, as the eager path's CaptureResult."""
        from sglang.srt.attention_capture.capture import CaptureResult

        rows = torch.tensor(spec.batch_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        max_kv = max(seq_lens_cpu[i] for i in spec.batch_rows)
        k = min(spec.top_k, max_kv, self.max_top_k)
        # NOTE: index_select copies, so the next replay cannot overwrite this result.
        result = CaptureResult(
            spec,
            self.layers,
            self.g_values.index_select(0, rows)[:, :k],
            self.g_indices.index_select(0, rows)[:, :k],
            self.g_excluded.index_select(0, rows),
        )
        if spec.per_layer:
            result.layer_values = self.g_layer_values.index_select(1, rows)[:, :, :k]
            result.layer_indices = self.g_layer_indices.index_select(1, rows)[:, :, :k]
            result.layer_excluded = self.g_layer_excluded.index_select(1, rows)
        spans = max((len(r.spans) for r in spec.requests), default=0)
        if spans:
            result.span_mass = self.g_span_mass.index_select(0, rows)[:, :spans]
        if any(r.stats for r in spec.requests):
            result.stats = self.g_stats.index_select(0, rows)
        return result

    # ---- inside the graph --------------------------------------------------------------------
    def static_begin(self, bs: int, shape: StaticShape) -> None:
        """Start a static forward of `bs` (padded) rows: zero their score rows."""
        self.graph_shape = shape
        self.rows[:bs, : shape.width].zero_()
        self.graph_active = True

    def _rank_static(
        self, row: torch.Tensor, forward_batch: "ForwardBatch", bs: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k (the shape's k) of [bs, width] score rows, all-reduced over TP first."""
        return self._rank_reduced(_all_reduced(row), forward_batch, bs)

    def _rank_reduced(
        self, row: torch.Tensor, forward_batch: "ForwardBatch", bs: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from sgl_kernel.attention_capture import capture_rank

        k = min(self.max_top_k, row.shape[1])
        seq_lens = forward_batch.seq_lens[:bs]
        return capture_rank(row, seq_lens, self.g_row_mask[:bs], self.g_exclude[:bs], k)

    def record_static(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        forward_batch: "ForwardBatch",
    ) -> None:
        """One selected layer for every row of a decode batch (masked rows add nothing).

        q: [bs, Hq * D] after rotary, lse: [bs, Hq] (decode: row i is batch row i).
        """
        shape = self.graph_shape
        c = self.slot_of_layer[layer.layer_id]
        bs, width = q.shape[0], shape.width
        keys_all = forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id)
        req_to_token = forward_batch.req_to_token_pool.req_to_token
        seq_lens = forward_batch.seq_lens[:bs]
        rows = self.rows[:bs, :width]
        layer_row = self.g_layer_row[:bs, :width] if shape.per_layer else None
        if getattr(self, "use_kernel", False):
            # The kernel's grid spans `width` columns; a row's blocks past its length do nothing.
            self._capture_scores(
                q,
                lse,
                keys_all,
                req_to_token,
                forward_batch.req_pool_indices[:bs],
                seq_lens,
                self.g_q_index[:bs],
                self.g_row_mask[:bs],
                self.g_weights[:bs, c],
                rows,
                score_scale(layer, forward_batch),
                self.num_q_heads_total,
                sliding_window=layer.sliding_window_size,
                logit_cap=layer.logit_cap,
                accumulate=True,
                layer_rows=layer_row,
            )
        else:
            j = torch.arange(width, device=q.device)
            valid = (j[None, :] < seq_lens[:, None]) & (self.g_row_mask[:bs, None] != 0)
            allowed = valid & key_visible(
                (seq_lens - 1)[:, None], j[None, :], layer.sliding_window_size
            )
            slots = req_to_token[forward_batch.req_pool_indices[:bs], :width]
            probs = head_summed_probs(
                q.reshape(bs, -1),
                lse,
                keys_all,
                slots,
                allowed,
                score_scale(layer, forward_batch),
                layer.logit_cap,
                self.num_q_heads_total,
            )
            rows.addcmul_(probs, self.g_weights[:bs, c : c + 1])
            if layer_row is not None:
                layer_row.copy_(probs)
        if layer_row is not None:
            vals, idx, excl = self._rank_static(layer_row, forward_batch, bs)
            self.g_layer_values[c, :bs, : vals.shape[1]].copy_(vals)
            self.g_layer_indices[c, :bs, : idx.shape[1]].copy_(idx)
            self.g_layer_excluded[c, :bs].copy_(excl)

    def static_finish(self, forward_batch: "ForwardBatch", bs: int) -> None:
        """Rank the rows (all-reduced over TP, the shape's width only) into the static top-k
        outputs; ends the forward."""
        row = _all_reduced(self.rows[:bs, : self.graph_shape.width])
        vals, idx, excl = self._rank_reduced(row, forward_batch, bs)
        if self.graph_shape.reduces:
            self.g_span_mass[:bs].copy_(span_mass(row, self.g_spans[:bs]))
            seq_lens = forward_batch.seq_lens[:bs]
            self.g_stats[:bs].copy_(row_stats(row, seq_lens, self.g_prompt_lens[:bs]))
        self.g_values[:bs, : vals.shape[1]].copy_(vals)
        self.g_indices[:bs, : idx.shape[1]].copy_(idx)
        self.g_excluded[:bs].copy_(excl)
        self.graph_active = False

    def static_abort(self) -> None:
        self.graph_active = False


def _all_reduced(row: torch.Tensor) -> torch.Tensor:
    """The [bs, width] rows summed over the TP group (as they are without TP)."""
    if get_tensor_model_parallel_world_size() > 1:
        return tensor_model_parallel_all_reduce(row.contiguous())
    return row
