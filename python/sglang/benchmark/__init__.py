"""Benchmark clients: the serving benchmark (`python -m sglang.benchmark.serving`, the same program
as `python -m sglang.bench_serving`) and the request sets it shares with
`python -m sglang.bench_offline_throughput` (`sglang.benchmark.datasets`).
"""
