"""Attention-token capture: the fork's feature, in one package (docs/attention_tokens.md).

`config` validates what a request asks for and maps `--attention-capture-layers` to layer ids;
`capture` computes exact head-mean probabilities from the attention backends' log-sum-exp and
ranks them; `records` turns results into per-token records and the response JSON. The rest of
the engine touches this package only through the server flags, the request fields, one field on
ForwardBatch, the backends' LSE contract, the output records and the OpenAI serializers.
"""

from sglang.srt.attention_capture.capture import (
    AttentionCapture,
    CaptureResult,
    CaptureSpec,
    build_capture_spec,
)
from sglang.srt.attention_capture.config import (
    AttentionRequest,
    parse_attention_request,
    resolve_capture_layers,
)
from sglang.srt.attention_capture.records import (
    AttentionRecord,
    format_content,
    report_header,
    result_to_records,
)

__all__ = [
    "AttentionCapture",
    "AttentionRecord",
    "AttentionRequest",
    "CaptureResult",
    "CaptureSpec",
    "build_capture_spec",
    "format_content",
    "parse_attention_request",
    "report_header",
    "resolve_capture_layers",
    "result_to_records",
]
