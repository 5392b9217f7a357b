"""Batched sampling state for one forward step: per-request knobs turned into device tensors.

`SamplingBatchInfo.from_reqs` is called by the scheduler/model runner once per step with the
requests in batch order; it reads each request's normalized `SamplingParams`, `origin_input_ids`,
`output_ids`, `sampling_seed` and `eos_token_ids`. The `Sampler` consumes the result together with
the logits. Host bookkeeping loops over requests, but every tensor is built with one host-to-device
copy and, for the [B, V] tables, one scatter.

Penalty semantics:
- repetition_penalty (HF): for every token in prompt + output, a positive logit is divided by the
  penalty and a non-positive one multiplied by it.
- frequency/presence (OpenAI): logit -= frequency * count + presence * (count > 0), where count is
  how often the token occurs in the output so far (the prompt does not count).
- logit_bias is added to the logits after the penalties.
- While len(output_ids) < min_new_tokens, the model EOS ids and the request's stop_token_ids get
  -inf, so they cannot be sampled (greedy rows included).

Tables exist only when some request in the batch needs them, so the common case builds only
the [B] vectors. Logits given to `apply_logits_bias` must be [B, vocab_size].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sglang.srt.sampling.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingBatchInfo:
    vocab_size: int
    # Per-row vectors. Greedy rows carry temperature 1 and no filtering so the shared sampled
    # path stays finite for them; their result is replaced by the argmax.
    temperatures: torch.Tensor  # [B, 1] float32
    top_ps: torch.Tensor  # [B] float32
    top_ks: torch.Tensor  # [B] int64, -1 mapped to vocab_size
    min_ps: torch.Tensor  # [B] float32
    is_greedy: torch.Tensor  # [B] bool
    seeds: torch.Tensor  # [B] int64 (the 64-bit seed, two's complement)
    steps: torch.Tensor  # [B] int64, index of the output token about to be sampled
    # Host-side flags so the sampler can skip work without reading device memory.
    is_all_greedy: bool
    need_top_p_sampling: bool
    need_top_k_sampling: bool
    need_min_p_sampling: bool
    # Optional tables, None when no request uses them.
    frequency_penalties: torch.Tensor | None = None  # [B, 1] float32
    presence_penalties: torch.Tensor | None = None  # [B, 1] float32
    output_token_counts: torch.Tensor | None = None  # [B, V] float32
    repetition_penalties: torch.Tensor | None = None  # [B, 1] float32
    seen_token_mask: torch.Tensor | None = None  # [B, V] bool, prompt + output tokens
    logit_bias: torch.Tensor | None = None  # [B, V] float32
    min_tokens_rows: torch.Tensor | None = None  # [N] int64, (row, token) pairs to block
    min_tokens_cols: torch.Tensor | None = None  # [N] int64
    # Token bitmask of the constrained rows (constrained/vocab_mask.py), None when there are none.
    vocab_mask: Any = None

    @property
    def batch_size(self) -> int:
        return self.temperatures.shape[0]

    @property
    def need_filtering(self) -> bool:
        return self.need_top_k_sampling or self.need_top_p_sampling or self.need_min_p_sampling

    @property
    def has_logits_bias(self) -> bool:
        return (
            self.output_token_counts is not None
            or self.seen_token_mask is not None
            or self.logit_bias is not None
            or self.min_tokens_rows is not None
        )

    @classmethod
    def from_reqs(cls, reqs: list[Any], vocab_size: int, device: torch.device | str):
        V = vocab_size
        temps: list[float] = []
        top_ps: list[float] = []
        min_ps: list[float] = []
        top_ks: list[int] = []
        greedy: list[bool] = []
        seeds: list[int] = []
        steps: list[int] = []
        need_top_p = need_top_k = need_min_p = False
        for req in reqs:
            sp: SamplingParams = req.sampling_params
            g = sp.is_greedy
            greedy.append(g)
            seeds.append(_to_int64(req.sampling_seed))
            steps.append(len(req.output_ids))
            if g:
                temps.append(1.0)
                top_ps.append(1.0)
                min_ps.append(0.0)
                top_ks.append(V)
                continue
            k = V if sp.top_k == -1 or sp.top_k >= V else sp.top_k
            temps.append(float(sp.temperature))
            top_ps.append(float(sp.top_p))
            min_ps.append(float(sp.min_p))
            top_ks.append(k)
            need_top_p |= sp.top_p < 1.0
            need_top_k |= k < V
            need_min_p |= sp.min_p > 0.0

        floats = torch.tensor([temps, top_ps, min_ps], dtype=torch.float32).to(device)
        ints = torch.tensor([top_ks, seeds, steps], dtype=torch.int64).to(device)
        info = cls(
            vocab_size=V,
            temperatures=floats[0].unsqueeze(1),
            top_ps=floats[1],
            min_ps=floats[2],
            top_ks=ints[0],
            seeds=ints[1],
            steps=ints[2],
            is_greedy=torch.tensor(greedy, dtype=torch.bool).to(device),
            is_all_greedy=all(greedy),
            need_top_p_sampling=need_top_p,
            need_top_k_sampling=need_top_k,
            need_min_p_sampling=need_min_p,
        )
        info._build_penalties(reqs, device)
        info._build_logit_bias(reqs, device)
        info._build_min_tokens(reqs, device)
        if any(getattr(r, "grammar", None) is not None for r in reqs):
            from sglang.srt.constrained.vocab_mask import VocabMask

            info.vocab_mask = VocabMask.from_reqs(reqs, V)
        return info

    def _build_penalties(self, reqs: list[Any], device: torch.device | str) -> None:
        B, V = len(reqs), self.vocab_size
        params = [r.sampling_params for r in reqs]
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            rows: list[int] = []
            cols: list[int] = []
            for i, (req, p) in enumerate(zip(reqs, params)):
                if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                    rows.extend([i] * len(req.output_ids))
                    cols.extend(req.output_ids)
            pens = [[p.frequency_penalty for p in params], [p.presence_penalty for p in params]]
            pen = torch.tensor(pens, dtype=torch.float32).to(device)
            self.frequency_penalties = pen[0].unsqueeze(1)
            self.presence_penalties = pen[1].unsqueeze(1)
            self.output_token_counts = _scatter_add(rows, cols, None, B, V, device)
        if any(p.repetition_penalty != 1.0 for p in params):
            rows, cols = [], []
            for i, (req, p) in enumerate(zip(reqs, params)):
                if p.repetition_penalty != 1.0:
                    n = len(req.origin_input_ids) + len(req.output_ids)
                    rows.extend([i] * n)
                    cols.extend(req.origin_input_ids)
                    cols.extend(req.output_ids)
            reps = [float(p.repetition_penalty) for p in params]
            self.repetition_penalties = torch.tensor(reps, dtype=torch.float32).to(device)
            self.repetition_penalties = self.repetition_penalties.unsqueeze(1)
            self.seen_token_mask = _scatter_add(rows, cols, None, B, V, device) > 0

    def _build_logit_bias(self, reqs: list[Any], device: torch.device | str) -> None:
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i, req in enumerate(reqs):
            bias = req.sampling_params.logit_bias
            if bias:
                rows.extend([i] * len(bias))
                cols.extend(int(k) for k in bias)
                vals.extend(float(v) for v in bias.values())
        if rows:
            self.logit_bias = _scatter_add(rows, cols, vals, len(reqs), self.vocab_size, device)

    def _build_min_tokens(self, reqs: list[Any], device: torch.device | str) -> None:
        rows: list[int] = []
        cols: list[int] = []
        V = self.vocab_size
        for i, req in enumerate(reqs):
            sp = req.sampling_params
            if len(req.output_ids) >= sp.min_new_tokens:
                continue
            blocked = set(getattr(req, "eos_token_ids", None) or ())
            blocked.update(sp.stop_token_ids or ())
            # These sets are tiny, so dropping out-of-vocab ids on the host is free.
            ids = [t for t in blocked if 0 <= t < V]
            rows.extend([i] * len(ids))
            cols.extend(ids)
        if rows:
            idx = torch.tensor([rows, cols], dtype=torch.int64).to(device)
            self.min_tokens_rows, self.min_tokens_cols = idx[0], idx[1]

    def apply_logits_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """Return float32 logits with penalties, logit_bias and min-token blocks applied.

        NOTE: never modifies `logits`; the sampler still needs the raw values for logprobs.
        """
        out = logits.float()
        if self.seen_token_mask is not None:
            rep = self.repetition_penalties
            penalized = torch.where(out > 0, out / rep, out * rep)
            out = torch.where(self.seen_token_mask, penalized, out)
        if self.output_token_counts is not None:
            counts = self.output_token_counts
            out = out - self.frequency_penalties * counts - self.presence_penalties * (counts > 0)
        if self.logit_bias is not None:
            out = out + self.logit_bias
        if self.min_tokens_rows is not None:
            neg_inf = torch.tensor(float("-inf"), dtype=out.dtype, device=out.device)
            out = out.index_put((self.min_tokens_rows, self.min_tokens_cols), neg_inf)
        if out is logits:
            # No bias applied and the input was already float32: hand back a distinct tensor
            # so later in-place work by the caller cannot touch the raw logits.
            out = out.clone()
        return out


def _to_int64(seed: int) -> int:
    """Reduce any Python int to the signed 64-bit value with the same low 64 bits."""
    seed &= _MASK64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _scatter_add(
    rows: list[int],
    cols: list[int],
    vals: list[float] | None,
    batch: int,
    vocab: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Dense [batch, vocab] float32 table with vals (default 1) summed at (rows, cols).

    Out-of-vocab ids (a prompt may carry any ints) contribute nothing; they are masked on the
    device rather than filtered in Python because prompt lists can be long.
    """
    idx = torch.tensor([rows, cols], dtype=torch.int64).to(device)
    r, c = idx[0], idx[1]
    valid = (c >= 0) & (c < vocab)
    weight = valid.float()
    if vals is not None:
        weight = weight * torch.tensor(vals, dtype=torch.float32).to(device)
    table = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
    table.index_put_((r, c.clamp(0, vocab - 1)), weight, accumulate=True)
    return table
