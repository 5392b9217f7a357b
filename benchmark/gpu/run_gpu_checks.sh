#!/usr/bin/env bash
# One device call: versions, the per-commit-1-gpu suite and the Llama-3.1-8B (dummy, bf16)
# benchmark. Everything lands in $OUT (gpu_bench.md/json, logs); a short table prints last.
# Usage on the device machine, from the repo root: bash benchmark/gpu/run_gpu_checks.sh
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/python:$PWD/sgl-kernel${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi
  python3 -c 'import sys, torch, triton, transformers; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0)); print("triton", triton.__version__, "transformers", transformers.__version__)'
  python3 -c 'import sglang.bench_one_batch, sglang.srt.model_executor.cuda_graph_runner, sglang.srt.layers.attention.triton_backend; print("sglang imports ok")'
} 2>&1 | tee "$OUT/versions.txt"
python3 benchmark/gpu/bench_gpu.py --out-dir "$OUT" --deadline "${GPU_DEADLINE:-530}" 2>&1 | tee "$OUT/driver_log.txt"
