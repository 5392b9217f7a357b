"""One-call GPU benchmark driver: Llama-3.1-8B architecture (dummy bf16 weights) on one GPU.

Owns the numbers issue 5 asks for, in one process tree that fits a ~9 minute device call:
device-to-device copy bandwidth; `python -m sglang.bench_one_batch` at batch 1, 8, 32, 64
(input 1024, output 128) with CUDA graphs on and off; attention capture off / on-but-unused /
last layer / all layers at batch 32 with a 2048-token prompt (output 128); HF transformers
`generate` on the same config (random init, bf16) at batch 32; the batch-1 roofline ratio
(bytes one decode step must read / measured bandwidth -> ideal tok/s, against the measured
median decode throughput); the per-commit-1-gpu suite runs first, and issue 15's targets are
judged in the summary. Every step runs in its own subprocess with a timeout, under one global
deadline; a failing step is recorded and the rest still run. Results go to OUT_DIR as
`gpu_bench.json`, `gpu_bench.md` and `logs.tar.gz` (per-step logs and JSONL); a short table is
printed last.

`--cpu-smoke` runs the same plumbing on CPU with a tiny Llama config and tiny lengths (no graphs,
no suite), so the driver is checked without a GPU. Subcommands `bandwidth` and `hf` are the
worker steps (run by the driver in subprocesses).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIG_DIR = HERE / "llama-3.1-8b"
GPU_BATCHES = [1, 8, 32, 64]
GPU_INPUT, GPU_OUTPUT = 1024, 128
CAPTURE_BS, CAPTURE_INPUT = 32, 2048
CAPTURE_CONFIGS = {
    "capture_off": [],
    "capture_unused": ["--return-attention-tokens", "--attention-capture-layers", "last"],
    "capture_last": [
        "--return-attention-tokens",
        "--attention-capture-layers",
        "last",
        "--request-attention-tokens",
    ],  # fmt: skip
    "capture_all": [
        "--return-attention-tokens",
        "--attention-capture-layers",
        "all",
        "--request-attention-tokens",
    ],  # fmt: skip
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    paths = [str(REPO / "python"), str(REPO / "sgl-kernel")]
    e["PYTHONPATH"] = os.pathsep.join(paths + [e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["PYTHONUNBUFFERED"] = "1"
    return e


# ------------------------------------------------------------------ worker: bandwidth


def bandwidth(device: str, size_mb: int) -> dict[str, Any]:
    import torch

    n = size_mb * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            ms = (time.perf_counter() - t) * 1e3
        if i >= 5:  # warm-up
            times.append(ms)
    assert torch.equal(dst, src), "copy mismatch"
    med = statistics.median(times)
    moved = 2 * n * 4  # bytes read + bytes written
    return {"bytes_moved": moved, "median_ms": med, "bandwidth_gbs": moved / med / 1e6}


# ------------------------------------------------------------------ worker: HF generate


def hf_generate(model_dir: str, device: str, dtype: str, batches: list[int], inp: int,
                out: int) -> list[dict[str, Any]]:  # fmt: skip
    import torch
    import transformers

    tdtype = getattr(torch, dtype)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(previous)
    print(f"HF model built in {time.perf_counter() - t0:.1f} s", flush=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for bs in batches:
        ids = torch.randint(0, config.vocab_size, (bs, inp), device=device)
        mask = torch.ones_like(ids)

        def gen(n: int) -> float:
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
            sync()
            return time.perf_counter() - t

        gen(2)  # warm-up
        prefill = gen(1)
        total = gen(out)
        decode_tput = bs * (out - 1) / max(total - prefill, 1e-9)
        row = {"batch_size": bs, "input_len": inp, "output_len": out, "prefill_latency": prefill,
               "total_latency": total, "decode_throughput": decode_tput,
               "output_throughput": bs * out / total}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ driver


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        # NOTE: the device tool returns at most 8 files from $OUT: logs travel as one tarball.
        self.work = Path(tempfile.mkdtemp(prefix="gpu_bench_logs_"))
        self.start = time.monotonic()
        self.steps: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], timeout: float) -> Optional[str]:
        """Run a step with its log under OUT; None when skipped, failed or timed out."""
        budget = min(timeout, self.left() - 15)
        step = {"name": name, "cmd": shlex.join(cmd)}
        self.steps.append(step)
        if budget < 20:
            step["status"] = "skipped (deadline)"
            print(f"== {name}: skipped, {self.left():.0f} s left", flush=True)
            return None
        print(f"== {name} (limit {budget:.0f} s): {shlex.join(cmd)}", flush=True)
        t = time.monotonic()
        log = self.work / f"log_{name}.txt"
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env(), timeout=budget,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            text, ok = proc.stdout, proc.returncode == 0
            step["status"] = "ok" if ok else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as e:
            text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            ok, step["status"] = False, f"timed out after {budget:.0f} s"
        step["seconds"] = round(time.monotonic() - t, 1)
        log.write_text(text)
        tail = "\n".join(text.splitlines()[-8:])
        print(f"   {step['status']} in {step['seconds']} s\n{tail}", flush=True)
        return text if ok else None

    def bench_one_batch(self, name: str, extra: list[str], batches: list[int], inp: int,
                        out: int, timeout: float) -> list[dict[str, Any]]:  # fmt: skip
        a = self.args
        jsonl = self.work / f"{name}.jsonl"
        jsonl.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "sglang.bench_one_batch", "--model-path", a.model_dir,
               "--load-format", "dummy", "--dtype", a.dtype, "--device", a.device,
               "--context-length", str(a.context_length), "--max-running-requests",
               str(max(GPU_BATCHES if not a.cpu_smoke else batches)), "--max-total-tokens",
               str(a.max_total_tokens), "--cuda-graph-max-bs", str(max(batches + [8])),
               "--run-name", name, "--result-filename", str(jsonl), "--batch-size",
               *map(str, batches), "--input-len", str(inp), "--output-len", str(out), *extra]  # fmt: skip
        self.run(name, cmd, timeout)
        rows = []
        if jsonl.exists():
            rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        self.results[name] = rows
        return rows

    def main(self) -> int:
        a = self.args
        smoke = a.cpu_smoke
        batches = [1, 2] if smoke else GPU_BATCHES
        inp, out = (16, 4) if smoke else (GPU_INPUT, GPU_OUTPUT)
        cap_bs, cap_in = (2, 24) if smoke else (CAPTURE_BS, CAPTURE_INPUT)
        me = [sys.executable, str(Path(__file__).resolve())]

        if a.suite and not smoke:
            # The suite first (issue 15): a kernel that fails there makes the numbers moot.
            text = self.run("gpu_suite", [sys.executable, "test/srt/run_suite.py", "--suite",
                            "per-commit-1-gpu", "--timeout-per-file", "150"], 200)  # fmt: skip
            self.results["gpu_suite"] = (text or "").strip().splitlines()[-1:] or ["failed"]
        text = self.run("bandwidth", me + ["bandwidth", "--device", a.device,
                                           "--size-mb", str(64 if smoke else 2048)], 60)  # fmt: skip
        if text:
            self.results["bandwidth"] = json.loads(text.strip().splitlines()[-1])
        graph_flags = ["--disable-cuda-graph"] if smoke else []
        self.bench_one_batch("graphs_on", graph_flags, batches, inp, out, 150)
        for name, flags in CAPTURE_CONFIGS.items():
            self.bench_one_batch(name, graph_flags + flags, [cap_bs], cap_in, out, 100)
        hf_batches = [1, 2] if smoke else [32]
        text = self.run("hf_generate", me + ["hf", "--model-dir", a.model_dir, "--device",
                        a.device, "--dtype", a.dtype, "--batch-size", *map(str, hf_batches),
                        "--input-len", str(inp), "--output-len", str(out)], 120)  # fmt: skip
        if text:
            self.results["hf_generate"] = [
                json.loads(line) for line in text.splitlines() if line.startswith("{")
            ]
        # Graphs off last: a comparison, not a target, so it gets whatever time is left.
        self.bench_one_batch("graphs_off", ["--disable-cuda-graph"], batches, inp, out, 150)
        self.results["roofline"] = roofline(a.model_dir, a.dtype, self.results, inp, out)
        self.results["steps"] = self.steps
        self.results["meta"] = {"device": a.device, "dtype": a.dtype, "cpu_smoke": smoke,
                                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "wall_s": round(time.monotonic() - self.start, 1)}  # fmt: skip
        (self.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=1))
        table = summary(self.results, cap_bs)
        (self.out / "gpu_bench.md").write_text(report_md(self.results, table))
        shutil.make_archive(str(self.out / "logs"), "gztar", root_dir=self.work)
        print("\n" + table, flush=True)
        return 0


def _weights(model_dir: str) -> tuple[int, int, int]:
    """(parameter count, input-embedding count, KV bytes per token per 2-byte element)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter, n, v = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                      cfg["vocab_size"])  # fmt: skip
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    embed = v * h
    lm_head = 0 if cfg.get("tie_word_embeddings") else v * h
    params = n * per_layer + embed + lm_head + h
    return params, embed, n * 2 * kv


