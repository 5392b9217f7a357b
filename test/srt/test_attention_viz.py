"""Tests for sglang.attention_tokens, the client-side module for attention-token reports.

Reports are built by hand in the server's format (docs/attention_tokens.md) from made-up per-layer
attention rows, so the expected rows, merged streams, HTML and bertviz arrays are known exactly.
No server, no model; the whole file runs in about a second.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from html.parser import HTMLParser
from typing import Any, Optional

import pytest

from sglang.attention_tokens import (
    extract_report,
    layer_labels,
    merge_stream_chunks,
    render_html,
    save_html,
    to_bertviz,
    to_rows,
    token_strings,
    viewer_asset,
    viewer_page,
)

PROMPT = ["<|im_start|>", "user", "\n", "What", " is", " the", " capital", " of", " France", "?"]
PROMPT += ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
COMPLETION = ["The", " capital", " is", " Paris", " &", " <b>"]
LAYERS = [3, 15, 29]


def _rows_for(layer: int, n_pos: int, seed: int) -> list[float]:
    """A made-up softmax row over positions 0..n_pos-1 with a strong sink at position 0."""
    rng = random.Random(layer * 1000 + seed)
    raw = [rng.random() ** 3 for _ in range(n_pos)]
    raw[0] += 4.0
    total = sum(raw)
    return [x / total for x in raw]


def _top(row: list[float], k: int, sink: int, tokens: list[str]) -> tuple[list[dict], float, float]:
    ranked = sorted((j for j in range(sink, len(row))), key=lambda j: -row[j])[:k]
    top = [
        {
            "position": j,
            "token_id": 1000 + j,
            "token": tokens[j],
            "source": "prompt" if j < len(PROMPT) else "completion",
            "score": row[j],
        }
        for j in ranked
    ]
    return top, sum(row[j] for j in ranked), sum(row[:sink])


def make_report(k: int = 3, aggregation: str = "mean", sink: int = 0) -> dict[str, Any]:
    """A report for PROMPT + COMPLETION over LAYERS as the server would build it."""
    tokens = PROMPT + COMPLETION
    content = []
    for t, tok in enumerate(COMPLETION):
        pos = len(PROMPT) + t
        rows = {layer: _rows_for(layer, pos, t) for layer in LAYERS}  # query pos-1 sees 0..pos-1
        entry: dict[str, Any] = {"token": tok, "token_id": 2000 + t, "position": pos}
        if aggregation == "mean":
            mean = [sum(rows[la][j] for la in LAYERS) / len(LAYERS) for j in range(pos)]
            top, captured, excluded = _top(mean, k, sink, tokens)
            entry["captured_mass"], entry["top_attention"] = captured, top
            if sink:
                entry["excluded_mass"] = excluded
        else:
            per = {str(la): _top(rows[la], k, sink, tokens) for la in LAYERS}
            entry["captured_mass"] = {la: v[1] for la, v in per.items()}
            if sink:
                entry["excluded_mass"] = {la: v[2] for la, v in per.items()}
            entry["layers"] = {la: v[0] for la, v in per.items()}
        content.append(entry)
    return {
        "top_k": k,
        "layers": LAYERS,
        "layer_aggregation": aggregation,
        "head_aggregation": "mean",
        "prompt_tokens": len(PROMPT),
        "exclude_sink": sink,
        "content": content,
    }


def chat_response(report: Optional[dict], n: int = 1) -> dict[str, Any]:
    choices = []
    for i in range(n):
        choice: dict[str, Any] = {
            "index": i,
            "message": {"role": "assistant", "content": "".join(COMPLETION)},
            "finish_reason": "stop",
        }
        if report is not None:
            choice["attention_tokens"] = report if i == 0 else {**report, "top_k": 99}
        choices.append(choice)
    usage = {"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21}
    head = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m"}
    return {**head, "choices": choices, "usage": usage}


def openai_chunks(report: dict[str, Any], sizes: list[int], index: int = 0) -> list[dict]:
    """The OpenAI stream of `report`: header with the first slice, bare slices after it."""
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks, start = [], 0
    for i, size in enumerate(sizes):
        part = report["content"][start : start + size]
        start += size
        att = {**report, "content": part} if i == 0 else {"content": part}
        delta = {"content": "".join(e["token"] for e in part)}
        choice = {"index": index, "delta": delta, "finish_reason": None, "attention_tokens": att}
        chunks.append({**head, "choices": [choice]})
    # the finish chunk without attention, then the usage chunk with no choices
    chunks.append({**head, "choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**head, "choices": []})
    return chunks


# ----------------------------------------------------------------------------- extract


def test_extract_from_report_native_and_openai_dicts() -> None:
    report = make_report()
    assert extract_report(report) is report
    assert extract_report({"text": "x", "meta_info": {"attention_tokens": report}}) is report
    batch = [{"meta_info": {"attention_tokens": {**report, "top_k": i}}} for i in range(3)]
    assert extract_report(batch, index=2)["top_k"] == 2
    resp = chat_response(report, n=2)
    assert extract_report(resp) is report
    assert extract_report(resp, index=1)["top_k"] == 99


def test_extract_from_openai_objects() -> None:
    pytest.importorskip("openai")
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    report = make_report()
    chat = ChatCompletion.model_validate(chat_response(report))
    assert extract_report(chat) == report
    assert extract_report(chat.model_dump()) == report
    comp = Completion.model_validate(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "text": "x", "finish_reason": "stop", "attention_tokens": report}
            ],
        }
    )
    assert extract_report(comp) == report


@pytest.mark.parametrize(
    "response",
    [chat_response(None), {"text": "x", "meta_info": {"prompt_tokens": 3}}, {"choices": []}],
)
def test_missing_report_says_how_to_ask(response: Any) -> None:
    with pytest.raises(ValueError) as err:
        extract_report(response)
    msg = str(err.value)
    assert "no attention_tokens" in msg
    assert "extra_body={'return_attention_tokens': True}" in msg
    assert "--return-attention-tokens" in msg


def test_not_a_response() -> None:
    for bad in (None, 3, "text", {"foo": 1}):
        with pytest.raises(ValueError, match="--return-attention-tokens"):
            extract_report(bad)
    with pytest.raises(ValueError, match="out of range"):
        extract_report([], index=0)


# ----------------------------------------------------------------------------- rows


def test_rows_mean() -> None:
    report = make_report(k=3)
    rows = to_rows(chat_response(report))
    assert len(rows) == 3 * len(COMPLETION)
    assert layer_labels(report) == ["mean"]
    first = rows[0]
    entry = report["content"][0]
    assert first["gen_index"] == 0 and first["gen_position"] == len(PROMPT)
    assert first["gen_token"] == "The" and first["gen_token_id"] == 2000
    assert first["layer"] == "mean" and first["rank"] == 1
    assert first["position"] == entry["top_attention"][0]["position"] == 0  # the sink
    assert first["token"] == "<|im_start|>" and first["source"] == "prompt"
    assert first["score"] == entry["top_attention"][0]["score"]
    for t in range(len(COMPLETION)):
        group = [r for r in rows if r["gen_index"] == t]
        assert [r["rank"] for r in group] == [1, 2, 3]
        scores = [r["score"] for r in group]
        assert scores == sorted(scores, reverse=True)
        assert all(r["position"] < r["gen_position"] for r in group)
        assert sum(scores) == pytest.approx(report["content"][t]["captured_mass"])
    sources = {r["source"] for r in rows}
    assert sources <= {"prompt", "completion"}


def test_rows_per_layer() -> None:
    report = make_report(k=2, aggregation="none")
    assert layer_labels(report) == LAYERS
    rows = to_rows(report)
    assert len(rows) == 2 * len(LAYERS) * len(COMPLETION)
    assert {r["layer"] for r in rows} == set(LAYERS)
    r = next(r for r in rows if r["gen_index"] == 4 and r["layer"] == 15 and r["rank"] == 2)
    assert r["score"] == report["content"][4]["layers"]["15"][1]["score"]


def test_rows_exclude_sink() -> None:
    report = make_report(k=3, sink=2)
    rows = to_rows(report)
    assert rows and all(r["position"] >= 2 for r in rows)
    for entry in report["content"]:
        assert 0 < entry["excluded_mass"] < 1
    per_layer = make_report(k=3, aggregation="none", sink=1)
    assert all(r["position"] >= 1 for r in to_rows(per_layer))


# ----------------------------------------------------------------------------- streaming


def test_merge_openai_chunks_dicts_and_objects() -> None:
    report = make_report()
    chunks = openai_chunks(report, [1, 2, 0, 3])
    assert merge_stream_chunks(chunks) == report
    pytest.importorskip("openai")
    from openai.types.chat import ChatCompletionChunk

    objects = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert merge_stream_chunks(objects) == report


def test_merge_per_layer_and_n_choices() -> None:
    a, b = make_report(aggregation="none", sink=1), make_report(k=2)
    stream_a, stream_b = openai_chunks(a, [2, 4], index=0), openai_chunks(b, [3, 3], index=1)
    interleaved = [c for pair in zip(stream_a, stream_b) for c in pair]
    assert merge_stream_chunks(interleaved, index=0) == a
    assert merge_stream_chunks(interleaved, index=1) == b
    # a bare delta (no header) still reads as per-layer
    assert layer_labels({"content": a["content"][2:]}) == LAYERS


def test_merge_native_cumulative_and_incremental() -> None:
    report = make_report()
    content = report["content"]
    cumulative = [
        {"text": "", "meta_info": {"attention_tokens": {**report, "content": content[:n]}}}
        for n in (1, 3, 6, 6)
    ]
    assert merge_stream_chunks(cumulative) == report
    # a final snapshot that lost trimmed tokens replaces what came before
    trimmed = cumulative + [{"meta_info": {"attention_tokens": {**report, "content": content[:4]}}}]
    assert merge_stream_chunks(trimmed)["content"] == content[:4]
    incremental = [
        {"meta_info": {"attention_tokens": {**report, "content": content[i : i + 2]}}}
        for i in (0, 2, 4)
    ]
    assert merge_stream_chunks(incremental) == report
    batch = [{**c, "index": 1} for c in incremental] + [
        {"index": 0, "meta_info": {"attention_tokens": {**report, "content": content[:1]}}}
    ]
    assert merge_stream_chunks(batch, index=1) == report
    assert len(merge_stream_chunks(batch, index=0)["content"]) == 1


def test_merge_without_attention_raises() -> None:
    with pytest.raises(ValueError, match="return_attention_tokens"):
        merge_stream_chunks(openai_chunks(make_report(), [6])[1:])


# ----------------------------------------------------------------------------- HTML


class _Structure(HTMLParser):
    """Checks that tags nest; collects text outside scripts and the JSON data blocks."""

    VOID = {"meta", "br", "img", "input", "hr", "link"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []
        self.data: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self._in_script: Optional[dict] = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "script":
            self._in_script = dict(attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()
        if tag == "script":
            self._in_script = None

    def handle_data(self, data: str) -> None:
        if self._in_script is None:
            self.text.append(data)
        elif self._in_script.get("type") == "application/json":
            self.data.append(data)


def _parse(page: str) -> _Structure:
    parser = _Structure()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors
    assert not parser.stack, f"unclosed tags {parser.stack}"
    return parser


def test_html_self_contained_and_complete() -> None:
    report = make_report(k=3)
    page = render_html(report, prompt_tokens=PROMPT, title="Capital <test>")
    assert page.startswith("<!DOCTYPE html>")
    for needle in ("http://", "https://", "src=", "<link", "@import", "url("):
        assert needle not in page
    parsed = _parse(page)
    text = "".join(parsed.text)
    assert "Capital <test>" in text
    # Without JavaScript (a static notebook render) the token text shows as plain text.
    assert "".join(PROMPT + COMPLETION) in text
    data = json.loads(parsed.data[0])
    assert data == {"report": report, "tokens": PROMPT, "title": "Capital <test>"}
    # The one renderer, shared with the server's /attention page, inlined.
    assert viewer_asset("renderer.js") in page and viewer_asset("viewer.css") in page
    assert viewer_asset("app.js") not in page and 'id="attn-form"' not in page


def test_html_placeholders_and_saved_token_strings() -> None:
    report = make_report(k=2, aggregation="none", sink=1)
    parsed = _parse(render_html(report))
    text = "".join(parsed.text)
    known = {a["position"] for e in report["content"] for v in e["layers"].values() for a in v}
    missing = [p for p in range(len(PROMPT)) if p not in known]
    assert missing
    for p in missing:
        assert f"[{p}]" in text
    assert json.loads(parsed.data[0])["tokens"] is None
    # A report saved by the /attention page carries the text of every position.
    saved = {**report, "token_strings": PROMPT + COMPLETION}
    parsed = _parse(render_html(saved))
    assert "".join(PROMPT + COMPLETION) in "".join(parsed.text)
    assert json.loads(parsed.data[0])["tokens"] == PROMPT + COMPLETION


def test_html_fragment_ids_and_save(tmp_path: Any) -> None:
    report = make_report()
    a, b = render_html(report, full_page=False), render_html(report, full_page=False)
    assert a.startswith('<div class="attn-host"') and "<html" not in a
    _parse(a)
    id_a = a.split('id="', 1)[1].split('"', 1)[0]
    assert id_a != b.split('id="', 1)[1].split('"', 1)[0]
    assert f"AttnView.mount('{id_a}')" in a
    path = save_html(report, tmp_path / "attn.html", prompt_tokens=PROMPT)
    assert path.read_text(encoding="utf-8").count("</html>") == 1


def test_html_hostile_tokens_stay_inert() -> None:
    report = make_report()
    report["content"][1]["token"] = "</script><script>alert(1)</script>"
    page = render_html(report)
    assert "alert(1)</script>" not in page
    parsed = _parse(page)
    assert (
        json.loads(parsed.data[0])["report"]["content"][1]["token"]
        == (report["content"][1]["token"])
    )


def test_viewer_page_is_form_plus_renderer() -> None:
    page = viewer_page()
    parsed = _parse(page)
    assert any(tag == "form" and a.get("id") == "attn-form" for tag, a in parsed.tags)
    for name in ("renderer.js", "app.js", "viewer.css"):
        assert viewer_asset(name) in page
    for needle in ("http://", "https://", "src=", "<link"):
        assert needle not in page


def test_token_strings_prefer_report_then_prompt_list() -> None:
    report = make_report()
    wrong = ["?"] * len(PROMPT)
    toks = token_strings(report, prompt_tokens=wrong)
    assert toks[0] == "<|im_start|>" and len(toks) == len(PROMPT) + len(COMPLETION)
    assert toks[len(PROMPT) :] == COMPLETION
    assert "?" in toks


# ----------------------------------------------------------------------------- bertviz


def test_bertviz_mean() -> None:
    np = pytest.importorskip("numpy")
    report = make_report(k=3)
    attention, tokens = to_bertviz(report, prompt_tokens=PROMPT)
    seq = len(PROMPT) + len(COMPLETION)
    assert tokens == PROMPT + COMPLETION
    assert len(attention) == 1
    (dense,) = attention
    assert dense.shape == (1, 1, seq, seq) and dense.dtype == np.float32
    for entry in report["content"]:
        row = dense[0, 0, entry["position"] - 1]
        for a in entry["top_attention"]:
            assert row[a["position"]] == pytest.approx(a["score"], abs=1e-7)
        assert row.sum() == pytest.approx(entry["captured_mass"], abs=1e-6)
        assert np.count_nonzero(row) == 3
        assert not row[entry["position"] :].any()  # causal
    filled = {e["position"] - 1 for e in report["content"]}
    empty = [r for r in range(seq) if r not in filled]
    assert not dense[0, 0, empty].any()


def test_bertviz_per_layer() -> None:
    pytest.importorskip("numpy")
    report = make_report(k=2, aggregation="none", sink=1)
    attention, tokens = to_bertviz(report)
    assert len(attention) == len(LAYERS)
    assert len(tokens) == attention[0].shape[-1]
    entry = report["content"][3]
    for i, layer in enumerate(LAYERS):
        row = attention[i][0, 0, entry["position"] - 1]
        assert row.sum() == pytest.approx(entry["captured_mass"][str(layer)], abs=1e-6)
        assert row[0] == 0  # excluded sink


def test_module_imports_with_standard_library_only() -> None:
    code = (
        "import sys\n"
        "for name in ('numpy', 'torch', 'pandas', 'openai'): sys.modules[name] = None\n"
        "import sglang.attention_tokens as m\n"
        "assert not [k for k in sys.modules if k.startswith('sglang.srt')]\n"
        "r = {'top_k': 1, 'layers': [0], 'prompt_tokens': 1, 'content': [{'token': 'a',"
        " 'position': 1, 'top_attention': [{'position': 0, 'token': 'b', 'score': 1.0}]}]}\n"
        "assert m.to_rows(r) and m.render_html(r)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------- prompt_content


def with_prompt_content(report: dict[str, Any], k: int = 3) -> dict[str, Any]:
    """`report` plus `prompt_content` for every prompt position ("all"), as the server sends it."""
    tokens = PROMPT + COMPLETION
    entries = []
    for q, tok in enumerate(PROMPT):
        rows = [_rows_for(layer, q + 1, 100 + q) for layer in LAYERS]  # query q sees 0..q
        mean = [sum(r[j] for r in rows) / len(LAYERS) for j in range(q + 1)]
        top, captured, _ = _top(mean, k, 0, tokens)
        entries.append({"token": tok, "token_id": 1000 + q, "position": q,
                        "captured_mass": captured, "top_attention": top})  # fmt: skip
    # The last prompt position's query is the one that produced completion token 0: same list.
    first = report["content"][0]
    entries[-1].update(captured_mass=first["captured_mass"], top_attention=first["top_attention"])
    return {**report, "prompt_content": entries}


def test_bertviz_with_prompt_content_is_prompt_by_completion() -> None:
    pytest.importorskip("numpy")
    report = with_prompt_content(make_report(k=3))
    (dense,), tokens = to_bertviz(report)  # token text from the report alone
    seq = len(PROMPT) + len(COMPLETION)
    assert tokens == PROMPT + COMPLETION and dense.shape == (1, 1, seq, seq)
    for entry in report["prompt_content"]:
        row = dense[0, 0, entry["position"]]
        for a in entry["top_attention"]:
            assert row[a["position"]] == pytest.approx(a["score"], abs=1e-7)
        assert row.sum() == pytest.approx(entry["captured_mass"], abs=1e-6)
        assert not row[entry["position"] + 1 :].any()  # causal
    # Every query row but the last position's (which produces nothing) is filled.
    assert all(dense[0, 0, r].any() for r in range(seq - 1)) and not dense[0, 0, seq - 1].any()


def test_merge_keeps_prompt_content_sent_once() -> None:
    report = with_prompt_content(make_report())
    merged = merge_stream_chunks(openai_chunks(report, [2, 3, 1]))
    assert merged == report
    native = [{"text": "", "meta_info": {"attention_tokens": {**report, "content": part}}}
              for part in (report["content"][:2], report["content"][2:])]  # fmt: skip
    del native[1]["meta_info"]["attention_tokens"]["prompt_content"]
    assert merge_stream_chunks(native) == report
