"""Which top-level request fields each entry point implements, refuses or ignores.

Shared by native `/generate` (http_server.py), the OpenAI routes (openai/api.py) and
`Engine.generate` keyword arguments (engine.py); docs/request_fields.md is the user-facing table.
Before a body reaches its model, `screen_fields` sorts every key:

- implemented fields pass through; the route's model and the engine validate their values;
- fields upstream SGLang knows but this server does not implement are refused (ValueError naming
  the field, HTTP 400) as soon as they carry a value other than upstream's default; sent with the
  default, as routers and `bench_serving` do, they are accepted;
- fields that change nothing upstream either (metadata such as `log_metrics`) are dropped;
- any other unknown field is dropped, as upstream does, unless it is a near miss of a field the
  route knows (difflib), which is refused with "did you mean". On `/generate` a sampling
  parameter sent at the top level is refused too: upstream would ignore it and sample with the
  defaults, which is never what the client meant.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# How close (difflib ratio) an unknown name must be to a known one to count as a misspelling.
# 0.85 catches a dropped/added/swapped letter or underscore in names of 10+ characters while
# leaving real-world extras alone (e.g. `store` vs `stop`, `log_metrics` vs `logprobs`).
MISSPELLING_CUTOFF = 0.85

# Upstream fields shared by both OpenAI routes that this server does not implement, with the
# value that means "not used" (accepted).
_OPENAI_UNSUPPORTED: dict[str, Any] = {
    "lora_path": None,
    "session_id": None,
    "session_params": None,
    "custom_logit_processor": None,
    "stop_regex": None,
    "return_routed_experts": False,
    "routed_experts_start_len": 0,
    "return_cached_tokens_details": False,
    "return_token_ids": False,
    "images_config": None,
    "bootstrap_host": None,
    "bootstrap_port": None,
    "bootstrap_room": None,
    "routed_dp_rank": None,
    "disagg_prefill_dp_rank": None,
    "data_parallel_rank": None,
    "priority": None,
    "cache_salt": None,
    "ngram_corpus_id": None,
}

# Accepted and dropped: upstream's own effect of these is nil without features this server does
# not have (custom logit processors, reasoning parsers, tool parsers) or they are metadata.
_OPENAI_INERT = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "extra_key",
        "custom_labels",
        "custom_params",
        "stream_reasoning",
        "parallel_tool_calls",
    }
)

_CHAT_UNSUPPORTED: dict[str, Any] = {
    **_OPENAI_UNSUPPORTED,
    "return_prompt_token_ids": False,
    "return_meta_info": False,
    "reasoning_effort": None,
    "task": None,
    "input_ids": None,
    "max_dynamic_patch": None,
    "min_dynamic_patch": None,
    "use_audio_in_video": False,
    "functions": None,
    "function_call": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "web_search_options": None,
}

_NATIVE_UNSUPPORTED: dict[str, Any] = {
    "input_embeds": None,
    "image_data": None,
    "video_data": None,
    "audio_data": None,
    "use_audio_in_video": False,
    "modalities": None,
    "token_ids_logprob": None,
    "return_routed_experts": False,
    "return_indexer_topk": False,
    "routed_experts_start_len": 0,
    "session_params": None,
    "lora_id": None,
    "custom_logit_processor": None,
    "positional_embed_overrides": None,
    "bootstrap_host": None,
    "bootstrap_port": None,
    "bootstrap_room": None,
    "bootstrap_pair_key": None,
    "decode_tp_size": None,
    "require_reasoning": False,
    "routed_dp_rank": None,
    "disagg_prefill_dp_rank": None,
    "data_parallel_rank": None,
    "priority": None,
    "return_bytes": False,
    "return_entropy": False,
    "max_dynamic_patch": None,
    "min_dynamic_patch": None,
    "image_max_dynamic_patch": None,
    "video_max_dynamic_patch": None,
    "multi_item_delimiter_indices": None,
}

# `model` is what sglang-router adds; the rest is upstream metadata with no effect on the output.
_NATIVE_INERT = frozenset(
    {
        "model",
        "log_metrics",
        "background",
        "conversation_id",
        "extra_key",
        "routing_key",
        "no_logs",
        "custom_labels",
        "external_trace_header",
        "received_time",
    }
)


@dataclass(frozen=True)
class FieldPolicy:
    """One entry point's field table (see the module docstring for what each set means)."""

    route: str
    implemented: frozenset[str]
    unsupported: Mapping[str, Any]
    inert: frozenset[str]
    misplaced: Mapping[str, str] = field(default_factory=dict)  # name -> where it belongs

    @property
    def known(self) -> frozenset[str]:
        return self.implemented | frozenset(self.unsupported) | self.inert


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The known name `name` most likely misspells, or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=MISSPELLING_CUTOFF)
    return matches[0] if matches else None


