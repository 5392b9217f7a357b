/*
 * CPU matmul on GGUF block-quantized weights kept packed: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
 *
 * Owned by sgl_kernel.cpu_gemm_gguf, which compiles this file on first use and calls it through
 * ctypes. Why it exists: a decode step at batch 1 is bound by the bytes of weight it streams, and
 * a Q4_1 weight is 5 bits where a bf16 one is 16; PyTorch's int4 kernel has no fast float32 path
 * and no Q8_0 form.
 *
 * Every format is an affine function of an unsigned code c per 32-weight block of a row:
 *   w = d * (c - zp) + mn      (Q4_0: zp 8, no mn; Q4_1: mn; Q8_0: c = q + 128, zp 128;
 *                               Q4_K sub-blocks: d = d * sc, mn = -dmin * mins, float32 scales)
 * Activations are quantized once per call, per row and 32-block, to integers X with one step e,
 * so the block's dot product is an integer one:
 *   sum_i w_i x_i ~= d * e * (sum_i c_i X_i - zp * sum_i X_i) + mn * e * sum_i X_i,
 * which AVX-512 VNNI computes 64 byte products per instruction (vpdpbusd: unsigned codes times
 * signed bytes). passes = 1 is llama.cpp's scheme: X = round(x / e) in int8, e = max|x| / 127
 * (about 1 % relative error per layer on SmolLM2's activations). passes = 2 adds the residual's
 * int8 code at step e / 254, X = 254 q1 + q2 (about 15 bits; 4e-5 per layer, better than
 * bfloat16 activations): twice the dot products, the same weight bytes. The only approximation
 * is X's rounding (measured by the tests and docs/quantization.md); the rest is exact integer
 * arithmetic and one float32 sum per block.
 *
 * Weight layout (packed once at load): tiles of NC = 16 output columns (N zero-padded); per tile,
 * one record per 32-block of K: the codes, then 16 scales d, then 16 mins (when the format has
 * them), scales as float16 (Q4_0/Q4_1/Q8_0 store float16, so this is exact) or float32. Codes are
 * interleaved so one 64-byte vector holds 4 consecutive k of all 16 columns (byte 4 j + i is
 * column j, k = 4 g + i): 4-bit records hold k groups g in the low nibbles of vector g and g + 4
 * in the high nibbles (256 bytes); 8-bit records hold group g in vector g (512 bytes). One int32
 * lane of vpdpbusd then sums one column's 4 products, with no horizontal reduction.
 *
 * Paths: AVX-512 (F/BW/VNNI), AVX2 (maddubs: products of two codes below 16 fit int16; 8-bit
 * codes go in two nibbles) and portable C. All compute the same integer sums and the same float
 * operations in the same order, so they agree to float32 rounding of fma contraction.
 * OpenMP splits the output tiles, in groups, across threads. The AVX-512 path computes a group
 * in one kernel (tiles_avx512): each activation broadcast then feeds every tile's codes, which
 * keeps the loads below the multiply ports. Groups are pairs (four rows at a time; 1.05-1.37x
 * over one tile at a time on SmolLM2's shapes, benchmark/results/cpu_gguf_tile_pairs.md), and
 * fours (two rows at a time) for 8-bit codes with two passes, whose products outnumber their
 * code loads most (1.05-1.15x over pairs on the Q8_0 LM head, cpu_gguf_tile_quads.md). Same
 * bits either way. A group past the last tile repeats the last tile's records.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_bf16.h"

#define NC 16 /* output columns per tile */
#define QK 32 /* weights per block */
#define MR 4  /* activation rows per register tile */
#define NT_MAX 4 /* column tiles per AVX-512 kernel call */

enum { ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3, ISA_AMX = 4 };

static inline int64_t codes_bytes(int bits) { return bits == 4 ? 256 : 512; }

