"""Per-request hidden states (`return_hidden_states`, with `--enable-return-hidden-states`).

What a request gets, as upstream SGLang returns it in `meta_info.hidden_states`: the final-layer
hidden states after the model's final norm (the vectors the LM head turns into logits), as a list
whose entry 0 is the whole prompt (`[prompt_len][hidden]`) and whose entries 1.. are one
`[hidden]` vector per decode step, i.e. for the token fed to that step. A request that generates
N tokens therefore gets N entries, and the rows concatenated equal HuggingFace's
`output_hidden_states=True` `hidden_states[-1]` over `prompt + output_ids[:-1]`.

The scheduler's output processor calls `collect_prefill` / `collect_decode` with the forward's
`LogitsProcessorOutput.hidden_states` (all tokens of the batch, present only when some request
asked). Only the rows of requests that asked are copied to the host, as float32 tensors; the
tokenizer manager turns them into lists. To return the whole prompt, such requests take no prefix
from the radix cache for their first prefill (`Req.wants_prompt_hidden`); a prompt prefilled in
chunks is assembled from its chunks; a request retracted and prefilled again adds only the hidden
state of its last token, which stands in for the decode step it replaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the tokenizer manager imports this module and must not import torch
    import torch

    from sglang.srt.managers.schedule_batch import ScheduleBatch

# The refusal (HTTP 400) of a request asking without the server flag.
HIDDEN_STATES_OFF = "return_hidden_states needs a server started with --enable-return-hidden-states"


def collect_prefill(batch: ScheduleBatch, hidden: Optional[torch.Tensor]) -> None:
    """Append each asking request's part of an extend forward's hidden states."""
    if hidden is None:
        return
    import torch

    start = 0
    for req in batch.reqs:
        length = req.extend_input_len
        if req.return_hidden_states:
            rows = hidden[start : start + length]
            if req.wants_prompt_hidden():
                req.prompt_hidden_chunks.append(rows.float().cpu())
                if not req.is_chunked:
                    req.hidden_states.append(torch.cat(req.prompt_hidden_chunks))
                    req.prompt_hidden_chunks = []
            elif not req.is_chunked:
                req.hidden_states.append(rows[-1].float().cpu())
        start += length


def collect_decode(batch: ScheduleBatch, hidden: Optional[torch.Tensor]) -> None:
    """Append one vector per asking request of a decode forward (one host copy for all)."""
    if hidden is None:
        return
    rows = [i for i, req in enumerate(batch.reqs) if req.return_hidden_states]
    if not rows:
        return
    import torch

    host = hidden[torch.tensor(rows, device=hidden.device)].float().cpu()
    for k, i in enumerate(rows):
        batch.reqs[i].hidden_states.append(host[k])
