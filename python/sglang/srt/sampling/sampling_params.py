"""Per-request sampling parameters: the `sampling_params` object of `/generate`.

Owns the field set and defaults (docs/compat.md), type and range validation (`verify`, whose
ValueError becomes an HTTP 400 naming the field; the bounds are in docs/request_fields.md), and
canonicalisation (`normalize`) into the shapes the scheduler and `SamplingBatchInfo` read: `stop`
as a list of strings, `stop_token_ids` as a set, `logit_bias` keyed by int token ids.

Greedy decoding is exposed as the `is_greedy` property (temperature below 1e-6, or top_k == 1);
`normalize` leaves `temperature` and `top_k` as the client sent them so they can be echoed back.
`json_schema` / `regex` / `ebnf` (at most one per request) are checked for type here; whether
they compile is the scheduler's grammar backend's call (constrained/), which answers HTTP 400
with the compiler's message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows float32.
GREEDY_TEMPERATURE_EPS = 1e-6
# Upper bounds (docs/request_fields.md). n: OpenAI's documented maximum for chat.
MAX_N = 128
# Every stop string is searched for in the text after each token.
MAX_STOP_STRINGS = 64
# OpenAI's documented logit_bias range; larger biases only overflow the logits.
LOGIT_BIAS_LIMIT = 100.0
_GRAMMARS = ("json_schema", "regex", "ebnf")
_FLAGS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | set[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: dict[str | int, float] | None = None
    sampling_seed: int | None = None
    custom_params: dict[str, Any] | None = field(default=None)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a request dict; unknown keys are a client error, not silently dropped."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        check_sampling_keys(d)
        return cls(**d)

    @property
    def is_greedy(self) -> bool:
        """True when the request must take the argmax token (temperature ~0 or top_k == 1)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def stop_str_max_len(self) -> int:
        """Length in characters of the longest stop string (0 when there are none)."""
        stop = self.stop
        if stop is None:
            return 0
        if isinstance(stop, str):
            return len(stop)
        return max((len(s) for s in stop), default=0)

    def verify(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first out-of-range field and its allowed range."""
        _number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _integer("top_k", self.top_k)
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        _number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _number("repetition_penalty", self.repetition_penalty)
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.max_new_tokens is not None:
            _integer("max_new_tokens", self.max_new_tokens)
            if self.max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        _integer("min_new_tokens", self.min_new_tokens)
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        _integer("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.sampling_seed is not None:
            _integer("sampling_seed", self.sampling_seed)
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        self._verify_stop(vocab_size)
        self._verify_logit_bias(vocab_size)
        given = [name for name in _GRAMMARS if getattr(self, name) is not None]
        for name in given:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if len(given) > 1:
            raise ValueError(
                "only one of json_schema, regex and ebnf may be set in a request; "
                f"got {', '.join(given)}"
            )
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise ValueError("custom_params must be an object or null")

    def _verify_stop(self, vocab_size: int | None) -> None:
        stop = self.stop
        if stop is not None and not isinstance(stop, str):
            listed = isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)
            if not listed:
                raise ValueError("stop must be a string or a list of strings")
            if len(stop) > MAX_STOP_STRINGS:
                raise ValueError(
                    f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}"
                )
        if stop == "" or (isinstance(stop, (list, tuple)) and "" in stop):
            raise ValueError("stop strings must not be empty")
        if self.stop_token_ids is None:
            return
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            raise ValueError("stop_token_ids must be a list of token ids")
        upper = "vocab_size" if vocab_size is None else f"vocab_size={vocab_size}"
        for tid in self.stop_token_ids:
            if not _is_int(tid) or tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise ValueError(f"stop_token_ids entries must be in [0, {upper}), got {tid!r}")

    def _verify_logit_bias(self, vocab_size: int | None) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias must be an object mapping token id to bias")
        upper = "vocab_size" if vocab_size is None else f"vocab_size={vocab_size}"
        for key, bias in self.logit_bias.items():
            tid = _token_key(key)
            if tid is None or tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise ValueError(f"logit_bias keys must be token ids in [0, {upper}), got {key!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
                raise ValueError(f"logit_bias[{key!r}] must be a number, got {bias!r}")
            if abs(bias) > LOGIT_BIAS_LIMIT:
                raise ValueError(
                    f"logit_bias[{key!r}] must be in [-{LOGIT_BIAS_LIMIT:g}, "
                    f"{LOGIT_BIAS_LIMIT:g}], got {bias!r}"
                )

    def normalize(self) -> SamplingParams:
        """Canonicalise in place (idempotent) after `verify`; returns self for chaining."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = set(self.stop_token_ids or ())
        if self.logit_bias is not None:
            # JSON object keys arrive as strings ("50256"); the batch builder wants ints.
            self.logit_bias = {int(_token_key(k)): float(v) for k, v in self.logit_bias.items()}
        return self


def check_sampling_keys(d: dict[str, Any]) -> None:
    """ValueError naming every key that is not a sampling parameter (with a likely fix)."""
    from sglang.srt.entrypoints.request_fields import did_you_mean

    known = {f.name for f in fields(SamplingParams)}
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        hints = []
        for name in unknown:
            guess = did_you_mean(name, known)
            # OpenAI's name for the same knob is the usual slip on /generate.
            guess = guess or {"max_tokens": "max_new_tokens", "seed": "sampling_seed"}.get(name)
            hints.append(f"{name} (did you mean {guess!r}?)" if guess else name)
        raise ValueError(
            f"Unknown sampling parameter(s): {', '.join(hints)}. "
            f"Allowed: {', '.join(sorted(known))}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(name: str, value: Any) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _number(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _token_key(key: Any) -> int | None:
    """Parse a logit_bias key (int or decimal string); None when it is neither."""
    if _is_int(key):
        return key
    if isinstance(key, str):
        try:
            return int(key.strip())
        except ValueError:
            return None
    return None
