"""Checks of attention-token results against a dense reference row (tests only).

Owns what "correct" means for a top-k report: given the reference head-mean (and layer-mean)
probability row of one query, the reported positions must be a valid top-k of that row (ties
allowed: every reported score at least every unreported one, within tolerance), every score must
equal the reference at its position, scores come sorted, excluded leading positions are never
ranked and their mass matches. Used by test_topk_attention.py and test_attention_tokens.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def layer_mean(rows: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Mean over `layers` of a [num_layers, context] tensor of head-mean rows."""
    return rows[list(layers)].mean(0)


def assert_valid_topk(
    positions: Sequence[int],
    scores: Sequence[float],
    ref: torch.Tensor,
    k: int,
    *,
    exclude: int = 0,
    excluded_mass: Optional[float] = None,
    tol: float = 1e-4,
    label: str = "",
) -> None:
    """`positions`/`scores` are a valid top-k of the reference row `ref` ([context] float64)."""
    n = ref.shape[0]
    rankable = max(n - exclude, 0)
    assert len(positions) == len(scores) == min(k, rankable), (
        f"{label}: {len(positions)} entries, expected {min(k, rankable)}"
    )
    assert len(set(positions)) == len(positions), f"{label}: repeated positions {positions}"
    for p, s in zip(positions, scores):
        assert exclude <= p < n, f"{label}: position {p} outside [{exclude}, {n})"
        assert abs(ref[p].item() - s) <= tol, (
            f"{label}: score at {p} is {s}, reference {ref[p].item()}"
        )
    assert all(a >= b for a, b in zip(scores, scores[1:])), f"{label}: scores not sorted {scores}"
    if positions and len(positions) < rankable:
        rest = torch.ones(n, dtype=torch.bool)
        rest[: max(exclude, 0)] = False
        rest[list(positions)] = False
        best_left = ref[rest].max().item()
        assert min(ref[p].item() for p in positions) >= best_left - tol, (
            f"{label}: positions {positions} are not a top-{k} of the reference "
            f"(an unreported position scores {best_left})"
        )
    if excluded_mass is not None:
        want = ref[:exclude].sum().item() if exclude else 0.0
        assert abs(excluded_mass - want) <= tol * max(1, exclude), (
            f"{label}: excluded mass {excluded_mass}, reference {want}"
        )
