"""This CPU's peak rate of the two instructions the CPU matmul kernels are made of.

Owns measuring, per run, how many 512-bit `vpdpbusd` (AVX-512 VNNI: 64 byte products, the GGUF
kernel's instruction, csrc/cpu_gemm_gguf.c) and `vfmadd231ps` (16 float32 products, the dense
float32 matmul's) one core retires per second in a loop that touches no memory: twelve
independent accumulators, so neither latency nor loads limit it. A kernel's figure divided by
this is its fraction of peak, and work / peak is a floor no kernel can beat (used by
bench_attention_options.py for the logit lens's extra LM-head rows). The loop is compiled with
the system's `cc` at run time and run on `threads` OpenMP threads at once (the figure is per
core: the total over the threads divided by their number).

    .venv/bin/python benchmark/vector_peak.py --threads 2
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from sgl_kernel.cpu_build import cpu_flags

# Each op of a loop step updates one of 12 accumulators; `asm volatile` keeps the operands opaque.
SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#define STEPS 20000000L
#define TWELVE(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static int vnni(void) {
#define DECL(i) __m512i a##i = _mm512_set1_epi32(i);
    TWELVE(DECL)
    __m512i b = _mm512_set1_epi8(3), c = _mm512_set1_epi8(5);
    for (long n = 0; n < STEPS; n++) {
#define STEP(i) a##i = _mm512_dpbusd_epi32(a##i, b, c);
        TWELVE(STEP) __asm__ volatile("" : "+v"(b), "+v"(c));
    }
#define SUM(i) +_mm512_reduce_add_epi32(a##i)
    return 0 TWELVE(SUM);
}
__attribute__((target("avx512f"))) static float fma32(void) {
#define DECLF(i) __m512 f##i = _mm512_set1_ps((float)i);
    TWELVE(DECLF)
    __m512 g = _mm512_set1_ps(1.0f);
    for (long n = 0; n < STEPS; n++) {
#define STEPF(i) f##i = _mm512_fmadd_ps(f##i, g, g);
        TWELVE(STEPF) __asm__ volatile("" : "+v"(g));
    }
#define SUMF(i) +_mm512_reduce_add_ps(f##i)
    return 0 TWELVE(SUMF);
}
int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    double t0 = omp_get_wtime();
    long sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += vnni();
    double t1 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += (long)fma32();
    double t2 = omp_get_wtime();
    printf("%.4f %.4f %ld\n", 12.0 * STEPS / (t1 - t0) / 1e9, 12.0 * STEPS / (t2 - t1) / 1e9,
           sink & 1);
    return 0;
}
"""


def vector_peaks(threads: int = 1) -> Optional[dict[str, float]]:
    """Per-core G instructions/s: {"vpdpbusd": ..., "vfmadd231ps": ...} with `threads` threads
    busy at once; None where the CPU lacks AVX-512 VNNI or `cc` cannot build the loop."""
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        try:
            subprocess.run(["cc", "-O2", "-fopenmp", str(src), "-o", str(exe)], check=True,
                           capture_output=True)  # fmt: skip
            out = subprocess.run([str(exe), str(threads)], check=True, capture_output=True,
                                 text=True).stdout.split()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            return None
    return {"vpdpbusd": float(out[0]), "vfmadd231ps": float(out[1])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    peaks = vector_peaks(p.parse_args().threads)
    if peaks is None:
        print("no AVX-512 VNNI on this CPU (or no C compiler): nothing to measure")
        return 1
    for name, rate in peaks.items():
        print(f"{name} zmm: {rate:.2f} G/s per core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
