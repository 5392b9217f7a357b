"""Test runners: our engine in-process and HuggingFace transformers as the reference.

`SRTRunner` drives the real ModelRunner + Scheduler (no processes, no HTTP) on token ids;
`HFRunner` runs transformers in eager mode and returns the same quantities; `make_tiny_model`
builds and saves a small random-weight HF checkpoint for an architecture. Tests compare them.
`hf_greedy_chat` is transformers' greedy answer to a chat, the oracle of golden-answer tests.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.sampling.sampling_params import SamplingParams


@dataclass
class GenOutput:
    output_ids: list[int]
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[Optional[float]] = field(default_factory=list)
    cached_tokens: int = 0
    finish_reason: Optional[dict] = None


TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        cls="LlamaConfig",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
    ),
    "llama_tied": dict(cls="LlamaConfig", tie_word_embeddings=True),
    "mistral": dict(cls="MistralConfig", sliding_window=4096, tie_word_embeddings=False),
    "qwen2": dict(cls="Qwen2Config", tie_word_embeddings=False),
    "qwen3": dict(cls="Qwen3Config", tie_word_embeddings=False, head_dim=32),
    # GPT-2 / GPT-NeoX have no KV grouping: as many KV heads as heads keeps the KV pool right.
    "gpt2": dict(cls="GPT2Config", num_key_value_heads=4, n_inner=160),
    "gpt_neox": dict(
        cls="GPTNeoXConfig",
        num_key_value_heads=4,
        rotary_pct=0.25,
        hidden_act="gelu",
        tie_word_embeddings=False,
    ),
    "phi3": dict(
        cls="Phi3Config", sliding_window=16, partial_rotary_factor=0.5, tie_word_embeddings=False
    ),
    "olmo2": dict(cls="Olmo2Config", tie_word_embeddings=False),
    # MoE: 4 experts, top 2; Qwen3-MoE renormalises the top-k (norm_topk_prob), Qwen2-MoE does
    # not and has one dense layer (mlp_only_layers) besides its shared expert.
    "mixtral": dict(
        cls="MixtralConfig",
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        cls="Qwen3MoeConfig",
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    "qwen2_moe": dict(
        cls="Qwen2MoeConfig",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=96,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    ),
    # Qwen sliding windows on layers >= max_window_layers only (here layers 1 and 2).
    "qwen2_window": dict(
        cls="Qwen2Config",
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        initializer_range=0.3,
    ),
    "qwen3_window": dict(
        cls="Qwen3Config",
        head_dim=16,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
        initializer_range=0.3,
    ),
    # Gemma: peaky attention (large init), a window of 8 on alternating layers, soft-caps the
    # scores and logits actually reach.
    "gemma2": dict(
        cls="Gemma2Config",
        num_hidden_layers=4,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        attn_logit_softcapping=4.0,
        final_logit_softcapping=10.0,
        initializer_range=0.3,
    ),
    "gemma3": dict(
        cls="Gemma3TextConfig",
        architectures=["Gemma3ForCausalLM"],
        num_hidden_layers=4,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        initializer_range=0.3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    ),
}


def make_tiny_model(
    arch: str, folder: Optional[str] = None, seed: int = 0, **overrides: Any
) -> str:
    """Build a random-weight tiny model of `arch` (a TINY_CONFIGS key, config fields overridable
    by keyword, e.g. num_key_value_heads=1), save it, return the folder."""
    import transformers

    spec = dict(TINY_CONFIGS[arch])
    config_cls = getattr(transformers, spec.pop("cls"))
    kwargs = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        initializer_range=0.08,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(spec)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    folder = folder or tempfile.mkdtemp(prefix=f"tiny-{arch}-")
    model.save_pretrained(folder)
    return folder


def make_tiny_text_model(folder: str) -> str:
    """A tiny random Llama with SmolLM2's vocabulary and its tokenizer saved beside it, so a
    server runs the whole text path (tokenize, detokenize, chat template) in seconds."""
    from sglang.srt.hf_transformers_utils import get_tokenizer

    make_tiny_model("llama", folder, max_position_embeddings=4096, vocab_size=49152)
    get_tokenizer("smollm2-135m-instruct").save_pretrained(folder)
    return folder


def assert_greedy_matches(
    outs: list[GenOutput], refs: list[GenOutput], label: str, tol: float = 1e-4
) -> None:
    """Identical greedy tokens and output logprobs within `tol`, request by request."""
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.output_ids == r.output_ids, f"{label}: request {i} greedy tokens differ"
        diff = max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs))
        assert diff < tol, f"{label}: request {i} logprob diff {diff}"


class HFRunner:
    def __init__(
        self, model_path: str, gguf_file: Optional[str] = None, dtype: torch.dtype = torch.float32
    ) -> None:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation="eager")
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs).eval()

    @classmethod
    def for_model(cls, name_or_path: str, dtype: torch.dtype = torch.float32) -> "HFRunner":
        """A model as `--model-path` names it (a short name, a folder or a .gguf file)."""
        from sglang.srt.model_loader.resolve import is_gguf_path, resolve_model_path

        path = resolve_model_path(name_or_path)
        if is_gguf_path(path):
            return cls(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
        return cls(path, dtype=dtype)

    @torch.no_grad()
    def prefill_logits(self, input_ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([input_ids])).logits[0, -1].float()

    @torch.no_grad()
    def prompt_logprobs(self, input_ids: list[int]) -> list[float]:
        logits = self.model(torch.tensor([input_ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return [lp[i, input_ids[i + 1]].item() for i in range(len(input_ids) - 1)]

    @torch.no_grad()
    def greedy(self, input_ids: list[int], max_new_tokens: int) -> GenOutput:
        """Greedy decoding with the HF KV cache, never stopping early (EOS is not suppressed)."""
        return self.greedy_with_attention(input_ids, max_new_tokens, attentions=False)[0]

    @torch.no_grad()
    def greedy_with_attention(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        attentions: bool = True,
        cache: Any = None,
        per_head: bool = False,
    ) -> tuple[GenOutput, list[torch.Tensor]]:
        """Greedy decoding plus, per generated token t, the eager attention of the query that
        produced it: a float64 [num_layers, context] tensor of the head-mean softmax row
        (`attentions[layer][0, :, -1, :]` averaged over heads, as in generate(output_attentions)).
        `cache`: an empty transformers Cache to decode with (e.g. one that rounds K/V).
        `per_head`: [num_layers, num_heads, context] rows, each head's own (no head mean)."""
        ids: list[int] = []
        lps: list[float] = []
        rows: list[torch.Tensor] = []
        past = cache
        step_input = torch.tensor([input_ids])
        for _ in range(max_new_tokens):
            out = self.model(
                step_input, past_key_values=past, use_cache=True, output_attentions=attentions
            )
            if attentions:
                # A sliding-window cache hands back only the last keys of a windowed layer: pad
                # its row on the left (those positions are outside the window: probability 0).
                heads = [a[0, :, -1, :].double() for a in out.attentions]
                if not per_head:
                    heads = [h.mean(0) for h in heads]
                ctx = max(h.shape[-1] for h in heads)
                rows.append(torch.stack([F.pad(h, (ctx - h.shape[-1], 0)) for h in heads]))
            past = out.past_key_values
            logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)
            token = int(torch.argmax(logprobs))
            ids.append(token)
            lps.append(logprobs[token].item())
            step_input = torch.tensor([[token]])
        return GenOutput(output_ids=ids, output_logprobs=lps), rows


