"""A tiny random-weight Llama that carries the default model's real tokenizer.

For measuring the serving pipeline rather than the model: its forward takes about a millisecond on
a CPU, while text goes through the same tokenizer, detokenizer and HTTP path as SmolLM2's does
(same vocabulary size, so the LM head and sampling have the real width).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from sglang.test.runners import make_tiny_model

DEFAULT_MODEL = "smollm2-135m-instruct"


def make_tiny_served_model(folder: Optional[str] = None, num_layers: int = 2) -> str:
    """Build (or reuse, when `folder` already holds one) the tiny model; returns its folder."""
    from sglang.srt.hf_transformers_utils import get_tokenizer
    from sglang.srt.model_loader import resolve_model_path

    folder = folder or tempfile.mkdtemp(prefix="tiny-served-")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    tokenizer = get_tokenizer(resolve_model_path(DEFAULT_MODEL))
    make_tiny_model(
        "llama_tied",
        folder,
        vocab_size=len(tokenizer),
        num_hidden_layers=num_layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tokenizer.save_pretrained(folder)
    return folder


def served_tiny_fixtures(name: str, num_layers: int, server_args: list[str]) -> tuple:
    """Module-scoped pytest fixtures of one server on the tiny model (built in a temporary folder
    named after `name`, launched with `server_args`): (model_dir, server, client, tok, hf), the
    folder, the server's URL, an OpenAI client on it, its tokenizer and an HFRunner of the same
    weights. A test module binds them to those names, which is how pytest finds them:
    `model_dir, server, client, tok, hf = served_tiny_fixtures(...)`."""
    import openai
    import pytest

    from sglang.srt.hf_transformers_utils import get_tokenizer
    from sglang.test.runners import HFRunner
    from sglang.test.test_utils import running_server

    @pytest.fixture(scope="module")
    def model_dir(tmp_path_factory):
        return make_tiny_served_model(str(tmp_path_factory.mktemp(name)), num_layers=num_layers)

    @pytest.fixture(scope="module")
    def server(model_dir):
        with running_server(model_dir, other_args=server_args) as url:
            yield url

    @pytest.fixture(scope="module")
    def client(server):
        return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")

    @pytest.fixture(scope="module")
    def tok(model_dir):
        return get_tokenizer(model_dir)

    @pytest.fixture(scope="module")
    def hf(model_dir):
        return HFRunner(model_dir)

    return model_dir, server, client, tok, hf