int64_t sgl_gguf_record_bytes(int bits, int has_min, int scale_f32) {
    return codes_bytes(bits) + (int64_t)NC * (scale_f32 ? 4 : 2) * (1 + (has_min != 0));
}

int sgl_gguf_tile_cols(void) { return NC; }

/* The best path this CPU runs. */
int sgl_gguf_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
    return ISA_SCALAR;
}

/*
 * codes: uint8 [n][k] (one code per byte, 0..15 or 0..255); scale / mins: [n][k / 32] elements of
 * 2 bytes (float16) or 4 (float32, scale_f32 = 1); mins NULL for formats without them.
 * out: ceil(n / 16) * (k / 32) records of sgl_gguf_record_bytes.
 */
void sgl_gguf_pack(const uint8_t *codes, const void *scale, const void *mins, int64_t n,
                   int64_t k, int bits, int scale_f32, uint8_t *out, int nthreads) {
    int64_t nb = k / QK, nt = (n + NC - 1) / NC;
    int sb = scale_f32 ? 4 : 2;
    int64_t rb = sgl_gguf_record_bytes(bits, mins != NULL, scale_f32), cb = codes_bytes(bits);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < nt; t++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *rec = out + (t * nb + b) * rb;
            memset(rec, 0, rb);
            for (int j = 0; j < NC; j++) {
                int64_t col = t * NC + j;
                if (col >= n) continue;
                const uint8_t *c = codes + col * k + b * QK;
                for (int i = 0; i < 4; i++) {
                    if (bits == 4) {
                        for (int g = 0; g < 4; g++)
                            rec[g * 64 + j * 4 + i] =
                                (uint8_t)((c[4 * g + i] & 15) | ((c[16 + 4 * g + i] & 15) << 4));
                    } else {
                        for (int g = 0; g < 8; g++) rec[g * 64 + j * 4 + i] = c[4 * g + i];
                    }
                }
                memcpy(rec + cb + j * sb, (const uint8_t *)scale + (col * nb + b) * sb, sb);
                if (mins)
                    memcpy(rec + cb + (NC + j) * sb, (const uint8_t *)mins + (col * nb + b) * sb,
                           sb);
            }
        }
    }
}

static inline float half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, u;
    if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define RES 254 /* the residual pass's step is the first one's / RES */

/* Round to nearest even (as nearbyintf in the default mode) by the 1.5 * 2^23 trick, which
 * the compiler vectorizes; exact for |v| < 2^22. */
static inline int32_t round_clamp(float v) {
    int32_t c = (int32_t)((v + 12582912.0f) - 12582912.0f);
    return c > 127 ? 127 : (c < -127 ? -127 : c);
}

/* One activation row, one block: int8 codes q1 (and q2 when passes = 2), the step e of
 * X = q1 (or RES q1 + q2) and X's sum. */
