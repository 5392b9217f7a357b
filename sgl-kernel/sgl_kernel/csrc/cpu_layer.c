/*
 * CPU kernels of a decoder layer's non-matmul work: (fused add +) RMSNorm, rotary embedding,
 * SiLU-and-mul, and decode attention read straight from the paged KV pool.
 *
 * Why they exist: at decode's batch sizes each of these is a handful (attention: some twenty) of
 * PyTorch operator calls on a few hundred values, so a small model's step on CPU is dominated by
 * per-call overhead (dispatch, allocation, dtype casts) rather than arithmetic. One call here
 * replaces them.
 *
 * Arithmetic follows the PyTorch reference (sgl_kernel/ref.py) operation by operation, with the
 * same roundings: a bfloat16 result is rounded to nearest even after every operation the reference
 * does in bfloat16, float32 work stays float32, and the file is compiled with -ffp-contract=off so
 * no multiply-add is fused behind the reference's back. What can still differ is the last bit of
 * a float32 transcendental or reduction (exp, the order of the mean's sum), as between any two
 * PyTorch builds.
 *
 * Decode attention is not a reference transcription: scores, softmax and the weighted sum are
 * float32 (as the fused SDPA kernel accumulates), rounded once to the output dtype.
 *
 * Dtype codes: 0 float32, 1 bfloat16. Rows are contiguous; row strides are in elements.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

/* A value rounded to bfloat16 and widened back (the result of one bf16 operation). */
static inline float rb(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* n values of a float32 or bf16 buffer widened into dst (the branch is outside the loops). */
static inline void load_f32(float *dst, const void *src, int bf16, int64_t n) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(p[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline void store_f32(void *dst, int bf16, const float *src, int64_t n) {
    if (bf16) {
        uint16_t *p = (uint16_t *)dst;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) p[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline void round_bf16(float *v, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) v[i] = rb(v[i]);
}

/* exp(x) for float32 in branch-free arithmetic the compiler vectorizes (Cody-Waite reduction by
 * ln 2 and a degree-6 polynomial; within about 2 ulp of the correctly rounded value, like the
 * vectorized exp PyTorch's CPU kernels use). */
static inline float exp_f32(float x) {
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.72283f ? 88.72283f : x;
    /* Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even). */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

#define ROW_MAX 16384 /* values per row kept on the stack; longer rows take the heap */

/*
 * out = weight * rmsnorm(x [+ residual]) per row of n values, as ref.rmsnorm /
 * ref.fused_add_rmsnorm: with residual, h = x + residual (one operation in the input dtype) is
 * written to res_out; then y = h * rsqrt(mean(h^2) + eps) in float32, cast to the input dtype,
 * times weight (weight_bf16 says its dtype; out_bf16 the product's, PyTorch's type promotion of
 * the two). x / residual rows have strides x_stride / r_stride; out and res_out are contiguous.
 * residual may be NULL. Returns 0, or -1 when a long row's buffer cannot be allocated.
 */
int sgl_cpu_rmsnorm(const void *x, int64_t x_stride, const void *residual, int64_t r_stride,
                    const void *weight, int weight_bf16, int bf16, float eps, int64_t m,
                    int64_t n, void *out, int out_bf16, void *res_out) {
    float stack[3 * (n <= ROW_MAX ? n : 1)];
    float *buf = n <= ROW_MAX ? stack : (float *)malloc(sizeof(float) * 3 * (size_t)n);
    if (buf == NULL) return -1;
    float *h = buf, *t = buf + n, *w = buf + 2 * n;
    const size_t esz = bf16 ? 2 : 4, out_esz = out_bf16 ? 2 : 4;
    load_f32(w, weight, weight_bf16, n);
    for (int64_t r = 0; r < m; r++) {
        load_f32(h, (const char *)x + r * x_stride * esz, bf16, n);
        if (residual != NULL) {
            load_f32(t, (const char *)residual + r * r_stride * esz, bf16, n);
#pragma omp simd
            for (int64_t i = 0; i < n; i++) h[i] = h[i] + t[i];
            if (bf16) round_bf16(h, n);
            store_f32((char *)res_out + r * n * esz, bf16, h, n);
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += h[i] * h[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) t[i] = h[i] * inv;
        if (bf16) round_bf16(t, n);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) t[i] = w[i] * t[i];
        store_f32((char *)out + r * n * out_esz, out_bf16, t, n);
    }
    if (buf != stack) free(buf);
    return 0;
}

/*
 * Rotary embedding in the half-split (neox) layout, as ref.apply_rotary_emb: for each token and
 * head, the first `rot` dims of x become x * cos + rotate_half(x) * sin (cos/sin: float32
 * [tokens][rot], cast to the input dtype first; each product and the sum rounded in the input
 * dtype); the other dims pass through. x: [tokens][heads][head_dim] with token stride x_stride
 * (heads contiguous); out: [tokens][heads][head_dim] contiguous. head_dim <= ROW_MAX.
 */
void sgl_cpu_rotary(const void *x, int64_t x_stride, int bf16, const float *cos, const float *sin,
                    int64_t tokens, int64_t heads, int64_t head_dim, int64_t rot, void *out) {
    const int64_t half = rot / 2;
    const size_t esz = bf16 ? 2 : 4;
    float c[rot], s[rot], xv[head_dim], rv[rot], a[head_dim];
    for (int64_t t = 0; t < tokens; t++) {
        memcpy(c, cos + t * rot, sizeof(float) * (size_t)rot);
        memcpy(s, sin + t * rot, sizeof(float) * (size_t)rot);
        if (bf16) {
            round_bf16(c, rot);
            round_bf16(s, rot);
        }
        for (int64_t h = 0; h < heads; h++) {
            load_f32(xv, (const char *)x + (t * x_stride + h * head_dim) * esz, bf16, head_dim);
            for (int64_t i = 0; i < half; i++) {
                rv[i] = -xv[i + half];
                rv[i + half] = xv[i];
            }
#pragma omp simd
            for (int64_t i = 0; i < rot; i++) {
                a[i] = xv[i] * c[i];
                rv[i] = rv[i] * s[i];
            }
            if (bf16) {
                round_bf16(a, rot);
                round_bf16(rv, rot);
            }
#pragma omp simd
            for (int64_t i = 0; i < rot; i++) a[i] = a[i] + rv[i];
            for (int64_t i = rot; i < head_dim; i++) a[i] = xv[i];
            store_f32((char *)out + (t * heads + h) * head_dim * esz, bf16, a, head_dim);
        }
    }
}

/* out = silu(gate) * up for x = [gate | up] rows of 2d values (stride x_stride), as
 * ref.silu_and_mul: silu in float32, rounded to the input dtype, then the product rounded.
 * Returns 0, or -1 when a long row's buffer cannot be allocated. */
int sgl_cpu_silu_and_mul(const void *x, int64_t x_stride, int bf16, int64_t m, int64_t d,
                         void *out) {
    float stack[2 * (d <= ROW_MAX ? d : 1)];
    float *buf = d <= ROW_MAX ? stack : (float *)malloc(sizeof(float) * 2 * (size_t)d);
    if (buf == NULL) return -1;
    float *g = buf, *u = buf + d;
    const size_t esz = bf16 ? 2 : 4;
    for (int64_t r = 0; r < m; r++) {
        load_f32(g, (const char *)x + r * x_stride * esz, bf16, d);
        load_f32(u, (const char *)x + (r * x_stride + d) * esz, bf16, d);
#pragma omp simd
        for (int64_t i = 0; i < d; i++) g[i] = g[i] / (1.0f + exp_f32(-g[i]));
        if (bf16) round_bf16(g, d);
#pragma omp simd
        for (int64_t i = 0; i < d; i++) g[i] = g[i] * u[i];
        store_f32((char *)out + r * d * esz, bf16, g, d);
    }
    if (buf != stack) free(buf);
    return 0;
}

/* Attention is not a reference transcription: let its sums use fused multiply-adds. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

static inline float dot_f32(const float *a, const float *b, int64_t d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < d; i++) acc += a[i] * b[i];
    return acc;
}

static void store_new(const void *src, int64_t src_stride, int src_bf16, void *buf, int buf_bf16,
                      const int64_t *loc, int64_t bs, int64_t row) {
    for (int64_t b = 0; b < bs; b++) {
        const int64_t dst_off = loc[b] * row, src_off = b * src_stride;
        if (src_bf16 == buf_bf16) {
            const size_t esz = buf_bf16 ? 2 : 4;
            memcpy((char *)buf + dst_off * esz, (const char *)src + src_off * esz, row * esz);
        } else if (buf_bf16) {
            for (int64_t i = 0; i < row; i++)
                ((uint16_t *)buf)[dst_off + i] = f32_to_bf16(((const float *)src)[src_off + i]);
        } else {
            for (int64_t i = 0; i < row; i++)
                ((float *)buf)[dst_off + i] = bf16_to_f32(((const uint16_t *)src)[src_off + i]);
        }
    }
}

/*
 * The AVX-512 halves of one attention task, for head_dim = 16 * NV (NV 4, 8 or 16: 64, 128, 256),
 * where the portable loops below are latency-bound: a K row and a V row are NV registers
 * (widened once per key for every query head of the group), each score is NV multiply-adds and
 * one horizontal sum, and the output sums of up to 16 / NV query heads stay in registers across
 * every value row. Used when the CPU has AVX-512F/DQ (checked at run time).
 */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq")

static inline __attribute__((always_inline)) __m512 load16(const char *p, int bf16) {
    if (bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)p);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)p);
}

/* scores[g * n + t] = scale * q_g . k_t (soft-capped when cap > 0) for the task's n keys. */
static inline __attribute__((always_inline)) void scores_v(
    const int NV, const float *qf, int64_t group, const char *k_base, int kv_bf16, int64_t row,
    const int32_t *s32, const int64_t *s64, int64_t n, float scale, float cap, float *scores) {
    const size_t esz = kv_bf16 ? 2 : 4;
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = s64 != NULL ? s64[t] : s32[t];
        const char *kp = k_base + (size_t)(slot * row) * esz;
        __m512 kv[16];
        for (int c = 0; c < NV; c++) kv[c] = load16(kp + (size_t)c * 16 * esz, kv_bf16);
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qf + g * 16 * NV;
            __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(qg), kv[0]);
            __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(qg + 16), kv[1]);
            for (int c = 2; c < NV; c += 2) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), kv[c], a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c + 16), kv[c + 1], a1);
            }
            float sc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
            if (cap > 0.0f) sc = tanhf(sc / cap) * cap;
            scores[g * n + t] = sc;
        }
    }
}

