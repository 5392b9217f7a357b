"""Prompt attention on the device: exact head-mean rows of asked prompt query positions.

Owns the arithmetic of `attention_prompt_positions` (the host side is prompt.py). It rides on
`AttentionCapture` (capture.py): an extend whose spec carries prompt groups creates one
`PromptCapture`, every captured layer some group selected hands it the layer's query and the
backend's log-sum-exp of every extend token, and `finish` ranks the rows. Per layer and group:

    probs[r, j] = sum_h exp(cap(q[p_r, h] . K[j, h // group] * scale) - lse[p_r, h]) / H,  j <= p_r

(a sliding window masks further), the same numbers as the generated-token capture, so the same
HF reference holds. A group's rows share its request's keys: keys are read once per chunk of key
positions for all the group's rows, and the float32 working set of a chunk (keys plus two
[rows, heads, positions] score tensors) stays under CHUNK_BYTES, rows taken at most ROW_SLICE at
a time, so many rows never make a [positions x context x heads] tensor. What persists for the
forward is one float32 [rows, row width] sum per group (mean aggregation) or each selected
layer's top-k ("none").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from sgl_kernel.attention_scores import key_visible, softcap

from sglang.srt.attention_capture.prompt import PromptGroup
from sglang.srt.attention_capture.records import AttentionRecord, _top
from sglang.srt.attention_capture.torch_scores import CHUNK_BYTES
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

# Query rows scored together: bounds the [rows, heads, positions] score tensors of one chunk.
ROW_SLICE = 128
NOT_RANKED = -1.0  # as capture.NOT_RANKED: below every real probability


def prompt_row_probs(
    q: torch.Tensor,
    lse: torch.Tensor,
    keys_all: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    host_positions: list[int],
    scale: float,
    logit_cap: float,
    window: int,
    num_q_heads_total: int,
) -> torch.Tensor:
    """[R, W] float32 head-summed probabilities (divided by H) of R queries over W keys.

    q: [R, Hq, D] (this rank's heads, after rotary); lse: [R, Hq]; keys_all: [slots, Hkv, D] the
    layer's pool; slots: [W] the KV slots of the request's positions 0..W-1; positions: [R] each
    query's absolute position, ascending (`host_positions`: the same on the host).
    """
    num, hq, d = q.shape
    width, hkv = slots.shape[0], keys_all.shape[1]
    group = hq // hkv
    out = torch.zeros(num, width, dtype=torch.float32, device=q.device)
    for r0 in range(0, num, ROW_SLICE):
        r1 = min(num, r0 + ROW_SLICE)
        qr = q[r0:r1].reshape(r1 - r0, hkv, group, d).float()
        lr = lse[r0:r1].reshape(r1 - r0, hkv, group, 1).float()
        pos = positions[r0:r1, None]
        per_position = 4 * (hkv * d + 2 * (r1 - r0) * hq)
        step = max(1, CHUNK_BYTES // per_position)
        # Keys past the slice's last query are never visible to it.
        end_all = min(width, host_positions[r1 - 1] + 1)
        for k0 in range(0, end_all, step):
            k1 = min(end_all, k0 + step)
            kc = keys_all.index_select(0, slots[k0:k1]).float()
            scores = torch.einsum("rhgd,jhd->rhgj", qr, kc) * scale
            probs = torch.exp(softcap(scores, logit_cap) - lr).sum(dim=(1, 2))
            j = torch.arange(k0, k1, device=q.device)
            out[r0:r1, k0:k1] = torch.where(key_visible(pos, j[None, :], window), probs, 0.0)
    return out / num_q_heads_total


@dataclass
class PromptResult:
    """One group's ranked rows (device tensors until `to_records`)."""

    group: PromptGroup
    values: Optional[torch.Tensor] = None  # [R, k] mean over layers
    indices: Optional[torch.Tensor] = None
    excluded: Optional[torch.Tensor] = None  # [R]
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )  # layer id -> (values, indices, excluded) with layer aggregation "none"

    def to_records(self) -> list[AttentionRecord]:
        k = self.group.options.top_k
        if self.group.options.per_layer:
            lists = {
                layer: (v.tolist(), i.tolist(), x.tolist())
                for layer, (v, i, x) in sorted(self.layers.items())
            }
            records = []
            for r in range(len(self.group.positions)):
                per = {}
                for layer, (v, i, x) in lists.items():
                    pos, val = _top(i[r], v[r], k)
                    per[layer] = (pos, val, x[r])
                records.append(AttentionRecord([], [], 0.0, per))
            return records
        values, indices = self.values.tolist(), self.indices.tolist()
        excluded = self.excluded.tolist()
        return [
            AttentionRecord(*_top(indices[r], values[r], k), excluded[r])
            for r in range(len(self.group.positions))
        ]


