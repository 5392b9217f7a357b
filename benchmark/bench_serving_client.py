"""`python -m sglang.bench_serving`, unchanged, except that it leaves out request-body fields.

`transformers serve` answers 422 to any field it does not know, and the client always sends
`ignore_eos`. This wrapper runs the same client with those fields dropped from every request body:

    BENCH_DROP_FIELDS=ignore_eos python benchmark/bench_serving_client.py --backend vllm ...

The equivalent of ignore_eos is then passed the engine's own way (see bench_serving_compare.py).
"""

import os
import sys

import sglang.benchmark.serving as serving

DROP = [f for f in os.environ.get("BENCH_DROP_FIELDS", "").split(",") if f]
_build = serving.build_payload


def build_payload(req):
    body = _build(req)
    for name in DROP:
        body.pop(name, None)
    return body


serving.build_payload = build_payload

if __name__ == "__main__":
    sys.exit(serving.main())