def screen_fields(body: Mapping[str, Any], policy: FieldPolicy) -> dict[str, Any]:
    """The implemented fields of `body`; raises ValueError (HTTP 400) naming a refused field."""
    out: dict[str, Any] = {}
    for name, value in body.items():
        if name in policy.implemented:
            out[name] = value
        elif name in policy.unsupported:
            if value != policy.unsupported[name]:
                raise ValueError(
                    f"{name} is not supported by this server yet; leave it out "
                    f"(or send its default, {policy.unsupported[name]!r})"
                )
        elif name in policy.inert:
            continue
        elif name in policy.misplaced:
            raise ValueError(
                f"{name} belongs inside {policy.misplaced[name]}, not at the top level"
            )
        else:
            guess = did_you_mean(name, policy.known)
            if guess is not None:
                raise ValueError(
                    f"unknown field {name!r} on {policy.route}: did you mean {guess!r}?"
                )
    return out


def _native_policy() -> FieldPolicy:
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    implemented = frozenset(f.name for f in fields(GenerateReqInput) if f.init)
    sampling = {f.name: "sampling_params" for f in fields(SamplingParams)}
    # OpenAI spellings a client may carry over to /generate.
    sampling.update(max_tokens="sampling_params (as max_new_tokens)", seed="sampling_params")
    return FieldPolicy(
        "/generate",
        implemented,
        _NATIVE_UNSUPPORTED,
        _NATIVE_INERT,
        {k: v for k, v in sampling.items() if k not in implemented},
    )


def _openai_policy(route: str, model_cls: Any, unsupported: Mapping[str, Any]) -> FieldPolicy:
    names = set()
    for name, info in model_cls.model_fields.items():
        names.add(name)
        choices = getattr(info.validation_alias, "choices", None) or ()
        names.update(c for c in choices if isinstance(c, str))
    return FieldPolicy(route, frozenset(names), unsupported, _OPENAI_INERT)


_POLICIES: dict[str, FieldPolicy] = {}


def policy_for(route: str) -> FieldPolicy:
    """The table of `/generate`, `/v1/completions` or `/v1/chat/completions` (built once)."""
    if route not in _POLICIES:
        if route == "/generate":
            _POLICIES[route] = _native_policy()
        else:
            from sglang.srt.entrypoints.openai.protocol import (
                ChatCompletionRequest,
                CompletionRequest,
            )

            if route == "/v1/completions":
                _POLICIES[route] = _openai_policy(route, CompletionRequest, _OPENAI_UNSUPPORTED)
            elif route == "/v1/chat/completions":
                _POLICIES[route] = _openai_policy(route, ChatCompletionRequest, _CHAT_UNSUPPORTED)
            else:
                raise KeyError(route)
    return _POLICIES[route]


def screen_engine_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`Engine.generate` keyword arguments: the native table, but an unknown name is a TypeError
    (as for any Python call) instead of being dropped."""
    policy = policy_for("/generate")
    for name in kwargs:
        if name not in policy.known and name not in policy.misplaced:
            guess = did_you_mean(name, policy.known)
            hint = f"; did you mean {guess!r}?" if guess else ""
            raise TypeError(f"Engine.generate() got an unexpected keyword argument {name!r}{hint}")
    return screen_fields(kwargs, policy)