/* acc[g * d ...] = sum_t p[g][t] * v_t for every query head g of the task. */
static inline __attribute__((always_inline)) void values_v(
    const int NV, const float *probs, int64_t group, const char *v_base, int kv_bf16, int64_t row,
    const int32_t *s32, const int64_t *s64, int64_t n, float *acc) {
    const size_t esz = kv_bf16 ? 2 : 4;
    const int GT = 16 / NV; /* query heads whose sums fit in 16 registers */
    for (int64_t g0 = 0; g0 < group; g0 += GT) {
        const int gt = (int)(group - g0 < GT ? group - g0 : GT);
        __m512 a[16];
        for (int i = 0; i < GT * NV; i++) a[i] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            const int64_t slot = s64 != NULL ? s64[t] : s32[t];
            const char *vp = v_base + (size_t)(slot * row) * esz;
            __m512 vv[16];
            for (int c = 0; c < NV; c++) vv[c] = load16(vp + (size_t)c * 16 * esz, kv_bf16);
            for (int gi = 0; gi < GT; gi++) {
                if (gi >= gt) break;
                const __m512 pv = _mm512_set1_ps(probs[(g0 + gi) * n + t]);
                for (int c = 0; c < NV; c++)
                    a[gi * NV + c] = _mm512_fmadd_ps(pv, vv[c], a[gi * NV + c]);
            }
        }
        for (int gi = 0; gi < gt; gi++)
            for (int c = 0; c < NV; c++)
                _mm512_storeu_ps(acc + (g0 + gi) * 16 * NV + 16 * c, a[gi * NV + c]);
    }
}

