"""hidden_states_layers and logit_lens over HTTP, against HuggingFace float32 eager.

One server on a tiny random-weight Llama with the default model's tokenizer (3 layers, hidden 64),
`--chunked-prefill-size 16` (the long prompt takes several chunks), attention tokens on and a small
`--hidden-states-max-bytes`. Checked: /generate (a prefix hit, base64 rows, the logit lens inside
attention content entries), /v1/completions and /v1/chat/completions (streaming and not, through
the official client's extra_body), and the 400s naming the field. Reference:
python/sglang/test/layer_probe_reference.py.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import requests

from sglang.test.layer_probe_reference import check_hidden, check_lens, lens_pairs, reference
from sglang.test.runners import HFRunner, chat_prompt_ids, cpu_threads_hint
from sglang.test.served_tiny import served_tiny_fixtures

cpu_threads_hint()
LAYERS, HIDDEN, MAX_NEW = 3, 64, 4
MAX_BYTES = 2 * HIDDEN * 4 * 64  # two layers for 64 tokens
ARGS = ["--max-total-tokens", "8192", "--dtype", "float32", "--return-attention-tokens",
        "--attention-tokens-top-k", "4", "--chunked-prefill-size", "16",
        "--hidden-states-max-bytes", str(MAX_BYTES)]  # fmt: skip
LONG = (
    "The committee met on a grey morning to discuss the harbour, the bridge, the tolls, the "
    "ferries and the old lighthouse, and then it adjourned"
)
CHAT = [{"role": "user", "content": "Name three rivers of France."}]
GREEDY = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}
PROBES = {"hidden_states_layers": [0, -1], "logit_lens": {"layers": [1, 2], "top_n": 3}}


model_dir, server, client, tok, hf = served_tiny_fixtures("tiny-probes", LAYERS, ARGS)


def check_probes(hf: HFRunner, prompt: list[int], fields: dict, output_ids=None) -> None:
    """Check hidden_states_layers ("0", "2") and logit_lens (layers 1, 2, top 3) of one choice.
    Without output_ids they are read off the last layer's lens (greedy: its top-1 is the token)."""
    lens = fields["logit_lens"]
    if output_ids is None:
        output_ids = [step["2"][0]["token_id"] for step in lens]
    assert len(output_ids) == MAX_NEW
    ref = reference(hf, prompt, output_ids)
    rows = fields["hidden_states_layers"]
    assert sorted(rows) == ["0", "2"]
    for layer in (0, 2):
        check_hidden(rows[str(layer)], ref[layer])
    for layer in (1, 2):
        check_lens(hf, lens_pairs(lens, layer), ref[layer], 3)


def test_generate_prefix_hit_base64_and_text(server, hf, tok) -> None:
    prompt = tok.encode(LONG)
    body = {"text": LONG, "sampling_params": GREEDY, **PROBES}
    out = requests.post(f"{server}/generate", json=body, timeout=300).json()
    check_probes(hf, prompt, out["meta_info"], out["output_ids"])
    entry = out["meta_info"]["logit_lens"][0]["1"][0]
    assert entry["token"] == tok.decode([entry["token_id"]])
    # Again: a prefix hit, rows as base64 little-endian float32.
    body["hidden_states_format"] = "base64"
    again = requests.post(f"{server}/generate", json=body, timeout=300).json()
    meta = again["meta_info"]
    assert meta["cached_tokens"] > 0 and again["output_ids"] == out["output_ids"]
    meta["hidden_states_layers"] = {
        layer: [np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]
        for layer, rows in meta["hidden_states_layers"].items()
    }
    check_probes(hf, prompt, meta, again["output_ids"])