static void quantize_block(const void *x, int x_bf16, int passes, float *e, int32_t *sx,
                           int8_t *q1, int8_t *q2) {
    float v[QK], amax = 0.0f;
    for (int i = 0; i < QK; i++) {
        v[i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
        float a = fabsf(v[i]);
        amax = a > amax ? a : amax;
    }
    float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t s = 0;
    for (int i = 0; i < QK; i++) {
        int32_t c = round_clamp(v[i] * id);
        q1[i] = (int8_t)c;
        if (passes == 2) {
            /* |v - c d| <= d / 2, so the residual's code at step d / RES stays within 127. */
            int32_t c2 = round_clamp((v[i] - (float)c * d) * id * (float)RES);
            q2[i] = (int8_t)c2;
            c = c * RES + c2;
        }
        s += c;
    }
    *e = passes == 2 ? d / (float)RES : d;
    *sx = s;
}

typedef struct {
    const int8_t *xq; /* [passes][m][k]: q1, then q2 (AMX: m padded to whole tiles) */
    const float *xd;  /* [m][nb] steps e */
    const int32_t *xs; /* [m][nb] sums of X */
    int64_t m;
    int passes;
    int64_t k, nb, rb;
    int bits, zp, has_min, scale_f32;
} args_t;

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- portable C ---------------------------------------------------------------------------- */

static void tile_scalar(const args_t *a, int64_t r0, int rows, const uint8_t *w, float *out) {
    int64_t cb = codes_bytes(a->bits);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < NC; j++) out[r * NC + j] = 0.0f;
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *rec = w + b * a->rb;
        const uint8_t *sc = rec + cb;
        for (int r = 0; r < rows; r++) {
            const int8_t *xr = a->xq + (r0 + r) * a->k + b * QK;
            float dx = a->xd[(r0 + r) * a->nb + b];
            int32_t sx = a->xs[(r0 + r) * a->nb + b];
            for (int j = 0; j < NC; j++) {
                int32_t s = 0;
                for (int g = 0; g < 8; g++) {
                    for (int i = 0; i < 4; i++) {
                        int c = a->bits == 4 ? (rec[(g & 3) * 64 + j * 4 + i] >> (g < 4 ? 0 : 4)) & 15
                                             : rec[g * 64 + j * 4 + i];
                        int32_t xv = xr[4 * g + i];
                        if (a->passes == 2) xv = xv * RES + xr[a->m * a->k + 4 * g + i];
                        s += c * xv;
                    }
                }
                s -= a->zp * sx;
                float d, mn = 0.0f;
                if (a->scale_f32) {
                    memcpy(&d, sc + 4 * j, 4);
                    if (a->has_min) memcpy(&mn, sc + 4 * (NC + j), 4);
                } else {
                    uint16_t h;
                    memcpy(&h, sc + 2 * j, 2);
                    d = half_to_f32(h);
                    if (a->has_min) {
                        memcpy(&h, sc + 2 * (NC + j), 2);
                        mn = half_to_f32(h);
                    }
                }
                float acc = fmaf((float)s, d * dx, out[r * NC + j]);
                if (a->has_min) acc = fmaf(mn, dx * (float)sx, acc);
                out[r * NC + j] = acc;
            }
        }
    }
}

/* ---- AVX2 ---------------------------------------------------------------------------------- */

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

/* sum over 4 k of codes (u8 < 16) times xq (s8), per int32 lane. */
AVX2_TARGET __m256i dot4_avx2(__m256i codes, __m256i xb, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xb), ones);
}

