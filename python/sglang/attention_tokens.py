"""Client-side helpers for attention-token reports (the `attention_tokens` field of a response).

Owns everything an interpretability user does with a report after the server returned it: finding
it in a response (`extract_report`), merging streamed chunks back into one report
(`merge_stream_chunks`), flat rows (`to_rows`), a self-contained HTML view (`render_html`,
`save_html`: the renderer of the server's /attention page, python/sglang/viewer/, with the report
inlined; `viewer_page` is that page) and dense arrays in the layout bertviz expects
(`to_bertviz`). The report format is in docs/attention_tokens.md. Pure Python: imports nothing
from the server and needs only the standard library, except `to_bertviz`, which needs numpy.
"""

from __future__ import annotations

import html
import json
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Union

__all__ = [
    "extract_report",
    "merge_stream_chunks",
    "layer_labels",
    "token_strings",
    "to_rows",
    "render_html",
    "save_html",
    "viewer_page",
    "viewer_asset",
    "to_bertviz",
]

HINT = (
    "ask with extra_body={'return_attention_tokens': True} (native /generate and Engine: "
    "return_attention_tokens=True) and start the server with --return-attention-tokens"
)

Report = dict[str, Any]
LayerLabel = Union[str, int]


# ----------------------------------------------------------------------------- finding the report


def _plain(obj: Any) -> Any:
    """A pydantic model (openai objects) or an HTTP response object as plain JSON-like data."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "status_code") and callable(getattr(obj, "json", None)):
        return obj.json()
    return obj


def _is_report(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("content"), list) and "choices" not in obj


def _pick_choice(choices: list[Any], index: int) -> Optional[dict[str, Any]]:
    for pos, choice in enumerate(choices):
        if isinstance(choice, dict) and choice.get("index", pos) == index:
            return choice
    return None


def _find(obj: Any, index: int) -> tuple[Optional[Report], bool]:
    """(report or None, whether obj had a recognisable response shape)."""
    obj = _plain(obj)
    if isinstance(obj, list):  # native batch / n > 1: one dict per sample
        if not 0 <= index < len(obj):
            raise ValueError(f"index {index} out of range for a batch of {len(obj)} outputs")
        return _find(obj[index], 0)
    if not isinstance(obj, dict):
        return None, False
    if _is_report(obj):
        return obj, True
    if isinstance(obj.get("choices"), list):
        choice = _pick_choice(obj["choices"], index)
        return (choice.get("attention_tokens") if choice else None), True
    if isinstance(obj.get("meta_info"), dict):
        return obj["meta_info"].get("attention_tokens"), True
    return None, False


def extract_report(response: Any, index: int = 0) -> Report:
    """The attention-token report of one output of `response`.

    `response` may be an OpenAI ChatCompletion / Completion object (or its `model_dump()`), a
    native `/generate` or `Engine.generate` dict (or list of dicts, picked by `index`), or the
    report dict itself. For OpenAI responses `index` selects `choices[i]` by its `index` field.
    Raises ValueError when there is no report, saying how to ask for one.
    """
    report, known = _find(response, index)
    if report is None:
        what = "the response has no attention_tokens" if known else "not a response or report"
        raise ValueError(f"{what}: {HINT}")
    if not _is_report(report):
        raise ValueError(
            f"attention_tokens is not a report (expected a dict with 'content'): {HINT}"
        )
    return report


def merge_stream_chunks(chunks: Iterable[Any], index: int = 0) -> Report:
    """One report from streamed chunks (OpenAI chunk objects or dicts, native stream dicts).

    Header fields and `prompt_content` (sent once) come from whichever chunk carries them (the
    first, for OpenAI streams). Content
    entries are keyed by generated position: a chunk whose content starts at or before the
    earliest position seen is a cumulative snapshot (as native streams of older servers sent)
    and replaces what was merged; otherwise its entries are appended (every stream of this
    server carries only new entries). Native batch streams are filtered by their `index` key,
    OpenAI chunks by `choices[i].index`.
    """
    header: dict[str, Any] = {}
    entries: dict[int, dict[str, Any]] = {}
    seen = False
    for chunk in chunks:
        data = _plain(chunk)
        if isinstance(data, dict) and "meta_info" in data and data.get("index", index) != index:
            continue
        report, _ = _find(data, index)
        if not report:
            continue
        seen = True
        header.update({k: v for k, v in report.items() if k != "content"})
        content = report.get("content") or []
        if content and entries and content[0]["position"] <= min(entries):
            entries = {}
        for entry in content:
            entries[entry["position"]] = entry
    if not seen:
        raise ValueError(f"no chunk carried attention_tokens: {HINT}")
    return {**header, "content": [entries[p] for p in sorted(entries)]}


# ----------------------------------------------------------------------------- reading entries


def layer_labels(report: Any) -> list[LayerLabel]:
    """["mean"] for aggregated reports, else the layer numbers of the per-layer lists, in order."""
    report = extract_report(report)
    aggregation = report.get("layer_aggregation")
    if aggregation is None:  # a bare streamed delta: tell by the entries
        per_layer = any("layers" in entry for entry in report["content"])
        aggregation = "none" if per_layer else "mean"
    if aggregation != "none":
        return ["mean"]
    labels = {int(x) for x in report.get("layers") or []}
    for entry in report["content"]:
        labels.update(int(k) for k in entry.get("layers") or {})
    return sorted(labels)


def _head_lists(entry: dict[str, Any], label: LayerLabel) -> list[tuple[Optional[int], list]]:
    """(head, top-k list) pairs of an entry for one layer label: the head id of each per-head
    list (attention_head_aggregation "none"), else one pair with head None."""
    value: Any = entry.get("heads") or entry.get("top_attention")
    if label != "mean":
        value = (entry.get("layers") or {}).get(str(label))
        if isinstance(value, dict):
            value = value.get("heads")
    if isinstance(value, dict):
        return [(int(h), tops) for h, tops in value.items()]
    return [(None, value or [])]


def _attended(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every attended-token dict of an entry, over all its lists."""
    labels: list[LayerLabel] = ["mean", *(int(k) for k in entry.get("layers") or {})]
    return [att for label in labels for _, tops in _head_lists(entry, label) for att in tops]