class PromptCapture:
    """One extend's prompt rows: created by AttentionCapture.begin, fed by its `record`."""

    def __init__(
        self, groups: list[PromptGroup], fb: "ForwardBatch", num_q_heads_total: int
    ) -> None:
        self.groups = groups
        self.num_q_heads_total = num_q_heads_total
        dev = fb.seq_lens.device
        table = fb.req_to_token_pool.req_to_token
        self.wanted = set().union(*(g.options.layers for g in groups))
        self.tp = get_tensor_model_parallel_world_size() > 1
        self.positions, self.token_index, self.slots, self.sums = [], [], [], []
        self.results = [PromptResult(g) for g in groups]
        for g in groups:
            width = g.positions[-1] + 1
            self.positions.append(torch.tensor(g.positions, dtype=torch.int64, device=dev))
            self.token_index.append(torch.tensor(g.token_index, dtype=torch.int64, device=dev))
            self.slots.append(table[g.pool_row, :width].to(torch.int64))
            mean = not g.options.per_layer
            self.sums.append(
                torch.zeros(len(g.positions), width, dtype=torch.float32, device=dev)
                if mean
                else None
            )

    def wants(self, layer_id: int) -> bool:
        return layer_id in self.wanted

    def record(
        self,
        layer: "RadixAttention",
        q: torch.Tensor,
        lse: torch.Tensor,
        fb: "ForwardBatch",
        scale: float,
    ) -> None:
        """Score this layer for every group that selected it (q, lse: every extend token's)."""
        hq, d = layer.tp_q_head_num, layer.head_dim
        q3 = q.view(-1, hq, d)
        pool = fb.token_to_kv_pool.get_key_buffer(layer.layer_id)
        for g, res, pos, index, slots, acc in zip(
            self.groups, self.results, self.positions, self.token_index, self.slots, self.sums
        ):
            if layer.layer_id not in g.options.layers:
                continue
            probs = prompt_row_probs(
                q3[index],
                lse[index],
                pool,
                slots,
                pos,
                g.positions,
                scale,
                layer.logit_cap,
                layer.sliding_window_size,
                self.num_q_heads_total,
            )
            if acc is not None:
                acc.add_(probs, alpha=1.0 / len(g.options.layers))
                continue
            if self.tp:
                probs = tensor_model_parallel_all_reduce(probs)
            res.layers[layer.layer_id] = self._rank(probs, pos, g)

    @staticmethod
    def _rank(
        rows: torch.Tensor, positions: torch.Tensor, g: PromptGroup
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k of each row over its causal context, leading `exclude_sink` positions aside."""
        j = torch.arange(rows.shape[1], device=rows.device)[None, :]
        valid = j <= positions[:, None]
        sink = j < g.options.exclude_sink
        excluded = torch.where(sink & valid, rows, 0.0).sum(dim=1)
        ranked = rows.masked_fill(sink | ~valid, NOT_RANKED)
        vals, idx = ranked.topk(min(g.options.top_k, rows.shape[1]), dim=1)
        return vals, idx, excluded

    def finish(self) -> list[PromptResult]:
        """Rank the layer-mean rows (all-reduced over TP first)."""
        for g, res, pos, acc in zip(self.groups, self.results, self.positions, self.sums):
            if acc is None:
                continue
            if self.tp:
                acc = tensor_model_parallel_all_reduce(acc)
            res.values, res.indices, res.excluded = self._rank(acc, pos, g)
        return self.results
