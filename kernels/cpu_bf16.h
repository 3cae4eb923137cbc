/* bfloat16 <-> float32 for the CPU kernels (kernels/cpu_*.c), rounding as torch does: one copy, so
 * every kernel rounds alike. kernels/cpu_build.py counts this header in each kernel's cache key. */
#ifndef PDMESH_CPU_BF16_H
#define PDMESH_CPU_BF16_H

#include <stdint.h>

typedef union {
    uint32_t u;
    float f;
} bits32;

static inline float bf16_to_f32(uint16_t h) {
    bits32 v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    bits32 v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);  /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

#endif
