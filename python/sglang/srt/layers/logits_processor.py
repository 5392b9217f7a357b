"""Logits: pick the hidden states that need them, apply the LM head, gather across TP ranks.

Owns which positions produce logits: the last token of each request (to sample the next token)
and, for requests asking for prompt logprobs, the positions listed in the forward batch, whose
log-probabilities of the following prompt token (and top-n alternatives) it computes here. When the
batch asks for hidden states it also returns the hidden states it was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from sgl_kernel.attention_scores import softcap
from torch import nn

from sglang.srt.distributed.parallel_state import tensor_model_parallel_all_gather

if TYPE_CHECKING:
    from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch


@dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor  # [bs, vocab] float32
    input_token_logprobs: Optional[torch.Tensor] = None  # [M] float32
    input_top_logprobs_val: Optional[torch.Tensor] = None  # [M, k]
    input_top_logprobs_idx: Optional[torch.Tensor] = None  # [M, k]
    # attention_capture.CaptureResult of this forward, when some row captured.
    attention_capture: Optional[Any] = None
    # Final hidden states (after the final norm, as fed to the LM head) of every token of the
    # forward, [num_tokens, hidden]; only when the batch asked (capture_hidden_states).
    hidden_states: Optional[torch.Tensor] = None
    # layers.layer_probe.ProbeResult of the rows asking hidden_states_layers / logit_lens.
    layer_probe: Optional[Any] = None


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, final_logit_softcapping: Optional[float] = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # Gemma 2's cap * tanh(logits / cap), applied to every logit the engine returns.
        self.final_logit_softcapping = final_logit_softcapping or 0.0

    def get_logits(self, hidden: torch.Tensor, lm_head: "VocabParallelEmbedding") -> torch.Tensor:
        packed = getattr(lm_head, "cpu_packed", None)  # layers/cpu_weight_layout.py
        if packed is not None:
            logits = packed.matmul(hidden, None)
        else:
            logits = F.linear(hidden, lm_head.weight)
        logits = tensor_model_parallel_all_gather(logits)
        logits = logits[:, : self.vocab_size].float()
        return softcap(logits, self.final_logit_softcapping)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        lm_head: "VocabParallelEmbedding",
        forward_batch: "ForwardBatch",
    ) -> LogitsProcessorOutput:
        if forward_batch.forward_mode.is_extend():
            last = forward_batch.extend_start_loc + forward_batch.extend_seq_lens - 1
            last_hidden = hidden_states[last]
        else:
            last_hidden = hidden_states
        probe = forward_batch.layer_probe
        lens = probe.lens_rows(last_hidden) if probe is not None else None
        if lens is None:
            logits = both = self.get_logits(last_hidden, lm_head)
        else:
            # The logit lens shares the sampler's head call: one pass over the LM-head weight.
            both = self.get_logits(torch.cat([last_hidden, lens]), lm_head)
            logits = both[: last_hidden.shape[0]]
        out = LogitsProcessorOutput(next_token_logits=logits)
        if forward_batch.capture_hidden_states:
            out.hidden_states = hidden_states  # a reference: copied only for rows that asked
        if probe is not None:
            out.layer_probe = probe.finish(both)

        idx = forward_batch.input_logprob_indices
        if idx is not None and idx.numel() > 0:
            logprobs = torch.log_softmax(self.get_logits(hidden_states[idx], lm_head), dim=-1)
            targets = forward_batch.input_logprob_targets
            out.input_token_logprobs = logprobs.gather(1, targets[:, None]).squeeze(1)
            k = max(forward_batch.input_logprob_top_nums or [0])
            if k > 0:
                val, ids = logprobs.topk(k, dim=-1)
                out.input_top_logprobs_val, out.input_top_logprobs_idx = val, ids
        return out