/* Dispatch on head_dim / 16 so each body is compiled with its register count known: CALL(nv)
 * for d = 16 nv; 0 when d has no AVX-512 body (the caller then runs the portable loops). */
#define BY_HEAD_DIM(d, CALL)              \
    switch (d) {                          \
        case 64: CALL(4); return 1;       \
        case 128: CALL(8); return 1;      \
        case 256: CALL(16); return 1;     \
        default: return 0;                \
    }

static int scores_avx512(int64_t d, const float *qf, int64_t group, const char *k_base,
                         int kv_bf16, int64_t row, const int32_t *s32, const int64_t *s64,
                         int64_t n, float scale, float cap, float *scores) {
#define SCORES(nv) scores_v(nv, qf, group, k_base, kv_bf16, row, s32, s64, n, scale, cap, scores)
    BY_HEAD_DIM(d, SCORES)
#undef SCORES
}

static int values_avx512(int64_t d, const float *probs, int64_t group, const char *v_base,
                         int kv_bf16, int64_t row, const int32_t *s32, const int64_t *s64,
                         int64_t n, float *acc) {
#define VALUES(nv) values_v(nv, probs, group, v_base, kv_bf16, row, s32, s64, n, acc)
    BY_HEAD_DIM(d, VALUES)
#undef VALUES
}

