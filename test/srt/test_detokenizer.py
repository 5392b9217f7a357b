"""Incremental detokenization (managers/detokenizer_manager.py): cost per token and exactness.

Counted in token ids handed to the tokenizer's decode, not in seconds, so the checks hold on any
machine: the work for one more token must not grow with the length of the output, with stop
strings and attention records on (the path that used to re-decode the whole prefix per token).
"""

from __future__ import annotations

import pytest

from sglang.srt.hf_transformers_utils import get_tokenizer
from sglang.srt.managers.detokenizer_manager import DecodeState
from sglang.srt.managers.io_struct import DetokenizeOptions
from sglang.srt.model_loader import resolve_model_path

TEXT = (
    "The river ran past the old mill, where the miller's daughter counted sacks of flour "
    "and sang about the sea. Nobody in the village had seen the sea, but everyone knew the song. "
)


class CountingTokenizer:
    """The real tokenizer, counting how many ids each decode is given."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.ids_decoded = 0

    def decode(self, ids: list[int], **kwargs: object) -> str:
        self.ids_decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(resolve_model_path("smollm2-135m-instruct"))


def _ids(tokenizer: object, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def _stream(tok: CountingTokenizer, ids: list[int], stop: list[str]) -> list[int]:
    """Feed ids one at a time with one attention record each; ids decoded per token."""
    state = DecodeState(DetokenizeOptions(stop=stop))
    per_token = []
    for i, t in enumerate(ids):
        before = tok.ids_decoded
        state.add(tok, [t], None)
        state.release_attention(tok, [i], None)
        per_token.append(tok.ids_decoded - before)
    return per_token


def test_cost_per_token_independent_of_output_length(tokenizer):
    tok = CountingTokenizer(tokenizer)
    per_token = _stream(tok, _ids(tokenizer, 1200), stop=["never appears in this text"])
    early, late = per_token[100:200], per_token[1100:1200]
    # Bounded by a few context windows per token, whatever the position.
    assert max(late) <= 40, max(late)
    assert sum(late) <= sum(early) + 100, (sum(early), sum(late))


def test_attention_released_with_text_and_cut_at_stop(tokenizer):
    """Records come out once their token's text is shown; on a stop-string finish, the records
    of tokens cut with the stop string are dropped, exactly as decoding the prefix says."""
    ids = _ids(tokenizer, 120)
    full = tokenizer.decode(ids)
    stop = "the sea"
    cut = full.index(stop)
    # The token that completes the stop string (the scheduler finishes the request there).
    last = next(j for j in range(len(ids)) if stop in tokenizer.decode(ids[: j + 1]))
    state = DecodeState(DetokenizeOptions(stop=[stop]))
    text, released = "", []
    for i, t in enumerate(ids[: last + 1]):
        finish = {"type": "stop", "matched": stop} if i == last else None
        text += state.add(tokenizer, [t], finish)
        released += state.release_attention(tokenizer, [i], finish)
    assert text == full[:cut]
    starts = [len(tokenizer.decode(ids[:j])) for j in range(last + 1)]
    assert released == [j for j in range(last + 1) if starts[j] < cut]
