"""Chat templates on the OpenAI chat route: SmolLM2's own template and the override forms.

Split from test_openai_protocol.py, whose scripted TokenizerManager stand-in it reuses.
"""

from __future__ import annotations

import json

import pytest
from test_openai_protocol import CHAT, FakeTokenizerManager

from sglang.srt.entrypoints.openai.chat_template import ChatTemplate, load_chat_template
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat


@pytest.fixture(scope="module")
def smol_tokenizer():
    from sglang.srt.hf_transformers_utils import get_tokenizer

    return get_tokenizer("smollm2-135m-instruct")


def test_chat_template_with_smollm2(smol_tokenizer):
    tm = FakeTokenizerManager(tokenizer=smol_tokenizer)
    serving = OpenAIServingChat(tm)
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "response_format": {"type": "text"},
        }
    )
    plan = serving.plan(req)
    text = smol_tokenizer.decode(plan.prompt_ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    (kw,) = plan.reqs
    assert kw["input_ids"] == plan.prompt_ids
    sp = kw["sampling_params"]
    assert sp["max_new_tokens"] == tm.context_len - len(plan.prompt_ids)
    assert "json_schema" not in sp
    assert "stop_token_ids" not in sp  # the tokenizer's own template: <|im_end|> is EOS already

    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3}
    )
    plan = serving.plan(req)
    assert smol_tokenizer.decode(plan.prompt_ids).startswith("<|im_start|>system\nYou are")
    assert plan.reqs[0]["sampling_params"]["max_new_tokens"] == 3

    cont = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hel"},
            ],
            "continue_final_message": True,
        }
    )
    assert serving.render_prompt(cont).endswith("<|im_start|>assistant\nHel")


def test_template_overrides(smol_tokenizer, tmp_path):
    source = "{% for m in messages %}[{{ m['content'] }}|{{ flavor }}]{% endfor %}"
    (tmp_path / "t.jinja").write_text(source)
    (tmp_path / "t.json").write_text(json.dumps({"chat_template": source}))
    msgs = [{"role": "user", "content": "q"}]
    for path in ("t.jinja", "t.json"):
        template = load_chat_template(str(tmp_path / path))
        out = template.render(smol_tokenizer, msgs, template_kwargs={"flavor": "x"})
        assert out == "[q|x]"
    chatml = load_chat_template("chatml")
    assert (
        chatml.render(smol_tokenizer, msgs)
        == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chatml.stop_token_ids(smol_tokenizer) == [
        smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    with pytest.raises(ValueError, match="Unknown chat template"):
        load_chat_template("no-such-template")
    with pytest.raises(ValueError, match="chat template"):
        ChatTemplate(source="{% if %}").render(smol_tokenizer, msgs)

    tm = FakeTokenizerManager(tokenizer=smol_tokenizer, chat_template="chatml")
    (kw,) = OpenAIServingChat(tm).plan(ChatCompletionRequest.model_validate(CHAT)).reqs
    assert kw["sampling_params"]["stop_token_ids"] == chatml.stop_token_ids(smol_tokenizer)
