"""The batch's token bitmask: one row per constrained request, applied to the logits at once.

Built with the step's `SamplingBatchInfo` (host side, before the forward result is read): each
constrained request's matcher writes its row of an int32 bitmask (bit t of a row allows token t).
The sampler then masks the disallowed tokens of those rows to -inf in one batched call before
temperature, filtering and argmax: on CPU with sgl_kernel's C kernel
(sgl-kernel/sgl_kernel/cpu_token_bitmask.py: xgrammar's semantics, a fraction of the cost of
xgrammar's CPU kernel), elsewhere with xgrammar's kernels (Triton on a GPU; its CPU kernel where
sgl_kernel's cannot be built, which beats a PyTorch version). Unconstrained rows are
neither filled nor masked; a batch with no constrained request builds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import xgrammar as xgr
from sgl_kernel import cpu_token_bitmask


@dataclass
class VocabMask:
    bitmask: torch.Tensor  # [B, ceil(V / 32)] int32; unconstrained rows stay all-allowed
    rows: list[int]  # the constrained batch rows
    vocab_size: int

    @classmethod
    def from_reqs(cls, reqs: list[Any], vocab_size: int) -> Optional[VocabMask]:
        constrained = [i for i, r in enumerate(reqs) if getattr(r, "grammar", None) is not None]
        if not constrained:
            return None
        # xgrammar indexes the bitmask by batch row, so it has a row for every request.
        bitmask = xgr.allocate_token_bitmask(len(reqs), vocab_size)
        for i in constrained:
            reqs[i].grammar.fill_vocab_mask(bitmask, i)
        return cls(bitmask, constrained, vocab_size)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens of the constrained rows of float32 `logits` to -inf, in place."""
        if logits.device.type == "cpu" and cpu_token_bitmask.available():
            cpu_token_bitmask.apply_token_bitmask_inplace(
                logits, self.bitmask, self.rows, self.vocab_size
            )
            return
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        indices = None if len(self.rows) == logits.shape[0] else self.rows
        xgr.apply_token_bitmask_inplace(
            logits, bitmask, vocab_size=self.vocab_size, indices=indices
        )
