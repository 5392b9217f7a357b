/*
 * Grammar token bitmask applied to float32 logits in place, for the constrained rows of a batch.
 *
 * Owned by sgl_kernel.cpu_token_bitmask, which compiles this file on first use and calls it
 * through ctypes once per step. Semantics are xgrammar's `apply_token_bitmask_inplace`: for each
 * listed row r and each token t < vocab_size, logits[r][t] = -inf when bit t % 32 of
 * bitmask[r][t / 32] is 0; every other value (allowed tokens, tokens >= vocab_size, rows not
 * listed) is left exactly as it was.
 *
 * Why it exists: xgrammar's CPU kernel tests every token's bit on its own (about 0.3 ms per row of
 * a 49k vocabulary). A grammar's mask is made of long runs: inside a JSON string nearly every
 * token is allowed, between values nearly every token is blocked. So a 32-token word that is all
 * ones is skipped, one that is all zeros is filled with a loop the compiler vectorizes, and only
 * a mixed word is walked, one blocked bit at a time. Plain C with no instruction-set flags, so the
 * same build runs on any CPU.
 */
#include <math.h>
#include <stdint.h>

/* The first `n` (1..32) tokens of one word; bit b of `m` allows token b. */
static inline void apply_word(float *p, uint32_t m, int n) {
    if (m == 0xffffffffu) return;
    if (m == 0 && n == 32) {
        for (int b = 0; b < 32; b++) p[b] = -INFINITY;
        return;
    }
    uint32_t blocked = ~m;
    if (n < 32) blocked &= (1u << n) - 1u;
    while (blocked) {
        p[__builtin_ctz(blocked)] = -INFINITY;
        blocked &= blocked - 1u;
    }
}

/* logits: [*, logits_stride] float32; bitmask: [*, bitmask_stride] int32 with at least
 * ceil(vocab_size / 32) words per row; rows: the n_rows row indices into both. */
void sgl_cpu_apply_token_bitmask(float *logits, int64_t logits_stride, const int32_t *bitmask,
                                 int64_t bitmask_stride, const int64_t *rows, int64_t n_rows,
                                 int64_t vocab_size) {
    const int64_t words = vocab_size / 32;
    const int tail = (int)(vocab_size % 32);
    for (int64_t i = 0; i < n_rows; i++) {
        float *out = logits + rows[i] * logits_stride;
        const uint32_t *bits = (const uint32_t *)(bitmask + rows[i] * bitmask_stride);
        for (int64_t w = 0; w < words; w++) apply_word(out + w * 32, bits[w], 32);
        if (tail) apply_word(out + words * 32, bits[words], tail);
    }
}