AVX2_TARGET void tile_avx2_rows(const args_t *a, int64_t r0, int rows, const uint8_t *w,
                                float *out) {
    const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1),
                  sixteen = _mm256_set1_epi16(16);
    int64_t cb = codes_bytes(a->bits);
    __m256 acc[MR][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *rec = w + b * a->rb;
        __m256i s[MR][2], sp[MR][2];
        for (int r = 0; r < rows; r++) s[r][0] = s[r][1] = _mm256_setzero_si256();
        for (int p = 0; p < a->passes; p++) {
            for (int r = 0; r < rows; r++) sp[r][0] = sp[r][1] = _mm256_setzero_si256();
            for (int g = 0; g < (a->bits == 4 ? 4 : 8); g++) {
                for (int h = 0; h < 2; h++) {
                    __m256i c = _mm256_loadu_si256((const __m256i *)(rec + g * 64 + h * 32));
                    __m256i lo = _mm256_and_si256(c, mask);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), mask);
                    for (int r = 0; r < rows; r++) {
                        const int8_t *xr = a->xq + (p * a->m + r0 + r) * a->k + b * QK;
                        __m256i xg = _mm256_set1_epi32(load_i32(xr + 4 * g));
                        __m256i *t = &sp[r][h];
                        if (a->bits == 4) {
                            __m256i xh = _mm256_set1_epi32(load_i32(xr + 16 + 4 * g));
                            *t = _mm256_add_epi32(*t, dot4_avx2(lo, xg, ones));
                            *t = _mm256_add_epi32(*t, dot4_avx2(hi, xh, ones));
                        } else {
                            *t = _mm256_add_epi32(*t, dot4_avx2(lo, xg, ones));
                            *t = _mm256_add_epi32(
                                *t, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xg), sixteen));
                        }
                    }
                }
            }
            /* s = RES * (first pass) + (second pass) */
            for (int r = 0; r < rows; r++)
                for (int h = 0; h < 2; h++)
                    s[r][h] = _mm256_add_epi32(
                        _mm256_mullo_epi32(s[r][h], _mm256_set1_epi32(RES)), sp[r][h]);
        }
        const uint8_t *sc = rec + cb;
        for (int h = 0; h < 2; h++) {
            __m256 d, mn = _mm256_setzero_ps();
            if (a->scale_f32) {
                d = _mm256_loadu_ps((const float *)sc + 8 * h);
                if (a->has_min) mn = _mm256_loadu_ps((const float *)sc + NC + 8 * h);
            } else {
                d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 16 * h)));
                if (a->has_min)
                    mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 2 * NC + 16 * h)));
            }
            for (int r = 0; r < rows; r++) {
                float dx = a->xd[(r0 + r) * a->nb + b];
                int32_t sx = a->xs[(r0 + r) * a->nb + b];
                __m256i si = _mm256_sub_epi32(s[r][h], _mm256_set1_epi32(a->zp * sx));
                __m256 f = _mm256_mul_ps(d, _mm256_set1_ps(dx));
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), f, acc[r][h]);
                if (a->has_min)
                    acc[r][h] = _mm256_fmadd_ps(mn, _mm256_set1_ps(dx * (float)sx), acc[r][h]);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(out + r * NC, acc[r][0]);
        _mm256_storeu_ps(out + r * NC + 8, acc[r][1]);
    }
}

__attribute__((target("avx2,fma,f16c"))) static void tile_avx2(const args_t *a, int64_t r0,
                                                                int rows, const uint8_t *w,
                                                                float *out) {
    switch (rows) {
        case 1: tile_avx2_rows(a, r0, 1, w, out); break;
        case 2: tile_avx2_rows(a, r0, 2, w, out); break;
        case 3: tile_avx2_rows(a, r0, 3, w, out); break;
        default: tile_avx2_rows(a, r0, MR, w, out); break;
    }
}

/* ---- AVX-512 VNNI -------------------------------------------------------------------------- */

#define AVX512_TARGET \
    __attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c"), always_inline)) static inline

/* A record's 16 scales d (and mins, zero without them) as float32 lanes. */
AVX512_TARGET void scales_avx512(const uint8_t *sc, int has_min, int scale_f32, __m512 *d,
                                 __m512 *mn) {
    *mn = _mm512_setzero_ps();
    if (scale_f32) {
        *d = _mm512_loadu_ps(sc);
        if (has_min) *mn = _mm512_loadu_ps(sc + 4 * NC);
    } else {
        *d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
        if (has_min) *mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 2 * NC)));
    }
}

/* nt column tiles (records w[0..nt)) for rows rows, nt x rows <= 8: each activation broadcast
 * feeds all nt tiles, so a k group costs rows x passes broadcasts and nt code loads for
 * nt x rows x passes vpdpbusd, and the two passes run side by side in sums of their own. The
 * second pass's sum (the first's with one pass) starts at -zp * sx, so the block's integer is
 * RES * s1 + s2, the one-tile kernel's exactly; the float steps are its own, in its order. */
