"""Checkpoint loading shared by models whose HF tensors do not map one-to-one onto parameters.

`load_routed_weights` feeds each (HF name, tensor) pair through the model's `route`, which says
which parameter (and which shard of a stacked parameter) each piece goes to, after whatever
re-layout the checkpoint needs (GPT-2's Conv1D transpose, GPT-NeoX's per-head fused QKV). It calls
every parameter's own weight loader, so TP sharding stays with the layer, warns about tensors the
model does not use and fails clearly when the checkpoint lacks a weight the model needs.
`RoutedCausalLM` is the LM-head shell (tied or untied head, logits, loading) of such models.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import torch
from torch import nn

from sglang.srt.layers.linear import default_weight_loader
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

ShardId = Optional[Union[str, int]]


class Routed(NamedTuple):
    param: str  # parameter name in the model
    tensor: torch.Tensor
    shard: ShardId = None  # shard of a stacked parameter ("q"/"k"/"v", 0/1), None otherwise


def load_routed_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    route: Callable[[str, torch.Tensor], list[Routed]],
    stacked: dict[str, tuple[ShardId, ...]],
) -> None:
    """Load `weights` into `model`. `route(name, tensor)` returns the pieces of one HF tensor
    (empty for tensors that are not weights, e.g. saved attention-mask buffers); `stacked` maps a
    stacked module's name (e.g. "c_attn") to the shard ids each of its parameters must receive."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        for piece in route(name, tensor):
            param = params.get(piece.param)
            if param is None:
                unexpected.append(name)
                continue
            loader = getattr(param, "weight_loader", default_weight_loader)
            if piece.shard is None:
                loader(param, piece.tensor)
                loaded.add(piece.param)
            else:
                loader(param, piece.tensor, piece.shard)
                loaded.add(f"{piece.param}:{piece.shard}")
    if unexpected:
        logger.warning(
            "ignored %d checkpoint tensors not used by the model: %s",
            len(unexpected),
            unexpected[:8],
        )
    missing = [key for key in expected_keys(model, stacked) if key not in loaded]
    if missing:
        raise ValueError(
            f"checkpoint is missing {len(missing)} weights the model needs, e.g. {missing[:5]}; "
            "the weight files may be incomplete or for a different architecture"
        )


def expected_keys(model: nn.Module, stacked: dict[str, tuple[ShardId, ...]]) -> list[str]:
    """Every key `load_routed_weights` must have loaded: one per parameter, one per shard of a
    stacked parameter."""
    keys = []
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 2)[-2] if "." in name else ""
        shards = stacked.get(module)
        keys += [name] if shards is None else [f"{name}:{s}" for s in shards]
    return keys


def refuse_int4(model: nn.Module) -> None:
    """Raise when the loader gave `model` int4 layers (an AWQ/GPTQ checkpoint): the models that
    call this re-lay out fused or transposed tensors at load, which packed int4 tensors do not
    survive, and their int4 path is not checked against HF."""
    if any(getattr(module, "quant_method", None) is not None for module in model.modules()):
        raise ValueError(
            f"int4 checkpoints of {type(model).__name__} are not supported; use unquantized weights"
        )


class RoutedCausalLM(nn.Module):
    """The causal-LM shell of models loaded through `route`: a backbone and an LM head under the
    checkpoint's own names (`transformer` + `lm_head` for GPT-2, `gpt_neox` + `embed_out` for
    GPT-NeoX), the head tied to the input embedding when the config says so, and the logits."""

    # Stacked modules and the shard ids their parameters receive (see load_routed_weights).
    stacked: dict[str, tuple[ShardId, ...]] = {}

    def __init__(self, config: Any, quant_config: Any = None) -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError("quantized checkpoints are not supported yet")
        self.config = config
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def attach(
        self,
        backbone_name: str,
        backbone: nn.Module,
        head_name: str,
        embedding: VocabParallelEmbedding,
        tie_default: bool,
    ) -> None:
        """Register the backbone and the LM head (the embedding itself when tied)."""
        self.tie_word_embeddings = bool(getattr(self.config, "tie_word_embeddings", tie_default))
        if self.tie_word_embeddings:
            head: nn.Module = embedding
        else:
            head = ParallelLMHead(self.config.vocab_size, self.config.hidden_size)
        setattr(self, backbone_name, backbone)
        setattr(self, head_name, head)
        self.backbone_name, self.head_name = backbone_name, head_name

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> LogitsProcessorOutput:
        hidden_states = getattr(self, self.backbone_name)(input_ids, positions, forward_batch)
        head = getattr(self, self.head_name)
        return self.logits_processor(input_ids, hidden_states, head, forward_batch)

    def route(self, name: str, tensor: torch.Tensor) -> list[Routed]:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        refuse_int4(self)
        load_routed_weights(self, weights, self.route, self.stacked)