def _seq_len(report: Report, prompt_tokens: Optional[list[str]]) -> int:
    content = report["content"]
    n = max(int(report.get("prompt_tokens") or 0) + len(content), len(prompt_tokens or []))
    for entry in [*content, *(report.get("prompt_content") or [])]:
        n = max(n, entry["position"] + 1)
    return n


def token_strings(
    report: Any, prompt_tokens: Optional[list[str]] = None, placeholder: str = "[{position}]"
) -> list[str]:
    """Token text for every position 0 .. seq-1.

    Text comes from the report (generated tokens and every attended token), then from
    `prompt_tokens` (a list of strings for positions 0..); positions found in neither get
    `placeholder` formatted with the position.
    """
    report = extract_report(report)
    known: dict[int, str] = {}
    for entry in [*report["content"], *(report.get("prompt_content") or [])]:
        known[entry["position"]] = entry.get("token", "")
        for att in _attended(entry):
            known.setdefault(att["position"], att.get("token", ""))
    out = []
    for pos in range(_seq_len(report, prompt_tokens)):
        if pos in known:
            out.append(known[pos])
        elif prompt_tokens is not None and pos < len(prompt_tokens):
            out.append(prompt_tokens[pos])
        else:
            out.append(placeholder.format(position=pos))
    return out


def to_rows(report: Any) -> list[dict[str, Any]]:
    """One flat dict per (generated token, layer, head list, attended token), for pandas or csv.

    Keys: gen_index (0-based index in the completion), gen_position, gen_token, gen_token_id,
    layer ("mean" or the layer number), head (the head id of a per-head list, else the report's
    head aggregation, "mean" or "max"), rank (1 = highest score), position, token, token_id,
    source ("prompt" or "completion") and score.
    """
    report = extract_report(report)
    labels = layer_labels(report)
    aggregation = report.get("head_aggregation") or "mean"
    rows = []
    for gen_index, entry in enumerate(report["content"]):
        for label, (head, tops) in (
            (label, pair) for label in labels for pair in _head_lists(entry, label)
        ):
            for rank, att in enumerate(tops, start=1):
                rows.append(
                    {
                        "gen_index": gen_index,
                        "gen_position": entry["position"],
                        "gen_token": entry.get("token"),
                        "gen_token_id": entry.get("token_id"),
                        "layer": label,
                        "head": aggregation if head is None else head,
                        "rank": rank,
                        "position": att["position"],
                        "token": att.get("token"),
                        "token_id": att.get("token_id"),
                        "source": att.get("source"),
                        "score": att["score"],
                    }
                )
    return rows


# ----------------------------------------------------------------------------- bertviz export


