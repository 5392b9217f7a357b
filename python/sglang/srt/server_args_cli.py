"""The launch command line: argparse flags generated from `ServerArgs`, help texts, `--config`.

`prepare_server_args(argv)` parses with prefix abbreviations, the upstream aliases and
`--config file.yaml` (file values sit under the command line) and exits with status 2 for anything
argparse or ServerArgs validation rejects. Each flag's `--help` ends with what the flag tables of
server_args.py say about it (refused at start-up, or accepted with nothing to do). Callers import
these names from `sglang.srt.server_args`, upstream's module.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Optional

from sglang.srt.server_args import (
    _CHOICES,
    ACCEPTED_AS_IS,
    REFUSED_FLAGS,
    REFUSED_VALUES,
    ServerArgs,
    _flag,
)

# NOTE: flags are generated from the dataclass fields (name -> --kebab-name, annotation -> type),
# so a field and its flag cannot drift apart; these tables add only what annotations cannot say.
_ALIASES: dict[str, tuple[str, ...]] = {
    "model_path": ("--model",),
    "tp_size": ("--tp", "--tensor-parallel-size"),
    "dp_size": ("--dp", "--data-parallel-size"),
    "pp_size": ("--pp", "--pipeline-parallel-size"),
    "dist_init_addr": ("--nccl-init-addr",),
    "stream_output": ("--incremental-streaming-output",),
}

# First field of each --help section.
_GROUPS: dict[str, str] = {
    "model_path": "model and tokenizer",
    "host": "HTTP server",
    "mem_fraction_static": "memory and scheduling",
    "tp_size": "parallelism and placement",
    "random_seed": "runtime",
    "log_level": "logging and observability",
    "attention_backend": "kernels and backends",
    "return_attention_tokens": "attention tokens",
}

_HELP: dict[str, str] = {
    "model_path": "Model to serve: a local HuggingFace folder, a GGUF file, a known model id or "
    "a Hugging Face hub id (org/name: the local cache first, else downloaded).",
    "tokenizer_path": "Tokenizer location (default: the model path).",
    "revision": "Hub revision (branch, tag or commit) of a Hugging Face model id.",
    "download_dir": "Hugging Face cache folder for hub ids (default: $HF_HUB_CACHE or "
    "$HF_HOME/hub).",
    "tokenizer_mode": "'auto' prefers the fast tokenizer, 'slow' forces the Python one.",
    "skip_tokenizer_init": "Load no tokenizer: requests carry input_ids, outputs are token ids.",
    "load_format": "Weight format; 'dummy' builds random weights from config.json alone.",
    "gguf_dequantize": "GGUF: dequantize every tensor to the model dtype at load (the exact "
    "path). By default a CPU model keeps its Q4_0/Q4_1/Q4_K/Q8_0 linear weights packed and runs "
    "them on sgl_kernel's GGUF kernel (float32 and bfloat16; float16 on PyTorch's int4 kernel).",
    "trust_remote_code": "Let transformers run code shipped in the model folder (custom config "
    "or tokenizer classes); model architectures still come from the built-in registry.",
    "context_length": "Maximum context length (default: from the model config).",
    "dtype": "Weight and activation dtype.",
    "quantization": "Quantization method of the weights; the checkpoint's own config is used "
    "when unset. The Marlin names run the same int4 path as awq/gptq.",
    "kv_cache_dtype": "KV cache dtype: 'auto' = the model dtype; bf16/bfloat16; fp8_e4m3 and "
    "fp8_e5m2 store K/V in one byte per element (twice the tokens per GB, per-tensor scale 1.0).",
    "served_model_name": "Model name the OpenAI API reports (default: the model path).",
    "chat_template": "Chat template name or file (default: the tokenizer's own).",
    "host": "Address the HTTP server binds.",
    "port": "Port of the HTTP server.",
    "api_key": "Require 'Authorization: Bearer KEY' on every route except /health*.",
    "skip_server_warmup": "Skip the warm-up generation at startup.",
    "mem_fraction_static": "Share of device memory for weights plus KV pool (default: by TP size).",
    "max_running_requests": "Cap on concurrently running requests (default: from the KV pool).",
    "max_queued_requests": (
        "Cap on requests waiting in the scheduler queue; beyond it new requests get HTTP 503 "
        "with Retry-After (default: unbounded)."
    ),
    "max_total_tokens": "KV pool size in tokens (default: from free memory).",
    "chunked_prefill_size": "Longest prefill chunk, -1 = no chunking (default 8192 GPU, 2048 CPU).",
    "max_prefill_tokens": "Token budget of one prefill batch.",
    "schedule_policy": "Order in which waiting requests are admitted.",
    "schedule_conservativeness": "Higher values keep more KV room for running requests.",
    "page_size": "Tokens per KV cache page.",
    "disable_radix_cache": "Turn off prefix caching.",
    "disable_overlap_schedule": "Run scheduling and the forward pass one after the other.",
    "allow_auto_truncate": "Truncate over-long prompts instead of rejecting them.",
    "tp_size": "Tensor parallel size across all nodes.",
    "dp_size": "Data parallel size (independent model replicas).",
    "pp_size": "Pipeline parallel size.",
    "load_balance_method": "How requests are spread over data parallel replicas.",
    "nnodes": "Number of nodes.",
    "node_rank": "Rank of this node.",
    "dist_init_addr": "host:port where all nodes rendezvous.",
    "nccl_port": "Port of the collective backend on one node (default: a free one).",
    "device": "Device (default: cuda when available, else cpu).",
    "base_gpu_id": "First GPU index to use.",
    "gpu_id_step": "Stride between the GPU indices of consecutive ranks.",
    "random_seed": "Seed (default: random).",
    "watchdog_timeout": (
        "Seconds a scheduler step may run while work is pending before /health answers 503; "
        "2 s later the watchdog dumps every thread's stack to the log and stops the server "
        "(exit 1). Also the timeout of TP collectives."
    ),
    "stream_interval": "Decode steps between streamed chunks.",
    "stream_output": "Native streaming sends text deltas instead of the whole text so far.",
    "log_level": "Log level of all processes.",
    "log_level_http": "Log level of the HTTP server (default: --log-level).",
    "log_requests": "Log every request when it arrives and when it finishes (detail: "
    "--log-requests-level).",
    "log_requests_level": "Detail of --log-requests: 0 metadata, 1 + sampling parameters, "
    "2 + input and output cut to 2048 characters, 3 + everything.",
    "decode_log_interval": "Decode steps between 'Decode batch.' log lines.",
    "enable_metrics": "Serve Prometheus metrics on /metrics.",
    "enable_cache_report": "Report cached prompt tokens in OpenAI usage.",
    "enable_return_hidden_states": "Allow requests to ask for return_hidden_states: the "
    "final-layer hidden states (after the final norm) in meta_info.hidden_states.",
    "hidden_states_max_bytes": "Largest hidden_states_layers answer a request may ask for, in "
    "bytes (layers x hidden size x 4 x max_new_tokens); larger requests get HTTP 400.",
    "enable_step_profile": "Time every part of the serving pipeline per step (scheduler phases, "
    "ZMQ hops, detokenizer, tokenizer manager, HTTP write) and serve the summary on "
    "GET /step_profile (docs/step_profile.md).",
    "attention_backend": "Attention kernels (default: triton on GPU, torch_native on CPU).",
    "prefill_attention_backend": "Attention kernels for prefill (default: --attention-backend).",
    "decode_attention_backend": "Attention kernels for decode (default: --attention-backend).",
    "sampling_backend": "Sampling kernels (default: pytorch).",
    "grammar_backend": "Constrained decoding backend (json_schema, regex, ebnf, "
    "response_format): xgrammar, or none to refuse constrained requests with HTTP 400.",
    "tool_call_parser": "Parse tool calls out of chat answers under tool_choice auto: "
    "hermes or qwen25 / qwen (Hermes-style <tool_call> blocks, Qwen 2.5/3), llama3, mistral.",
    "reasoning_parser": "Split the think block of a reasoning model's chat answer into "
    "message.reasoning_content: deepseek-r1 or qwen3.",
    "constrained_json_disable_any_whitespace": "JSON constraints allow no free whitespace "
    "between tokens (default: any whitespace, as upstream).",
    "disable_cuda_graph": "Run decode without CUDA graphs.",
    "disable_cuda_graph_padding": "Replay CUDA graphs only for batch sizes captured exactly; "
    "other sizes run eagerly instead of padded to a larger graph.",
    "cuda_graph_max_bs": "Largest decode batch captured in a CUDA graph (default: 160).",
    "cuda_graph_bs": "Explicit list of batch sizes to capture.",
    "enable_torch_compile": "Run decode batches up to --torch-compile-max-bs through a "
    "torch.compile'd forward (attention stays eager); compiles on first use.",
    "torch_compile_max_bs": "Largest decode batch that runs the compiled forward.",
    "triton_attention_num_kv_splits": "KV splits of the Triton decode attention kernel.",
    "disable_flashinfer": "Deprecated: pick a non-flashinfer attention backend instead.",
    "disable_flashinfer_sampling": "Deprecated: same as --sampling-backend pytorch.",
    "return_attention_tokens": "Enable attention-token reports; without it such requests get 400.",
    "attention_tokens_top_k": "Largest top-k a request may ask for.",
    "attention_capture_layers": "Layers captured: last, all, auto (~4 spread over depth) or i,j,k.",
    "attention_prompt_max_len": "Longest prompt for attention_prompt_positions 'all' (and most "
    "positions a request may list).",
}

# Annotation (a string, under postponed evaluation) -> argparse keywords.
_TYPE_KWARGS: dict[str, dict[str, Any]] = {
    "bool": {"action": "store_true"},
    "int": {"type": int},
    "Optional[int]": {"type": int},
    "float": {"type": float},
    "Optional[float]": {"type": float},
    "str": {},
    "Optional[str]": {},
    "Optional[list[int]]": {"type": int, "nargs": "+"},
}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerArgs field, in --help groups."""
    group: Any = parser
    for f in dataclasses.fields(ServerArgs):
        if f.name in _GROUPS:
            group = parser.add_argument_group(_GROUPS[f.name])
        kwargs = dict(_TYPE_KWARGS[str(f.type)])
        if kwargs.get("action") != "store_true":
            # model_path has no dataclass default; it is checked after --config is merged.
            default = f.default if f.default is not dataclasses.MISSING else None
            kwargs["default"] = default
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        group.add_argument(
            _flag(f.name), *_ALIASES.get(f.name, ()), dest=f.name, help=_help(f.name), **kwargs
        )


