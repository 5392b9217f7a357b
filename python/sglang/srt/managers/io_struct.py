"""Every message that crosses a process boundary, and the one codec that carries them.

Flow: HTTP / Engine -> `GenerateReqInput` (main process) -> TokenizerManager ->
`TokenizedGenerateReqInput` -> Scheduler process -> `BatchTokenIDOut` -> DetokenizerManager process
-> `BatchStrOut` -> TokenizerManager. Control messages (`AbortReq`, `FlushCacheReq`, `GetLoadReq`,
`GetSchedulerStatsReq`, `HealthCheckReq`) go to the scheduler; their answers come straight back to
the TokenizerManager.

All messages are plain dataclasses pickled by `send_msg` / `recv_msg` (pickle is enough: every
endpoint is a process of the same server, started from the same code).
"""

from __future__ import annotations

import copy
import pickle
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import zmq

from sglang.srt.managers.layer_probes import PROBE_FIELDS
from sglang.srt.sampling.sampling_params import MAX_N, SamplingParams

# The request fields of the fork's attention tokens (docs/attention_tokens.md).
ATTENTION_FIELDS = (
    "return_attention_tokens",
    "attention_tokens_top_k",
    "attention_layers",
    "attention_layer_aggregation",
    "attention_exclude_sink",
    "attention_prompt_positions",
    "attention_heads",
    "attention_head_aggregation",
    "attention_spans",
    "attention_stats",
)
# The most top logprobs a native request may ask per position (docs/request_fields.md); OpenAI's
# top_logprobs stops at 20.
MAX_TOP_LOGPROBS_NUM = 100


# --------------------------------------------------------------------------- codec


def send_msg(sock: zmq.Socket, obj: Any, flags: int = 0) -> Any:
    """Pickle and send one message; on a zmq.asyncio socket the result must be awaited."""
    return sock.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), flags=flags)


def recv_msg(sock: zmq.Socket, flags: int = 0) -> Any:
    """Receive and unpickle one message from a blocking socket (zmq.Again with NOBLOCK when empty)."""
    return pickle.loads(sock.recv(flags=flags, copy=True))


async def recv_msg_async(sock: Any) -> Any:
    """Receive and unpickle one message from a zmq.asyncio socket."""
    return pickle.loads(await sock.recv())


def recv_all_nowait(sock: zmq.Socket) -> list[Any]:
    """Drain every message already queued on a blocking socket without waiting."""
    out: list[Any] = []
    while True:
        try:
            out.append(recv_msg(sock, zmq.NOBLOCK))
        except zmq.Again:
            return out


# --------------------------------------------------------------------------- requests


