"""Request sets for the benchmarks: what to send, how long each prompt is, how many tokens to ask for.

Both `bench_serving` (HTTP client) and `bench_offline_throughput` (in-process Engine) call
`add_dataset_args` on their parser and `get_dataset(args, tokenizer)` to build a list of
`DatasetRow`s. Three sources:

- `random`: token ids drawn uniformly from the tokenizer's ordinary (non-special) vocabulary and
  decoded to text; input and output lengths uniform in [len * ratio, len].
- `sharegpt`: a local JSON file in the ShareGPT layout (a list of {"conversations": [{"from":
  "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}); the first human turn is the
  prompt and the reply's token count the output length. Nothing is ever downloaded.
- `generated-shared-prefix`: `gsp_num_groups` random system prompts, each followed by
  `gsp_prompts_per_group` random questions; it exercises the prefix cache. `--num-prompts` does not
  apply: the set holds groups x prompts-per-group requests.

Every choice is drawn from one numpy generator seeded with `--seed`, so a run is repeatable.
`DatasetError` carries a one-line message for bad input (missing file, wrong layout).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

DATASET_NAMES = ("random", "sharegpt", "generated-shared-prefix")
# Random text rarely re-tokenizes to exactly the drawn length; a few top-ups get it there.
_MAX_LENGTH_FIXES = 4


@dataclass
class DatasetRow:
    prompt: str
    prompt_len: int
    output_len: int


class DatasetError(Exception):
    """Bad dataset input, reported to the user as one line."""


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--dataset-name", default="random", choices=DATASET_NAMES, help="Where prompts come from."
    )
    group.add_argument(
        "--dataset-path", default="", help="Local ShareGPT-format JSON file (sharegpt only)."
    )
    group.add_argument("--num-prompts", type=int, default=1000, help="Number of requests.")
    group.add_argument(
        "--random-input-len", type=int, default=1024, help="Longest prompt, in tokens (random)."
    )
    group.add_argument(
        "--random-output-len", type=int, default=1024, help="Longest output, in tokens (random)."
    )
    group.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Lengths are drawn uniformly from [len * ratio, len] (random).",
    )
    group.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="Fixed output length for every sharegpt request (default: the reply's length).",
    )
    group.add_argument(
        "--sharegpt-context-len",
        type=int,
        default=None,
        help="Skip sharegpt conversations whose prompt + output exceed this many tokens.",
    )
    group.add_argument("--gsp-num-groups", type=int, default=64, help="Shared prefixes.")
    group.add_argument("--gsp-prompts-per-group", type=int, default=16, help="Requests per prefix.")
    group.add_argument(
        "--gsp-system-prompt-len", type=int, default=2048, help="Tokens in each shared prefix."
    )
    group.add_argument("--gsp-question-len", type=int, default=128, help="Tokens after the prefix.")
    group.add_argument("--gsp-output-len", type=int, default=256, help="Output tokens per request.")
    group.add_argument("--seed", type=int, default=1, help="Seed of every random choice.")


def get_dataset(args: argparse.Namespace, tokenizer: Any) -> list[DatasetRow]:
    rng = np.random.default_rng(args.seed)
    if args.dataset_name == "random":
        _check_positive(
            num_prompts=args.num_prompts,
            random_input_len=args.random_input_len,
            random_output_len=args.random_output_len,
        )
        if not 0.0 <= args.random_range_ratio <= 1.0:
            raise DatasetError(
                f"--random-range-ratio must be in [0, 1], got {args.random_range_ratio}"
            )
        return sample_random_requests(
            tokenizer,
            rng,
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
        )
    if args.dataset_name == "sharegpt":
        _check_positive(num_prompts=args.num_prompts)
        return sample_sharegpt_requests(
            tokenizer,
            rng,
            args.dataset_path,
            args.num_prompts,
            args.sharegpt_output_len,
            args.sharegpt_context_len,
        )
    if args.dataset_name == "generated-shared-prefix":
        _check_positive(
            gsp_num_groups=args.gsp_num_groups,
            gsp_prompts_per_group=args.gsp_prompts_per_group,
            gsp_system_prompt_len=args.gsp_system_prompt_len,
            gsp_question_len=args.gsp_question_len,
            gsp_output_len=args.gsp_output_len,
        )
        return sample_generated_shared_prefix_requests(
            tokenizer,
            rng,
            args.gsp_num_groups,
            args.gsp_prompts_per_group,
            args.gsp_system_prompt_len,
            args.gsp_question_len,
            args.gsp_output_len,
        )
    raise DatasetError(f"unknown dataset {args.dataset_name!r}; choose from {DATASET_NAMES}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            raise DatasetError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# ----------------------------------------------------------------------------------- random


def _ordinary_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids safe to sample: no special or added tokens (they would inject chat-control markup)."""
    excluded = set(getattr(tokenizer, "all_special_ids", []) or [])
    excluded.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    vocab = len(tokenizer)
    ids = np.array([i for i in range(vocab) if i not in excluded], dtype=np.int64)
    if ids.size == 0:
        raise DatasetError("the tokenizer has no ordinary tokens to sample from")
    return ids


