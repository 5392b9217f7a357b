"""Tests for sglang.srt.server_args: flags, aliases, --config files, auto resolution, validation."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sglang.srt.server_args import (
    PortArgs,
    ServerArgs,
    build_parser,
    prepare_server_args,
)

# Every upstream flag and the attention-token flags (docs/compat.md), canonical spelling.
COMPAT_FLAGS = """
--model-path --tokenizer-path --tokenizer-mode --skip-tokenizer-init --load-format
--trust-remote-code --context-length --host --port --dtype --quantization --kv-cache-dtype
--mem-fraction-static --max-running-requests --max-total-tokens --chunked-prefill-size
--max-prefill-tokens --schedule-policy --schedule-conservativeness --page-size
--disable-radix-cache --disable-overlap-schedule --tp-size --dp-size --pp-size
--load-balance-method --nnodes --node-rank --dist-init-addr --nccl-port --device --base-gpu-id
--gpu-id-step --random-seed --watchdog-timeout --stream-interval --stream-output --log-level
--log-level-http --log-requests --decode-log-interval --enable-metrics --api-key
--served-model-name --chat-template --enable-cache-report --attention-backend
--prefill-attention-backend --decode-attention-backend --sampling-backend --grammar-backend
--disable-cuda-graph --disable-cuda-graph-padding --cuda-graph-max-bs --cuda-graph-bs
--enable-torch-compile --torch-compile-max-bs --triton-attention-num-kv-splits
--allow-auto-truncate --enable-return-hidden-states --skip-server-warmup --disable-flashinfer
--return-attention-tokens --attention-tokens-top-k --attention-capture-layers
""".split()


def parse(*argv: str) -> ServerArgs:
    # Pin the device unless a test sets it, so results do not depend on the machine.
    if not any(a.startswith("--dev") for a in argv):
        argv = (*argv, "--device", "cpu")
    return prepare_server_args(list(argv))


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        prepare_server_args(argv)
    return info.value.code


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# ------------------------------------------------------------------- flags and defaults


def test_every_compat_flag_is_a_field_and_a_flag():
    fields = {f.name for f in dataclasses.fields(ServerArgs)}
    options = build_parser()._option_string_actions
    for flag in COMPAT_FLAGS:
        assert flag in options, flag
        assert options[flag].dest in fields, flag


def test_defaults():
    args = parse("--model-path", "/models/m")
    assert args.model_path == "/models/m"
    assert args.tokenizer_path == "/models/m"
    assert args.served_model_name == "/models/m"
    assert (args.host, args.port) == ("127.0.0.1", 30000)
    assert args.url() == "http://127.0.0.1:30000"
    assert (args.tokenizer_mode, args.load_format, args.dtype, args.kv_cache_dtype) == (
        "auto",
        "auto",
        "auto",
        "auto",
    )
    assert (args.tp_size, args.dp_size, args.pp_size, args.nnodes, args.node_rank) == (
        1,
        1,
        1,
        1,
        0,
    )
    assert args.max_prefill_tokens == 16384
    assert args.schedule_policy == "fcfs"
    assert args.schedule_conservativeness == 1.0
    assert args.page_size == 1
    assert args.load_balance_method == "round_robin"
    assert (args.base_gpu_id, args.gpu_id_step) == (0, 1)
    assert args.watchdog_timeout == 300
    assert args.stream_interval == 1
    assert args.log_level == "info" and args.log_level_http is None
    assert args.decode_log_interval == 40
    assert args.grammar_backend == "xgrammar"
    assert args.torch_compile_max_bs == 32
    assert args.triton_attention_num_kv_splits == 8
    assert args.cuda_graph_bs is None
    assert args.quantization is None and args.api_key is None and args.chat_template is None
    assert args.return_attention_tokens is False
    assert args.attention_tokens_top_k == 10
    assert args.attention_capture_layers == "last"
    for switch in (
        "skip_tokenizer_init",
        "trust_remote_code",
        "disable_radix_cache",
        "disable_overlap_schedule",
        "stream_output",
        "log_requests",
        "enable_metrics",
        "enable_cache_report",
        "enable_torch_compile",
        "allow_auto_truncate",
        "enable_return_hidden_states",
        "skip_server_warmup",
    ):
        assert getattr(args, switch) is False, switch


def test_cli_defaults_match_dataclass_defaults():
    direct = ServerArgs(model_path="m", device="cpu", random_seed=1)
    via_cli = parse("--model-path", "m", "--random-seed", "1")
    assert direct == via_cli


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--model", "m"], "model_path", "m"),
        (["--tp", "2"], "tp_size", 2),
        (["--tensor-parallel-size", "2"], "tp_size", 2),
        (["--dp", "3"], "dp_size", 3),
        (["--data-parallel-size", "3"], "dp_size", 3),
        (["--nccl-init-addr", "10.0.0.1:5000"], "dist_init_addr", "10.0.0.1:5000"),
        (["--incremental-streaming-output"], "stream_output", True),
    ],
)
def test_aliases(argv, field, value):
    if argv[0] != "--model":
        argv = ["--model-path", "m", *argv]
    assert getattr(parse(*argv), field) == value


def test_pipeline_parallel_aliases_parse_to_pp_size():
    # pp_size > 1 is refused after parsing; the aliases themselves must still resolve.
    for flag in ("--pp", "--pipeline-parallel-size", "--pp-size"):
        assert build_parser().parse_args(["--model", "m", flag, "2"]).pp_size == 2


def test_prefix_abbreviation_and_equals_form():
    args = parse("--model-p", "m", "--tp-s", "2", "--mem-frac", "0.5", "--schedule-pol", "lpm")
    assert (args.model_path, args.tp_size, args.mem_fraction_static) == ("m", 2, 0.5)
    assert args.schedule_policy == "lpm"
    args = parse("--model-path=/m", "--port=31000", "--model-p=/n", "--cuda-graph-bs", "4", "1")
    assert (args.model_path, args.port, args.cuda_graph_bs) == ("/n", 31000, [1, 4])
    args = parse("--model=m", "--chunked-prefill-size=-1")
    assert args.chunked_prefill_size == -1


def test_unknown_ambiguous_and_invalid_flags_exit_2():
    assert exit_code(["--model-path", "m", "--no-such-flag"]) == 2
    # --disable-cuda is a prefix of two flags.
    assert exit_code(["--model-path", "m", "--disable-cuda"]) == 2
    assert exit_code(["--model-path", "m", "--dtype", "int3"]) == 2
    assert exit_code(["--model-path", "m", "--attention-backend", "sdpa"]) == 2
    assert exit_code(["--model-path", "m", "--port", "http"]) == 2
    assert exit_code(["--port", "1"]) == 2  # model path missing


def test_unknown_flag_exit_status_in_a_real_process():
    code = "from sglang.srt.server_args import prepare_server_args as p; p(['--model', 'm', '--x'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unrecognized arguments: --x" in proc.stderr


def test_import_stays_light():
    code = (
        "import sys, sglang.srt.server_args; "
        "print([m for m in ('fastapi', 'uvicorn', 'zmq', 'transformers') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------- --config files


def test_config_file_with_cli_override(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model-path: /models/from-file
        port: 31000
        tp_size: 2
        schedule-policy: lpm
        disable_radix_cache: true
        enable-metrics: false
        cuda-graph-bs: [8, 2]
        chunked_prefill_size: -1
        return-attention-tokens: true
        attention_capture_layers: 3,1
        """,
    )
    args = parse("--config", path, "--port", "32000", "--tp", "4")
    assert args.model_path == "/models/from-file"
    assert args.port == 32000  # command line wins
    assert args.tp_size == 4
    assert args.schedule_policy == "lpm"
    assert args.disable_radix_cache is True
    assert args.enable_metrics is False
    assert args.cuda_graph_bs == [2, 8]
    assert args.chunked_prefill_size == -1
    assert args.return_attention_tokens is True
    assert args.attention_capture_layers == "1,3"