AVX512_TARGET void tiles_avx512_rows(const args_t *a, int64_t r0, int rows, int nt,
                                     const uint8_t *const *w, float *out, int bits, int zp,
                                     int has_min, int scale_f32, int passes) {
    const __m512i mask = _mm512_set1_epi8(15);
    const int64_t cb = codes_bytes(bits);
    __m512 acc[MR][NT_MAX];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < nt; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *rec[NT_MAX];
        __m512i s1[MR][NT_MAX], s2[MR][NT_MAX];
        const int8_t *x1[MR], *x2[MR];
        for (int t = 0; t < nt; t++) rec[t] = w[t] + b * a->rb;
        for (int r = 0; r < rows; r++) {
            x1[r] = a->xq + (r0 + r) * a->k + b * QK;
            x2[r] = x1[r] + a->m * a->k;
            __m512i start = _mm512_set1_epi32(-zp * a->xs[(r0 + r) * a->nb + b]);
            for (int t = 0; t < nt; t++) {
                s1[r][t] = passes == 2 ? _mm512_setzero_si512() : start;
                s2[r][t] = start;
            }
        }
        if (bits == 4) {
            for (int g = 0; g < 4; g++) {
                __m512i lo[NT_MAX], hi[NT_MAX];
                for (int t = 0; t < nt; t++) {
                    __m512i c = _mm512_loadu_si512(rec[t] + g * 64);
                    lo[t] = _mm512_and_si512(c, mask);
                    hi[t] = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
                }
                for (int r = 0; r < rows; r++) {
                    for (int p = 0; p < passes; p++) {
                        const int8_t *xr = p ? x2[r] : x1[r];
                        __m512i xl = _mm512_set1_epi32(load_i32(xr + 4 * g));
                        __m512i xh = _mm512_set1_epi32(load_i32(xr + 16 + 4 * g));
                        for (int t = 0; t < nt; t++) {
                            __m512i *s = p ? &s2[r][t] : &s1[r][t];
                            *s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*s, lo[t], xl), hi[t], xh);
                        }
                    }
                }
            }
        } else {
            for (int g = 0; g < 8; g++) {
                __m512i c[NT_MAX];
                for (int t = 0; t < nt; t++) c[t] = _mm512_loadu_si512(rec[t] + g * 64);
                for (int r = 0; r < rows; r++) {
                    for (int p = 0; p < passes; p++) {
                        __m512i xv = _mm512_set1_epi32(load_i32((p ? x2[r] : x1[r]) + 4 * g));
                        for (int t = 0; t < nt; t++) {
                            __m512i *s = p ? &s2[r][t] : &s1[r][t];
                            *s = _mm512_dpbusd_epi32(*s, c[t], xv);
                        }
                    }
                }
            }
        }
        for (int t = 0; t < nt; t++) {
            __m512 d, mn;
            scales_avx512(rec[t] + cb, has_min, scale_f32, &d, &mn);
            for (int r = 0; r < rows; r++) {
                float dx = a->xd[(r0 + r) * a->nb + b];
                __m512i v = s1[r][t];
                if (passes == 2) /* RES * s1 + s2 (exact: |s1| < 2^20) */
                    v = _mm512_add_epi32(_mm512_mullo_epi32(v, _mm512_set1_epi32(RES)), s2[r][t]);
                __m512 f = _mm512_mul_ps(d, _mm512_set1_ps(dx));
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), f, acc[r][t]);
                if (has_min) {
                    float ms = dx * (float)a->xs[(r0 + r) * a->nb + b];
                    acc[r][t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(ms), acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < nt; t++) _mm512_storeu_ps(out + (r * nt + t) * NC, acc[r][t]);
}

/* Rows, tiles, passes and format as constants: every instance keeps its sums in registers and
 * has no branches on the format in its loops. CALL(rows, bits, zp, has_min, scale_f32, passes)
 * names the kernel instance. */
#define AVX512_ROWS_P(CALL, bits, zp, has_min, scale_f32, p)           \
    switch (rows) {                                                    \
        case 1: CALL(1, bits, zp, has_min, scale_f32, p); break;       \
        case 2: CALL(2, bits, zp, has_min, scale_f32, p); break;       \
        case 3: CALL(3, bits, zp, has_min, scale_f32, p); break;       \
        default: CALL(MR, bits, zp, has_min, scale_f32, p); break;     \
    }
