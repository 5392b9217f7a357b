"""Server configuration: every launch flag, its default, and how "auto" settings resolve.

`ServerArgs` is the one dataclass every process receives (HTTP server, tokenizer manager,
schedulers, detokenizer, `Engine`, `Runtime`). Its field names are the snake_case forms of the
upstream SGLang flags, so `Engine(**kwargs)` and `--flag` spell the same setting. `__post_init__`
turns "auto" (None) values into concrete ones and rejects inconsistent combinations with a
`ValueError`, so downstream code never re-derives defaults.

The flag tables `REFUSED_FLAGS`, `REFUSED_VALUES` and `ACCEPTED_AS_IS` say which flags are
refused at start-up and which are accepted although nothing reads them. The command line
(`build_parser`, `prepare_server_args`: argparse, help texts, `--config` files) is in
`server_args_cli.py` and re-exported here; `PortArgs` names the ipc endpoints that connect the
processes of one server (defined in `port_args.py`).

This module stays light on purpose: it imports no serving stack, and torch only when the device
has to be detected.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

LOAD_FORMATS = ["auto", "safetensors", "pt", "gguf", "dummy"]
DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]
SCHEDULE_POLICIES = ["fcfs", "lpm", "random", "dfs-weight", "lof"]
ATTENTION_BACKENDS = ["torch_native", "triton", "flashinfer"]
SAMPLING_BACKENDS = ["pytorch", "flashinfer"]
LOAD_BALANCE_METHODS = ["round_robin", "total_requests", "total_tokens"]
DEVICES = ["cuda", "cpu"]
TOKENIZER_MODES = ["auto", "slow"]
GRAMMAR_BACKENDS = ["xgrammar", "outlines", "llguidance", "none"]
REASONING_PARSER_NAMES = ["deepseek-r1", "qwen3"]
TOOL_CALL_PARSER_NAMES = ["hermes", "llama3", "mistral", "qwen", "qwen25"]
KV_CACHE_DTYPES = ["auto", "fp8_e5m2", "fp8_e4m3", "bf16", "bfloat16", "fp4_e2m1"]
# Upstream's method names, so a known name gets the "not supported yet" refusal below and a typo
# gets argparse's "invalid choice".
QUANTIZATION_METHODS = (
    "awq fp8 gptq marlin gptq_marlin awq_marlin bitsandbytes gguf modelopt modelopt_fp4 "
    "petit_nvfp4 w8a8_int8 w8a8_fp8 moe_wna16 qoq w4afp8 mxfp4 compressed-tensors"
).split()
# The --quantization values served (layers/quantization/__init__.py: FLAG_METHODS); a checkpoint
# of another method is refused by the loader whatever the flag.
QUANTIZATION_SERVED = ("awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "compressed-tensors")
CAPTURE_LAYER_KEYWORDS = ("last", "all", "auto")

# Field -> allowed values; argparse enforces them on the command line, `check_server_args` on
# values given directly (Engine kwargs) or resolved from "auto".
_CHOICES: dict[str, list[str]] = {
    "tokenizer_mode": TOKENIZER_MODES,
    "load_format": LOAD_FORMATS,
    "dtype": DTYPES,
    "schedule_policy": SCHEDULE_POLICIES,
    "load_balance_method": LOAD_BALANCE_METHODS,
    "device": DEVICES,
    "attention_backend": ATTENTION_BACKENDS,
    "prefill_attention_backend": ATTENTION_BACKENDS,
    "decode_attention_backend": ATTENTION_BACKENDS,
    "sampling_backend": SAMPLING_BACKENDS,
    "grammar_backend": GRAMMAR_BACKENDS,
    "reasoning_parser": REASONING_PARSER_NAMES,
    "tool_call_parser": TOOL_CALL_PARSER_NAMES,
    "kv_cache_dtype": KV_CACHE_DTYPES,
    "quantization": QUANTIZATION_METHODS,
}

_ATTENTION_BACKEND_FIELDS = (
    "attention_backend",
    "prefill_attention_backend",
    "decode_attention_backend",
)
# Count-like settings for which zero or less makes no sense.
_POSITIVE_FIELDS = (
    "tp_size dp_size pp_size nnodes gpu_id_step page_size stream_interval decode_log_interval "
    "max_prefill_tokens cuda_graph_max_bs torch_compile_max_bs triton_attention_num_kv_splits "
    "attention_tokens_top_k attention_prompt_max_len"
).split()
_OPTIONAL_POSITIVE_FIELDS = (
    "context_length",
    "max_running_requests",
    "max_queued_requests",
    "max_total_tokens",
)
LOG_REQUESTS_LEVELS = (0, 1, 2, 3)

# NOTE: every flag either does what upstream SGLang's does, or is listed in exactly one of the
# three tables below; test/srt/test_server_args.py walks the flag table to enforce it, and
# `--help` prints each reason, so the tables are the one place that says what is not done.
#
# Flags refused at start-up (exit 2) when set to anything but their default.
REFUSED_FLAGS: dict[str, str] = {
    "pp_size": "pipeline parallelism is not supported; use --tp across GPUs and nodes",
}
# Values of otherwise working flags that are refused at start-up (exit 2).
REFUSED_VALUES: dict[str, dict[str, str]] = {
    "quantization": {
        **dict.fromkeys(
            [m for m in QUANTIZATION_METHODS if m not in QUANTIZATION_SERVED + ("gguf",)],
            "only AWQ / GPTQ 4-bit and FP8 checkpoints load (--quantization awq, awq_marlin, "
            "gptq, gptq_marlin, fp8, compressed-tensors); serve other checkpoints unquantized "
            "or as a GGUF file",
        ),
        "gguf": "a .gguf --model-path is recognised by its name; leave --quantization unset",
    },
    "sampling_backend": {
        "flashinfer": "this build samples with PyTorch only; use --sampling-backend pytorch",
    },
    "schedule_policy": {
        "dfs-weight": "dfs-weight scheduling is not implemented; use lpm (longest cached "
        "prefix first) or fcfs",
    },
    "grammar_backend": {
        "outlines": "the outlines backend is not built in; use xgrammar (the default) or none",
        "llguidance": "the llguidance backend is not built in; use xgrammar (the default) or none",
    },
    "kv_cache_dtype": {
        "fp4_e2m1": "FP4 KV cache needs Blackwell kernels that are not built here; use auto, "
        "bf16, fp8_e4m3 or fp8_e5m2",
    },
}
# Flags accepted although nothing reads them, because what upstream does with them already holds.
ACCEPTED_AS_IS: dict[str, str] = {
    "disable_flashinfer": (
        "legacy switch: flashinfer attention backends fall back to triton (torch_native on CPU) "
        "while the flags are parsed"
    ),
    "disable_flashinfer_sampling": "legacy switch: sampling always runs in PyTorch here",
    "sampling_backend": "sampling always runs in PyTorch here, which is what 'pytorch' asks for",
}

# Chunk size when --chunked-prefill-size is not given: GPUs amortise launches over big chunks,
# CPUs want short chunks so decode steps of running requests are not starved.
DEFAULT_CHUNKED_PREFILL = {"cuda": 8192, "cpu": 2048}
DEFAULT_CUDA_GRAPH_MAX_BS = 160


def parse_attention_capture_layers(spec: str) -> str | tuple[int, ...]:
    """Parse `--attention-capture-layers`: a keyword (last|all|auto) or sorted unique layer ids.

    Raises ValueError on anything else. The capture package maps keywords to layer ids once it
    knows the model depth.
    """
    text = str(spec).strip().lower()
    if text in CAPTURE_LAYER_KEYWORDS:
        return text
    parts = [p.strip() for p in text.split(",")]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            "attention_capture_layers must be last, all, auto or comma-separated layer "
            f"indices (e.g. 0,14,29), got {spec!r}"
        ) from None
    if any(i < 0 for i in ids):
        raise ValueError(f"attention_capture_layers: layer indices must be >= 0, got {spec!r}")
    return tuple(sorted(set(ids)))


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str
    tokenizer_path: Optional[str] = None
    revision: Optional[str] = None
    download_dir: Optional[str] = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    trust_remote_code: bool = False
    context_length: Optional[int] = None
    dtype: str = "auto"
    quantization: Optional[str] = None
    gguf_dequantize: bool = False
    kv_cache_dtype: str = "auto"
    served_model_name: Optional[str] = None
    chat_template: Optional[str] = None

    # HTTP server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    skip_server_warmup: bool = False

    # Memory and scheduling
    mem_fraction_static: Optional[float] = None
    max_running_requests: Optional[int] = None
    max_queued_requests: Optional[int] = None
    max_total_tokens: Optional[int] = None
    chunked_prefill_size: Optional[int] = None
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0
    page_size: int = 1
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    allow_auto_truncate: bool = False

    # Parallelism and placement
    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    load_balance_method: str = "round_robin"
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None
    nccl_port: Optional[int] = None
    device: Optional[str] = None
    base_gpu_id: int = 0
    gpu_id_step: int = 1

    # Runtime behaviour
    random_seed: Optional[int] = None
    watchdog_timeout: float = 300.0
    stream_interval: int = 1
    stream_output: bool = False

    # Logging and observability
    log_level: str = "info"
    log_level_http: Optional[str] = None
    log_requests: bool = False
    log_requests_level: int = 2
    decode_log_interval: int = 40
    enable_metrics: bool = False
    enable_cache_report: bool = False
    enable_return_hidden_states: bool = False
    # Largest hidden_states_layers answer one request may ask for (layers x hidden x 4 bytes x
    # max_new_tokens); larger requests get HTTP 400.
    hidden_states_max_bytes: int = 64 * 1024 * 1024
    enable_step_profile: bool = False

    # Kernels and backends
    attention_backend: Optional[str] = None
    prefill_attention_backend: Optional[str] = None
    decode_attention_backend: Optional[str] = None
    sampling_backend: Optional[str] = None
    grammar_backend: str = "xgrammar"
    constrained_json_disable_any_whitespace: bool = False
    reasoning_parser: Optional[str] = None
    tool_call_parser: Optional[str] = None
    disable_cuda_graph: bool = False
    disable_cuda_graph_padding: bool = False
    cuda_graph_max_bs: Optional[int] = None
    cuda_graph_bs: Optional[list[int]] = None
    enable_torch_compile: bool = False
    torch_compile_max_bs: int = 32
    triton_attention_num_kv_splits: int = 8
    # NOTE: legacy 0.2.x switches; accepted with a warning, they only steer backend choice.
    disable_flashinfer: bool = False
    disable_flashinfer_sampling: bool = False

    # Attention tokens (this fork's feature, docs/attention_tokens.md)
    return_attention_tokens: bool = False
    attention_tokens_top_k: int = 10
    attention_capture_layers: str = "last"
    # Longest prompt attention_prompt_positions "all" may ask for, and the most listed positions.
    attention_prompt_max_len: int = 512

    def __post_init__(self) -> None:
        self._resolve_defaults()
        self.check_server_args()

    # ----------------------------------------------------------------- auto resolution

    def _resolve_defaults(self) -> None:
        if self.device is None:
            self.device = _detect_device()
        _check_choice("device", self.device, DEVICES)  # the defaults below are keyed by device
        on_cuda = self.device == "cuda"

        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.served_model_name is None:
            self.served_model_name = self.model_path

        # Legacy flags only remove flashinfer; an explicit non-flashinfer choice stays.
        if self.disable_flashinfer:
            logger.warning(
                "--disable-flashinfer is deprecated; use --attention-backend triton "
                "(or torch_native on CPU). Falling back to a non-flashinfer attention backend."
            )
            fallback = "triton" if on_cuda else "torch_native"
            for name in _ATTENTION_BACKEND_FIELDS:
                if getattr(self, name) == "flashinfer":
                    setattr(self, name, fallback)
        if self.disable_flashinfer_sampling:
            logger.warning(
                "--disable-flashinfer-sampling is deprecated; use --sampling-backend pytorch."
            )
            if self.sampling_backend == "flashinfer":
                self.sampling_backend = "pytorch"

        if self.attention_backend is None:
            self.attention_backend = "triton" if on_cuda else "torch_native"
        if self.prefill_attention_backend is None:
            self.prefill_attention_backend = self.attention_backend
        if self.decode_attention_backend is None:
            self.decode_attention_backend = self.attention_backend
        if self.sampling_backend is None:
            self.sampling_backend = "pytorch"

        if self.chunked_prefill_size is None:
            self.chunked_prefill_size = DEFAULT_CHUNKED_PREFILL[self.device]
        elif self.chunked_prefill_size <= 0:
            # Any non-positive size means "no chunking"; one spelling keeps checks simple.
            self.chunked_prefill_size = -1

        if not on_cuda:
            self.disable_cuda_graph = True
        if self.cuda_graph_bs is not None:
            self.cuda_graph_bs = sorted({int(bs) for bs in self.cuda_graph_bs})
            if self.cuda_graph_max_bs is None and self.cuda_graph_bs:
                self.cuda_graph_max_bs = self.cuda_graph_bs[-1]
        if self.cuda_graph_max_bs is None:
            self.cuda_graph_max_bs = DEFAULT_CUDA_GRAPH_MAX_BS

        # On CPU there is no device memory to take a fraction of: the KV pool is sized from
        # --max-total-tokens or the model runner's host budget, so the field stays None there.
        if self.mem_fraction_static is None and on_cuda:
            self.mem_fraction_static = _default_mem_fraction(self.tp_size)

        if self.random_seed is None:
            self.random_seed = random.randint(0, (1 << 30) - 1)

        parsed = parse_attention_capture_layers(self.attention_capture_layers)
        self.attention_capture_layers = (
            parsed if isinstance(parsed, str) else ",".join(str(i) for i in parsed)
        )

    # ----------------------------------------------------------------- validation

    def check_server_args(self) -> None:
        """Raise ValueError naming the flag when a setting is out of range or inconsistent."""
        for name, choices in _CHOICES.items():
            optional = ("quantization", "reasoning_parser", "tool_call_parser")
            if name in optional and getattr(self, name) is None:
                continue  # choice fields whose default is "none given"
            _check_choice(name, getattr(self, name), choices)
        if self.device == "cpu":
            # NOTE: SGLANG_TRITON_INTERPRET_OK=1 (tests only) runs the triton backend on CPU
            # tensors through Triton's interpreter (TRITON_INTERPRET=1).
            interpret_ok = os.environ.get("SGLANG_TRITON_INTERPRET_OK") == "1"
            for name in _ATTENTION_BACKEND_FIELDS:
                value = getattr(self, name)
                if value != "torch_native" and not (interpret_ok and value == "triton"):
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} needs a GPU; on --device cpu use "
                        "torch_native"
                    )

        _check_refused(self)
        if self.enable_torch_compile:
            _check_torch_compile(self)
        _check_port("port", self.port)
        if self.nccl_port is not None:
            _check_port("nccl_port", self.nccl_port)

        for name in _POSITIVE_FIELDS:
            _check_at_least(name, getattr(self, name), 1)
        _check_capture_top_k(self.attention_tokens_top_k)
        for name in _OPTIONAL_POSITIVE_FIELDS:
            if getattr(self, name) is not None:
                _check_at_least(name, getattr(self, name), 1)
        _check_at_least("base_gpu_id", self.base_gpu_id, 0)
        if self.log_requests_level not in LOG_REQUESTS_LEVELS:
            raise ValueError(
                f"log_requests_level must be one of 0, 1, 2, 3, got {self.log_requests_level!r}"
            )
        if self.schedule_conservativeness < 0:
            raise ValueError(
                f"schedule_conservativeness must be >= 0, got {self.schedule_conservativeness}"
            )
        if self.watchdog_timeout <= 0:
            raise ValueError(f"watchdog_timeout must be > 0 seconds, got {self.watchdog_timeout}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}"
            )
        if self.cuda_graph_bs is not None and any(bs < 1 for bs in self.cuda_graph_bs):
            raise ValueError(f"cuda_graph_bs entries must be >= 1, got {self.cuda_graph_bs}")

        if self.tp_size % self.nnodes != 0:
            raise ValueError(
                f"tp_size ({self.tp_size}) must be divisible by nnodes ({self.nnodes}): "
                "tensor parallelism is split evenly across nodes"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}"
            )
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ValueError("nnodes > 1 needs --dist-init-addr host:port for the rendezvous")
        if self.dp_size > 1 and self.nnodes > 1:
            raise ValueError(
                "dp_size > 1 runs on one node; for replicas on several nodes start one server "
                "per node behind the router"
            )
        if self.dist_init_addr is not None:
            host, sep, port = self.dist_init_addr.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(
                    f"dist_init_addr must look like host:port, got {self.dist_init_addr!r}"
                )

    # ----------------------------------------------------------------- helpers

    def url(self) -> str:
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literals need brackets inside a URL
        return f"http://{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable copy of every field (used by /get_server_info)."""
        return dataclasses.asdict(self)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        from sglang.srt.server_args_cli import add_cli_args

        add_cli_args(parser)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})


_FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ServerArgs)}


def _check_capture_top_k(top_k: int) -> None:
    from sglang.srt.attention_capture.config import check_server_top_k

    check_server_top_k(top_k)


def check_gpu_extra(args: ServerArgs) -> None:
    """At launch (not when args are built: configs for a GPU machine may be made elsewhere):
    a CUDA device running triton/flashinfer attention needs Triton (TritonMissingError)."""
    from sglang.srt.layers.attention import check_triton_installed

    check_triton_installed(args.device, [getattr(args, n) for n in _ATTENTION_BACKEND_FIELDS])


def _detect_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu"; without an NVIDIA driver, no torch import.

    Importing torch costs ~1.3 s of the main process's start-up on a small CPU machine, and the
    main process needs torch for nothing else; a machine with no NVIDIA driver node cannot have
    a CUDA device, so the answer is known without it.
    """
    if not _nvidia_driver_present():
        return "cpu"
    import torch  # lazy: only where a GPU may exist

    return "cuda" if torch.cuda.is_available() else "cpu"


def _nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")


def _default_mem_fraction(tp_size: int) -> float:
    # Larger TP groups need more room outside the pool for communication buffers.
    for min_tp, fraction in ((16, 0.79), (8, 0.81), (4, 0.85), (2, 0.87)):
        if tp_size >= min_tp:
            return fraction
    return 0.88


def _check_refused(args: ServerArgs) -> None:
    """ValueError for a refused flag or value; the message names the flag and says why."""
    for name, reason in REFUSED_FLAGS.items():
        value = getattr(args, name)
        if value != _FIELD_DEFAULTS[name]:
            raise ValueError(f"{_flag(name)} {value} is refused: {reason}")
    for name, values in REFUSED_VALUES.items():
        value = getattr(args, name)
        if value in values:
            raise ValueError(f"{_flag(name)} {value} is refused: {values[value]}")


def _check_torch_compile(args: ServerArgs) -> None:
    # NOTE: the model runner compiles the eager decode forward; CUDA-graph capture of a compiled
    # forward and compiled TP collectives are not built, so those combinations are refused.
    if args.device == "cuda" and not args.disable_cuda_graph:
        raise ValueError(
            "--enable-torch-compile is refused with CUDA graphs on (compiled graph capture is "
            "not built); add --disable-cuda-graph to compile the eager decode forward"
        )
    if args.tp_size > 1:
        raise ValueError("--enable-torch-compile is refused with --tp > 1 (not built yet)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_choice(name: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_port(name: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"{name} must be in [1, 65535], got {port}")


def __getattr__(name: str) -> Any:
    # NOTE: the command line lives in server_args_cli.py (which imports this module); its entry
    # points resolve here lazily, under upstream's import path, without an import cycle.
    if name in ("build_parser", "prepare_server_args"):
        from sglang.srt import server_args_cli

        return getattr(server_args_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# NOTE: PortArgs lives in port_args.py; re-exported here under its upstream import path.
from sglang.srt.port_args import PortArgs  # noqa: E402,F401
