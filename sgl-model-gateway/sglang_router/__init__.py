"""sglang_router: a cache-aware HTTP router in front of SGLang-compatible servers.

`python -m sglang_router.launch_router --worker-urls URL ...` runs it (flags: `router_args.py`);
`python -m sglang_router.launch_server --dp-size N ...` starts N servers and the router together.
"""

__version__ = "0.4.0.dev0"
