"""`--log-requests`: one log line when a request arrives and one when it finishes.

The TokenizerManager owns one RequestLogger when the flag is on and calls `received(obj)` after a
request is validated and sent to the scheduler, and `finished(obj, out)` with the final output
dict (the one `/generate` returns). Line formats follow upstream SGLang, which log scrapers match:
`Receive: obj=GenerateReqInput(rid='...', ...)` and `Finish: obj=GenerateReqInput(...), out={...}`.

`--log-requests-level` picks the detail, as upstream:
  0: metadata only (rid, flags, counts; no prompt, no sampling parameters, no output text/ids);
  1: plus the sampling parameters;
  2: plus the prompt and the output, each string or list cut to 2048 characters/items;
  3: everything, uncut.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

PARTIAL_LIMIT = 2048  # level 2: longest string / list shown before "..."
# Request fields that carry the prompt, and output keys that carry the generated tokens.
_INPUT_FIELDS = frozenset({"text", "input_ids", "lora_path"})
_OUTPUT_KEYS = frozenset({"text", "output_ids"})


class RequestLogger:
    def __init__(self, level: int) -> None:
        if level not in (0, 1, 2, 3):
            raise ValueError(f"log_requests_level must be 0, 1, 2 or 3, got {level!r}")
        self.level = level
        self.limit = PARTIAL_LIMIT if level == 2 else None
        self.skip_fields: frozenset[str] = frozenset()
        self.skip_keys: frozenset[str] = frozenset()
        if level <= 1:
            self.skip_fields = _INPUT_FIELDS | ({"sampling_params"} if level == 0 else set())
            self.skip_keys = _OUTPUT_KEYS

    def received(self, obj: Any) -> None:
        logger.info("Receive: obj=%s", self.format_request(obj))

    def finished(self, obj: Any, out: dict[str, Any]) -> None:
        shown = {k: v for k, v in out.items() if k not in self.skip_keys}
        logger.info("Finish: obj=%s, out=%s", self.format_request(obj), self._fmt(shown))

    def format_request(self, obj: Any) -> str:
        parts = [
            f"{f.name}={self._fmt(getattr(obj, f.name))}"
            for f in dataclasses.fields(obj)
            if f.init and f.name not in self.skip_fields
        ]
        return f"{type(obj).__name__}({', '.join(parts)})"

    def _fmt(self, value: Any) -> str:
        limit = self.limit
        if isinstance(value, str):
            if limit is not None and len(value) > limit:
                return repr(value[:limit]) + "..."
            return repr(value)
        if isinstance(value, (list, tuple)):
            items = list(value)
            cut = limit is not None and len(items) > limit
            body = ", ".join(self._fmt(v) for v in (items[:limit] if cut else items))
            return f"[{body}{', ...' if cut else ''}]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {self._fmt(v)}" for k, v in value.items()) + "}"
        return repr(value)