@dataclass
class GenerateReqInput:
    """The native `/generate` body (also what Engine.generate builds).

    After `normalize_batch_and_arguments()` every per-request field is either a scalar (single
    request) or a list of length `batch_size`. `n > 1` expands each prompt into n consecutive
    entries (prompt-major: prompt i, sample j sits at index i * n + j) and turns a single
    request into a batch.
    """

    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[int], list[list[int]]]] = None
    sampling_params: Optional[Union[dict[str, Any], list[dict[str, Any]]]] = None
    rid: Optional[Union[str, list[str]]] = None
    stream: bool = False
    return_logprob: Union[bool, list[bool]] = False
    logprob_start_len: Union[int, list[int]] = -1
    top_logprobs_num: Union[int, list[int]] = 0
    return_text_in_logprobs: bool = False
    return_hidden_states: Union[bool, list[bool]] = False
    lora_path: Optional[Union[str, list[Optional[str]]]] = None
    return_attention_tokens: Union[bool, list[bool]] = False
    attention_tokens_top_k: Optional[Union[int, list[Optional[int]]]] = None
    attention_layers: Optional[Any] = None
    attention_layer_aggregation: Optional[Union[str, list[Optional[str]]]] = None
    attention_exclude_sink: Optional[Union[int, list[Optional[int]]]] = None
    attention_heads: Optional[Any] = None  # list of head ids (a list of lists: per prompt)
    attention_head_aggregation: Optional[Union[str, list[Optional[str]]]] = None
    attention_spans: Optional[Any] = None  # list of {name, start, end} (list of lists: per prompt)
    attention_stats: Optional[Union[bool, list[Optional[bool]]]] = None
    top_k_attention: Optional[Union[int, list[Optional[int]]]] = None  # alias of the top-k field
    attention_prompt_positions: Optional[Any] = None  # a list of positions or "all"
    # Layer probes (managers/layer_probes.py): residual stream after layers, logit lens.
    hidden_states_layers: Optional[Any] = None
    hidden_states_format: Optional[Union[str, list[Optional[str]]]] = None
    logit_lens: Optional[Any] = None

    # Set by normalize_batch_and_arguments.
    is_single: bool = field(default=True, init=False)
    batch_size: int = field(default=1, init=False)
    parallel_sample_num: int = field(default=1, init=False)
    # Internal (not a request field): a stream whose every output holds only what is new since
    # the previous one (text, ids, logprobs), as --stream-output does for text and ids. The
    # OpenAI routes set it, so a chunk costs O(new tokens), not O(everything generated so far).
    stream_deltas: bool = field(default=False, init=False)

    def normalize_batch_and_arguments(self) -> None:
        """Check the input shape and broadcast every per-request field; raises ValueError."""
        if self.top_k_attention is not None:
            if self.attention_tokens_top_k is not None:
                raise ValueError(
                    "give attention_tokens_top_k or its alias top_k_attention, not both"
                )
            self.attention_tokens_top_k, self.top_k_attention = self.top_k_attention, None
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("Exactly one of text or input_ids must be given")
        if self.text is not None:
            if isinstance(self.text, str):
                prompts: list[Any] = [self.text]
                single = True
            elif isinstance(self.text, list) and all(isinstance(t, str) for t in self.text):
                prompts, single = list(self.text), False
            else:
                raise ValueError("text must be a string or a list of strings")
        else:
            ids = self.input_ids
            if not isinstance(ids, list) or not ids:
                raise ValueError("input_ids must be a non-empty list of token ids or of lists")
            if all(_is_int(t) for t in ids):
                prompts, single = [list(ids)], True
            elif all(isinstance(x, list) and all(_is_int(t) for t in x) for x in ids):
                prompts, single = [list(x) for x in ids], False
            else:
                raise ValueError("input_ids must be a list of ints or a list of lists of ints")
        num = len(prompts)
        if num == 0:
            raise ValueError("the batch is empty")

        sps = self.sampling_params
        if isinstance(sps, list):
            if single or len(sps) != num:
                raise ValueError("sampling_params list must have one entry per prompt")
            sp_list = [dict(s or {}) for s in sps]
        else:
            if sps is not None and not isinstance(sps, dict):
                raise ValueError("sampling_params must be an object or a list of objects")
            sp_list = [dict(sps or {}) for _ in range(num)]
        ns = {sp.get("n", 1) for sp in sp_list}
        if len(ns) != 1:
            raise ValueError("every prompt of a batch must use the same n")
        n = ns.pop()
        if not _is_int(n) or not 1 <= n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {n!r}")

        rids = self.rid
        if rids is None:
            rid_list = [uuid.uuid4().hex for _ in range(num)]
        elif isinstance(rids, str):
            if not single:
                raise ValueError("rid must be a list with one entry per prompt for a batch")
            rid_list = [rids]
        elif isinstance(rids, list) and len(rids) == num:
            rid_list = [str(r) for r in rids]
        else:
            raise ValueError("rid must be a string or a list with one entry per prompt")

        per_req = {
            name: _broadcast(name, getattr(self, name), num, single)
            for name in (
                "return_logprob",
                "logprob_start_len",
                "top_logprobs_num",
                "return_hidden_states",
                "lora_path",
                *ATTENTION_FIELDS,
                *PROBE_FIELDS,
            )
        }

        for value in per_req["top_logprobs_num"]:
            if not _is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS_NUM:
                raise ValueError(
                    f"top_logprobs_num must be an integer in [0, {MAX_TOP_LOGPROBS_NUM}], "
                    f"got {value!r}"
                )
        if any(path is not None for path in per_req["lora_path"]):
            raise ValueError("lora_path is not supported yet: this server has no LoRA adapters")

        # Expand n: prompt-major, every sample its own rid and (when seeded) its own seed.
        def expand(values: list[Any]) -> list[Any]:
            return [v for v in values for _ in range(n)]

        if n > 1:
            new_sps = []
            for sp in sp_list:
                for j in range(n):
                    s = dict(sp, n=1)
                    if s.get("sampling_seed") is not None and _is_int(s["sampling_seed"]):
                        s["sampling_seed"] = s["sampling_seed"] + j
                    new_sps.append(s)
            sp_list = new_sps
            rid_list = [f"{r}-{j}" for r in rid_list for j in range(n)]
            prompts = expand(prompts)
            per_req = {k: expand(v) for k, v in per_req.items()}
            single = False

        if self.text is not None:
            self.text = prompts[0] if single else prompts
        else:
            self.input_ids = prompts[0] if single else prompts
        self.sampling_params = sp_list[0] if single else sp_list
        self.rid = rid_list[0] if single else rid_list
        for name, values in per_req.items():
            setattr(self, name, values[0] if single else values)
        self.is_single = single
        self.batch_size = len(prompts)
        self.parallel_sample_num = n

    def __getitem__(self, i: int) -> GenerateReqInput:
        """The i-th request of a normalized batch, as a normalized single request."""
        if self.is_single:
            return self
        sub = copy.copy(self)
        for name in ("text", "input_ids", "sampling_params", "rid", "return_logprob",
                     "logprob_start_len", "top_logprobs_num", "return_hidden_states",
                     "lora_path", *ATTENTION_FIELDS, *PROBE_FIELDS):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                setattr(sub, name, value[i])
        sub.is_single, sub.batch_size, sub.parallel_sample_num = True, 1, 1
        return sub


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Fields whose one request's value is itself a list.
_LIST_FIELDS = (
    "attention_layers",
    "hidden_states_layers",
    "attention_prompt_positions",
    "attention_heads",
    "attention_spans",
)