def random_text(tokenizer: Any, rng: np.random.Generator, pool: np.ndarray, length: int) -> str:
    """Text that re-tokenizes to (about) `length` tokens of random vocabulary."""
    ids = rng.choice(pool, size=length).tolist()
    text = ""
    for _ in range(_MAX_LENGTH_FIXES):
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == length:
            break
        if len(ids) > length:
            ids = ids[:length]
        else:
            ids = ids + rng.choice(pool, size=length - len(ids)).tolist()
    return text


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text))


def _uniform_lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> list[int]:
    low = max(1, int(length * ratio))
    return rng.integers(low, length + 1, size=n).tolist()


def sample_random_requests(
    tokenizer: Any,
    rng: np.random.Generator,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
) -> list[DatasetRow]:
    pool = _ordinary_token_ids(tokenizer)
    input_lens = _uniform_lengths(rng, num_prompts, input_len, range_ratio)
    output_lens = _uniform_lengths(rng, num_prompts, output_len, range_ratio)
    rows = []
    for in_len, out_len in zip(input_lens, output_lens):
        text = random_text(tokenizer, rng, pool, in_len)
        rows.append(DatasetRow(text, _count(tokenizer, text), out_len))
    return rows


# ----------------------------------------------------------------------------------- sharegpt

_PROMPT_ROLES = ("human", "user")
_REPLY_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing")


def _first_exchange(entry: Any) -> Optional[tuple[str, str]]:
    """(prompt, reply) from a conversation's first two turns, or None if it has no such pair."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    if first.get("from") not in _PROMPT_ROLES or second.get("from") not in _REPLY_ROLES:
        return None
    prompt, reply = first.get("value"), second.get("value")
    if not isinstance(prompt, str) or not isinstance(reply, str):
        return None
    return prompt, reply


def load_sharegpt(path: str) -> list[Any]:
    if not path:
        raise DatasetError(
            "--dataset-name sharegpt needs --dataset-path pointing at a local ShareGPT JSON file"
        )
    if not os.path.isfile(path):
        raise DatasetError(f"ShareGPT file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read ShareGPT file {path}: {e}") from e
    if not isinstance(data, list):
        raise DatasetError(f"ShareGPT file {path} must hold a JSON list of conversations")
    return data


def sample_sharegpt_requests(
    tokenizer: Any,
    rng: np.random.Generator,
    path: str,
    num_prompts: int,
    fixed_output_len: Optional[int] = None,
    context_len: Optional[int] = None,
) -> list[DatasetRow]:
    if fixed_output_len is not None and fixed_output_len < 1:
        raise DatasetError(f"--sharegpt-output-len must be >= 1, got {fixed_output_len}")
    data = load_sharegpt(path)
    rows: list[DatasetRow] = []
    for index in rng.permutation(len(data)).tolist():
        pair = _first_exchange(data[index])
        if pair is None:
            continue
        prompt, reply = pair
        prompt_len = _count(tokenizer, prompt)
        output_len = fixed_output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        # NOTE: one-token prompts or replies say nothing about serving speed; skip them.
        if prompt_len < 2 or output_len < 2:
            continue
        if context_len is not None and prompt_len + output_len > context_len:
            continue
        rows.append(DatasetRow(prompt, prompt_len, output_len))
        if len(rows) == num_prompts:
            break
    if not rows:
        raise DatasetError(f"ShareGPT file {path} has no usable human/gpt exchange")
    return rows


# ---------------------------------------------------------------------- generated shared prefix


def sample_generated_shared_prefix_requests(
    tokenizer: Any,
    rng: np.random.Generator,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
) -> list[DatasetRow]:
    pool = _ordinary_token_ids(tokenizer)
    rows = []
    for _ in range(num_groups):
        system_prompt = random_text(tokenizer, rng, pool, system_prompt_len)
        for _ in range(prompts_per_group):
            question = random_text(tokenizer, rng, pool, question_len)
            prompt = f"{system_prompt}\n\n{question}"
            rows.append(DatasetRow(prompt, _count(tokenizer, prompt), output_len))
    # Interleave the groups, as real traffic would, instead of sending each group back to back.
    order = rng.permutation(len(rows)).tolist()
    return [rows[i] for i in order]


def summarize(rows: list[DatasetRow]) -> str:
    inputs = sum(r.prompt_len for r in rows)
    outputs = sum(r.output_len for r in rows)
    return f"{len(rows)} requests, {inputs} input tokens, {outputs} requested output tokens"
