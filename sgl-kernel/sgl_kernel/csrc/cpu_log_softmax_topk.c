/*
 * The top-n of log_softmax over listed rows of a float32 logits matrix, without writing a row.
 *
 * Owned by sgl_kernel.cpu_log_softmax_topk, which compiles this file on first use and calls it
 * through ctypes. Why it exists: the logit lens needs, per probed row of a 49k vocabulary, only
 * n values of log_softmax; PyTorch's route (topk, then x - max, exp, sum, log over the row) reads
 * and writes the whole row several times, and the rows it reads are scattered through the LM
 * head's output, so they must first be gathered (a copy as large as the rows).
 *
 * Per row, two passes: the first keeps the n largest values (ties: the lower index first) in a
 * small sorted list, comparing 16 values at a time against the n-th largest so far; the second
 * sums exp(x - max) in float32 lanes over 1024-column chunks, each chunk's sum added in double.
 * Each value is then x - max - log(sum), log_softmax's own formula. exp is a degree-6
 * polynomial after range reduction (relative error about 2e-7, below float32 rounding of the
 * sum); the AVX-512 path and the portable C path (libm's expf) agree to that error.
 * OpenMP splits the rows across threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define MAX_N 64

/* Insert (v, id) into best[0..*have) sorted descending, keeping at most n entries; equal values
 * keep their order (v goes after them), so the lower index stays first. */
static inline void insert(float *best, int32_t *ids, int *have, int n, float v, int32_t id) {
    int i = *have < n ? (*have)++ : n - 1;
    while (i > 0 && best[i - 1] < v) {
        best[i] = best[i - 1];
        ids[i] = ids[i - 1];
        i--;
    }
    best[i] = v;
    ids[i] = id;
}

static void top_scalar(const float *x, int64_t v0, int64_t v1, float *best, int32_t *ids,
                       int *have, int n) {
    for (int64_t j = v0; j < v1; j++) {
        if (*have < n || x[j] > best[n - 1]) insert(best, ids, have, n, x[j], (int32_t)j);
    }
}

static double sum_exp_scalar(const float *x, int64_t v0, int64_t v1, float mx) {
    double total = 0.0;
    for (int64_t j = v0; j < v1; j++) total += (double)expf(x[j] - mx);
    return total;
}

#define AVX512_TARGET __attribute__((target("avx512f,avx512dq,fma")))

AVX512_TARGET static int64_t top_avx512(const float *x, int64_t v, float *best, int32_t *ids,
                                        int *have, int n) {
    int64_t j = 0;
    /* Fill the list from the first values, then only values above its n-th enter. */
    int64_t start = n < v ? n : v;
    top_scalar(x, 0, start, best, ids, have, n);
    j = start;
    for (; j + 16 <= v; j += 16) {
        __m512 t = _mm512_set1_ps(best[n - 1]);
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), t, _CMP_GT_OQ);
        while (m) {
            int b = __builtin_ctz(m);
            m &= m - 1;
            /* The threshold rises as values enter; recheck against the current one. */
            if (x[j + b] > best[n - 1]) insert(best, ids, have, n, x[j + b], (int32_t)(j + b));
        }
    }
    return j;
}

/* exp(d) for d <= 0 (clamped below at -104, where expf is 0 in float32). */
AVX512_TARGET static inline __m512 exp_avx512(__m512 d) {
    d = _mm512_max_ps(d, _mm512_set1_ps(-104.0f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = d - k ln 2 in two steps (Cody-Waite), |r| <= ln 2 / 2. */
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), d);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

AVX512_TARGET static double sum_exp_avx512(const float *x, int64_t v, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    double total = 0.0;
    int64_t j = 0;
    while (j < v) {
        int64_t end = j + 1024 < v ? j + 1024 : v;
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (; j + 32 <= end; j += 32) {
            s0 = _mm512_add_ps(s0, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), m)));
            s1 = _mm512_add_ps(s1, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), m)));
        }
        for (; j < end; j += 16) {
            __mmask16 k = end - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (end - j)) - 1);
            /* Masked-off lanes read as -inf: exp gives 0. */
            __m512 xv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + j);
            s0 = _mm512_add_ps(s0, exp_avx512(_mm512_sub_ps(xv, m)));
        }
        total += (double)_mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    }
    return total;
}

static int use_avx512(int isa) {
    if (isa == 1) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

/*
 * logits: float32, row r at logits + r * ld, v values per row; rows: the r of each output row.
 * values: [nrows][n] float32 log_softmax values, descending; ids: [nrows][n] int32 columns.
 * isa: 0 picks the best path, 1 the portable one. Returns 0, or -1 when n is out of 1..MAX_N
 * or v < n.
 */
int sgl_cpu_log_softmax_topk(const float *logits, int64_t ld, int64_t v, const int64_t *rows,
                             int64_t nrows, int n, float *values, int32_t *ids, int isa,
                             int nthreads) {
    if (n < 1 || n > MAX_N || v < n) return -1;
    int wide = use_avx512(isa);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && nrows > 1)
    for (int64_t i = 0; i < nrows; i++) {
        const float *x = logits + rows[i] * ld;
        float best[MAX_N];
        int32_t at[MAX_N];
        int have = 0;
        int64_t done = wide ? top_avx512(x, v, best, at, &have, n) : 0;
        top_scalar(x, done, v, best, at, &have, n);
        float mx = best[0];
        double total = wide ? sum_exp_avx512(x, v, mx) : sum_exp_scalar(x, 0, v, mx);
        float log_sum = (float)log(total);
        for (int c = 0; c < n; c++) {
            values[i * n + c] = (best[c] - mx) - log_sum;
            ids[i * n + c] = at[c];
        }
    }
    return 0;
}
