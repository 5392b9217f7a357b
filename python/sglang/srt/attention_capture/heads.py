"""Head selection of the capture: `attention_heads` and `attention_head_aggregation`.

Owns, per forward, which of this rank's query heads each capturing row uses and how it combines
them (docs/attention_tokens.md): the mean over the chosen heads' softmax rows, their elementwise
maximum, or one row per chosen head ("none", at most MAX_SPLIT_HEADS heads). Head ids are global:
under tensor parallelism rank t holds heads [t * Hl, (t + 1) * Hl), so a row's chosen heads may
sit on any rank. Each rank computes its own share of the layer's row and the capture's existing
sum all-reduce completes it:

  * mean: sum over the chosen local heads of 1/|chosen| times their probabilities (a row that
    names no heads in a forward with a plan takes every head with 1/H: the plain head mean, up
    to float rounding);
  * max: the maximum needs every rank's heads, so the per-layer maxima are gathered over the
    group first and each rank adds 1/T of the result (T a power of two in practice, where the
    division is exact);
  * none: row s of a request is its s-th chosen head's probabilities, zero on the other ranks.

Only forwards with a row that asks anything but the plain mean build a plan; the rest keep
capture.py's head-summed path and pay nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sglang.srt.attention_capture.config import AttentionRequest
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)


@dataclass
class HeadPlan:
    """One forward's head selection for R capturing rows over this rank's Hl heads."""

    mean_weights: torch.Tensor  # [R, Hl] float32: 1/|chosen| on chosen local heads, else 0
    chosen: torch.Tensor  # [R, Hl] bool: the row's chosen heads among this rank's
    is_max: Optional[torch.Tensor]  # [R, 1] bool rows aggregated by max; None when none are
    slots: Optional[torch.Tensor]  # [R, S] int64 local head of row r's s-th chosen head, or -1
    num_slots: int  # S: the most heads a "none" row chose (0: no such row)
    head_slot: Optional[torch.Tensor] = None  # [R, Hl] int32 the inverse: slot of a head, or -1


def plan_heads(
    requests: list[AttentionRequest], num_heads_total: int, device: torch.device
) -> Optional[HeadPlan]:
    """The plan of a forward's rows, or None when every row takes the plain head mean."""
    if all(r.plain_heads for r in requests):
        return None
    tp = get_tensor_model_parallel_world_size()
    local = num_heads_total // tp
    first = get_tensor_model_parallel_rank() * local
    weights, chosen, is_max, slots, head_slot = [], [], [], [], []
    num_slots = max((len(r.heads or ()) for r in requests if r.per_head), default=0)
    for r in requests:
        heads = range(num_heads_total) if r.heads is None else r.heads
        mine = [h - first for h in heads if first <= h < first + local]
        mask = [False] * local
        for h in mine:
            mask[h] = True
        chosen.append(mask)
        weights.append([1.0 / len(heads) if m else 0.0 for m in mask])
        is_max.append(r.head_aggregation == "max")
        row_slots = []
        if r.per_head:
            row_slots = [h - first if first <= h < first + local else -1 for h in heads]
        slots.append(row_slots + [-1] * (num_slots - len(row_slots)))
        inverse = [-1] * local
        for s, h in enumerate(row_slots):
            if h >= 0:
                inverse[h] = s
        head_slot.append(inverse)

    def to_dev(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return HeadPlan(
        mean_weights=to_dev(weights, torch.float32),
        chosen=to_dev(chosen, torch.bool),
        is_max=to_dev(is_max, torch.bool)[:, None] if any(is_max) else None,
        slots=to_dev(slots, torch.int64) if num_slots else None,
        num_slots=num_slots,
        head_slot=to_dev(head_slot, torch.int32) if num_slots else None,
    )


def max_share(local: torch.Tensor) -> torch.Tensor:
    """[R, W] this rank's additive share of the maximum over every rank's chosen heads, from
    this rank's own maxima (gathered over the TP group, then 1/T of it)."""
    tp = get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    gathered = tensor_model_parallel_all_gather(local[None], dim=0)
    return gathered.amax(dim=0) / tp


def aggregate_heads(
    plan: HeadPlan, probs: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """This rank's share of one layer's aggregated [R, W] rows and, when some row splits its
    heads, of its [R, S, W] per-head rows, from [R, Hl, W] per-head probabilities."""
    row = torch.einsum("rhw,rh->rw", probs, plan.mean_weights)
    if plan.is_max is not None:
        local = probs.masked_fill(~plan.chosen[:, :, None], 0.0).amax(dim=1)
        row = torch.where(plan.is_max, max_share(local), row)
    return row, split_heads(plan, probs)


def split_heads(plan: HeadPlan, probs: torch.Tensor) -> Optional[torch.Tensor]:
    """[R, S, W]: row r's s-th chosen head's probabilities where this rank holds it, else 0."""
    if plan.slots is None:
        return None
    index = plan.slots.clamp_min(0)[:, :, None].expand(-1, -1, probs.shape[2])
    return probs.gather(1, index) * (plan.slots >= 0)[:, :, None]
