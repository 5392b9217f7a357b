/*
 * The AMX path of csrc/cpu_gemm_gguf.c, included by it after its AVX-512 path and owned, like the
 * rest of that file, by sgl_kernel.cpu_gemm_gguf.
 *
 * With AMX-INT8 one tile multiply gives a block's integer sums for 16 activation rows and the 16
 * columns of a tile at once: A = 16 rows x 32 int8 codes of X (the quantized rows where they lie,
 * stride k, padded to 16 rows with zeros), B = the record's 32 x 16 codes (its vectors are already
 * AMX's layout: 4 consecutive k of the 16 columns per 64 bytes), C = 16 x 16 int32. Each tile's
 * codes are first copied once per call with the zero point taken out (Q8_0: c - 128 is the signed
 * q; Q4_0: c - 8; 4-bit codes split into their nibble halves), so pass p's sum is
 * s_p = sum (c - zp) q_p, small enough (< 2^20) to be exact in float32.
 *
 * Same bits as the AVX-512 path: there the block's integer is v = RES s_1 + s_2 (zero point
 * included) and its float is cvt(v); here it is fma(float(s_1), RES, float(s_2)), which rounds the
 * same exact integer once, so it is the same float. Then the same steps in the same order:
 * f = d * e, acc = fma(., f, acc), the min's fma with e * sum X.
 *
 * What it gains is bounded by the formats' 32-weight blocks: every block's 16 x 16 sums must
 * leave the tile unit (a tile store) for their float steps, and a multiply over 32 k costs about
 * what one over 64 does. Measured (docs/quantization.md, 2 cores): 1.05-1.3x the AVX-512 path
 * from 32 to 256 rows, 0.2-0.35x at one row (the per-call code copy and the padding to 16 rows),
 * so the default takes it only for calls of 32 rows or more (sgl_gguf_amx_pays). Issuing block
 * b + 1's multiplies before block b's float steps (alternating C tiles) was measured no faster:
 * the tile work and the float steps add up here either way, so the loop stays plain.
 */

#define MA 16 /* activation rows per AMX tile */

/* The tile intrinsics need GCC 11 or clang 12; an older compiler builds the rest without them
 * (amx_usable() is then 0 and the AVX-512 path runs). */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define SGL_HAVE_AMX 1
#else
#define SGL_HAVE_AMX 0
static int amx_usable(void) { return 0; }
static int gemm_amx(const void *a, int64_t m, int64_t n, const uint8_t *w, const float *bias,
                    void *y, int y_bf16, int nthreads) {
    (void)a, (void)m, (void)n, (void)w, (void)bias, (void)y, (void)y_bf16, (void)nthreads;
    return -2;
}
#endif

#if SGL_HAVE_AMX
#define AMX_ATTRS "amx-tile,amx-int8,avx512f,avx512bw,avx512vnni,fma,f16c"
#define AMX_TARGET __attribute__((target(AMX_ATTRS)))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tilecfg_t;

/* Whether this CPU has AMX-INT8 and Linux lets this process use the tile registers. */
static int amx_usable(void) {
    static int state = -1;
    if (state >= 0) return state;
    unsigned int eax, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    int has = ((edx >> 24) & 1) && ((edx >> 25) & 1); /* AMX-TILE, AMX-INT8 */
    /* arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): granted to the whole process. */
    state = has && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return state;
}

/* Tiles: 0, 1 the two passes' activations (MA rows x QK bytes); 2 the block's codes (QK / 4
 * rows of 64 bytes); 3, 4 the two passes' sums (MA x NC int32). A static table: GCC 12 drops
 * stores to a local only ldtilecfg reads. */
static const tilecfg_t AMX_TILES = {
    .palette = 1,
    .colsb = {QK, QK, 64, 64, 64},
    .rows = {MA, MA, QK / 4, MA, MA},
};

/* Per thread, around its share of the tiles. */
AMX_TARGET static void amx_begin(void) { _tile_loadconfig(&AMX_TILES); }
AMX_TARGET static void amx_end(void) { _tile_release(); }

/* One tile's nb records (from w) as B tiles of 512 bytes each, zero point out. */
AMX_TARGET static void amx_codes(const args_t *a, const uint8_t *w, uint8_t *dst) {
    const __m512i mask = _mm512_set1_epi8(15), zp = _mm512_set1_epi8((char)a->zp),
                  top = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *rec = w + b * a->rb;
        uint8_t *d = dst + b * 512;
        if (a->bits == 8) { /* zp 128: c - 128 as int8 is c with its top bit flipped */
            for (int g = 0; g < 8; g++)
                _mm512_store_si512(d + g * 64,
                                   _mm512_xor_si512(_mm512_loadu_si512(rec + g * 64), top));
        } else {
            for (int g = 0; g < 4; g++) {
                __m512i c = _mm512_loadu_si512(rec + g * 64);
                __m512i lo = _mm512_and_si512(c, mask);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
                _mm512_store_si512(d + g * 64, _mm512_sub_epi8(lo, zp));
                _mm512_store_si512(d + (g + 4) * 64, _mm512_sub_epi8(hi, zp));
            }
        }
    }
}

