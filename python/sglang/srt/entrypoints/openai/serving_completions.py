"""`/v1/completions`: OpenAI legacy completions on top of `TokenizerManager.generate_request`.

Owns the prompt forms (string, list of strings, token ids, list of token-id lists), `echo`
(the prompt text, and with `logprobs` the prompt-token logprobs via `logprob_start_len=0`, which is
how lm-eval scores loglikelihood with `max_tokens` 0 or 1), the legacy logprobs object and the
`text_completion` stream. `suffix` is rejected, and so is a `best_of` other than `n` (ranking
samples is not implemented; `best_of` equal to `n`, as bench_serving sends, changes nothing).

`text_offset` entries are character offsets into the choice's returned `text` (so with echo they
start at 0 on the prompt), computed from the decoded token strings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from sglang.srt.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    now,
    random_id,
)
from sglang.srt.managers.layer_probes import openai_extras
from sglang.srt.entrypoints.openai.serving_base import (
    ServingBase,
    StreamCursor,
    choice_requests,
    finish_of,
    sampling_params_for,
    token_text,
    usage_of,
)


class CompletionPlan(NamedTuple):
    """What one completions request turns into: ids, the per-choice generate kwargs, prompts."""

    id: str
    created: int
    reqs: list[dict[str, Any]]
    prompts: list[str | list[int]]


def normalize_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Any]:
    """A list with one entry per prompt, each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


class OpenAIServingCompletion(ServingBase):
    def plan(self, request: CompletionRequest) -> CompletionPlan:
        """Validate and convert; raises ValueError (HTTP 400) for requests we cannot serve."""
        if request.suffix:
            raise ValueError("suffix is not supported")
        if request.best_of is not None and request.best_of != request.n:
            raise ValueError(
                f"best_of={request.best_of} with n={request.n} is not supported yet: this server "
                "returns every sample, so best_of must equal n (or be left out)"
            )
        prompts = normalize_prompts(request.prompt)
        max_new = 16 if request.max_tokens is None else request.max_tokens
        params = sampling_params_for(request, max_new)
        want_logprobs = request.logprobs is not None
        rid = random_id("cmpl")
        reqs = choice_requests(
            request,
            [{"text": p} if isinstance(p, str) else {"input_ids": p} for p in prompts],
            [params] * len(prompts),
            rid,
            return_logprob=want_logprobs,
            logprob_start_len=0 if (request.echo and want_logprobs) else -1,
            top_logprobs_num=request.logprobs or 0,
        )
        return CompletionPlan(rid, now(), reqs, prompts)

    # ------------------------------------------------------------ non-streaming

    def build_response(
        self, request: CompletionRequest, plan: CompletionPlan, finals: list[dict[str, Any]]
    ) -> CompletionResponse:
        choices = []
        for index, out in enumerate(finals):
            meta = out.get("meta_info", {})
            prefix = self.echo_text(plan.prompts[index // request.n]) if request.echo else ""
            logprobs = None
            if request.logprobs is not None:
                logprobs = self.logprobs(meta, include_input=request.echo, offset=0)
            finish = finish_of(meta)
            choices.append(
                CompletionResponseChoice(
                    index=index,
                    text=prefix + out.get("text", ""),
                    logprobs=logprobs,
                    finish_reason=finish.reason,
                    matched_stop=finish.matched,
                    **self.extras(request, meta),
                )
            )
        return CompletionResponse(
            id=plan.id,
            created=plan.created,
            model=self.model_name(request),
            choices=choices,
            usage=usage_of(finals, request.n, self.enable_cache_report),
        )

    def echo_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt)

    def logprobs(
        self,
        meta: dict[str, Any],
        *,
        include_input: bool,
        offset: int,
        output: tuple[list[Any], list[Any]] | None = None,
    ) -> CompletionLogProbs:
        """Legacy logprobs; `output` overrides meta's output lists (a stream chunk's new slice)."""
        pairs: list[tuple[Any, Any]] = []
        if include_input:
            lps = meta.get("input_token_logprobs") or []
            pairs.extend(_pad_zip(lps, meta.get("input_top_logprobs")))
        if output is None:
            output = (meta.get("output_token_logprobs") or [], meta.get("output_top_logprobs"))
        pairs.extend(_pad_zip(*output))
        result = CompletionLogProbs()
        for entry, top in pairs:
            text = token_text(entry, self.tokenizer)
            result.tokens.append(text)
            result.token_logprobs.append(entry[0])
            result.text_offset.append(offset)
            offset += len(text)
            if top is None:
                result.top_logprobs.append(None if entry[0] is None else {})
            else:
                result.top_logprobs.append({token_text(t, self.tokenizer): t[0] for t in top})
        return result

    # ------------------------------------------------------------ streaming

    def stream(
        self, request: CompletionRequest, plan: CompletionPlan, raw_request: Any
    ) -> AsyncIterator[str]:
        model = self.model_name(request)

        def chunk(choice: CompletionResponseStreamChoice) -> CompletionStreamResponse:
            return CompletionStreamResponse(
                id=plan.id, created=plan.created, model=model, choices=[choice]
            )

        def on_output(index: int, out: dict[str, Any], cursor: StreamCursor) -> list[Any]:
            meta = out.get("meta_info", {})
            first = not cursor.started
            cursor.started = True
            piece = ""
            if first and request.echo:
                piece = self.echo_text(plan.prompts[index // request.n])
            piece += self.text_delta(cursor, out)
            logprobs = None
            if request.logprobs is not None:
                new = cursor.new_logprobs(meta)
                if new[0] or (first and request.echo):
                    logprobs = self.logprobs(
                        meta,
                        include_input=first and request.echo,
                        offset=cursor.char_offset,
                        output=new,
                    )
                    cursor.char_offset = _next_offset(logprobs, cursor.char_offset)
            finish = finish_of(meta)
            extras: dict[str, Any] = {}
            if request.return_attention_tokens:
                extras["attention_tokens"] = cursor.attention_delta(meta.get("attention_tokens"))
            extras.update(openai_extras(meta, stream=True))
            if not (piece or logprobs or finish.reason or any(extras.values())):
                return []
            chunks = [
                chunk(
                    CompletionResponseStreamChoice(
                        index=index,
                        text=piece,
                        logprobs=logprobs,
                        finish_reason=finish.reason,
                        matched_stop=finish.matched,
                        **extras,
                    )
                )
            ]
            if finish.reason is not None and request.return_hidden_states:
                # As upstream: the last token's hidden state in its own chunk after the finish.
                hidden = self.extras(request, meta).get("hidden_states")
                choice = CompletionResponseStreamChoice(index=index, text="", hidden_states=hidden)
                chunks.append(chunk(choice))
            return chunks

        on_usage = self.usage_chunk_builder(request, plan, model, CompletionStreamResponse)
        return self.stream_events(plan.reqs, raw_request, on_output, on_usage)


def _pad_zip(lps: list[Any], tops: list[Any] | None) -> list[tuple[Any, Any]]:
    tops = list(tops or [])
    tops += [None] * (len(lps) - len(tops))
    return list(zip(lps, tops))


def _next_offset(logprobs: CompletionLogProbs, start: int) -> int:
    if not logprobs.tokens:
        return start
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])
