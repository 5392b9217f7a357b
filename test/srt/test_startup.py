"""Start-up: phase-time log lines, the default CPU KV pool size, and what makes starting fast.

One server (the default model, default pool sizing, `--return-attention-tokens` as `make serve`
starts it) is checked for its `Start-up:` lines (the scheduler's phases and the main process's
summary before the ready line) and for a KV pool within the documented CPU default bound
(`8 x context length` tokens; docs/server_arguments.md). Without a server: the KV pool's padding
page is zeroed (the rest is left uninitialized on purpose), `GGUFIndex` reads the same metadata
and tensor bytes as `gguf.GGUFReader`, and a GGUF tokenizer loaded back from its disk cache
encodes, decodes and renders chat exactly as the converted one.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
import torch

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.model_runner import CPU_DEFAULT_POOL_CONTEXTS
from sglang.srt.model_loader import resolve_model_path
from sglang.test.test_utils import (
    DEFAULT_MODEL_NAME_FOR_TEST,
    DEFAULT_URL_FOR_TEST,
    find_free_port,
    kill_process_tree,
    popen_launch_server,
    terminate,
)

READY_LINE = "The server is fired up and ready to roll!"


@pytest.fixture(scope="module")
def server():
    url = f"{DEFAULT_URL_FOR_TEST}:{find_free_port()}"
    proc = popen_launch_server(
        DEFAULT_MODEL_NAME_FOR_TEST, url, other_args=["--return-attention-tokens"]
    )
    try:
        yield url, proc
    finally:
        try:
            terminate(proc, timeout=30)
        finally:
            kill_process_tree(proc.pid)


def test_startup_phase_lines(server):
    url, proc = server
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    lines = list(proc.log_lines)
    ready = next(i for i, line in enumerate(lines) if READY_LINE in line)
    startup = [line.split("] ", 1)[-1] for line in lines[:ready] if "Start-up:" in line]
    assert len(startup) == 2, startup  # the scheduler's line, then the main process's summary
    model, main = startup
    for phase in ("imports", "model config", "load weights", "KV pool", "tokenizer", "total"):
        assert f"{phase} " in model, (phase, model)
    for phase in ("imports", "start processes and tokenizer", "wait for the model process",
                  "load weights", "warm-up", "total"):  # fmt: skip
        assert f"{phase} " in main, (phase, main)
    assert main.rstrip().endswith(" s")


def test_default_cpu_pool_within_bound(server):
    url, _ = server
    info = requests.get(f"{url}/get_server_info", timeout=10).json()
    assert info["max_total_tokens"] is None and info["mem_fraction_static"] is None
    assert 0 < info["max_total_num_tokens"] <= CPU_DEFAULT_POOL_CONTEXTS * info["context_len"]
    # Still serves attention tokens at the default size.
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0},
            "return_attention_tokens": True}  # fmt: skip
    meta = requests.post(f"{url}/generate", json=body, timeout=120).json()["meta_info"]
    assert len(meta["attention_tokens"]["content"]) == 2


def test_kv_pool_padding_page_is_zero():
    page = 4
    pool = MHATokenToKVPool(64, page, torch.float32, 2, 8, 3, "cpu")
    for buf in pool.k_buffer + pool.v_buffer:
        assert buf.shape == (64 + page, 2, 8)
        assert torch.count_nonzero(buf[:page]) == 0


def test_gguf_index_matches_gguf_reader():
    import gguf

    from sglang.srt.model_loader.gguf_index import COUNTED_ONLY, GGUFIndex

    path = resolve_model_path(DEFAULT_MODEL_NAME_FOR_TEST)
    index, reader = GGUFIndex(path), gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        if key in COUNTED_ONLY:
            assert index.metadata[f"{key}.count"] == len(field.data)
        else:
            assert index.metadata[key] == pytest.approx(field.contents()), key
    assert len(index.tensors) == len(reader.tensors)
    for ours, theirs in zip(index.tensors, reader.tensors):
        assert (ours.name, ours.tensor_type) == (theirs.name, theirs.tensor_type)
        assert ours.shape.tolist() == theirs.shape.tolist()
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        assert np.array_equal(ours.data, theirs.data), ours.name


def test_gguf_tokenizer_cache_round_trip(tmp_path, monkeypatch):
    from sglang.srt.hf_transformers_utils import get_tokenizer

    monkeypatch.setenv("SGLANG_CACHE_DIR", str(tmp_path))
    converted = get_tokenizer(DEFAULT_MODEL_NAME_FOR_TEST)  # converts and writes the cache
    folders = list((tmp_path / "gguf_tokenizers").iterdir())
    assert len(folders) == 1 and (folders[0] / "sglang-cache-complete").is_file()
    cached = get_tokenizer(DEFAULT_MODEL_NAME_FOR_TEST)
    text = "The capital of France is Paris. ünïcødé 你好 <|im_start|>user\n1, 2, 3"
    assert cached.encode(text) == converted.encode(text)
    ids = converted.encode(text)
    assert cached.decode(ids, skip_special_tokens=True) == converted.decode(
        ids, skip_special_tokens=True
    )
    assert cached.all_special_ids == converted.all_special_ids
    assert cached.eos_token_id == converted.eos_token_id and len(cached) == len(converted)
    chat = [{"role": "user", "content": "Hi"}]
    assert cached.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        converted.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )


def test_http_process_does_not_import_torch_before_spawning():
    """The HTTP process parses flags, resolves the model and builds its app without torch (~1.3 s
    of a small machine's start-up); only the config check after the ranks are spawned needs it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sglang.srt.server_args_cli import prepare_server_args\n"
        "from sglang.srt.entrypoints import http_server, engine\n"
        "from sglang.srt.managers import tokenizer_manager, detokenizer_manager\n"
        "from sglang.srt.entrypoints.openai import api\n"
        "args = prepare_server_args(['--model-path', 'smollm2-135m-instruct'])\n"
        "assert args.device in ('cpu', 'cuda')\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout.strip().splitlines()[-1], out.stdout
