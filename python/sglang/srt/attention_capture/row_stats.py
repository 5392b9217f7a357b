"""Span mass and attention statistics: reductions of the aggregated score rows, on the device.

Owns `attention_spans` and `attention_stats` (docs/attention_tokens.md). Both are computed from
the [R, W] float32 rows the capture already holds after the all-reduce (the layer- and head-mean
probabilities of each capturing row's query), before the top-k, so they cover the whole row and
not only the k listed positions. A handful of tensor reductions per forward, shared by the eager
(capture.py) and the static (static.py) paths; nothing reads host values.

    span_mass[r, s] = sum of row[r, j] for start[r, s] <= j < end[r, s]
    entropy         = -sum_j row_j log row_j               (nats; terms with row_j = 0 are 0)
    sink_mass       = row_0
    prompt_mass     = sum_{j < prompt_len} row_j,   completion_mass = sum_{j >= prompt_len} row_j
    mean_distance   = sum_j row_j (q - j),   q = seq_len - 1 the query's position
"""

from __future__ import annotations

from typing import Optional

import torch


def span_bounds(
    spans: list[tuple[tuple[str, int, int], ...]], device: torch.device
) -> Optional[torch.Tensor]:
    """[R, S, 2] int64 (start, end) of every row's spans, padded with empty (0, 0) spans; None
    when no row has spans."""
    width = max((len(s) for s in spans), default=0)
    if width == 0:
        return None
    bounds = [[(a, b) for _, a, b in s] + [(0, 0)] * (width - len(s)) for s in spans]
    return torch.tensor(bounds, dtype=torch.int64).to(device, non_blocking=True)


def span_mass(row: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """[R, S] float32 mass of each span: differences of the row's float64 prefix sums (so each
    span's sum carries float64 rounding only, whatever the number of spans)."""
    prefix = torch.nn.functional.pad(row.double().cumsum(dim=1), (1, 0))
    ends = prefix.gather(1, bounds[..., 1].clamp_max(row.shape[1]))
    starts = prefix.gather(1, bounds[..., 0].clamp_max(row.shape[1]))
    return (ends - starts).float()


def row_stats(row: torch.Tensor, seq_lens: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """[R, 5] float32 statistics of [R, W] rows (zero past each row's length)."""
    j = torch.arange(row.shape[1], device=row.device)
    entropy = -torch.where(row > 0, row * row.clamp_min(1e-45).log(), 0.0).sum(dim=1)
    in_prompt = j[None, :] < prompt_lens[:, None]
    prompt = torch.where(in_prompt, row, 0.0).sum(dim=1)
    completion = torch.where(in_prompt, 0.0, row).sum(dim=1)
    distance = ((seq_lens - 1)[:, None] - j[None, :]).clamp_min(0).to(row.dtype)
    mean_distance = (row * distance).sum(dim=1)
    # Column order is STAT_NAMES'.
    return torch.stack([entropy, row[:, 0], prompt, completion, mean_distance], dim=1)
