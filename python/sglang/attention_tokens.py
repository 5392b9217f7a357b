"""Client-side helpers for attention-token reports (the `attention_tokens` field of a response).

Owns everything an interpretability user does with a report after the server returned it: finding
it in a response (`extract_report`), merging streamed chunks back into one report
(`merge_stream_chunks`), flat rows (`to_rows`), a self-contained HTML heat map (`render_html`,
`save_html`) and dense arrays in the layout bertviz expects (`to_bertviz`). The report format is
in docs/attention_tokens.md. Pure Python: imports nothing from the server and needs only the
standard library, except `to_bertviz`, which needs numpy.
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

    Header fields come from whichever chunk carries them (the first, for OpenAI streams). Content
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


def _tops(entry: dict[str, Any], label: LayerLabel) -> list[dict[str, Any]]:
    if label == "mean":
        return entry.get("top_attention") or []
    return (entry.get("layers") or {}).get(str(label)) or []


def _attended(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every attended-token dict of an entry, over all its lists."""
    out = list(entry.get("top_attention") or [])
    for tops in (entry.get("layers") or {}).values():
        out.extend(tops)
    return out


def _mass(entry: dict[str, Any], key: str, label: LayerLabel) -> Optional[float]:
    value = entry.get(key)
    if isinstance(value, dict):
        return value.get(str(label))
    return value


