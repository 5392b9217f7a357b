/*
 * CPU matmul with bfloat16 weights: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), float32 accumulation.
 *
 * Owned by sgl_kernel.cpu_gemm, which compiles this file on first use and calls it through ctypes.
 * Why it exists: on x86 CPUs without native bf16 arithmetic (no AVX512_BF16 / AMX), PyTorch's bf16
 * GEMM runs about 3x slower than its float32 GEMM at decode's row counts, while a bf16 weight is
 * half the bytes to stream. This kernel widens each bf16 weight to float32 in registers (a bf16 is
 * the top half of a float32) and multiplies in float32, so it reads bf16 bytes at float32 speed.
 *
 * The same kernel takes float32 weights in the same layout (sgl_cpu_gemm_f32w): where PyTorch's
 * float32 GEMM runs below the machine's bandwidth at decode's row counts (MKL on AMD CPUs: 1.6-9.3x
 * slower than this on a Zen 4 EPYC, benchmark/results/cpu_f32_gemm.md), it is the same loop with
 * plain loads.
 *
 * Weight layout: packed once at load into blocks of NR output columns, [N/NR][K][NR] (the last
 * block zero-padded), so the inner loop reads NR consecutive weights per k. The register tile is
 * up to MR rows of x times NR columns: each k loads two vectors of weights and does 2*rows FMAs
 * with x broadcast from memory. Rows are processed in chunks of MC so that a chunk of x stays in
 * cache while every weight block streams past it once. Every output is summed over k in order in
 * one float32 chain, whatever the tile's row count, so a row's result does not depend on the other
 * rows of the call (a batch's composition) nor on the thread count. (A one-row tile with four
 * interleaved k chains was 1-3 % faster at decode's single row, but gave other bits.)
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

#define NR 32
#define MR 8
#define MC 64

/* 16 consecutive weights as float32: element i of w, bf16 (f32 = 0) or float32 (f32 = 1). */
static inline __attribute__((always_inline)) __m512 load_w16(const void *w, int64_t i, int f32) {
    if (f32) return _mm512_loadu_ps((const float *)w + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

int sgl_cpu_gemm_block_cols(void) { return NR; }

/* W [N][K] row-major, elements of es bytes (2: bf16, 4: float32) -> packed [ceil(N/NR)][K][NR]. */
static void pack(const void *w, int es, int64_t n, int64_t k, void *out, int nthreads) {
    int64_t nb = (n + NR - 1) / NR;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        char *o = (char *)out + b * k * NR * es;
        for (int64_t j = 0; j < NR; j++) {
            int64_t row = b * NR + j;
            const char *src = (const char *)w + row * k * es;
            for (int64_t kk = 0; kk < k; kk++) {
                char *dst = o + (kk * NR + j) * es;
                if (row < n)
                    memcpy(dst, src + kk * es, es);
                else
                    memset(dst, 0, es);
            }
        }
    }
}

void sgl_cpu_pack_bf16(const uint16_t *w, int64_t n, int64_t k, uint16_t *out, int nthreads) {
    pack(w, 2, n, k, out, nthreads);
}

void sgl_cpu_pack_f32(const float *w, int64_t n, int64_t k, float *out, int nthreads) {
    pack(w, 4, n, k, out, nthreads);
}

/* One register tile: rows x NR outputs into acc_out (rows * NR floats). */
static inline __attribute__((always_inline)) void tile(
    const float *x, int64_t ldx, int rows, int64_t k, const void *w, int f32, float *acc_out) {
    __m512 a0[MR], a1[MR];
    for (int r = 0; r < rows; r++) {
        a0[r] = _mm512_setzero_ps();
        a1[r] = _mm512_setzero_ps();
    }
    for (int64_t kk = 0; kk < k; kk++) {
        __m512 w0 = load_w16(w, kk * NR, f32), w1 = load_w16(w, kk * NR + 16, f32);
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_set1_ps(x[r * ldx + kk]);
            a0[r] = _mm512_fmadd_ps(xv, w0, a0[r]);
            a1[r] = _mm512_fmadd_ps(xv, w1, a1[r]);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm512_storeu_ps(acc_out + r * NR, a0[r]);
        _mm512_storeu_ps(acc_out + r * NR + 16, a1[r]);
    }
}

/* Rows and the weight type as constants, so each instance keeps its sums in registers. */
static inline __attribute__((always_inline)) void run_tile(const float *x, int64_t ldx, int rows,
                                                           int64_t k, const void *w, int f32,
                                                           float *acc) {
    switch (rows) {
        case 1: tile(x, ldx, 1, k, w, f32, acc); break;
        case 2: tile(x, ldx, 2, k, w, f32, acc); break;
        case 3: tile(x, ldx, 3, k, w, f32, acc); break;
        case 4: tile(x, ldx, 4, k, w, f32, acc); break;
        case 5: tile(x, ldx, 5, k, w, f32, acc); break;
        case 6: tile(x, ldx, 6, k, w, f32, acc); break;
        case 7: tile(x, ldx, 7, k, w, f32, acc); break;
        default: tile(x, ldx, MR, k, w, f32, acc); break;
    }
}

static void run_tile_bf16(const float *x, int64_t ldx, int rows, int64_t k, const void *w,
                          float *acc) {
    run_tile(x, ldx, rows, k, w, 0, acc);
}

static void run_tile_f32(const float *x, int64_t ldx, int rows, int64_t k, const void *w,
                         float *acc) {
    run_tile(x, ldx, rows, k, w, 1, acc);
}

/*
 * x: [m][k] with row stride ldx, float32 (x_bf16 = 0) or bfloat16 (x_bf16 = 1).
 * wp: packed weights of n outputs, bf16 (sgl_cpu_gemm_bf16w) or float32 (sgl_cpu_gemm_f32w).
 * bias: n floats or NULL.
 * y: [m][n] contiguous, float32 (y_bf16 = 0) or bfloat16 (y_bf16 = 1).
 * Returns 0, or -1 when the float32 copy of a bf16 x cannot be allocated.
 */
static int gemm(const void *x, int64_t ldx, int x_bf16, int64_t m, int64_t k, const void *wp,
                int f32, int64_t n, const float *bias, void *y, int y_bf16, int nthreads) {
    const float *xf = (const float *)x;
    float *copy = NULL;
    if (x_bf16) {
        copy = (float *)malloc((size_t)(m * k) * sizeof(float));
        if (!copy) return -1;
        const uint16_t *xb = (const uint16_t *)x;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * k > 65536)
        for (int64_t i = 0; i < m; i++)
            for (int64_t kk = 0; kk < k; kk++) copy[i * k + kk] = bf16_to_f32(xb[i * ldx + kk]);
        xf = copy;
        ldx = k;
    }
    int64_t nb = (n + NR - 1) / NR;
#pragma omp parallel num_threads(nthreads)
    for (int64_t m0 = 0; m0 < m; m0 += MC) {
        int64_t mc = (m - m0) < MC ? (m - m0) : MC;
        int64_t tiles = (mc + MR - 1) / MR;
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            for (int64_t t = 0; t < tiles; t++) {
                float acc[MR * NR];
                int64_t r0 = m0 + t * MR;
                int rows = (int)((m0 + mc - r0) < MR ? (m0 + mc - r0) : MR);
                if (f32)
                    run_tile_f32(xf + r0 * ldx, ldx, rows, k, (const float *)wp + b * k * NR, acc);
                else
                    run_tile_bf16(xf + r0 * ldx, ldx, rows, k, (const uint16_t *)wp + b * k * NR,
                                  acc);
                int64_t c0 = b * NR;
                int cols = (int)((n - c0) < NR ? (n - c0) : NR);
                for (int r = 0; r < rows; r++) {
                    size_t at = (size_t)((r0 + r) * n + c0) * (y_bf16 ? 2 : 4);
                    store_row(acc + r * NR, cols, bias ? bias + c0 : NULL, (char *)y + at, y_bf16);
                }
            }
        }
    }
    free(copy);
    return 0;
}

int sgl_cpu_gemm_bf16w(const void *x, int64_t ldx, int x_bf16, int64_t m, int64_t k,
                       const uint16_t *wp, int64_t n, const float *bias, void *y, int y_bf16,
                       int nthreads) {
    return gemm(x, ldx, x_bf16, m, k, wp, 0, n, bias, y, y_bf16, nthreads);
}

/* The same, for float32 weights packed by sgl_cpu_pack_f32 (one signature, so callers that hold
 * the bf16 entry's address can take this one's). */
int sgl_cpu_gemm_f32w(const void *x, int64_t ldx, int x_bf16, int64_t m, int64_t k,
                      const float *wp, int64_t n, const float *bias, void *y, int y_bf16,
                      int nthreads) {
    return gemm(x, ldx, x_bf16, m, k, wp, 1, n, bias, y, y_bf16, nthreads);
}
