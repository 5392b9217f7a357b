"""Mixture-of-experts layers: top-k routing, the routed experts, and their checkpoint loading.

`select_experts` turns router logits into each token's top-k experts and their weights with the
architecture's normalisation. `FusedMoE` holds every expert's gate/up and down projections stacked
in two 3-D parameters (`w13_weight` [E, 2I, H], `w2_weight` [E, H, I]); under tensor parallelism
each rank holds a slice of every expert's intermediate dim and the block all-reduces after the down
projection, as the dense MLP's row-parallel layer does. The experts run grouped: the token-expert
assignments are sorted by expert and each expert that received tokens does one matmul over them.
Under CUDA-graph capture (no host sync allowed, so no data-dependent shapes) every expert runs
over the whole batch weighted by a dense [T, E] routing matrix that is zero where a token was not
routed: the same sums, fixed shapes. `ExpertWeightsMixin` loads HF's per-expert tensors
(`experts.{e}.w1/w3/w2` of Mixtral, `experts.{e}.gate_proj/up_proj/down_proj` of Qwen MoE).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from sglang.srt.layers.linear import ReplicatedLinear


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], expert ids [T, k]): softmax over all experts in float32, the top k, and
    with `renormalize` those k rescaled to sum to 1 (equal to a softmax over the top-k logits,
    Mixtral's rule; Qwen MoE's `norm_topk_prob`)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def _divide(a: int, b: int) -> int:
    if a % b != 0:
        raise ValueError(f"expert intermediate size {a} is not divisible by the TP size {b}")
    return a // b


class FusedMoE(nn.Module):
    """The routed experts of one sparse block (SiLU-gated MLPs), TP-sharded on the intermediate dim."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.shard_size = _divide(intermediate_size, self.tp_size)
        size = self.shard_size
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * size, hidden_size), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, size), requires_grad=False
        )
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str, expert_id: int
    ) -> None:
        """Copy this rank's slice of one expert's HF tensor: w1 (gate) and w3 (up) [I, H] into
        the two halves of w13, w2 (down) [H, I] into w2."""
        size = self.shard_size
        start = self.tp_rank * size
        if shard_id == "w2":
            dst = param.data[expert_id]
            src = loaded_weight.narrow(1, start, size)
        else:
            half = 0 if shard_id == "w1" else size
            dst = param.data[expert_id].narrow(0, half, size)
            src = loaded_weight.narrow(0, start, size)
        if dst.shape != src.shape:
            raise ValueError(
                f"shape mismatch loading expert {expert_id} {shard_id}: expected "
                f"{tuple(dst.shape)}, got {tuple(src.shape)}"
            )
        with torch.no_grad():
            dst.copy_(src)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13_weight[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2_weight[e])

    # Left out of torch.compile (--enable-torch-compile): the grouped path's per-expert row counts
    # are data, so Dynamo would specialise on them and recompile at every step; and the capture
    # check must run when the graph is captured, not when it is traced.
    @torch.compiler.disable
    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            out = self.forward_dense(x, topk_weights, topk_ids)
        else:
            out = self.forward_grouped(x, topk_weights, topk_ids)
        return tensor_model_parallel_all_reduce(out) if self.tp_size > 1 else out

    def forward_grouped(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """Assignments sorted by expert; one matmul per expert over the tokens routed to it."""
        top_k = topk_ids.shape[1]
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        rows = order // top_k
        weights = topk_weights.reshape(-1)[order].unsqueeze(1)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = rows[start : start + n]
                out.index_add_(0, idx, self.expert(e, x[idx]) * weights[start : start + n])
            start += n
        return out

    def forward_dense(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """Every expert over every token, weighted by the routing matrix (zero where not routed)."""
        routing = x.new_zeros(x.shape[0], self.num_experts)
        routing.scatter_(1, topk_ids, topk_weights.to(x.dtype))
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            out += self.expert(e, x) * routing[:, e : e + 1]
        return out


def check_silu(config: Any) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"MoE experts with hidden_act {act!r} are not supported (silu)")


# HF per-expert tensor -> (FusedMoE parameter, shard id)
_EXPERT_PROJ = {
    "w1": ("w13_weight", "w1"),
    "gate_proj": ("w13_weight", "w1"),
    "w3": ("w13_weight", "w3"),
    "up_proj": ("w13_weight", "w3"),
    "w2": ("w2_weight", "w2"),
    "down_proj": ("w2_weight", "w2"),
}
_EXPERT_NAME = re.compile(r"^(.*)\.experts\.(\d+)\.(\w+)\.weight$")


class ExpertWeightsMixin:
    """`load_weights` for a LlamaForCausalLM-style model whose MoE blocks live at `mlp`: per-expert
    tensors go to the FusedMoE parameters, everything else to the base class's loader. Mixtral's
    checkpoints name the block `block_sparse_moe`; it is read as `mlp`."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from sglang.srt.models.utils import refuse_int4

        refuse_int4(self)  # type: ignore[arg-type]
        params = dict(self.named_parameters())  # type: ignore[attr-defined]
        loaded: set[tuple[str, str, int]] = set()

        def others() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.replace(".block_sparse_moe.", ".mlp.")
                match = _EXPERT_NAME.match(name)
                proj = _EXPERT_PROJ.get(match.group(3)) if match else None
                target = f"{match.group(1)}.experts.{proj[0]}" if match and proj else None
                if target is None or target not in params:
                    yield name, tensor
                    continue
                expert = int(match.group(2))
                params[target].weight_loader(params[target], tensor, proj[1], expert)
                loaded.add((target, proj[1], expert))

        super().load_weights(others())  # type: ignore[misc]
        missing = [key for key in self.expert_weight_keys() if key not in loaded]
        if missing:
            raise ValueError(
                f"checkpoint is missing {len(missing)} expert weights the model needs, e.g. "
                f"{missing[:3]}; the weight files may be incomplete or for a different architecture"
            )

    def expert_weight_keys(self) -> list[tuple[str, str, int]]:
        keys = []
        for prefix, module in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(module, FusedMoE):
                for e in range(module.num_experts):
                    keys += [(f"{prefix}.w13_weight", s, e) for s in ("w1", "w3")]
                    keys.append((f"{prefix}.w2_weight", "w2", e))
        return keys

    def expected_weight_keys(self) -> list[str]:
        return [
            key
            for key in super().expected_weight_keys()  # type: ignore[misc]
            if not key.endswith((".w13_weight", ".w2_weight"))
        ]


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated) + routed experts: the MoE MLP of Mixtral and Qwen3-MoE."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        intermediate_size: int,
        top_k: int,
        renormalize: bool,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)
