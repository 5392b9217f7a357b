"""Chat-template selection and rendering for `/v1/chat/completions`.

Owns what `--chat-template` means: a path to a Jinja file (or a JSON file with a `chat_template`
key, as tokenizer_config.json has), or one of a few built-in names. Without the flag the tokenizer's
own template is used. The serving layer calls `ChatTemplate.render` to turn OpenAI messages into
prompt token ids; the ids (not text) cross into the engine so a BOS written by the template is not
added a second time by the tokenizer.

Stop tokens: the tokenizer's own template ends turns with a token the model config already treats as
EOS. A built-in override names its end-of-turn string, which the serving layer adds as a stop token
id when the vocabulary has it.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# name -> (jinja source, end-of-turn string)
BUILTIN_TEMPLATES: dict[str, tuple[str, str]] = {
    "chatml": (_CHATML, "<|im_end|>"),
    "qwen": (_CHATML, "<|im_end|>"),
    "llama-3-instruct": (_LLAMA3, "<|eot_id|>"),
}


class ChatTemplate(NamedTuple):
    """A template override (`source` None means the tokenizer's own) and its turn-end strings."""

    source: str | None = None
    stop_strings: tuple[str, ...] = ()

    def render(
        self,
        tokenizer: Any,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text; template or argument problems raise ValueError (an HTTP 400)."""
        kwargs = dict(template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        if self.source is not None:
            kwargs["chat_template"] = self.source
        elif getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The tokenizer has no chat template; start the server with --chat-template"
            )
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        except ValueError:
            raise
        except Exception as exc:  # jinja2 TemplateError and friends: the messages did not fit
            raise ValueError(f"Cannot apply the chat template: {exc}") from exc
        if not isinstance(text, str):
            raise ValueError("The chat template did not render to text")
        return text

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the override's turn-end strings that are single tokens in the vocabulary."""
        ids = []
        unk = getattr(tokenizer, "unk_token_id", None)
        for s in self.stop_strings:
            tid = tokenizer.convert_tokens_to_ids(s)
            if isinstance(tid, int) and tid != unk:
                ids.append(tid)
        return ids


def load_chat_template(value: str | None) -> ChatTemplate:
    """Resolve a `--chat-template` value; unknown names and unreadable files raise ValueError."""
    if not value:
        return ChatTemplate()
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            source = f.read()
        if value.endswith(".json"):
            data = json.loads(source)
            source = data.get("chat_template") if isinstance(data, dict) else data
            if not isinstance(source, str):
                raise ValueError(f"{value} has no string 'chat_template' entry")
        return ChatTemplate(source=source)
    if value in BUILTIN_TEMPLATES:
        source, stop = BUILTIN_TEMPLATES[value]
        return ChatTemplate(source=source, stop_strings=(stop,))
    names = ", ".join(sorted(BUILTIN_TEMPLATES))
    raise ValueError(f"Unknown chat template {value!r}: not a file and not one of {names}")
