/* bfloat16 <-> float32 conversions and the output row store shared by the CPU GEMM kernels. */
#ifndef SGL_CPU_BF16_H
#define SGL_CPU_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as PyTorch's float -> bfloat16 conversion; NaN stays NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* One output row's cols values plus bias (NULL: none) into y, which holds float32 or, when
 * y_bf16, bfloat16; y and bias point at the row's first column. */
static inline void store_row(const float *src, int cols, const float *bias, void *y, int y_bf16) {
    if (y_bf16) {
        uint16_t *dst = (uint16_t *)y;
        for (int j = 0; j < cols; j++) dst[j] = f32_to_bf16(src[j] + (bias ? bias[j] : 0.0f));
    } else {
        float *dst = (float *)y;
        for (int j = 0; j < cols; j++) dst[j] = src[j] + (bias ? bias[j] : 0.0f);
    }
}

#endif
