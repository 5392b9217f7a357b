"""The xgrammar grammar backend (`--grammar-backend xgrammar`, the default).

Compiles JSON schemas, regexes and EBNF grammars (xgrammar's GBNF dialect, `root ::= ...`)
against the served tokenizer, and wraps xgrammar's `GrammarMatcher` as a request's grammar
object. The tokenizer's vocabulary table (`TokenizerInfo`, ~0.5 s to build) is made on the first
compile, in the compile thread, so servers that never see a constraint never pay for it.
"""

from __future__ import annotations

import json
import logging
from threading import Lock
from typing import Any, Optional

import torch
import xgrammar as xgr

from sglang.srt.constrained.base_grammar_backend import (
    ANY_JSON_OBJECT,
    BaseGrammarBackend,
    BaseGrammarObject,
)

logger = logging.getLogger(__name__)


class XGrammarGrammar(BaseGrammarObject):
    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept_token(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


class XGrammarGrammarBackend(BaseGrammarBackend):
    def __init__(self, tokenizer: Any, vocab_size: int, any_whitespace: bool = True) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.any_whitespace = any_whitespace
        self._compiler: Optional[xgr.GrammarCompiler] = None
        self._compiler_lock = Lock()

    def compiler(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError(
                        "constrained decoding needs the tokenizer; start the server without "
                        "--skip-tokenizer-init"
                    )
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        compiler = self.compiler()
        if kind == "json":
            if text == ANY_JSON_OBJECT:
                return compiler.compile_builtin_json_grammar()  # any JSON value, as upstream
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
            return compiler.compile_json_schema(text, any_whitespace=self.any_whitespace)
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "ebnf":
            return compiler.compile_grammar(text)
        raise ValueError(f"unknown constraint kind {kind!r}")

    def new_matcher(
        self, compiled: xgr.CompiledGrammar, stop_token_ids: list[int]
    ) -> XGrammarGrammar:
        # The request's own EOS set ends the grammar, not only the tokenizer's.
        stops = sorted(stop_token_ids) or None
        return XGrammarGrammar(xgr.GrammarMatcher(compiled, override_stop_tokens=stops))
