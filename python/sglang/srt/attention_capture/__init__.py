"""Attention-token capture: the fork's feature, in one package (docs/attention_tokens.md).

`config` validates what a request asks for and maps `--attention-capture-layers` to layer ids;
`capture` computes exact head-mean probabilities from the attention backends' log-sum-exp and
ranks them; `records` turns results into per-token records and the response JSON. The rest of
the engine touches this package only through the server flags, the request fields, one field on
ForwardBatch, the backends' LSE contract, the output records and the OpenAI serializers.

Names resolve lazily, so the HTTP process (which needs `config` and `records`) does not import
torch, which only `capture` needs.
"""

from __future__ import annotations

from sglang.srt.lazy_exports import lazy_getattr

_WHERE = {
    "AttentionCapture": "capture",
    "CaptureResult": "capture",
    "CaptureSpec": "capture",
    "build_capture_spec": "capture",
    "AttentionRequest": "config",
    "parse_attention_request": "config",
    "resolve_capture_layers": "config",
    "AttentionRecord": "records",
    "format_content": "records",
    "report_header": "records",
    "result_to_records": "records",
}

__all__ = sorted(_WHERE)

__getattr__ = lazy_getattr(__name__, _WHERE)