def to_bertviz(
    report: Any, prompt_tokens: Optional[list[str]] = None
) -> tuple[list[Any], list[str]]:
    """(attention, tokens) in the layout of bertviz `head_view` / `model_view`.

    attention: one numpy float32 array per entry of `layer_labels(report)` (one for "mean"), each
    of shape (1, heads, seq, seq) — batch 1, one "head" holding the head mean (or maximum), or
    with attention_head_aggregation "none" one per chosen head (`report["heads"]`). Row p-1 (the query that
    produced the token at position p) holds that token's top-k scores, and with `prompt_content`
    (attention_prompt_positions) row q holds prompt query q's, so a report asked with "all" fills
    the whole prompt x completion picture; every other cell is 0.
    tokens: `token_strings(report, prompt_tokens)`, length seq. bertviz stacks torch tensors, so
    call `head_view([torch.from_numpy(a) for a in attention], tokens)`.
    """
    try:
        import numpy as np
    except ImportError as e:  # pragma: no cover - numpy ships with the server
        raise ImportError("to_bertviz needs numpy: pip install numpy") from e
    report = extract_report(report)
    tokens = token_strings(report, prompt_tokens)
    seq = len(tokens)
    attention = []
    split = report.get("head_aggregation") == "none"
    slot = {h: i for i, h in enumerate(report.get("heads") or [])} if split else {}
    for label in layer_labels(report):
        dense = np.zeros((1, max(len(slot), 1), seq, seq), dtype=np.float32)
        queries = [(e["position"] - 1, e) for e in report["content"]]
        queries += [(e["position"], e) for e in report.get("prompt_content") or []]
        for row, entry in queries:
            for head, tops in _head_lists(entry, label):
                for att in tops:
                    dense[0, slot.get(head, 0), row, att["position"]] = att["score"]
        attention.append(dense)
    return attention, tokens


# ----------------------------------------------------------------------------- HTML view

# The viewer's files (package data): renderer.js draws a report, viewer.css styles it; the
# server's /attention page adds app.html and app.js around the same renderer.
VIEWER_DIR = Path(__file__).resolve().parent / "viewer"


def viewer_asset(name: str) -> str:
    """The text of one of the viewer's files (renderer.js, viewer.css, app.html, app.js)."""
    return (VIEWER_DIR / name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(
    report: Any,
    prompt_tokens: Optional[list[str]] = None,
    title: str = "Attention tokens",
    full_page: bool = True,
) -> str:
    """A self-contained HTML page (inline CSS and JS, no network) showing the report.

    The same renderer as the server's `/attention` page (python/sglang/viewer/renderer.js), with
    the report inlined: prompt and completion tokens laid out as text; hovering over a generated
    token (or a prompt token that has a `prompt_content` entry) highlights what it attended to
    (shade relative to its highest score) and lists the scores, span masses, statistics and
    logit lens the entry carries; a click pins the selection; layer and head selectors when the
    report has per-layer or per-head lists. `prompt_tokens` (token strings for positions 0..)
    labels positions no list mentions (a report saved by the page carries them as
    `token_strings`); without either they show as `[position]`. Without JavaScript (a static
    notebook render) the token text shows as plain text. `full_page=False` returns only the
    view's <div> (for `IPython.display.HTML`; every view is scoped, so several can share a page).
    """
    report = extract_report(report)
    if prompt_tokens is None and isinstance(report.get("token_strings"), list):
        prompt_tokens = report["token_strings"]
    tokens = token_strings(report, prompt_tokens)
    data = {"report": report, "tokens": prompt_tokens, "title": title}
    view_id = f"attn-{uuid.uuid4().hex[:12]}"
    view = (
        f'<div class="attn-host" id="{view_id}">\n<style>{viewer_asset("viewer.css")}</style>\n'
        f'<pre class="attn-fallback">{html.escape("".join(tokens))}</pre>\n'
        '<div class="attn-mount"></div>\n'
        f'<script class="attn-data" type="application/json">{_script_json(data)}</script>\n'
        f"<script>{viewer_asset('renderer.js')}</script>\n"
        f"<script>AttnView.mount('{view_id}');</script>\n</div>\n"
    )
    if not full_page:
        return view
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n{view}</body>\n</html>\n"
    )


def viewer_page(title: str = "Attention tokens") -> str:
    """The server's `/attention` page: the request form (app.html, app.js) and the renderer."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{viewer_asset('viewer.css')}</style>\n"
        f"</head>\n<body>\n{viewer_asset('app.html')}"
        f"<script>{viewer_asset('renderer.js')}</script>\n"
        f"<script>{viewer_asset('app.js')}</script>\n</body>\n</html>\n"
    )


def save_html(
    report: Any,
    path: Union[str, Path],
    prompt_tokens: Optional[list[str]] = None,
    title: str = "Attention tokens",
) -> Path:
    """Write `render_html(report, prompt_tokens, title)` to `path` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(render_html(report, prompt_tokens=prompt_tokens, title=title), encoding="utf-8")
    return path
