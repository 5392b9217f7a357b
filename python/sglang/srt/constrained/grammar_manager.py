"""The scheduler's side of constrained decoding: requests waiting for their grammar.

`Scheduler.add_request` hands every request to `GrammarManager.add`. An unconstrained request is
left alone (False: the scheduler queues it as usual). A constrained one starts (or joins) its
grammar's compile and waits here, outside the waiting queue, so a slow compile never holds up
the batch; `poll`, called at the start of every scheduling step, gives each request whose
grammar is ready a fresh matcher and returns it for the waiting queue, and ends the ones whose
grammar did not compile with HTTP 400 and the compiler's message.

Under TP every rank compiles for itself; `poll` then waits for the pending compiles so all
ranks admit the same requests in the same step.

The matcher advances with each sampled token (scheduler_output_processor.py). Retraction keeps
a request's output tokens (it re-prefills them), so its matcher state stays valid as it is.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from sglang.srt.constrained.base_grammar_backend import (
    BaseGrammarBackend,
    InvalidGrammar,
    create_grammar_backend,
    grammar_key,
)

logger = logging.getLogger(__name__)

BACKEND_NONE = (
    "constrained decoding (json_schema, regex, ebnf, response_format) is off on this server: "
    "it was started with --grammar-backend none"
)


class GrammarManager:
    def __init__(
        self,
        server_args: Any,
        tokenizer: Any,
        vocab_size: int,
        on_invalid: Callable[[Any, str], None],
    ) -> None:
        self.backend: Optional[BaseGrammarBackend] = create_grammar_backend(
            server_args, tokenizer, vocab_size
        )
        self.on_invalid = on_invalid  # (req, message): finish it with HTTP 400
        self.blocking = getattr(server_args, "tp_size", 1) > 1
        self.queue: list[tuple[Any, Any]] = []  # (req, compile future), in arrival order

    def add(self, req: Any) -> bool:
        """True when the request is constrained and now waits here (or already failed)."""
        key = grammar_key(req.sampling_params)
        if key is None:
            return False
        if self.backend is None:
            self.on_invalid(req, BACKEND_NONE)
            return True
        self.queue.append((req, self.backend.get_future(key)))
        return True

    def poll(self) -> list[Any]:
        """The waiting requests whose grammar is ready, each with its matcher set."""
        if not self.queue:
            return []
        if self.blocking:
            for _, fut in self.queue:
                fut.result()
        ready, waiting = [], []
        for req, fut in self.queue:
            if not fut.done():
                waiting.append((req, fut))
                continue
            compiled = fut.result()
            if isinstance(compiled, InvalidGrammar):
                self.on_invalid(req, compiled.message)
                continue
            req.grammar = self.backend.new_matcher(compiled, sorted(req.eos_token_ids))
            ready.append(req)
        self.queue = waiting
        return ready

    def remove(self, rid: str) -> Optional[Any]:
        """Take the waiting request `rid` out of the queue (an abort); None when not here."""
        for i, (req, _) in enumerate(self.queue):
            if req.rid == rid:
                self.queue.pop(i)
                return req
        return None

    def rids(self) -> list[str]:
        return [req.rid for req, _ in self.queue]

    def has_waiting(self) -> bool:
        return bool(self.queue)
