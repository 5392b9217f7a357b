"""Static-shape attention capture, the graph mode (docs/attention_tokens.md, rule 3).

Owns the capture path that CUDA graphs record. Everything it touches is allocated once by
`init_static(max_bs, width)`: a per-row capture mask, the excluded-sink counts and the layer
weights of every batch row ([max_bs] / [max_bs, C]), and the top-k outputs ([max_bs, k] with the
server's k). Per decode step:

  * `load_static(spec, bs)` (outside the graph, before replay) writes the mask, exclusions and
    weights of the padded batch; rows that do not capture get mask 0 and weight 0;
  * `static_begin(bs)` (inside the graph) zeroes the score rows;
  * `record_static` (inside the graph, per captured layer) adds the head-summed probabilities of
    every row (masked rows contribute nothing), through sgl_kernel's `capture_scores` when the
    capture uses the Triton kernel, else through torch ops over the fixed [bs, width] window;
  * `static_finish(fb)` (inside the graph) ranks the fixed [bs, width] rows with the fixed k;
  * `static_result(spec, seq_lens)` (outside the graph) gathers the capturing rows into the same
    `CaptureResult` the eager path returns.

Shapes depend only on (bs, width, k), never on the batch's lengths, and nothing reads host values,
so the same code runs eagerly on CPU (how the tests check it equals the eager path) and inside a
CUDA graph. Per-layer lists ("none" aggregation) are not part of the graph: such batches run
eagerly. The eager path in capture.py is untouched by this mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from sgl_kernel.attention_scores import key_visible, softcap

from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)

if TYPE_CHECKING:
    from sglang.srt.attention_capture.capture import CaptureResult, CaptureSpec
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch


def score_scale(layer: "RadixAttention", forward_batch: "ForwardBatch") -> float:
    """The scale that turns q . K read from the pool into the layer's scaled scores: its softmax
    scale times the key scale a float8 pool stores K under (the backend's LSE is of these)."""
    k_scale, _ = forward_batch.token_to_kv_pool.kv_scales(layer)
    return layer.scaling * k_scale


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

    def init_static(self, max_bs: int, width: Optional[int] = None) -> None:
        """Allocate the graph-mode buffers for batches of up to `max_bs` rows.

        `width` bounds the key positions a row can have (default: the context length); the
        torch path reads that many keys per row, the kernel path only each row's own length.
        """
        if max_bs > self.max_rows:
            raise ValueError(f"graph batch {max_bs} exceeds the {self.max_rows} capture rows")
        dev = self.device
        num_cap = len(self.layers)
        self.static_max_bs = max_bs
        self.static_width = min(int(width or self.max_context), self.max_context)
        self.static_k = min(self.max_top_k, self.static_width)
        self.g_row_mask = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.g_exclude = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_weights = torch.zeros(max_bs, max(num_cap, 1), dtype=torch.float32, device=dev)
        self.g_q_index = torch.arange(max_bs, dtype=torch.int64, device=dev)
        self.g_values = torch.zeros(max_bs, self.static_k, dtype=torch.float32, device=dev)
        self.g_indices = torch.zeros(max_bs, self.static_k, dtype=torch.int64, device=dev)
        self.g_excluded = torch.zeros(max_bs, dtype=torch.float32, device=dev)

    @staticmethod
    def static_supports(spec: Optional["CaptureSpec"]) -> bool:
        """Whether a batch with this spec can use the graph-mode path (per-layer lists cannot)."""
        return spec is None or not spec.per_layer

    # ---- outside the graph -------------------------------------------------------------------
    def load_static(self, spec: Optional["CaptureSpec"], bs: int) -> None:
        """Fill mask, exclusions and weights of the (padded) batch's first `bs` rows."""
        if bs > self.static_max_bs:
            raise ValueError(f"batch {bs} exceeds the static capture size {self.static_max_bs}")
        num_cap = self.g_weights.shape[1]
        mask = [0] * bs
        exclude = [0] * bs
        weights = [[0.0] * num_cap for _ in range(bs)]
        if spec is not None:
            for row, req in zip(spec.batch_rows, spec.requests):
                mask[row] = 1
                exclude[row] = req.exclude_sink
                w = 1.0 / len(req.layers)
                weights[row] = [w if layer in req.layers else 0.0 for layer in self.layers]
        dev = self.device
        self.g_row_mask[:bs].copy_(torch.tensor(mask, dtype=torch.int32), non_blocking=True)
        self.g_exclude[:bs].copy_(torch.tensor(exclude, dtype=torch.int64), non_blocking=True)
        w_host = torch.tensor(weights, dtype=torch.float32).view(bs, num_cap)
        self.g_weights[:bs].copy_(w_host.to(dev, non_blocking=True), non_blocking=True)

    def static_result(self, spec: "CaptureSpec", seq_lens_cpu: list[int]) -> "CaptureResult":
        """The capturing rows of the last static run, as the eager path's CaptureResult."""
        from sglang.srt.attention_capture.capture import CaptureResult

        rows = torch.tensor(spec.batch_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        max_kv = max(seq_lens_cpu[i] for i in spec.batch_rows)
        k = min(spec.top_k, max_kv, self.max_top_k)
        # NOTE: index_select copies, so the next replay cannot overwrite this result.
        return CaptureResult(
            spec,
            self.layers,
            self.g_values.index_select(0, rows)[:, :k],
            self.g_indices.index_select(0, rows)[:, :k],
            self.g_excluded.index_select(0, rows),
        )

    # ---- inside the graph --------------------------------------------------------------------
    def static_begin(self, bs: int) -> None:
        """Start a static forward of `bs` (padded) rows: zero their score rows."""
        self.rows[:bs, : self.static_width].zero_()
        self.graph_active = True

    def record_static(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        forward_batch: "ForwardBatch",
    ) -> None:
        """One captured layer for every row of a decode batch (masked rows add nothing).

        q: [bs, Hq * D] after rotary, lse: [bs, Hq] (decode: row i is batch row i).
        """
        c = self.slot_of_layer[layer.layer_id]
        bs = q.shape[0]
        keys_all = forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id)
        req_to_token = forward_batch.req_to_token_pool.req_to_token
        seq_lens = forward_batch.seq_lens[:bs]
        if getattr(self, "use_kernel", False) and q.device.type == "cuda":
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
                self.rows,
                score_scale(layer, forward_batch),
                self.num_q_heads_total,
                sliding_window=layer.sliding_window_size,
                logit_cap=layer.logit_cap,
                accumulate=True,
            )
            return
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        width = self.static_width
        qr = q.reshape(bs, hq, d).float().view(bs, hkv, hq // hkv, d)
        lr = lse.float().view(bs, hkv, hq // hkv, 1)
        j = torch.arange(width, device=q.device)
        valid = (j[None, :] < seq_lens[:, None]) & (self.g_row_mask[:bs, None] != 0)
        slots = req_to_token[forward_batch.req_pool_indices[:bs], :width]
        slots = torch.where(valid, slots, 0).reshape(-1)
        keys = keys_all.index_select(0, slots).view(bs, width, hkv, d).float()
        scores = torch.einsum("rhgd,rjhd->rhgj", qr, keys) * score_scale(layer, forward_batch)
        probs = torch.exp(softcap(scores, layer.logit_cap) - lr).sum(dim=(1, 2))  # [bs, width]
        valid = valid & key_visible((seq_lens - 1)[:, None], j[None, :], layer.sliding_window_size)
        probs = torch.where(valid, probs, 0.0) / self.num_q_heads_total
        self.rows[:bs, :width].addcmul_(probs, self.g_weights[:bs, c : c + 1])

    def static_finish(self, forward_batch: "ForwardBatch", bs: int) -> None:
        """Rank the rows (all-reduced over TP) into the static top-k outputs; ends the forward."""
        from sgl_kernel.attention_capture import capture_rank

        row = self.rows[:bs, : self.static_width]
        if get_tensor_model_parallel_world_size() > 1:
            # NOTE: the whole static width travels; eager capture reduces only [R, max_kv].
            row = tensor_model_parallel_all_reduce(row.contiguous())
        vals, idx, excl = capture_rank(
            row,
            forward_batch.seq_lens[:bs],
            self.g_row_mask[:bs],
            self.g_exclude[:bs],
            self.static_k,
        )
        self.g_values[:bs].copy_(vals)
        self.g_indices[:bs].copy_(idx)
        self.g_excluded[:bs].copy_(excl)
        self.graph_active = False

    def static_abort(self) -> None:
        self.graph_active = False

    def static_run(self, spec: Optional["CaptureSpec"], fb: "ForwardBatch", model: Any) -> Any:
        """Eager run of the static path (tests, CPU): load, begin, forward, finish, result."""
        bs = fb.batch_size
        self.load_static(spec, bs)
        try:
            self.static_begin(bs)
            fb.attention_capture = self
            out = model(fb.input_ids, fb.positions, fb)
            self.static_finish(fb, bs)
        finally:
            self.static_abort()
            fb.attention_capture = None
        if spec is not None:
            out.attention_capture = self.static_result(spec, fb.seq_lens_cpu)
        return out
