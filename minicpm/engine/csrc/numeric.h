/* Helpers every source shares, as static inline functions: conversions between float32 and the
 * 16-bit types, rounding as torch does, the widths of a quantized KV cache's rows, and which
 * weight types are int4 records.
 *
 * Part of the native kernels' build (minicpm/engine/cpu_kernels.py keys the library by this file
 * too). Nothing here depends on a source's floating-point flags: each conversion is exact or
 * rounds once, to nearest even.
 */
#ifndef MINICPM_NUMERIC_H
#define MINICPM_NUMERIC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "minicpm.h"

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float16 <-> float32, round to nearest even (what torch's .half() and .float() do) */
static inline float half_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal: exactly man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);         /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);        /* rounds past 65504: inf */
    if (a < 0x38800000u) {                                           /* below 2^-14: subnormal or zero */
        float mag;
        memcpy(&mag, &a, sizeof mag);
        return (uint16_t)(sign | (uint32_t)rintf(mag * 16777216.0f)); /* units of 2^-24, nearest even */
    }
    a += 0xfffu + ((a >> 13) & 1u); /* round the 13 dropped bits to nearest even */
    return (uint16_t)(sign | ((a - 0x38000000u) >> 13));
}

/* whether minicpm_linear's weight type ``wtype`` is int4 records, their scales inside them (3:
 * float32 scales and minimums; 5: float16 ones; 6: float16 scales, minimums -8 x them) */
static inline int is_q4(int wtype) { return wtype == 3 || wtype == 5 || wtype == 6; }

/* the codes of a (token, kv head) row in bytes (int4) or elements: the codes' row width */
static inline int64_t kv_width(int kind, int head_dim) { return kind == MINICPM_KV_INT4 ? head_dim / 2 : head_dim; }
/* values per scale of a key row, or of a value row (``value``): int4 values in MINICPM_KV_VALUE_GROUP
 * where head_dim is a multiple of it (kv_format.KVFormat.group) */
static inline int kv_group(int kind, int head_dim, int value) {
    return value && kind == MINICPM_KV_INT4 && head_dim % MINICPM_KV_VALUE_GROUP == 0 ? MINICPM_KV_VALUE_GROUP
                                                                                       : MINICPM_KV_GROUP;
}
/* a key (or value) row's float16 scales */
static inline int kv_scales(int kind, int head_dim, int value) {
    return head_dim / kv_group(kind, head_dim, value) * (kind == MINICPM_KV_INT4 ? 2 : 1);
}

#endif