def test_config_file_accepts_aliases_and_abbreviated_config_flag(tmp_path):
    path = write_yaml(tmp_path, "model: m\ntp: 2\n")
    args = parse("--conf", path)
    assert (args.model_path, args.tp_size) == ("m", 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model-path: m\nbogus-key: 1\n", "unknown key 'bogus-key'"),
        ("model-path: m\nconfig: other.yaml\n", "unknown key 'config'"),
        ("model-path: m\ndtype: int3\n", "invalid choice"),
        ("model-path: m\nport: abc\n", "invalid int value"),
        ("model-path: m\ndisable-radix-cache: maybe\n", "takes true or false"),
        ("- model-path\n- m\n", "must hold a mapping"),
        ("model-path: [m\n", "not valid YAML"),
    ],
)
def test_config_file_errors(tmp_path, capsys, text, message):
    path = write_yaml(tmp_path, text)
    assert exit_code(["--config", path, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_config_file_missing(tmp_path, capsys):
    assert exit_code(["--model", "m", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


# ------------------------------------------------------------------- auto resolution


def test_auto_resolution_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ServerArgs(model_path="m")
    assert args.device == "cpu"
    assert args.attention_backend == "torch_native"
    assert args.prefill_attention_backend == args.decode_attention_backend == "torch_native"
    assert args.sampling_backend == "pytorch"
    assert args.chunked_prefill_size == 2048
    assert args.disable_cuda_graph is True
    assert args.mem_fraction_static is None
    assert isinstance(args.random_seed, int)


def test_auto_resolution_on_cuda(monkeypatch):
    import torch

    from sglang.srt import server_args as server_args_module

    # A GPU machine: an NVIDIA driver node, and torch sees a device.
    monkeypatch.setattr(server_args_module, "_nvidia_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = ServerArgs(model_path="m")
    assert args.device == "cuda"
    assert args.attention_backend == args.prefill_attention_backend == "triton"
    assert args.decode_attention_backend == "triton"
    assert args.chunked_prefill_size == 8192
    assert args.disable_cuda_graph is False
    assert args.cuda_graph_max_bs == 160
    assert args.mem_fraction_static == 0.88
    assert ServerArgs(model_path="m", tp_size=8).mem_fraction_static == 0.81


def test_auto_device_without_driver_skips_torch(monkeypatch):
    """No NVIDIA driver node: "cpu" without asking torch (the HTTP process does not import it)."""
    import torch

    from sglang.srt import server_args as server_args_module

    monkeypatch.setattr(server_args_module, "_nvidia_driver_present", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # would say cuda if asked
    assert ServerArgs(model_path="m").device == "cpu"


def test_split_attention_backends_default_to_main_choice():
    args = ServerArgs(model_path="m", device="cuda", attention_backend="flashinfer")
    assert args.prefill_attention_backend == args.decode_attention_backend == "flashinfer"
    args = parse("--model", "m", "--device", "cuda", "--decode-attention-backend", "flashinfer")
    assert (args.prefill_attention_backend, args.decode_attention_backend) == (
        "triton",
        "flashinfer",
    )


def test_explicit_values_are_kept():
    args = ServerArgs(
        model_path="m",
        device="cuda",
        tokenizer_path="t",
        served_model_name="served",
        chunked_prefill_size=512,
        mem_fraction_static=0.7,
        random_seed=7,
        cuda_graph_bs=[16, 1, 4, 4],
    )
    assert (args.tokenizer_path, args.served_model_name) == ("t", "served")
    assert (args.chunked_prefill_size, args.mem_fraction_static, args.random_seed) == (
        512,
        0.7,
        7,
    )
    assert args.cuda_graph_bs == [1, 4, 16]
    assert args.cuda_graph_max_bs == 16
    assert (
        ServerArgs(model_path="m", device="cpu", chunked_prefill_size=0).chunked_prefill_size == -1
    )


def test_disable_flashinfer_warns_and_falls_back(caplog):
    with caplog.at_level(logging.WARNING, logger="sglang.srt.server_args"):
        args = parse(
            "--model",
            "m",
            "--device",
            "cuda",
            "--attention-backend",
            "flashinfer",
            "--disable-flashinfer",
        )
    assert "disable-flashinfer" in caplog.text
    assert args.attention_backend == args.decode_attention_backend == "triton"
    args = parse("--model", "m", "--attention-backend", "flashinfer", "--disable-flashinfer")
    assert args.attention_backend == "torch_native"
    args = parse("--model", "m", "--disable-flashinfer")  # no backend chosen: still accepted
    assert args.attention_backend == "torch_native"
    args = parse(
        "--model",
        "m",
        "--device",
        "cuda",
        "--sampling-backend",
        "flashinfer",
        "--disable-flashinfer-sampling",
    )
    assert args.sampling_backend == "pytorch"


def test_capture_layer_specs():
    for spec in ("last", "all", "auto", "AUTO"):
        assert ServerArgs(model_path="m", device="cpu", attention_capture_layers=spec)
    args = ServerArgs(model_path="m", device="cpu", attention_capture_layers=" 29, 0,15,15")
    assert args.attention_capture_layers == "0,15,29"


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "h:1"}, "divisible by nnodes"),
        ({"page_size": 0}, "page_size must be >= 1"),
        ({"mem_fraction_static": 1.0}, "mem_fraction_static must be in (0, 1)"),
        ({"mem_fraction_static": 0.0}, "mem_fraction_static must be in (0, 1)"),
        ({"attention_tokens_top_k": 0}, "attention_tokens_top_k must be >= 1"),
        ({"port": 0}, "port must be in [1, 65535]"),
        ({"port": 70000}, "port must be in [1, 65535]"),
        ({"nccl_port": 70000}, "nccl_port must be in [1, 65535]"),
        ({"attention_capture_layers": "first"}, "attention_capture_layers must be"),
        ({"attention_capture_layers": "1,-2"}, "must be >= 0"),
        ({"nnodes": 2, "tp_size": 2}, "--dist-init-addr"),
        ({"nnodes": 2, "tp_size": 2, "dist_init_addr": "nohost"}, "host:port"),
        ({"node_rank": 1}, "node_rank must be in"),
        ({"attention_backend": "triton"}, "needs a GPU"),
        ({"sampling_backend": "flashinfer"}, "--sampling-backend flashinfer is refused"),
        ({"schedule_policy": "dfs-weight"}, "--schedule-policy dfs-weight is refused"),
        ({"quantization": "w8a8_fp8"}, "--quantization w8a8_fp8 is refused"),
        ({"quantization": "int3"}, "quantization must be one of"),
        ({"pp_size": 2}, "--pp-size 2 is refused: pipeline parallelism"),
        ({"log_requests_level": 4}, "log_requests_level must be one of 0, 1, 2, 3"),
        ({"dtype": "int3"}, "dtype must be one of"),
        ({"device": "tpu"}, "device must be one of"),
        ({"max_total_tokens": 0}, "max_total_tokens must be >= 1"),
        ({"cuda_graph_bs": [0, 2]}, "cuda_graph_bs entries"),
        ({"watchdog_timeout": 0}, "watchdog_timeout must be > 0"),
    ],
)
def test_validation_errors(kwargs, message):
    kwargs = {"model_path": "m", "device": "cpu", **kwargs}
    with pytest.raises(ValueError) as info:
        ServerArgs(**kwargs)
    assert message in str(info.value)


def test_validation_error_on_the_command_line_exits_2(capsys):
    assert exit_code(["--model", "m", "--device", "cpu", "--page-size", "0"]) == 2
    assert "page_size must be >= 1" in capsys.readouterr().err


def test_multi_node_settings():
    args = ServerArgs(
        model_path="m",
        device="cpu",
        tp_size=4,
        nnodes=2,
        node_rank=1,
        dist_init_addr="[::1]:5000",
    )
    assert (args.nnodes, args.node_rank) == (2, 1)


# ------------------------------------------------------------------- helpers


def test_url_and_to_dict():
    args = ServerArgs(model_path="m", device="cpu", host="::1", port=8000, cuda_graph_bs=[2, 1])
    assert args.url() == "http://[::1]:8000"
    data = args.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["cuda_graph_bs"] == [1, 2] and data["model_path"] == "m"
    assert ServerArgs(**data) == args


def test_port_args():
    args = ServerArgs(model_path="m", device="cpu")
    ports = PortArgs.init_new(args)
    try:
        names = [
            ports.tokenizer_ipc_name,
            ports.scheduler_input_ipc_name,
            ports.detokenizer_ipc_name,
        ]
        assert all(n.startswith("ipc://") for n in names)
        assert len(set(names)) == 3
        assert all(os.path.dirname(n[len("ipc://") :]) == ports.ipc_dir for n in names)
        assert 1 <= ports.nccl_port <= 65535
    finally:
        ports.cleanup()
    assert not os.path.exists(ports.ipc_dir)
    fixed = PortArgs.init_new(ServerArgs(model_path="m", device="cpu", nccl_port=12345))
    fixed.cleanup()
    assert fixed.nccl_port == 12345