def _seq_len(report: Report, prompt_tokens: Optional[list[str]]) -> int:
    content = report["content"]
    n = max(int(report.get("prompt_tokens") or 0) + len(content), len(prompt_tokens or []))
    for entry in content:
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
    for entry in report["content"]:
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
    """One flat dict per (generated token, layer, attended token), ready for pandas or csv.

    Keys: gen_index (0-based index in the completion), gen_position, gen_token, gen_token_id,
    layer ("mean" or the layer number), rank (1 = highest score), position, token, token_id,
    source ("prompt" or "completion") and score.
    """
    report = extract_report(report)
    labels = layer_labels(report)
    rows = []
    for gen_index, entry in enumerate(report["content"]):
        for label in labels:
            for rank, att in enumerate(_tops(entry, label), start=1):
                rows.append(
                    {
                        "gen_index": gen_index,
                        "gen_position": entry["position"],
                        "gen_token": entry.get("token"),
                        "gen_token_id": entry.get("token_id"),
                        "layer": label,
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
    of shape (1, 1, seq, seq) — batch 1, one "head" holding the head mean. Row p-1 (the query that
    produced the token at position p) holds that token's top-k scores; every other cell is 0.
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
    for label in layer_labels(report):
        dense = np.zeros((1, 1, seq, seq), dtype=np.float32)
        for entry in report["content"]:
            row = entry["position"] - 1
            for att in _tops(entry, label):
                dense[0, 0, row, att["position"]] = att["score"]
        attention.append(dense)
    return attention, tokens


# ----------------------------------------------------------------------------- HTML heat map

_CSS = """
.attn-view{font-family:system-ui,-apple-system,Segoe UI,sans-serif;color:#222;max-width:72em}
.attn-view h1{font-size:1.25em;margin:0 0 .3em}
.attn-view .meta{color:#555;font-size:.9em;margin-bottom:.8em}
.attn-view .controls{margin-bottom:.6em;font-size:.9em}
.attn-view .text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:14px;line-height:1.9;
white-space:pre-wrap;word-break:break-word;border:1px solid #ddd;border-radius:6px;padding:.7em}
.attn-view .tok{border-radius:3px;padding:1px 0;outline:1px solid transparent}
.attn-view .tok.gen{color:#0645ad;cursor:pointer;border-bottom:1px dotted #0645ad}
.attn-view .tok.gen:hover{outline-color:#0645ad}
.attn-view .tok.unk{color:#999}
.attn-view .tok.sink{text-decoration:line-through;text-decoration-color:#bbb}
.attn-view .tok.query{outline:2px dashed #666}
.attn-view .tok.sel{outline:2px solid #000;background:#ffe08a}
.attn-view .sep{color:#aaa}
.attn-view .detail{margin-top:1em;font-size:.9em}
.attn-view table{border-collapse:collapse;margin-top:.4em}
.attn-view th,.attn-view td{border-bottom:1px solid #eee;padding:2px 10px;text-align:left}
.attn-view td.num{text-align:right;font-variant-numeric:tabular-nums}
.attn-view .bar{background:#e8590c;height:9px;display:inline-block;vertical-align:middle}
.attn-view code{background:#f4f4f4;padding:0 3px}
"""

# Scoped to one view (several may share a notebook page); ROOT is replaced by the view's id.
_JS = """
(function(){
var root=document.getElementById('ROOT');
var D=JSON.parse(root.querySelector('script.attn-data').textContent);
var toks=root.querySelectorAll('.tok');
var byPos={};toks.forEach(function(el){byPos[el.dataset.pos]=el;});
var sel=root.querySelector('select.layer');var detail=root.querySelector('.detail');
var pinned=D.entries.length?0:null;
function layer(){return sel?sel.value:D.labels[0];}
function esc(s){return String(s).replace(/[&<>"]/g,function(c){
return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c];});}
function clear(){toks.forEach(function(el){el.style.backgroundColor='';
el.classList.remove('sel');el.classList.remove('query');});}
function show(i){
clear();
if(i===null){detail.innerHTML='<em>Hover over or click a generated token.</em>';return;}
var e=D.entries[i],L=layer(),top=e.top[L]||[],mx=0;
top.forEach(function(a){mx=Math.max(mx,a[1]);});
top.forEach(function(a){var el=byPos[a[0]];if(el){var x=mx>0?a[1]/mx:0;
el.style.backgroundColor='rgba(232,89,12,'+(0.1+0.9*x).toFixed(3)+')';}});
var me=byPos[e.pos];if(me)me.classList.add('sel');
var q=byPos[e.pos-1];if(q&&q!==me)q.classList.add('query');
var cm=e.captured[L],xm=e.excluded[L];
var h='<b>#'+i+' '+esc(JSON.stringify(e.token))+'</b> at position '+e.pos+
' (query position '+(e.pos-1)+'), layer <b>'+esc(L)+'</b>';
if(cm!=null)h+=', captured mass '+cm.toFixed(4);
if(xm!=null)h+=', excluded mass (positions &lt; '+D.exclude_sink+') '+xm.toFixed(4);
h+='<table><tr><th>rank</th><th>position</th><th>token</th><th>source</th><th>score</th>'+
'<th></th></tr>';
top.forEach(function(a,r){var t=D.tokens[a[0]];h+='<tr><td class="num">'+(r+1)+
'</td><td class="num">'+a[0]+'</td><td><code>'+esc(JSON.stringify(t))+'</code></td><td>'+
(a[0]<D.prompt_tokens?'prompt':'completion')+'</td><td class="num">'+a[1].toFixed(4)+
'</td><td><span class="bar" style="width:'+Math.round(a[1]*200)+'px"></span></td></tr>';});
detail.innerHTML=h+'</table>';}
root.querySelectorAll('.tok.gen').forEach(function(el){
var i=parseInt(el.dataset.gen,10);
el.addEventListener('mouseenter',function(){show(i);});
el.addEventListener('mouseleave',function(){show(pinned);});
el.addEventListener('click',function(){pinned=(pinned===i)?null:i;show(pinned);});});
if(sel)sel.addEventListener('change',function(){show(pinned);});
show(pinned);
})();
"""


def _display(token: str) -> str:
    """Visible text for a token: newlines as a return mark (and a real break), empty as a dot."""
    if token == "":
        return "\u2205"
    return token.replace("\r", "").replace("\n", "\u21b5\n").replace("\t", "\u21e5\t")


def _script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _token_spans(report: Report, tokens: list[str], prompt_tokens: Optional[list[str]]) -> str:
    gen_index = {entry["position"]: i for i, entry in enumerate(report["content"])}
    known = set(gen_index)
    for entry in report["content"]:
        known.update(att["position"] for att in _attended(entry))
    n_prompt = int(report.get("prompt_tokens") or 0)
    sink = int(report.get("exclude_sink") or 0)
    parts = []
    for pos, tok in enumerate(tokens):
        if pos == n_prompt and pos > 0:
            parts.append('<span class="sep" title="completion starts here">\u2016</span>')
        classes = ["tok"]
        attrs = f'data-pos="{pos}"'
        source = "prompt" if pos < n_prompt else "completion"
        if pos in gen_index:
            classes.append("gen")
            attrs += f' data-gen="{gen_index[pos]}"'
        unknown = pos not in known and (prompt_tokens is None or pos >= len(prompt_tokens))
        if unknown:
            classes.append("unk")
        if pos < sink:
            classes.append("sink")
        title = f"{pos}: {json.dumps(tok, ensure_ascii=False)} ({source})"
        if unknown:
            title = f"{pos}: token text unknown (not in any top-k; pass prompt_tokens=...)"
        parts.append(
            f'<span class="{" ".join(classes)}" {attrs} title="{html.escape(title)}">'
            f"{html.escape(_display(tok))}</span>"
        )
    return "".join(parts)


def render_html(
    report: Any,
    prompt_tokens: Optional[list[str]] = None,
    title: str = "Attention tokens",
    full_page: bool = True,
) -> str:
    """A self-contained HTML page (inline CSS and JS, no network) showing the report.

    Prompt and completion tokens are laid out as text; hovering over a generated token highlights
    its top-k attended tokens (colour intensity relative to its highest score) and shows their
    scores in a table; a click pins the selection. Per-layer reports get a layer selector.
    `prompt_tokens` (token strings for positions 0..) fills positions no top-k list mentions;
    without it they show as `[position]`. `full_page=False` returns only the view's <div> (for
    `IPython.display.HTML`; every view is scoped, so several can share a page).
    """
    report = extract_report(report)
    labels = layer_labels(report)
    tokens = token_strings(report, prompt_tokens)
    entries = []
    for entry in report["content"]:
        entries.append(
            {
                "pos": entry["position"],
                "token": entry.get("token", ""),
                "top": {
                    str(lb): [[a["position"], a["score"]] for a in _tops(entry, lb)]
                    for lb in labels
                },
                "captured": {str(lb): _mass(entry, "captured_mass", lb) for lb in labels},
                "excluded": {str(lb): _mass(entry, "excluded_mass", lb) for lb in labels},
            }
        )
    sink = int(report.get("exclude_sink") or 0)
    data = {
        "labels": [str(lb) for lb in labels],
        "tokens": tokens,
        "entries": entries,
        "prompt_tokens": int(report.get("prompt_tokens") or 0),
        "exclude_sink": sink,
    }
    meta = [
        f"top_k={report.get('top_k')}",
        f"layers={report.get('layers')}",
        f"layer aggregation={report.get('layer_aggregation', 'mean')}",
        f"head aggregation={report.get('head_aggregation', 'mean')}",
        f"prompt tokens={report.get('prompt_tokens')}",
        f"generated tokens={len(report['content'])}",
    ]
    if sink:
        meta.append(f"positions < {sink} excluded from the ranking")
    controls = ""
    if labels != ["mean"]:
        options = "".join(f'<option value="{lb}">layer {lb}</option>' for lb in labels)
        controls = (
            f'<div class="controls"><label>Layer: <select class="layer">{options}</select>'
            "</label></div>\n"
        )
    view_id = f"attn-{uuid.uuid4().hex[:12]}"
    view = (
        f'<div class="attn-view" id="{view_id}">\n<style>{_CSS}</style>\n'
        f"<h1>{html.escape(title)}</h1>\n"
        f'<div class="meta">{html.escape(" · ".join(meta))}</div>\n{controls}'
        f'<div class="text">{_token_spans(report, tokens, prompt_tokens)}</div>\n'
        '<div class="detail"></div>\n'
        f'<script class="attn-data" type="application/json">{_script_json(data)}</script>\n'
        f"<script>{_JS.replace('ROOT', view_id)}</script>\n</div>\n"
    )
    if not full_page:
        return view
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n{view}</body>\n</html>\n"
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