def test_generate_lens_in_attention_entries(server, hf, tok) -> None:
    body = {"text": LONG, "sampling_params": GREEDY, "return_attention_tokens": True,
            "logit_lens": {"layers": [1, 2], "top_n": 3}}  # fmt: skip
    out = requests.post(f"{server}/generate", json=body, timeout=300).json()
    meta = out["meta_info"]
    assert "logit_lens" not in meta and "hidden_states_layers" not in meta
    content = meta["attention_tokens"]["content"]
    assert len(content) == MAX_NEW
    steps = [e["logit_lens"] for e in content]
    ref = reference(hf, tok.encode(LONG), out["output_ids"])
    for layer in (1, 2):
        check_lens(hf, lens_pairs(steps, layer), ref[layer], 3)


def test_openai_completions(client, hf, tok) -> None:
    kwargs = dict(model="x", prompt=LONG, max_tokens=MAX_NEW, temperature=0.0)
    extra = {**PROBES, "ignore_eos": True}
    resp = client.completions.create(**kwargs, extra_body=extra)
    check_probes(hf, tok.encode(LONG), resp.choices[0].model_extra)
    merged = {"hidden_states_layers": {"0": [], "2": []}, "logit_lens": []}
    for chunk in client.completions.create(**kwargs, stream=True, extra_body=extra):
        fields = chunk.choices[0].model_extra if chunk.choices else {}
        for layer, rows in (fields.get("hidden_states_layers") or {}).items():
            merged["hidden_states_layers"][layer] += rows
        merged["logit_lens"] += fields.get("logit_lens") or []
    check_probes(hf, tok.encode(LONG), merged)


def test_openai_chat(client, hf, tok) -> None:
    prompt = chat_prompt_ids(tok, CHAT)
    kwargs = dict(model="x", messages=CHAT, max_tokens=MAX_NEW, temperature=0.0)
    extra = {**PROBES, "ignore_eos": True}
    resp = client.chat.completions.create(**kwargs, extra_body=extra)
    check_probes(hf, prompt, resp.choices[0].model_extra)
    merged = {"hidden_states_layers": {"0": [], "2": []}, "logit_lens": []}
    for chunk in client.chat.completions.create(**kwargs, stream=True, extra_body=extra):
        fields = chunk.choices[0].model_extra if chunk.choices else {}
        for layer, rows in (fields.get("hidden_states_layers") or {}).items():
            merged["hidden_states_layers"][layer] += rows
        merged["logit_lens"] += fields.get("logit_lens") or []
    check_probes(hf, prompt, merged)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"hidden_states_layers": [3]}, "hidden_states_layers: layer 3 is out of range"),
        ({"hidden_states_layers": [-4]}, "hidden_states_layers: layer -4 is out of range"),
        ({"hidden_states_layers": []}, "hidden_states_layers must be a non-empty list"),
        ({"hidden_states_layers": [0], "hidden_states_format": "hex"}, "hidden_states_format"),
        ({"hidden_states_format": "base64"}, "hidden_states_format needs hidden_states_layers"),
        ({"hidden_states_layers": [0, 1, 2]}, "--hidden-states-max-bytes"),
        ({"logit_lens": {"layers": [5]}}, "logit_lens.layers: layer 5 is out of range"),
        ({"logit_lens": {"layers": [0], "top_n": 21}}, "logit_lens.top_n"),
        ({"logit_lens": {"layer": [0]}}, "logit_lens: unknown key 'layer'"),
        ({"logit_lens": [0, 1]}, "logit_lens must be an object"),
    ],
)
def test_bad_requests_are_400(server, fields, fragment) -> None:
    params = {"max_new_tokens": 64, "temperature": 0.0}
    resp = requests.post(f"{server}/generate",
                         json={"text": "hi", "sampling_params": params, **fields}, timeout=60)  # fmt: skip
    assert resp.status_code == 400, resp.text
    assert fragment in resp.text
    for route, body in (
        ("completions", {"prompt": "hi"}),
        ("chat/completions", {"messages": CHAT}),
    ):
        resp = requests.post(f"{server}/v1/{route}",
                             json={"model": "x", "max_tokens": 64, **body, **fields}, timeout=60)  # fmt: skip
        assert resp.status_code == 400, resp.text
        assert fragment in resp.json()["message"]