#pragma GCC pop_options

static int have_avx512(void) {
    static int known = -1;
    if (known < 0)
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") ? 1 : 0;
    return known;
}

/*
 * Decode attention: one query token per request, keys and values read in place from the pool.
 * Optionally stores the step's new K/V into the pool first. Layouts:
 *   q      [bs][hq][d] with row stride q_stride elements per token, dtype q_dtype
 *   k_buf, v_buf  pool [slots][hkv][d] contiguous, dtype kv_dtype
 *   k_new, v_new  [bs][hkv][d] with row strides k_stride, v_stride, dtype new_dtype (k_new NULL:
 *                 nothing to store), written to slots loc[bs] (int64)
 *   req_to_token  [rows][rtt_stride], int32 (rtt_i64 = 0) or int64
 *   req_idx, seq_lens  [bs] int64; the query sits at position seq_lens[b] - 1
 *   out    [bs][hq][d] contiguous, dtype out_dtype; lse [bs][hq] float32 (NULL: not written)
 * Query head h reads KV head h / (hq / hkv). Key j is visible when j <= pos and, with window > 0,
 * pos - j < window. cap > 0 soft-caps the scaled scores: cap * tanh(s / cap). lse is the natural
 * log-sum-exp of the scaled, capped scores. Returns 0, or -1 when scratch cannot be allocated.
 */