def roofline(model_dir: str, dtype: str, results: dict, inp: int, out: int) -> dict[str, Any]:
    params, embed, kv_elems = _weights(model_dir)
    esize = 4 if dtype == "float32" else 2
    read = (params - embed) * esize  # the input embedding is gathered, not read whole
    kv_read = kv_elems * esize * (inp + out // 2)  # batch 1 at the mean decode context
    res: dict[str, Any] = {"params": params, "weight_bytes_read": read, "kv_bytes_read": kv_read}
    bw = (results.get("bandwidth") or {}).get("bandwidth_gbs")
    b1 = [r for r in results.get("graphs_on", []) if r["batch_size"] == 1]
    if bw:
        res["ideal_tok_s"] = bw * 1e9 / (read + kv_read)
        res["ideal_tok_s_weights_only"] = bw * 1e9 / read
    if bw and b1:
        res["measured_tok_s"] = b1[0]["median_decode_throughput"]
        res["ratio"] = res["measured_tok_s"] / res["ideal_tok_s"]
    return res


def _decode(rows: list[dict], bs: int) -> Optional[float]:
    for r in rows:
        if r["batch_size"] == bs:
            return r["median_decode_throughput"]
    return None


def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def summary(results: dict, cap_bs: int) -> str:
    lines = ["| run | batch | decode tok/s (median) | vs reference |", "| --- | --- | --- | --- |"]
    on, off = results.get("graphs_on", []), results.get("graphs_off", [])
    for r in on:
        e = _decode(off, r["batch_size"])
        ratio = r["median_decode_throughput"] / e if e else None
        lines.append(f"| graphs on | {r['batch_size']} | {r['median_decode_throughput']:.1f} | "
                     f"{_fmt(ratio, '.2f')}x graphs off ({_fmt(e)}) |")  # fmt: skip
    base = _decode(results.get("capture_off", []), cap_bs)
    for name in CAPTURE_CONFIGS:
        t = _decode(results.get(name, []), cap_bs)
        slow = (base / t - 1) * 100 if (t and base) else None
        lines.append(f"| {name} | {cap_bs} | {_fmt(t)} | {_fmt(slow, '+.2f')} % step time vs off |")
    for r in results.get("hf_generate", []):
        ours = _decode(on, r["batch_size"])
        ratio = ours / r["decode_throughput"] if ours else None
        lines.append(f"| HF generate | {r['batch_size']} | {r['decode_throughput']:.1f} | "
                     f"ours {_fmt(ratio, '.2f')}x |")  # fmt: skip
    rf = results.get("roofline", {})
    bw = (results.get("bandwidth") or {}).get("bandwidth_gbs")
    lines += targets(results, cap_bs)
    lines.append(f"| roofline bs1 | 1 | ideal {_fmt(rf.get('ideal_tok_s'))} (copy {_fmt(bw)} GB/s)"
                 f" | measured/ideal {_fmt(rf.get('ratio'), '.3f')} |")  # fmt: skip
    if "gpu_suite" in results:
        lines.append(f"| GPU suite | - | {' '.join(results['gpu_suite'])} | |")
    bad = [s["name"] + ": " + s["status"] for s in results.get("steps", []) if s["status"] != "ok"]
    if bad:
        lines.append("| steps not ok | - | " + "; ".join(bad) + " | |")
    return "\n".join(lines)


def targets(results: dict, cap_bs: int) -> list[str]:
    """Issue 15's targets on the 8B shape, each with its measured value and met / MISSED."""
    base = _decode(results.get("capture_off", []), cap_bs)

    def slowdown(name: str) -> Optional[float]:
        t = _decode(results.get(name, []), cap_bs)
        return (base / t - 1) * 100 if (t and base) else None

    hf = {r["batch_size"]: r["decode_throughput"] for r in results.get("hf_generate", [])}
    ours = _decode(results.get("graphs_on", []), 32)
    checks = [
        ("batch-1 decode / roofline >= 0.85", results.get("roofline", {}).get("ratio"), 0.85, 1),
        (f"capture last layer, bs {cap_bs}: slowdown <= 2 %", slowdown("capture_last"), 2.0, -1),
        (f"capture on but unused, bs {cap_bs}: slowdown <= 0.5 %", slowdown("capture_unused"),
         0.5, -1),
        ("bs 32 decode vs HF generate >= 3x", ours / hf[32] if ours and hf.get(32) else None,
         3.0, 1),
    ]  # fmt: skip
    lines = []
    for label, value, bound, sign in checks:
        verdict = "n/a" if value is None else ("met" if sign * (value - bound) >= 0 else "MISSED")
        lines.append(f"| target | {label} | {_fmt(value, '.3f')} | {verdict} |")
    return lines


def report_md(results: dict, table: str) -> str:
    meta = results["meta"]
    out = [f"# GPU benchmark ({meta['date']}, {meta['device']}, {meta['dtype']})", "", table, ""]
    out += ["## Steps", ""] + [f"- `{s['name']}`: {s['status']} ({s.get('seconds', 0)} s): "
                               f"`{s['cmd']}`" for s in results["steps"]]  # fmt: skip
    out += ["", "## Raw", "", "```json", json.dumps(results, indent=1), "```", ""]
    return "\n".join(out)


def tiny_config_dir() -> str:
    folder = tempfile.mkdtemp(prefix="tiny-llama-gpu-smoke-")
    cfg = json.loads((CONFIG_DIR / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=512, bos_token_id=1,
               eos_token_id=2, max_position_embeddings=4096)  # fmt: skip
    Path(folder, "config.json").write_text(json.dumps(cfg))
    return folder


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    bw = sub.add_parser("bandwidth")
    bw.add_argument("--device", default="cuda")
    bw.add_argument("--size-mb", type=int, default=2048)
    hf = sub.add_parser("hf")
    hf.add_argument("--model-dir", required=True)
    hf.add_argument("--device", default="cuda")
    hf.add_argument("--dtype", default="bfloat16")
    hf.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    hf.add_argument("--input-len", type=int, default=GPU_INPUT)
    hf.add_argument("--output-len", type=int, default=GPU_OUTPUT)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "gpu_bench_out"))
    p.add_argument("--deadline", type=float, default=540.0, help="Seconds for all steps.")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--no-suite", dest="suite", action="store_false")
    args = p.parse_args(argv)
    if args.cmd == "bandwidth":
        print(json.dumps(bandwidth(args.device, args.size_mb)))
        return 0
    if args.cmd == "hf":
        hf_generate(args.model_dir, args.device, args.dtype, args.batch_size, args.input_len,
                    args.output_len)  # fmt: skip
        return 0
    if args.cpu_smoke:
        args.device, args.dtype, args.model_dir = "cpu", "float32", tiny_config_dir()
        args.context_length, args.max_total_tokens = 256, 1024
    else:
        args.device, args.dtype, args.model_dir = "cuda", "bfloat16", str(CONFIG_DIR)
        args.context_length = CAPTURE_INPUT + 2 * GPU_OUTPUT
        args.max_total_tokens = max(GPU_BATCHES) * (CAPTURE_INPUT + GPU_OUTPUT) + 4096
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