#define AVX512_ROWS(CALL, bits, zp, has_min, scale_f32)                \
    if (a->passes == 2) {                                              \
        AVX512_ROWS_P(CALL, bits, zp, has_min, scale_f32, 2)           \
    } else {                                                           \
        AVX512_ROWS_P(CALL, bits, zp, has_min, scale_f32, 1)           \
    }
#define AVX512_FORMATS(CALL)                 \
    if (a->bits == 8) {                      \
        AVX512_ROWS(CALL, 8, 128, 0, 0)      \
    } else if (a->scale_f32) {               \
        AVX512_ROWS(CALL, 4, 0, 1, 1)        \
    } else if (a->has_min) {                 \
        AVX512_ROWS(CALL, 4, 0, 1, 0)        \
    } else {                                 \
        AVX512_ROWS(CALL, 4, 8, 0, 0)        \
    }
#define TWO_TILES(r, ...) tiles_avx512_rows(a, r0, r, 2, w, out, __VA_ARGS__)
#define FOUR_TILES(r, ...) tiles_avx512_rows(a, r0, r, 4, w, out, __VA_ARGS__)

/* How many tiles the AVX-512 path computes at once: four (two rows at a time) for 8-bit codes
 * with two passes, where code loads are cheap against the products; else two (four rows). */
static inline int avx512_group(const args_t *a) { return a->bits == 8 && a->passes == 2 ? 4 : 2; }

/* out: [rows][nt NC], the tiles side by side; rows <= 8 / nt. A group past the last tile
 * repeats the last tile's records (those columns are not stored). */
__attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c"))) static void tiles_avx512(
    const args_t *a, int64_t r0, int rows, int nt, const uint8_t *const *w, float *out) {
    if (nt == 4) {
        if (rows == 1)
            FOUR_TILES(1, 8, 128, 0, 0, 2);
        else
            FOUR_TILES(2, 8, 128, 0, 0, 2);
        return;
    }
    AVX512_FORMATS(TWO_TILES)
}

/* ---- AMX ------------------------------------------------------------------------------------ */

#include "cpu_gemm_gguf_amx.h"

/* Whether this process can run the AMX path (sgl_gguf_gemm's isa 4). */
int sgl_gguf_amx_usable(void) { return amx_usable(); }

/* Whether the best path (isa 0) takes AMX for m rows where it can: from 32 rows, and only when
 * padding to whole 16-row tiles adds at most a quarter (measured in docs/quantization.md: AMX is
 * 0.2-0.3x of AVX-512 at 1 row, ~0.9x at 24, 1.05-1.3x from 32 to 256). */
int sgl_gguf_amx_pays(int64_t m) {
    const int64_t mp = (m + MA - 1) / MA * MA;
    return m >= 32 && 4 * (mp - m) <= mp;
}

/* ---- entry ---------------------------------------------------------------------------------- */

/*
 * x: [m][k], row stride ldx, float32 (x_bf16 = 0) or bfloat16; k a multiple of 32.
 * w: packed records of n outputs (sgl_gguf_pack). bias: n floats or NULL.
 * y: [m][n] contiguous, float32 (y_bf16 = 0) or bfloat16. passes: 1 (int8 activations) or 2
 * (int8 plus the residual's int8). isa: 0 picks the best path (AMX where sgl_gguf_amx_pays).
 * Returns 0, -1 when scratch (the quantized copy of x) cannot be allocated, -2 when isa is AMX
 * and this CPU or OS does not run it.
 */
