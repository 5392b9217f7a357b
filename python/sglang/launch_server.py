"""`python -m sglang.launch_server --model-path ...`: parse the flags and serve over HTTP."""

from __future__ import annotations

if __name__ == "__main__":
    from sglang.srt.entrypoints.http_server import main_from_argv

    main_from_argv()
