"""Honest flags: every flag is read, refused (exit 2) or accepted as already true; quantized
checkpoints are refused; --log-requests levels. Split from test_server_args.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sglang
from sglang.srt.server_args import (
    ACCEPTED_AS_IS,
    REFUSED_FLAGS,
    REFUSED_VALUES,
    ServerArgs,
    build_parser,
)


# ------------------------------------------------------------------- the honesty tables

SRC = Path(sglang.__file__).parent


def _sources_outside_server_args() -> str:
    # Test helpers (sglang/test) do not count: a flag only they read does nothing for users.
    return "\n".join(
        p.read_text(encoding="utf-8")
        for p in sorted(SRC.rglob("*.py"))
        if p.name != "server_args.py" and "test" not in p.relative_to(SRC).parts[:1]
    )


def _is_read(name: str, source: str) -> bool:
    # Code reads flags as `server_args.x`, `self.server_args.x`, `args.x` or getattr(args, "x").
    pattern = rf'\b(server_args|args)\.{name}\b|getattr\([\w.]*args, "{name}"'
    return re.search(pattern, source) is not None


def test_every_flag_is_read_refused_or_accepted_as_is():
    """A flag nothing reads must say so: refused at start-up, or accepted because its upstream
    effect already holds. A flag marked accepted-as-is must really be read nowhere."""
    source = _sources_outside_server_args()
    fields = [f.name for f in dataclasses.fields(ServerArgs)]
    unread = [n for n in fields if not _is_read(n, source)]
    unmarked = [n for n in unread if n not in REFUSED_FLAGS and n not in ACCEPTED_AS_IS]
    assert not unmarked, f"flags read nowhere and not marked in server_args.py: {unmarked}"
    stale = [n for n in ACCEPTED_AS_IS if n not in unread]
    assert not stale, f"flags marked accepted-as-is but read in python/sglang: {stale}"
    for table in (REFUSED_FLAGS, REFUSED_VALUES, ACCEPTED_AS_IS):
        assert set(table) <= set(fields)
    assert not set(REFUSED_FLAGS) & set(ACCEPTED_AS_IS)


def test_help_and_docs_state_every_mark():
    docs = (Path(__file__).parents[2] / "docs" / "server_arguments.md").read_text()
    for name in (*REFUSED_FLAGS, *REFUSED_VALUES, *ACCEPTED_AS_IS):
        assert f"`--{name.replace('_', '-')}" in docs, f"{name} missing from the docs table"
    options = {a.dest: a for a in build_parser()._actions}
    for name, reason in {**REFUSED_FLAGS, **ACCEPTED_AS_IS}.items():
        assert reason in options[name].help.replace("%%", "%"), name
    for name, values in REFUSED_VALUES.items():
        for value, reason in values.items():
            assert value in options[name].choices
            assert reason in options[name].help.replace("%%", "%"), name


# A value to try for each flag refused whatever its value (the flag-table test keeps it complete).
REFUSED_FLAG_SAMPLES = {"pp_size": "2"}
# One launch per refused flag: the flag with a refused value (every other value is checked
# in-process below, which costs no server start).
REFUSED_ARGV = [
    [f"--{name.replace('_', '-')}", value]
    for name, value in [
        *REFUSED_FLAG_SAMPLES.items(),
        *((name, next(iter(values))) for name, values in REFUSED_VALUES.items()),
    ]
]


def test_every_refused_value_is_refused_in_process():
    assert set(REFUSED_FLAG_SAMPLES) == set(REFUSED_FLAGS), "add a sample value for the new flag"
    for name, values in REFUSED_VALUES.items():
        for value in values:
            kwargs = {"model_path": "m", "device": "cpu", name: value}
            with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} {value} is refused"):
                ServerArgs(**kwargs)


@pytest.mark.parametrize("argv", REFUSED_ARGV, ids=lambda a: a[0])
def test_refused_flag_exits_2_with_one_line_error(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", "m", "--device", "cpu"]
        + argv,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{argv[0]} {argv[1]} is refused" in errors[0]


def test_quantized_checkpoint_is_refused_naming_the_method(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 256,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "quantization_config": {"quant_method": "mxfp4", "bits": 4},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="quant_method='mxfp4'"):
        ModelConfig(str(tmp_path), device="cpu")
    # compressed-tensors loads its FP8 schemes only; others are refused naming the field.
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="compressed-tensors format 'pack-quantized'"):
        ModelConfig(str(tmp_path), device="cpu")
    config["quantization_config"] = {"load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quant_method='bitsandbytes'"):
        ModelConfig(str(tmp_path), device="cpu")

    # The server stops at start-up with one line naming the method.
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path)]
        + ["--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "quant_method='bitsandbytes'" in errors[0], proc.stderr


# ------------------------------------------------------------------- --log-requests levels


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_log_requests_levels(level, caplog):
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.request_logger import PARTIAL_LIMIT, RequestLogger

    obj = GenerateReqInput(text="x" * 3000, sampling_params={"temperature": 0.5}, rid="r1")
    out = {"text": "y" * 3000, "output_ids": [7] * 3000, "meta_info": {"id": "r1"}}
    log = RequestLogger(level)
    with caplog.at_level(logging.INFO, logger="sglang.srt.managers.request_logger"):
        log.received(obj)
        log.finished(obj, out)
    received, finished = (r.getMessage() for r in caplog.records)
    assert received.startswith("Receive: obj=GenerateReqInput(") and "rid='r1'" in received
    assert (
        finished.startswith("Finish: obj=GenerateReqInput(")
        and "'meta_info': {'id': 'r1'}" in finished
    )
    assert ("'temperature': 0.5" in received) == (level >= 1)
    assert ("text='x" in received) == (level >= 2)
    assert ("'output_ids': [7" in finished) == (level >= 2)
    if level == 2:
        assert (
            "x" * PARTIAL_LIMIT + "'..." in received and "x" * (PARTIAL_LIMIT + 1) not in received
        )
        assert finished.count("7") == PARTIAL_LIMIT and "7, ...]" in finished
    if level == 3:
        assert "x" * 3000 in received and "y" * 3000 in finished
