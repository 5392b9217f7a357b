"""The capture itself: exact attention probabilities of the rows that asked, then top-k.

Owns the device side of the feature: the torch path (its arithmetic in torch_scores.py, the CPU
default and the reference) and, when the attention backend runs Triton kernels (`use_kernel`),
sgl_kernel's fused `capture_scores` as the drop-in for `record`'s arithmetic. `AttentionCapture`
is created once per model runner when the server runs with `--return-attention-tokens` and
allocates its buffers then (`buffer_bytes`, which the model runner takes out of the KV budget):
one float32 score row per running request over the whole context, and per-layer top-k outputs. Each forward that has capturing rows goes through `begin` (per-forward indices:
which query token each row takes, which KV slots its keys sit in), `record` from every captured
layer (one extra read of K: q.K, exp(s - lse) with the kernel's log-sum-exp, summed over query
heads, weighted into the row), and `finish` (all-reduce over the TP group, sink exclusion,
top-k). Rows are gathered by tensor indexing: there is no Python loop
over requests and no host sync in the forward. The scheduler's batch says which rows capture
through a `CaptureSpec`; a forward with no capturing row never reaches this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from sgl_kernel.attention_scores import key_visible

from sglang.srt.attention_capture.config import AttentionRequest
from sglang.srt.attention_capture.prompt import PromptGroup, build_prompt_groups
from sglang.srt.attention_capture.prompt_capture import PromptCapture, PromptResult
from sglang.srt.attention_capture.heads import HeadPlan, aggregate_heads, max_share, plan_heads
from sglang.srt.attention_capture.row_stats import row_stats, span_bounds, span_mass
from sglang.srt.attention_capture.static import (
    StaticCaptureMixin,
    score_scale,
    static_buffer_bytes,
)
from sglang.srt.attention_capture.torch_scores import head_summed_probs
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

# Score given to positions that must not be ranked (padding, excluded sink); real scores are >= 0.
NOT_RANKED = -1.0


@dataclass
class CaptureSpec:
    """Which requests of a batch capture in this forward (built on the CPU by the scheduler).

    `batch_rows[i]` is the index in the batch of capture row i; `requests[i]` its options;
    `prompt_lens[i]` its prompt's length (what `attention_stats` splits prompt from completion
    mass at; needed only when some row asks for statistics).
    In an extend, a row takes the last token of its request's segment; in a decode, its one token.
    """

    batch_rows: list[int]
    requests: list[AttentionRequest]
    prompt_lens: list[int] = field(default_factory=list)
    # attention_prompt_positions rows of this extend (prompt.py), scored by prompt_capture.py.
    prompt: list[PromptGroup] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.batch_rows)

    @property
    def per_layer(self) -> bool:
        return any(r.per_layer for r in self.requests)

    @property
    def top_k(self) -> int:
        return max(r.top_k for r in self.requests)

    @property
    def plain_heads(self) -> bool:
        """Every row takes the plain head mean (what the static graph path serves, spans and
        statistics included; head selection runs eagerly)."""
        return all(r.plain_heads for r in self.requests)


def build_capture_spec(reqs: list[Any], extend: bool) -> Optional[CaptureSpec]:
    """The spec for a batch of scheduler requests, or None when no request captures now.

    In an extend, chunks that do not end the prompt and prompt-only requests produce no token, so
    they do not capture.
    """
    rows: list[int] = []
    options: list[AttentionRequest] = []
    prompt_lens: list[int] = []
    for i, req in enumerate(reqs):
        opt = req.attention
        if opt is None:
            continue
        if extend and (req.is_chunked or req.sampling_params.max_new_tokens == 0):
            continue
        rows.append(i)
        options.append(opt)
        prompt_lens.append(len(req.origin_input_ids))
    prompt = build_prompt_groups(reqs) if extend else []
    if not rows and not prompt:
        return None
    return CaptureSpec(rows, options, prompt_lens, prompt=prompt)


@dataclass
class CaptureResult:
    """Device tensors of one forward's capture; `to_lists` moves them to the host once."""

    spec: CaptureSpec
    layers: tuple[int, ...]  # captured layer ids (the server's set), index c of the per-layer axis
    values: torch.Tensor  # [R, k] scores of the mean row, NOT_RANKED where nothing is ranked
    indices: torch.Tensor  # [R, k] absolute key positions
    excluded: torch.Tensor  # [R] summed score of the excluded leading positions
    layer_values: Optional[torch.Tensor] = None  # [C, R, k] when some row wants per-layer lists
    layer_indices: Optional[torch.Tensor] = None
    layer_excluded: Optional[torch.Tensor] = None  # [C, R]
    # attention_head_aggregation "none": [R, S, k] / [R, S] per chosen head (S slots), and per
    # captured layer [C, R, S, k] / [C, R, S] when some such row also wants per-layer lists.
    head_values: Optional[torch.Tensor] = None
    head_indices: Optional[torch.Tensor] = None
    head_excluded: Optional[torch.Tensor] = None
    layer_head_values: Optional[torch.Tensor] = None
    layer_head_indices: Optional[torch.Tensor] = None
    layer_head_excluded: Optional[torch.Tensor] = None
    span_mass: Optional[torch.Tensor] = None  # [R, S] mass of each row's spans (row_stats.py)
    stats: Optional[torch.Tensor] = None  # [R, 5] statistics, columns in config.STAT_NAMES order
    prompt: Optional[list[PromptResult]] = None  # attention_prompt_positions rows (prompt.py)