int sgl_gguf_gemm(const void *x, int64_t ldx, int x_bf16, int64_t m, int64_t k, const uint8_t *w,
                  int64_t n, int bits, int zp, int has_min, int scale_f32, const float *bias,
                  void *y, int y_bf16, int passes, int isa, int nthreads) {
    int64_t nb = k / QK, nt = (n + NC - 1) / NC;
    passes = passes == 2 ? 2 : 1;
    if (isa == ISA_AMX && !amx_usable()) return -2;
    if (isa == 0) {
        isa = sgl_gguf_best_isa();
        if (isa == ISA_AVX512 && sgl_gguf_amx_pays(m) && amx_usable()) isa = ISA_AMX;
    }
    /* AMX reads whole tiles of 16 quantized rows: pad them (and their steps) with zeros. */
    const int64_t mp = isa == ISA_AMX ? (m + MA - 1) / MA * MA : m;
    int8_t *xq = (int8_t *)malloc((size_t)(passes * mp * k));
    float *xd = (float *)calloc((size_t)(mp * nb), sizeof(float));
    int32_t *xs = (int32_t *)calloc((size_t)(mp * nb), sizeof(int32_t));
    if (!xq || !xd || !xs) {
        free(xq);
        free(xd);
        free(xs);
        return -1;
    }
    for (int p = 0; p < passes && mp > m; p++) memset(xq + (p * mp + m) * k, 0, (mp - m) * k);
    size_t es = x_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * k > 65536)
    for (int64_t i = 0; i < m; i++)
        for (int64_t b = 0; b < nb; b++)
            quantize_block((const uint8_t *)x + (i * ldx + b * QK) * es, x_bf16, passes,
                           xd + i * nb + b, xs + i * nb + b, xq + i * k + b * QK,
                           passes == 2 ? xq + (mp + i) * k + b * QK : NULL);
    args_t a = {xq, xd, xs, mp, passes, k, nb, sgl_gguf_record_bytes(bits, has_min, scale_f32),
                bits, zp, has_min, scale_f32};
    if (isa == ISA_AMX) {
        int rc = gemm_amx(&a, m, n, w, bias, y, y_bf16, nthreads);
        free(xq);
        free(xd);
        free(xs);
        return rc;
    }
    /* Output tiles in groups of g (pairs by default); the AVX-512 path computes a whole group
     * in one kernel, rows_step rows at a time. */
    const int g = isa == ISA_AVX512 ? avx512_group(&a) : 2;
    const int64_t rows_step = isa == ISA_AVX512 ? 2 * MR / g : MR;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t tg = 0; tg < (nt + g - 1) / g; tg++) {
        float out[MR * NT_MAX * NC];
        const int64_t t0 = g * tg, t1 = t0 + g - 1 < nt ? t0 + g - 1 : nt - 1;
        const uint8_t *wg[NT_MAX];
        for (int j = 0; j < g; j++) wg[j] = w + (t0 + j <= t1 ? t0 + j : t1) * nb * a.rb;
        for (int64_t r0 = 0; r0 < m; r0 += rows_step) {
            int rows = (int)((m - r0) < rows_step ? (m - r0) : rows_step);
            if (isa == ISA_AVX512) tiles_avx512(&a, r0, rows, g, wg, out);
            for (int64_t t = t0; t <= t1; t++) {
                const int64_t c0 = t * NC;
                const int cols = (int)((n - c0) < NC ? (n - c0) : NC);
                const float *src = out + (t - t0) * NC;
                int ld = g * NC;
                if (isa != ISA_AVX512) {
                    src = out;
                    ld = NC;
                    if (isa == ISA_AVX2)
                        tile_avx2(&a, r0, rows, wg[t - t0], out);
                    else
                        tile_scalar(&a, r0, rows, wg[t - t0], out);
                }
                for (int r = 0; r < rows; r++) {
                    size_t at = (size_t)((r0 + r) * n + c0) * (y_bf16 ? 2 : 4);
                    store_row(src + r * ld, cols, bias ? bias + c0 : NULL, (char *)y + at,
                              y_bf16);
                }
            }
        }
    }
    free(xq);
    free(xd);
    free(xs);
    return 0;
}
