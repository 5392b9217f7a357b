"""What a grammar backend provides, and the compile pool and cache every backend shares.

A request's constraint is one `(kind, text)` key: kind is "json" (`json_schema`, or "$$ANY$$"
for OpenAI's `json_object`), "regex" or "ebnf". The backend compiles each distinct key once, in
a worker thread (off the scheduler loop), and keeps the result keyed by that text: every later
request with the same key gets a fresh matcher over the cached compiled grammar at no cost.
A compile failure is cached too, as an `InvalidGrammar` carrying the compiler's message.

`BaseGrammarObject` is one request's matcher: it advances with each sampled token and writes its
row of the batch's token bitmask (see vocab_mask.py).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from threading import Lock
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

# Upstream's json_schema value for "any JSON value" (OpenAI's json_object is {"type": "object"}).
ANY_JSON_OBJECT = "$$ANY$$"
# Compiles run on these threads; xgrammar releases the GIL while compiling.
COMPILE_THREADS = 2
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")
_KIND_OF_FIELD = {"json_schema": "json", "regex": "regex", "ebnf": "ebnf"}


@dataclass(frozen=True)
class InvalidGrammar:
    """A constraint that does not compile; `message` is the compiler's, for the HTTP 400."""

    message: str


def grammar_key(sampling_params: Any) -> Optional[tuple[str, str]]:
    """The request's constraint as a cache key, or None. `SamplingParams.verify` has already
    checked that there is at most one and that it is a string."""
    for name in GRAMMAR_FIELDS:
        value = getattr(sampling_params, name, None)
        if value is not None:
            return _KIND_OF_FIELD[name], value
    return None


class BaseGrammarObject:
    """One request's position in its grammar."""

    def accept_token(self, token: int) -> bool:
        """Advance past `token`; False when the grammar does not allow it."""
        raise NotImplementedError

    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        raise NotImplementedError

    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of the int32 bitmask."""
        raise NotImplementedError


class BaseGrammarBackend:
    """Compile pool plus cache keyed by `(kind, text)`; subclasses supply `compile` and
    `new_matcher`."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar")
        self._cache: dict[tuple[str, str], Future] = {}
        self._lock = Lock()
        self.compile_count = 0

    def get_future(self, key: tuple[str, str]) -> Future:
        """The (maybe finished) compile of `key`: a compiled grammar or an InvalidGrammar."""
        with self._lock:
            fut = self._cache.get(key)
            if fut is None:
                fut = self._executor.submit(self._compile_safely, key)
                self._cache[key] = fut
            return fut

    def _compile_safely(self, key: tuple[str, str]) -> Any:
        self.compile_count += 1
        try:
            return self.compile(*key)
        except Exception as e:  # the compiler's own message is what the client needs to see
            return InvalidGrammar(compiler_message(e))

    def compile(self, kind: str, text: str) -> Any:
        raise NotImplementedError

    def new_matcher(self, compiled: Any, stop_token_ids: list[int]) -> BaseGrammarObject:
        raise NotImplementedError

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def compiler_message(exc: BaseException) -> str:
    """The compiler's explanation without its C++ source location prefix."""
    text = str(exc).strip()
    # xgrammar prefixes "[hh:mm:ss] /path/file.cc:123: " and sometimes "Check failed: ...".
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
        head, sep, rest = text.partition(": ")
        if sep and (".cc:" in head or ".h:" in head):
            text = rest
    text = text.replace("Check failed: (error.empty()) is false: ", "")
    return text.splitlines()[0] if text else type(exc).__name__


def create_grammar_backend(
    server_args: Any, tokenizer: Any, vocab_size: int
) -> Optional[BaseGrammarBackend]:
    """The backend `--grammar-backend` names, or None for "none"."""
    name = server_args.grammar_backend
    if name == "none":
        return None
    if name == "xgrammar":
        from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend

        return XGrammarGrammarBackend(
            tokenizer,
            vocab_size,
            any_whitespace=not server_args.constrained_json_disable_any_whitespace,
        )
    raise ValueError(f"grammar backend {name!r} is not built in")