def _help(name: str) -> str:
    """The flag's help plus what the honesty tables say about it (argparse escapes '%')."""
    text = _HELP[name]
    if name in REFUSED_FLAGS:
        text += f" Refused at start-up: {REFUSED_FLAGS[name]}."
    if name in ACCEPTED_AS_IS:
        text += f" Accepted, nothing to do here: {ACCEPTED_AS_IS[name]}."
    for value, reason in REFUSED_VALUES.get(name, {}).items():
        text += f" '{value}' is refused at start-up: {reason}."
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.launch_server",
        usage="%(prog)s --model-path PATH [options]",
        description="Serve a language model over HTTP (SGLang-compatible flags).",
        allow_abbrev=True,
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of flag values (kebab- or snake_case keys); flags on the command line win.",
    )
    ServerArgs.add_cli_args(parser)
    return parser


def _config_to_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Turn a YAML mapping into command-line tokens, so argparse checks types and choices."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        parser.error(f"cannot read config file {path}: {e}")
    except yaml.YAMLError as e:
        parser.error(f"config file {path} is not valid YAML: {e}")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"config file {path} must hold a mapping of flag names to values")

    # NOTE: exact names only (flags or their aliases); prefix matching would make typos silent.
    actions = parser._option_string_actions
    tokens: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or action.dest in ("help", "config"):
            parser.error(f"config file {path}: unknown key {key!r}")
        if value is None:
            continue
        if action.nargs == 0:  # on/off switch
            if not isinstance(value, bool):
                parser.error(f"config file {path}: {key!r} takes true or false, got {value!r}")
            if value:
                tokens.append(flag)
        elif action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            tokens.append(flag)
            tokens.extend(str(v) for v in items)
        else:
            if isinstance(value, (list, dict)):
                parser.error(f"config file {path}: {key!r} takes a single value, got {value!r}")
            # The '=' form keeps values that start with '-' (e.g. -1) from reading as flags.
            tokens.append(f"{flag}={value}")
    return tokens


def prepare_server_args(argv: Optional[list[str]] = None) -> ServerArgs:
    """Parse launch flags (plus an optional --config file) into a validated ServerArgs.

    Anything rejected, by argparse or by ServerArgs validation, exits with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        # File values go first so that any flag repeated on the command line overrides them.
        file_argv = _config_to_argv(parser, args.config)
        args = parser.parse_args(file_argv + list(argv if argv is not None else sys.argv[1:]))
    if args.model_path is None:
        parser.error("the following arguments are required: --model-path/--model")
    try:
        return ServerArgs.from_cli_args(args)
    except ValueError as e:
        parser.error(str(e))