/* C tile `c` = A tile `x` times the codes (tile 2) into memory s: signed codes (zero point
 * taken out) or not. */
#define AMX_DOT(c, x, s)                 \
    do {                                 \
        _tile_zero(c);                   \
        if (sgn)                         \
            _tile_dpbssd(c, x, 2);       \
        else                             \
            _tile_dpbsud(c, x, 2);       \
        _tile_stored(c, s, 64);          \
    } while (0)

/* One column tile (its B tiles `codes`, its records w for the scales) for MA rows from r0 (the
 * quantized rows and their steps are padded to whole tiles); out: [MA][NC]. */
__attribute__((target(AMX_ATTRS), always_inline)) static inline void tile_amx_rows(
    const args_t *a, int64_t r0, const uint8_t *codes, const uint8_t *w, float *out, int sgn,
    int has_min, int scale_f32, int passes) {
    const int64_t cb = codes_bytes(a->bits), nb = a->nb;
    const int8_t *x1 = a->xq + r0 * a->k, *x2 = x1 + a->m * a->k;
    int32_t s[2 * MA * NC] __attribute__((aligned(64))); /* [pass][MA][NC] */
    const __m512 res = _mm512_set1_ps((float)RES);
    __m512 acc[MA];
    for (int r = 0; r < MA; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        _tile_loadd(0, x1 + b * QK, a->k);
        _tile_loadd(2, codes + b * 512, 64);
        AMX_DOT(3, 0, s);
        if (passes == 2) {
            _tile_loadd(1, x2 + b * QK, a->k);
            AMX_DOT(4, 1, s + MA * NC);
        }
        const float *dx = a->xd + r0 * nb + b;
        const int32_t *sx = a->xs + r0 * nb + b;
        __m512 d, mn;
        scales_avx512(w + b * a->rb + cb, has_min, scale_f32, &d, &mn);
        for (int r = 0; r < MA; r++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(s + r * NC));
            if (passes == 2) /* RES s_1 + s_2, rounded once */
                v = _mm512_fmadd_ps(v, res, _mm512_cvtepi32_ps(_mm512_load_si512(s + (MA + r) * NC)));
            __m512 f = _mm512_mul_ps(d, _mm512_set1_ps(dx[r * nb]));
            acc[r] = _mm512_fmadd_ps(v, f, acc[r]);
            if (has_min) /* the AVX-512 path's e * sum X */
                acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(dx[r * nb] * (float)sx[r * nb]), acc[r]);
        }
    }
    for (int r = 0; r < MA; r++) _mm512_store_ps(out + r * NC, acc[r]);
}

#define AMX_PASSES(sgn, has_min, scale_f32)                                               \
    if (a->passes == 2)                                                                   \
        tile_amx_rows(a, r0, codes, w, out, sgn, has_min, scale_f32, 2);                  \
    else                                                                                  \
        tile_amx_rows(a, r0, codes, w, out, sgn, has_min, scale_f32, 1);

/* One tile for MA rows, after amx_begin on this thread and amx_codes of the tile. */
AMX_TARGET static void tile_amx(const args_t *a, int64_t r0, const uint8_t *codes,
                                const uint8_t *w, float *out) {
    if (a->zp) { /* Q4_0, Q8_0: no mins, float16 scales */
        AMX_PASSES(1, 0, 0)
    } else if (a->scale_f32) {
        AMX_PASSES(0, 1, 1)
    } else {
        AMX_PASSES(0, 1, 0)
    }
}

/* y = x W^T (+ bias) on the AMX path: a's rows padded to whole tiles (their steps too), m real
 * rows. Returns 0, or -1 when scratch cannot be allocated. */
static int gemm_amx(const args_t *a, int64_t m, int64_t n, const uint8_t *w, const float *bias,
                    void *y, int y_bf16, int nthreads) {
    const int64_t nb = a->nb, nt = (n + NC - 1) / NC;
    uint8_t *codes = (uint8_t *)aligned_alloc(64, (size_t)(nthreads * nb * 512));
    if (!codes) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        amx_begin();
        uint8_t *mine = codes + (size_t)omp_get_thread_num() * nb * 512;
        float out[MA * NC] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; t++) {
            const uint8_t *wt = w + t * nb * a->rb;
            const int64_t c0 = t * NC;
            const int cols = (int)((n - c0) < NC ? (n - c0) : NC);
            amx_codes(a, wt, mine);
            for (int64_t r0 = 0; r0 < m; r0 += MA) {
                tile_amx(a, r0, mine, wt, out);
                for (int r = 0; r < MA && r0 + r < m; r++) {
                    size_t at = (size_t)((r0 + r) * n + c0) * (y_bf16 ? 2 : 4);
                    store_row(out + r * NC, cols, bias ? bias + c0 : NULL, (char *)y + at, y_bf16);
                }
            }
        }
        amx_end();
    }
    free(codes);
    return 0;
}

#endif /* SGL_HAVE_AMX */
