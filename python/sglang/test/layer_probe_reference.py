"""The HuggingFace reference of hidden_states_layers and logit_lens (docs/request_fields.md).

For completion token t of a request, HF runs over `prompt + output_ids[:-1]` and the query
position is len(prompt) + t - 1. The residual stream after layer L is HF's
`output_hidden_states[L + 1]` for every layer below the last; for the last layer HF's entry is
after the final norm, so the reference there is the last decoder layer's own output (a forward
hook), which is what the fork returns (before any final norm). The logit lens is
log_softmax(lm_head(final_norm(h_L))) with HF's own modules; a final-logit softcap (Gemma 2)
is applied as the model applies it to its logits.
"""

from __future__ import annotations

import numpy as np
import torch

from sglang.test.runners import HFRunner

HIDDEN_RTOL = 1e-5
LENS_TOL = 1e-4


def backbone_parts(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """An HF causal LM's decoder layers and final norm (Llama-style, GPT-2, GPT-NeoX)."""
    if hasattr(model, "transformer"):
        return model.transformer.h, model.transformer.ln_f
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers, model.gpt_neox.final_layer_norm
    return model.model.layers, model.model.norm


def reference(hf: HFRunner, prompt: list[int], output_ids: list[int]) -> dict[int, torch.Tensor]:
    """Layer -> [completion_len, hidden] residual stream after that layer, at each query."""
    model = hf.model
    layers, _ = backbone_parts(model)
    outputs: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def save(_module, _args, out) -> None:
            outputs[index] = (out[0] if isinstance(out, tuple) else out)[0].float()

        return save

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out = model(torch.tensor([prompt + output_ids[:-1]]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    n = len(layers)
    rows = slice(len(prompt) - 1, len(prompt) - 1 + len(output_ids))
    ref = {}
    for layer in range(n):
        hooked = outputs[layer][rows]
        if layer < n - 1:
            # The hook and HF's own hidden_states agree: layer L is hidden_states[L + 1].
            torch.testing.assert_close(hooked, out.hidden_states[layer + 1][0][rows].float())
        ref[layer] = hooked
    return ref


def lens_reference(hf: HFRunner, h: torch.Tensor) -> torch.Tensor:
    """log_softmax(lm_head(norm(h))) with HF's modules (and Gemma 2's final softcap)."""
    model = hf.model
    _, norm = backbone_parts(model)
    with torch.no_grad():
        logits = model.get_output_embeddings()(norm(h)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def check_hidden(rows: list, ref: torch.Tensor) -> None:
    """Within 1e-5 relative, per element and relative to the row's scale (an element near 0 in
    a row of magnitude ~10 differs by float32 rounding of a different summation order)."""
    got = torch.tensor(np.asarray(rows, dtype=np.float32))
    assert got.shape == ref.shape
    scale = ref.abs().amax(dim=-1, keepdim=True)
    assert ((got - ref).abs() <= HIDDEN_RTOL * torch.maximum(ref.abs(), scale)).all()


def check_lens(hf: HFRunner, entries: list, h: torch.Tensor, top_n: int) -> None:
    """entries[t] = [(token_id, logprob), ...] for completion token t."""
    ref = lens_reference(hf, h)
    assert len(entries) == ref.shape[0]
    for t, entry in enumerate(entries):
        assert len(entry) == top_n
        ids = [tid for tid, _ in entry]
        want = ref[t].topk(top_n)
        assert ids == want.indices.tolist()
        got = torch.tensor([lp for _, lp in entry])
        torch.testing.assert_close(got, want.values, rtol=LENS_TOL, atol=LENS_TOL)


def lens_pairs(steps: list[dict], layer: int) -> list[list[tuple[int, float]]]:
    """A response's logit_lens entries of one layer as check_lens takes them."""
    return [[(e["token_id"], e["logprob"]) for e in step[str(layer)]] for step in steps]