class SRTRunner:
    def __init__(self, model_path: str, **server_kwargs: Any) -> None:
        from sglang.srt.model_executor.model_runner import build_model_runner
        from sglang.srt.managers.scheduler import Scheduler
        from sglang.srt.server_args import ServerArgs

        kwargs = dict(device="cpu", dtype="float32", random_seed=0, max_total_tokens=4096)
        kwargs.update(server_kwargs)
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        self.model_runner = build_model_runner(self.server_args)
        self.scheduler = Scheduler(self.server_args, self.model_runner, tokenizer=None)
        self._counter = 0

    def make_req(
        self,
        input_ids: list[int],
        max_new_tokens: int = 32,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        attention: Any = None,
        **sampling: Any,
    ) -> Req:
        self._counter += 1
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        return Req(
            f"req-{self._counter}",
            input_ids,
            params,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            attention=attention,
        )

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int = 32, **kwargs: Any
    ) -> list[GenOutput]:
        """Submit all prompts at once and run the scheduler until every request finished."""
        kwargs.setdefault("temperature", 0.0)
        kwargs.setdefault("ignore_eos", True)
        reqs = [self.make_req(p, max_new_tokens, **kwargs) for p in prompts]
        for req in reqs:
            self.scheduler.add_request(req)
        self.scheduler.run_until_idle()
        self.scheduler.check_memory()
        return [self.to_output(r) for r in reqs]

    @staticmethod
    def to_output(req: Req) -> GenOutput:
        return GenOutput(
            output_ids=list(req.output_ids),
            output_logprobs=[lp for lp, _ in req.output_token_logprobs],
            input_logprobs=[lp for lp, _ in req.input_token_logprobs],
            cached_tokens=req.cached_tokens,
            finish_reason=req.finished_reason.to_json() if req.finished_reason else None,
        )

    def prefill_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Next-token logits of each prompt from one batched extend (memory released after)."""
        sched = self.scheduler
        reqs = [self.make_req(p, 1) for p in prompts]
        for req in reqs:
            req.sampling_params.normalize()
            req.init_next_round_input()
        batch = ScheduleBatch(
            reqs,
            sched.req_to_token_pool,
            sched.allocator,
            sched.tree_cache,
            sched.model_config.vocab_size,
            "cpu",
        )
        logits_output, _ = self.model_runner.forward(batch.prepare_for_extend())
        for req in reqs:
            req.output_ids.append(0)  # so release_req frees exactly the prompt's slots
            batch.release_req(req)
        sched.check_memory()
        return logits_output.next_token_logits


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt ids of `messages` under the tokenizer's chat template, ready for the answer."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def hf_greedy_chat(
    messages: list[dict[str, Any]], max_new_tokens: int, model: str = "smollm2-135m-instruct"
) -> tuple[list[int], str]:
    """HuggingFace transformers' greedy answer to a chat: the oracle of golden-answer tests.

    float32 eager attention on CPU, the model's own chat template; the ids stop before the first
    EOS (the server's stop trims the matched token from the text), the text is decoded without
    special tokens. Returns (ids, text)."""
    from sglang.srt.hf_transformers_utils import get_tokenizer
    from sglang.srt.model_loader import resolve_model_path

    tokenizer = get_tokenizer(resolve_model_path(model))
    hf = HFRunner.for_model(model)
    ids = hf.greedy(chat_prompt_ids(tokenizer, messages), max_new_tokens).output_ids
    eos = hf.model.generation_config.eos_token_id
    stops = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    ids = ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def cpu_threads_hint() -> None:
    """Keep tests from oversubscribing the small CI machine."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