class AttentionCapture(StaticCaptureMixin):
    """Runner-owned capture state: buffers allocated at start-up, reused by every forward."""

    def __init__(
        self,
        captured_layers: tuple[int, ...],
        num_layers: int,
        max_rows: int,
        max_context: int,
        max_top_k: int,
        num_q_heads_total: int,
        device: str | torch.device,
        use_kernel: bool = False,
    ) -> None:
        self.layers = tuple(captured_layers)
        self.slot_of_layer = [-1] * num_layers
        for c, layer in enumerate(self.layers):
            self.slot_of_layer[layer] = c
        self.max_rows, self.max_context, self.max_top_k = max_rows, max_context, max_top_k
        self.num_q_heads_total = num_q_heads_total
        self.device = torch.device(device)
        self.use_kernel = use_kernel
        if use_kernel:
            from sgl_kernel.attention_capture import capture_scores

            self._capture_scores = capture_scores
        num_cap = len(self.layers)
        f32 = torch.float32
        self.rows = torch.zeros(max_rows, max_context, dtype=f32, device=self.device)
        self.layer_values = torch.zeros(num_cap, max_rows, max_top_k, dtype=f32, device=self.device)
        self.layer_indices = torch.zeros(
            num_cap, max_rows, max_top_k, dtype=torch.int64, device=self.device
        )
        self.layer_excluded = torch.zeros(num_cap, max_rows, dtype=f32, device=self.device)
        self.active = False
        self.spec: Optional[CaptureSpec] = None
        self.prompt: Optional[PromptCapture] = None
        self.layer_wanted = [False] * num_layers
        nbytes = sum(
            t.numel() * t.element_size()
            for t in (self.rows, self.layer_values, self.layer_indices, self.layer_excluded)
        )
        logger.info(
            "Attention capture on: layers=%s, top_k<=%d, buffers=%.1f MB for %d rows x %d positions",
            list(self.layers),
            max_top_k,
            nbytes / 2**20,
            max_rows,
            max_context,
        )

    @staticmethod
    def buffer_bytes(
        num_cap: int, max_rows: int, max_context: int, max_top_k: int, graph_bs: int = 0
    ) -> int:
        """Bytes the capture allocates: `__init__`'s score rows and per-layer top-k outputs, plus
        `init_static`'s graph buffers for batches up to `graph_bs` (0: no CUDA graphs)."""
        total = max_rows * max_context * 4 + num_cap * max_rows * (max_top_k * 12 + 4)
        if graph_bs:
            total += static_buffer_bytes(num_cap, graph_bs, max_context, max_top_k)
        return total

    @classmethod
    def from_model_runner(cls, runner: Any, captured_layers: tuple[int, ...]) -> "AttentionCapture":
        mc = runner.model_config
        return cls(
            captured_layers,
            mc.num_hidden_layers,
            max_rows=runner.max_running_requests,
            max_context=runner.context_len,
            max_top_k=int(runner.server_args.attention_tokens_top_k),
            num_q_heads_total=mc.num_attention_heads,
            device=runner.device,
            use_kernel=bool(getattr(runner.attn_backend, "uses_triton_kernels", False)),
        )

    # ---- per forward -------------------------------------------------------------------------
    def begin(self, spec: CaptureSpec, fb: "ForwardBatch") -> None:
        """Per-forward indices for the capturing rows; zero their score rows."""
        num = spec.num_rows
        self.prompt = (
            PromptCapture(spec.prompt, fb, self.num_q_heads_total) if spec.prompt else None
        )
        if not num:  # an extend with prompt rows only
            self.layer_wanted = [False] * len(self.slot_of_layer)
            self.spec, self.active = spec, True
            return
        if num > self.max_rows:
            raise RuntimeError(f"{num} capturing rows exceed the {self.max_rows} allocated")
        dev = self.device
        rows = torch.tensor(spec.batch_rows, dtype=torch.int64).to(dev, non_blocking=True)
        seq_lens = fb.seq_lens[rows]
        if fb.forward_mode.is_extend():
            q_index = (fb.extend_start_loc + fb.extend_seq_lens - 1)[rows]
        else:
            q_index = rows
        max_kv = max(fb.seq_lens_cpu[i] for i in spec.batch_rows)
        j = torch.arange(max_kv, device=dev)
        valid = j[None, :] < seq_lens[:, None]
        slots = fb.req_to_token_pool.req_to_token[fb.req_pool_indices[rows], :max_kv]
        self.kv_slots = slots
        self.valid, self.seq_lens, self.q_index, self.max_kv = valid, seq_lens, q_index, max_kv
        if self.use_kernel:
            self.row_pool_indices = fb.req_pool_indices[rows]
            self.row_mask = torch.ones(num, dtype=torch.int32, device=dev)
        self.exclude = torch.tensor([r.exclude_sink for r in spec.requests], dtype=torch.int64).to(
            dev, non_blocking=True
        )
        # Weight of captured layer c in row i's mean: 1/|selected layers| if selected, else 0.
        weights = [
            [1.0 / len(r.layers) if layer in r.layers else 0.0 for layer in self.layers]
            for r in spec.requests
        ]
        self.weights = torch.tensor(weights, dtype=torch.float32).to(dev, non_blocking=True)
        # Layers some row selected: the only ones that pay the extra read of K in this forward.
        wanted = set().union(*(r.layers for r in spec.requests))
        self.layer_wanted = [
            s >= 0 and layer in wanted for layer, s in enumerate(self.slot_of_layer)
        ]
        self.windows: dict[int, torch.Tensor] = {}
        self.k = min(spec.top_k, max_kv, self.max_top_k)
        self.rows[:num, :max_kv].zero_()
        self.heads: Optional[HeadPlan] = plan_heads(spec.requests, self.num_q_heads_total, dev)
        self.head_rows: Optional[torch.Tensor] = None
        self.layer_head_lists: Optional[list[torch.Tensor]] = None
        if self.heads is not None and self.heads.num_slots:
            # Per-head rows only for forwards with a row that splits its heads (<= 8 slots).
            slots = self.heads.num_slots
            self.head_rows = torch.zeros(num, slots, max_kv, device=dev)
            if spec.per_layer:
                shape = (len(self.layers), num, slots, self.k)
                self.layer_head_lists = [
                    torch.full(shape, NOT_RANKED, device=dev),
                    torch.zeros(shape, dtype=torch.int64, device=dev),
                    torch.zeros(shape[:3], device=dev),
                ]
        self.spans = span_bounds([r.spans for r in spec.requests], dev)
        self.spec, self.active = spec, True

    def wants_layer(self, layer_id: int) -> bool:
        if self.graph_active:  # static mode: the graph's shape names the selected layers
            return layer_id in self.graph_shape.layers
        if self.prompt is not None and self.active and self.prompt.wants(layer_id):
            return True
        return self.active and self.layer_wanted[layer_id]

    def _allowed(self, window: int) -> torch.Tensor:
        """[R, max_kv] keys the captured query attends to (its causal context, its window)."""
        if window <= 0:
            return self.valid
        mask = self.windows.get(window)
        if mask is None:
            j = torch.arange(self.max_kv, device=self.device)
            mask = self.valid & key_visible((self.seq_lens - 1)[:, None], j[None, :], window)
            self.windows[window] = mask
        return mask

    def record(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        forward_batch: "ForwardBatch",
    ) -> None:
        """Add this layer's head-summed probabilities of every capturing row into its score row.

        q: [num_tokens, Hq * D] (after rotary), lse: [num_tokens, Hq] natural-log log-sum-exp of
        the scaled scores, both for this rank's heads.
        """
        if self.graph_active:
            return self.record_static(layer, q, lse, forward_batch)
        if self.prompt is not None and self.prompt.wants(layer.layer_id):
            self.prompt.record(layer, q, lse, forward_batch, score_scale(layer, forward_batch))
            if not self.layer_wanted[layer.layer_id]:
                return
        num = self.spec.num_rows
        c = self.slot_of_layer[layer.layer_id]
        if self.heads is not None:
            probs = self._record_heads(layer, q, lse, forward_batch, c)
        elif self.use_kernel:
            probs = self._record_fused(layer, q, lse, forward_batch, c)
        else:
            probs = self._torch_probs(layer, q, lse, forward_batch, per_head=False)
            self.rows[:num, : self.max_kv].addcmul_(probs, self.weights[:, c : c + 1])
        if self.spec.per_layer:
            probs = tensor_model_parallel_all_reduce(probs)
            vals, idx, excl = self._rank(probs)
            self.layer_values[c, :num, : self.k] = vals
            self.layer_indices[c, :num, : self.k] = idx
            self.layer_excluded[c, :num] = excl

    def _torch_probs(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        forward_batch: "ForwardBatch",
        per_head: bool,
    ) -> torch.Tensor:
        """torch_scores' [R, W] head-summed (or [R, Hl, W] per-head) probabilities of the rows."""
        hq, d = layer.tp_q_head_num, layer.head_dim
        # The backend's LSE is of the soft-capped scores (Gemma 2): head_summed_probs caps.
        return head_summed_probs(
            q.view(-1, hq * d)[self.q_index],
            lse[self.q_index],
            forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.kv_slots,
            self._allowed(layer.sliding_window_size),
            score_scale(layer, forward_batch),
            layer.logit_cap,
            self.num_q_heads_total,
            per_head=per_head,
        )

    def _record_heads(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        forward_batch: "ForwardBatch",
        c: int,
    ) -> torch.Tensor:
        """`record` for a forward with head selection (heads.py): every local head's row, then
        each capturing row's own aggregation. Returns the layer's unweighted [R, W] share."""
        num = self.spec.num_rows
        if self.use_kernel:
            probs, split = self._heads_fused(layer, q, lse, forward_batch)
        else:
            per_head = self._torch_probs(layer, q, lse, forward_batch, per_head=True)
            probs, split = aggregate_heads(self.heads, per_head)
        weight = self.weights[:, c : c + 1]
        self.rows[:num, : self.max_kv].addcmul_(probs, weight)
        if split is not None:
            self.head_rows.addcmul_(split, weight[:, :, None])
            if self.layer_head_lists is not None:
                ranked = self._rank(tensor_model_parallel_all_reduce(split))
                for out, value in zip(self.layer_head_lists, ranked):
                    out[c] = value
        return probs

    def _heads_fused(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        forward_batch: "ForwardBatch",
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`aggregate_heads`' results from sgl_kernel's fused kernel: the weighted head sum, the
        per-head rows and the head maxima come out of one pass over K."""
        plan, num, dev = self.heads, self.spec.num_rows, self.device
        probs = torch.zeros(num, self.max_kv, dtype=torch.float32, device=dev)
        split = top = None
        if plan.num_slots:
            split = torch.zeros(num, plan.num_slots, self.max_kv, device=dev)
        if plan.is_max is not None:
            top = torch.zeros(num, self.max_kv, dtype=torch.float32, device=dev)
        self._kernel(
            layer,
            q,
            lse,
            forward_batch,
            self.row_mask.float(),  # weight 1: `probs` is this layer's own row
            probs,
            accumulate=False,
            head_weights=plan.mean_weights,
            head_slots=plan.head_slot,
            head_rows=split,
            max_rows=top,
        )
        if top is not None:
            probs = torch.where(plan.is_max, max_share(top), probs)
        return probs, split

    def _record_fused(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        forward_batch: "ForwardBatch",
        c: int,
    ) -> Optional[torch.Tensor]:
        """`record`'s arithmetic in sgl_kernel's fused kernel (same numbers; K read once per KV
        head, window and padding masked in-kernel). Returns the unweighted [R, max_kv] rows when
        some row wants per-layer lists, else None."""
        num = self.spec.num_rows
        layer_rows = None
        if self.spec.per_layer:
            layer_rows = torch.zeros(num, self.max_kv, dtype=torch.float32, device=self.device)
        self._kernel(
            layer,
            q,
            lse,
            forward_batch,
            self.weights[:, c],
            self.rows[:num, : self.max_kv],
            layer_rows=layer_rows,
        )
        return layer_rows

    def _kernel(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        forward_batch: "ForwardBatch",
        weights: torch.Tensor,
        rows: torch.Tensor,
        **options: Any,
    ) -> None:
        """sgl_kernel's `capture_scores` over this forward's capturing rows."""
        self._capture_scores(
            q if q.stride(-1) == 1 else q.contiguous(),
            lse.contiguous(),
            forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id),
            forward_batch.req_to_token_pool.req_to_token,
            self.row_pool_indices,
            self.seq_lens,
            self.q_index,
            self.row_mask,
            weights,
            rows,
            score_scale(layer, forward_batch),
            self.num_q_heads_total,
            sliding_window=layer.sliding_window_size,
            logit_cap=layer.logit_cap,
            **options,
        )

    def _rank(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k of [R, W] score rows (or [R, S, W] per-head rows) after leaving out padding
        and the excluded leading positions."""
        j = torch.arange(self.max_kv, device=self.device)
        sink = j[None, :] < self.exclude[:, None]
        valid = self.valid
        if row.dim() == 3:
            sink, valid = sink[:, None, :], valid[:, None, :]
        excluded = torch.where(sink & valid, row, 0.0).sum(dim=-1)
        ranked = row.masked_fill(sink | ~valid, NOT_RANKED)
        vals, idx = ranked.topk(self.k, dim=-1)
        return vals, idx, excluded

    def finish(self) -> CaptureResult:
        """All-reduce the rows over the TP group and rank them; ends the forward's capture."""
        spec, num = self.spec, self.spec.num_rows
        prompt = self.prompt.finish() if self.prompt is not None else None
        self.prompt = None
        if not num:
            empty = torch.empty(0, 0, device=self.device)
            self.active, self.spec = False, None
            return CaptureResult(
                spec, self.layers, empty, empty.long(), empty.sum(1), prompt=prompt
            )
        row = self.rows[:num, : self.max_kv]
        if get_tensor_model_parallel_world_size() > 1:
            row = tensor_model_parallel_all_reduce(row.contiguous())
        vals, idx, excl = self._rank(row)
        result = CaptureResult(spec, self.layers, vals, idx, excl, prompt=prompt)
        if spec.per_layer:
            result.layer_values = self.layer_values[:, :num, : self.k].clone()
            result.layer_indices = self.layer_indices[:, :num, : self.k].clone()
            result.layer_excluded = self.layer_excluded[:, :num].clone()
        if self.spans is not None:
            result.span_mass = span_mass(row, self.spans)
        if any(r.stats for r in spec.requests):
            prompt_lens = torch.tensor(spec.prompt_lens, dtype=torch.int64)
            prompt_lens = prompt_lens.to(self.device, non_blocking=True)
            result.stats = row_stats(row, self.seq_lens, prompt_lens)
        if self.head_rows is not None:
            split = tensor_model_parallel_all_reduce(self.head_rows)
            result.head_values, result.head_indices, result.head_excluded = self._rank(split)
            if self.layer_head_lists is not None:
                result.layer_head_values, result.layer_head_indices, result.layer_head_excluded = (
                    self.layer_head_lists
                )
        self.active, self.spec = False, None
        return result

    def abort(self) -> None:
        """Forget a forward that failed half-way."""
        self.active, self.spec, self.prompt = False, None, None