def _broadcast(name: str, value: Any, num: int, single: bool) -> list[Any]:
    # A list of layers is itself one request's value, so only a list of lists is per-prompt.
    per_prompt = isinstance(value, list) and (
        name not in _LIST_FIELDS or (value and isinstance(value[0], list))
    )
    if per_prompt and not single:
        if len(value) != num:
            raise ValueError(f"{name} list must have one entry per prompt")
        return list(value)
    return [value] * num


@dataclass
class TokenizedGenerateReqInput:
    """One validated, tokenized request as the scheduler receives it."""

    rid: str
    input_text: Optional[str]
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    return_hidden_states: bool = False
    # Validated attention-token options (attention_capture.AttentionRequest); None: not asked.
    attention_options: Optional[Any] = None
    # Validated hidden_states_layers / logit_lens (managers.layer_probes.ProbeRequest) or None.
    probe_options: Optional[Any] = None


@dataclass
class AbortReq:
    rid: str = ""
    abort_all: bool = False


@dataclass
class FlushCacheReq:
    pass


@dataclass
class FlushCacheResp:
    success: bool
    message: str = ""


@dataclass
class GetLoadReq:
    # Also verify the idle KV invariant (tests use it to prove nothing leaked).
    check_memory: bool = False


@dataclass
class GetLoadResp:
    dp_rank: int
    num_reqs: int
    num_waiting_reqs: int
    num_tokens: int
    token_usage: float = 0.0
    memory_error: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dp_rank": self.dp_rank,
            "num_reqs": self.num_reqs,
            "num_waiting_reqs": self.num_waiting_reqs,
            "num_tokens": self.num_tokens,
        }