int sgl_cpu_decode_attention(const void *q, int64_t q_stride, int q_dtype, void *k_buf,
                             void *v_buf, int kv_dtype, const void *k_new, const void *v_new,
                             int64_t k_stride, int64_t v_stride, int new_dtype, const int64_t *loc, int64_t hq,
                             int64_t hkv, int64_t d, const void *req_to_token, int rtt_i64,
                             int64_t rtt_stride, const int64_t *req_idx, const int64_t *seq_lens,
                             int64_t bs, int64_t window, float cap, float scale, void *out,
                             int out_dtype, float *lse, int nthreads) {
    const int64_t group = hq / hkv, row = hkv * d;
    if (k_new != NULL) {
        store_new(k_new, k_stride, new_dtype, k_buf, kv_dtype, loc, bs, row);
        store_new(v_new, v_stride, new_dtype, v_buf, kv_dtype, loc, bs, row);
    }
    int64_t max_len = 1;
    for (int64_t b = 0; b < bs; b++)
        if (seq_lens[b] > max_len) max_len = seq_lens[b];
    int failed = 0;
    const int avx512 = have_avx512();
    /* One task per (request, KV head): its `group` query heads share every key and value read. */
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        /* scores [group][max_len], the query rows, the output sums, one widened K or V row */
        const size_t floats = (size_t)(group * max_len + 2 * group * d + d);
        float *scores = (float *)malloc(sizeof(float) * floats);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *qf = scores + group * max_len, *acc = qf + group * d, *kv = acc + group * d;
        const size_t kv_esz = kv_dtype ? 2 : 4;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < bs * hkv; task++) {
            if (scores == NULL) continue;
            const int64_t b = task / hkv, kh = task % hkv;
            const int64_t len = seq_lens[b], pos = len - 1;
            const int64_t lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
            const int64_t n = len - lo;
            const int32_t *slots32 = (const int32_t *)req_to_token + req_idx[b] * rtt_stride + lo;
            const int64_t *slots64 = (const int64_t *)req_to_token + req_idx[b] * rtt_stride + lo;
            load_f32(qf, (const char *)q + (b * q_stride + kh * group * d) * (q_dtype ? 2 : 4),
                     q_dtype, group * d);
            const int32_t *s32 = rtt_i64 ? NULL : slots32;
            const int64_t *s64 = rtt_i64 ? slots64 : NULL;
            const char *k_base = (const char *)k_buf + kh * d * kv_esz;
            const char *v_base = (const char *)v_buf + kh * d * kv_esz;
            const int wide = avx512 && scores_avx512(d, qf, group, k_base, kv_dtype, row, s32,
                                                     s64, n, scale, cap, scores);
            for (int64_t t = 0; t < n && !wide; t++) {
                const int64_t slot = rtt_i64 ? slots64[t] : slots32[t];
                load_f32(kv, (const char *)k_buf + (slot * row + kh * d) * kv_esz, kv_dtype, d);
                for (int64_t g = 0; g < group; g++) {
                    float sc = dot_f32(qf + g * d, kv, d) * scale;
                    if (cap > 0.0f) sc = tanhf(sc / cap) * cap;
                    scores[g * n + t] = sc;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *sc = scores + g * n;
                float mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx)
                for (int64_t t = 0; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
#pragma omp simd reduction(+ : sum)
                for (int64_t t = 0; t < n; t++) {
                    sc[t] = exp_f32(sc[t] - mx);
                    sum += sc[t];
                }
                const float inv = 1.0f / sum;
#pragma omp simd
                for (int64_t t = 0; t < n; t++) sc[t] *= inv;
                if (lse != NULL) lse[b * hq + kh * group + g] = mx + logf(sum);
            }
            if (wide) {
                values_avx512(d, scores, group, v_base, kv_dtype, row, s32, s64, n, acc);
            } else {
                memset(acc, 0, sizeof(float) * (size_t)(group * d));
            }
            for (int64_t t = 0; t < n && !wide; t++) {
                const int64_t slot = rtt_i64 ? slots64[t] : slots32[t];
                load_f32(kv, (const char *)v_buf + (slot * row + kh * d) * kv_esz, kv_dtype, d);
                for (int64_t g = 0; g < group; g++) {
                    const float p = scores[g * n + t];
                    float *a = acc + g * d;
#pragma omp simd
                    for (int64_t i = 0; i < d; i++) a[i] += p * kv[i];
                }
            }
            store_f32((char *)out + (b * hq + kh * group) * d * (out_dtype ? 2 : 4), out_dtype, acc,
                      group * d);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

#pragma GCC pop_options

/* ---- a decode step's decoder layers in one call ----------------------------------------------- */

/*
 * Runs consecutive Llama-family decoder layers of a decode step (pre-norm attention and gated MLP:
 * norm, qkv, rotary, attention over the pool, o, add + norm, gate/up, SiLU-and-mul, down) with the
 * kernels above and the packed GEMMs, which live in their own libraries (each compiled with its
 * own flags) and come in as function pointers. Every call here is the one the layer modules make
 * for the same batch, in the same order, with the same arguments, so the result is bit-identical
 * to running the modules; what goes away is the Python between the calls.
 */
typedef int (*gemm_bf16w_fn)(const void *, int64_t, int, int64_t, int64_t, const void *, int64_t,
                             const float *, void *, int, int);
typedef int (*gemm_gguf_fn)(const void *, int64_t, int, int64_t, int64_t, const void *, int64_t,
                            int, int, int, int, const float *, void *, int, int, int, int);

enum { LINEAR_BF16W = 1, LINEAR_GGUF = 2 };

/* One projection's packed weight (n outputs, k inputs); int64 fields keep the ctypes mirror
 * (sgl_kernel/cpu_layer.py) free of padding questions. */
typedef struct {
    int64_t kind;
    const void *fn;
    const void *w;
    int64_t n, k;
    const float *bias;                    /* float32 [n] or NULL */
    int64_t bits, zp, has_min, scale_f32; /* GGUF record format */
} sgl_linear;

typedef struct {
    sgl_linear qkv, o, gate_up, down;
    const void *norm1, *norm2; /* input / post-attention RMSNorm weights, the activation dtype */
    float eps1, eps2, scale, logit_cap;
    int64_t window;
    void *k_buf, *v_buf; /* this layer's pool [slots][hkv][d] */
    int64_t id;          /* the layer's index in the model (the probe slots' index) */
} sgl_decoder_layer;

typedef struct {
    int64_t m, hidden, hq, hkv, head_dim, rot, inter;
    int64_t bf16, kv_bf16; /* activation dtype and pool dtype: 0 float32, 1 bfloat16 */
    const float *cos, *sin; /* [m][rot] */
    const void *req_to_token;
    int64_t rtt_i64, rtt_stride;
    const int64_t *req_idx, *seq_lens, *loc;
    int64_t gguf_passes, gguf_isa, gemm_threads, attn_threads;
    /* Layer probes (0 rows: none). After layer L, probe row r (batch row tap_rows[r]) gets its
     * residual stream h = x + residual (one add in the activation dtype) in
     * tap_stream[stream_slot[L]][r] and rmsnorm(h) * final_norm in tap_normed[normed_slot[L]][r]
     * (slots -1: not asked), by the call the model's final fused add-norm makes. */
    int64_t tap_n;
    const int64_t *tap_rows, *stream_slot, *normed_slot; /* [tap_n], [layers], [layers] */
    void *tap_stream, *tap_normed; /* [slots][tap_n][hidden], the activation dtype */
    const void *final_norm;
    float final_eps;
} sgl_decode_step;

static int linear(const sgl_linear *l, const sgl_decode_step *s, const void *x, int64_t m,
                  void *y) {
    const int bf16 = (int)s->bf16;
    if (l->kind == LINEAR_BF16W)
        return ((gemm_bf16w_fn)l->fn)(x, l->k, bf16, m, l->k, l->w, l->n, l->bias, y, bf16,
                                      (int)s->gemm_threads);
    return ((gemm_gguf_fn)l->fn)(x, l->k, bf16, m, l->k, l->w, l->n, (int)l->bits, (int)l->zp,
                                 (int)l->has_min, (int)l->scale_f32, l->bias, y, bf16,
                                 (int)s->gguf_passes, (int)s->gguf_isa, (int)s->gemm_threads);
}

/* Scratch values (in the activation dtype) sgl_cpu_decoder_layers needs for m rows. */
int64_t sgl_cpu_decoder_scratch(const sgl_decode_step *s) {
    const int64_t q = s->hq * s->head_dim, kv = s->hkv * s->head_dim;
    return s->m * (s->hidden + (q + 2 * kv) + q + kv + q + s->hidden + 3 * s->inter);
}

/* The probes of layer L (see sgl_decode_step), x its output, res the residual it was added to;
 * spare_a / spare_b: a free row each for the results nobody asked for. */
static int tap_layer(const sgl_decode_step *s, const sgl_decoder_layer *L, const void *x,
                     const void *res, void *spare_a, void *spare_b) {
    const int64_t hs = s->hidden, at = L->id;
    const int64_t hslot = s->stream_slot[at], nslot = s->normed_slot[at];
    if (hslot < 0 && nslot < 0) return 0;
    const int bf16 = (int)s->bf16;
    const size_t row = (size_t)hs * (bf16 ? 2 : 4);
    for (int64_t r = 0; r < s->tap_n; r++) {
        const int64_t b = s->tap_rows[r];
        char *h = hslot >= 0 ? (char *)s->tap_stream + (size_t)(hslot * s->tap_n + r) * row
                             : (char *)spare_a;
        char *y = nslot >= 0 ? (char *)s->tap_normed + (size_t)(nslot * s->tap_n + r) * row
                             : (char *)spare_b;
        int rc = sgl_cpu_rmsnorm((const char *)x + b * row, hs, (const char *)res + b * row, hs,
                                 s->final_norm, bf16, bf16, s->final_eps, 1, hs, y, bf16, h);
        if (rc != 0) return rc;
    }
    return 0;
}

/*
 * Layers [0, count) of `layers` over m rows. x_in: the first layer's input [m][hidden];
 * res_in: its residual stream, or NULL when the first layer is the model's first (the residual is
 * then x_in itself). Results: x_out, the last layer's output, and res_out, the residual stream
 * (each [m][hidden], contiguous; res_out may alias res_in). scratch: sgl_cpu_decoder_scratch
 * values. Returns 0, or the first nonzero return of a kernel.
 */
int sgl_cpu_decoder_layers(const sgl_decode_step *s, const sgl_decoder_layer *layers,
                           int64_t count, const void *x_in, const void *res_in, void *x_out,
                           void *res_out, void *scratch) {
    const int bf16 = (int)s->bf16;
    const size_t esz = bf16 ? 2 : 4;
    const int64_t m = s->m, hs = s->hidden, d = s->head_dim;
    const int64_t q = s->hq * d, kv = s->hkv * d, w = q + 2 * kv;
    char *h = (char *)scratch;
    char *qkv = h + m * hs * esz, *qr = qkv + m * w * esz, *kr = qr + m * q * esz;
    char *att = kr + m * kv * esz, *o = att + m * q * esz, *gu = o + m * hs * esz;
    char *act = gu + m * 2 * s->inter * esz;
    int rc = 0;
    for (int64_t i = 0; i < count && rc == 0; i++) {
        const sgl_decoder_layer *L = layers + i;
        const void *x = i == 0 ? x_in : x_out;
        if (i == 0 && res_in == NULL) {
            memcpy(res_out, x_in, (size_t)(m * hs) * esz);
            rc = sgl_cpu_rmsnorm(x, hs, NULL, 0, L->norm1, bf16, bf16, L->eps1, m, hs, h, bf16,
                                 NULL);
        } else {
            const void *r = i == 0 ? res_in : res_out;
            rc = sgl_cpu_rmsnorm(x, hs, r, hs, L->norm1, bf16, bf16, L->eps1, m, hs, h, bf16,
                                 res_out);
        }
        if (rc == 0) rc = linear(&L->qkv, s, h, m, qkv);
        if (rc != 0) break;
        sgl_cpu_rotary(qkv, w, bf16, s->cos, s->sin, m, s->hq, d, s->rot, qr);
        sgl_cpu_rotary(qkv + q * esz, w, bf16, s->cos, s->sin, m, s->hkv, d, s->rot, kr);
        rc = sgl_cpu_decode_attention(qr, q, bf16, L->k_buf, L->v_buf, (int)s->kv_bf16, kr,
                                      qkv + (q + kv) * esz, kv, w, bf16, s->loc, s->hq, s->hkv, d,
                                      s->req_to_token, (int)s->rtt_i64, s->rtt_stride, s->req_idx,
                                      s->seq_lens, m, L->window, L->logit_cap, L->scale, att,
                                      bf16, NULL, (int)s->attn_threads);
        if (rc == 0) rc = linear(&L->o, s, att, m, o);
        if (rc == 0)
            rc = sgl_cpu_rmsnorm(o, hs, res_out, hs, L->norm2, bf16, bf16, L->eps2, m, hs, h, bf16,
                                 res_out);
        if (rc == 0) rc = linear(&L->gate_up, s, h, m, gu);
        if (rc == 0) rc = sgl_cpu_silu_and_mul(gu, 2 * s->inter, bf16, m, s->inter, act);
        if (rc == 0) rc = linear(&L->down, s, act, m, x_out);
        /* h and o are free again: the spare rows of the probes nobody asked for. */
        if (rc == 0 && s->tap_n > 0) rc = tap_layer(s, L, x_out, res_out, h, o);
    }
    return rc;
}
