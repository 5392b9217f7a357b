"""The sampler: turns one step's logits [B, V] into next token ids and, on request, logprobs.

Called by the model runner after the logits processor, with the `SamplingBatchInfo` built for the
same batch. Everything stays on the logits' device; there is no host sync and no per-row Python
loop, so the caller decides when to copy the result back.

Determinism: a sampled row draws exactly one uniform from a counter-based hash of
(sampling_seed, step) and inverts the CDF of its filtered distribution in vocabulary order.
Every operation is row-local and the filtering is an exact no-op for rows that do not ask for it,
so a request with a fixed seed yields the same tokens alone or inside any batch.

Logprobs are log_softmax of the raw logits in float32 (before penalties and temperature), which
is what HF reports for greedy decoding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo


class SamplerOutput(NamedTuple):
    next_token_ids: torch.Tensor  # [B] int64
    next_token_logprobs: torch.Tensor | None  # [B] float32
    top_logprobs_val: torch.Tensor | None  # [B, max_k] float32, descending
    top_logprobs_idx: torch.Tensor | None  # [B, max_k] int64


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# splitmix64 constants as signed int64 so torch accepts them; products wrap modulo 2**64.
_GAMMA = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64: `>>` is arithmetic, so clear the sign-extended bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float32 uniform in [0, 1) per row, a pure function of (seed, step)."""
    state = _mix64(seeds + _GAMMA)
    # Stepping by the odd gamma and re-mixing gives independent-looking draws per step.
    z = _mix64(state + (steps + 1) * _GAMMA)
    # 24 high bits fit a float32 mantissa exactly, so the conversion is lossless.
    return _shr(z, 40).to(torch.float32) * (1.0 / (1 << 24))


def _filter_mask(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Bool [B, V] in vocabulary order: tokens that survive top-k, then top-p, then min-p.

    top-p is taken over the top-k survivors renormalised (HF order); the most likely token
    always survives. Rows that do not use a filter get an all-true contribution from it.
    """
    vocab = probs.shape[-1]
    # NOTE: stable sort so ties keep vocabulary order, matching argmax's first-max rule.
    sorted_p, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=probs.device).unsqueeze(0)
    keep = rank == 0
    keep_sorted = torch.ones_like(sorted_p, dtype=torch.bool)
    if info.need_top_k_sampling:
        keep_sorted &= rank < info.top_ks.unsqueeze(1)
    if info.need_top_p_sampling:
        kept = sorted_p * keep_sorted
        cum = kept.cumsum(dim=-1)
        top_p = info.top_ps.unsqueeze(1)
        # A token joins the nucleus while the mass before it is short of top_p: this keeps the
        # minimal prefix whose mass reaches top_p.
        in_nucleus = (cum - kept) < top_p * cum[:, -1:]
        keep_sorted &= in_nucleus | (top_p >= 1.0)
    if info.need_min_p_sampling:
        keep_sorted &= sorted_p >= info.min_ps.unsqueeze(1) * sorted_p[:, :1]
    keep_sorted |= keep
    return torch.zeros_like(keep_sorted).scatter(-1, sorted_idx, keep_sorted)


def sample_from_logits(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Seeded temperature/top-k/top-p/min-p sampling of every row; [B] int64.

    `logits` are float32 with biases already applied. Greedy rows get a meaningless result
    here (temperature 1, no filters); the caller replaces it with the argmax.
    """
    probs = torch.softmax(logits / info.temperatures, dim=-1)
    if info.need_filtering:
        probs = probs * _filter_mask(probs, info)
    cdf = probs.cumsum(dim=-1)
    u = seeded_uniform(info.seeds, info.steps) * cdf[:, -1]
    idx = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)
    # Rounding can put u at the total mass, which would select past the last live token.
    rank = torch.arange(probs.shape[-1], device=probs.device)
    last_live = torch.where(probs > 0, rank, 0).amax(dim=-1)
    return torch.minimum(idx, last_live)


class Sampler(nn.Module):
    def forward(
        self,
        logits: torch.Tensor,
        sampling_info: SamplingBatchInfo,
        return_logprob: bool = False,
        top_logprobs_nums: list[int] | None = None,
    ) -> SamplerOutput:
        info = sampling_info
        biased = info.apply_logits_bias(logits) if info.has_logits_bias else logits.float()
        if info.vocab_mask is not None:
            if biased is logits and return_logprob:
                biased = logits.clone()  # logprobs below read the raw logits; nothing else does
            info.vocab_mask.apply(biased)
        greedy_ids = biased.argmax(dim=-1)
        if info.is_all_greedy:
            next_ids = greedy_ids
        else:
            next_ids = torch.where(info.is_greedy, greedy_ids, sample_from_logits(biased, info))

        if not return_logprob:
            return SamplerOutput(next_ids, None, None, None)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        next_lp = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)
        top_val = top_idx = None
        max_k = min(max(top_logprobs_nums or [0]), logprobs.shape[-1])
        if max_k > 0:
            top_val, top_idx = logprobs.topk(max_k, dim=-1)
        return SamplerOutput(next_ids, next_lp, top_val, top_idx)