@dataclass
class GetSchedulerStatsReq:
    """Asked on every `/metrics` scrape (only with --enable-metrics)."""


@dataclass
class SchedulerStats:
    """The scheduler's gauges at the moment it answered (see metrics/collector.py)."""

    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_used_tokens: int = 0
    token_usage: float = 0.0
    gen_throughput: float = 0.0
    cache_hit_rate: float = 0.0


@dataclass
class HealthCheckReq:
    """Liveness ping: the scheduler answers between two steps, so a hung loop never answers."""


@dataclass
class HealthCheckResp:
    ok: bool = True


# --------------------------------------------------------------------------- outputs


@dataclass
class DetokenizeOptions:
    """What the detokenizer needs to know about one request (sent with its first output)."""

    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stop: list[str] = field(default_factory=list)


@dataclass
class BatchTokenIDOut:
    """Scheduler -> detokenizer: new tokens of the requests that advanced, per rid.

    Lists are parallel. `new_output_ids` and the output logprob lists hold only what is new since
    the previous message for that rid; prompt logprobs come once, when the prompt is done.
    """

    rids: list[str]
    new_output_ids: list[list[int]]
    finished_reasons: list[Optional[dict[str, Any]]]
    detokenize_options: list[Optional[DetokenizeOptions]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    output_token_logprobs: list[Optional[list[tuple[float, int]]]]
    output_top_logprobs: list[Optional[list[list[tuple[float, int]]]]]
    input_token_logprobs: list[Optional[list[tuple[Optional[float], int]]]]
    input_top_logprobs: list[Optional[list[Optional[list[tuple[float, int]]]]]]
    # New attention_capture.AttentionRecord per new output token (None: not asked).
    attention_records: list[Optional[list[Any]]] = field(default_factory=list)
    # New hidden-state entries, float32 CPU tensors (None: not asked; managers/hidden_states.py).
    hidden_states: list[Optional[list[Any]]] = field(default_factory=list)
    # New (query position, AttentionRecord) pairs of attention_prompt_positions (None: none new).
    attention_prompt: list[Optional[list[Any]]] = field(default_factory=list)
    # New managers.layer_probes.ProbeRecord per new output token (None: not asked).
    probe_records: list[Optional[list[Any]]] = field(default_factory=list)
    # managers/step_profile.PipelineStamp with --enable-step-profile, else None.
    profile: Any = None


@dataclass
class BatchStrOut:
    """Detokenizer -> tokenizer manager: the same per-rid deltas plus new text.

    `new_texts[i]` is text safe to show (never a split character, never a possible stop-string
    prefix); appended in order it gives the final, stop-trimmed text.
    """

    rids: list[str]
    new_texts: list[str]
    new_output_ids: list[list[int]]
    finished_reasons: list[Optional[dict[str, Any]]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    output_token_logprobs: list[Optional[list[tuple[float, int]]]]
    output_top_logprobs: list[Optional[list[list[tuple[float, int]]]]]
    input_token_logprobs: list[Optional[list[tuple[Optional[float], int]]]]
    input_top_logprobs: list[Optional[list[Optional[list[tuple[float, int]]]]]]
    # Attention records of tokens whose text is final (trimmed with the text on a stop string).
    attention_records: list[Optional[list[Any]]] = field(default_factory=list)
    hidden_states: list[Optional[list[Any]]] = field(default_factory=list)  # as BatchTokenIDOut
    attention_prompt: list[Optional[list[Any]]] = field(default_factory=list)  # as BatchTokenIDOut
    probe_records: list[Optional[list[Any]]] = field(default_factory=list)  # as BatchTokenIDOut
    profile: Any = None  # as BatchTokenIDOut
