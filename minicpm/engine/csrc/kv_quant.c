/* The KV cache's writer: rows of keys or values quantized into a cache layer's codes and float16
 * scales, exactly as minicpm/engine/attention/kv_format.py's reference quantizer does, bit for bit.
 *
 * Built without floating-point contraction or reassociation (minicpm/engine/cpu_kernels.py), so
 * every product and sum rounds as torch's separate operators do; the sums over a group (32 values,
 * or int4 values' 64: numeric.h's kv_group) are taken in one fixed order, adjacent pairs first
 * (kv_format.tree_sum), on both sides.
 *
 *   int8: per group of 32, scale = max|x| / 127 rounded to float16, codes rint(x / scale).
 *   int4: per group, the (scale, min) pair, both float16, of the least squared error among
 *         the plain one (min, (max - min) / 15) and INT4_FITS least-squares refits (each the
 *         regression of the values on the previous pair's codes), the first of equal errors;
 *         codes rint((x - min) / scale) in [0, 15].
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "minicpm.h"
#include "numeric.h"

#define G MINICPM_KV_GROUP
#define GMAX MINICPM_KV_VALUE_GROUP
#define INT4_FITS 2 /* kv_format.INT4_FITS */

/* t[0..n-1] (n a power of two) summed as kv_format.tree_sum does: adjacent pairs, then pairs of
 * those (t is used up) */
static inline float tree_sum(float *t, int n) {
    for (int h = n / 2; h >= 1; h >>= 1)
        for (int j = 0; j < h; j++) t[j] = t[2 * j] + t[2 * j + 1];
    return t[0];
}

/* the int4 codes of x[0..n-1] under (scale, min) */
static inline void int4_codes(const float *x, int n, float s, float mn, float *c) {
    const float div = s == 0.0f ? 1.0f : s;
    for (int j = 0; j < n; j++) {
        const float r = rintf((x[j] - mn) / div);
        c[j] = r < 0.0f ? 0.0f : r > 15.0f ? 15.0f : r;
    }
}

/* the squared error of x[0..n-1]'s round trip through float16 (scale, min), its codes into c */
static inline float int4_error(const float *x, int n, uint16_t hs, uint16_t hm, float *c) {
    const float s = half_to_f32(hs), mn = half_to_f32(hm);
    float t[GMAX];
    int4_codes(x, n, s, mn, c);
    for (int j = 0; j < n; j++) {
        const float e = (c[j] * s + mn) - x[j];
        t[j] = e * e;
    }
    return tree_sum(t, n);
}

/* one group of n (32 or 64) values: codes packed in runs of 32 (value j low, j + 16 high) and its
 * (scale, min) */
static void quantize_int4(const float *x, int n, uint8_t *codes, uint16_t *sm) {
    float lo = x[0], hi = x[0];
    for (int j = 1; j < n; j++) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
    }
    const float s0 = (hi - lo) / 15.0f;
    uint16_t bs = f32_to_half(s0), bm = f32_to_half(lo);
    float d[GMAX], c[GMAX], t[GMAX], best_c[GMAX];
    const float fn = (float)n;
    float best = int4_error(x, n, bs, bm, best_c);
    for (int j = 0; j < n; j++) d[j] = x[j] - lo;
    int4_codes(d, n, s0, 0.0f, c);
    for (int round = 0; round < INT4_FITS; round++) {
        for (int j = 0; j < n; j++) t[j] = c[j];
        const float sc = tree_sum(t, n);
        for (int j = 0; j < n; j++) t[j] = c[j] * c[j];
        const float scc = tree_sum(t, n);
        for (int j = 0; j < n; j++) t[j] = d[j];
        const float sd = tree_sum(t, n);
        for (int j = 0; j < n; j++) t[j] = c[j] * d[j];
        const float scd = tree_sum(t, n);
        const float det = fn * scc - sc * sc, num = fn * scd - sc * sd;
        const float fs = num / (det > 0.0f ? det : 1.0f);
        const int ok = det > 0.0f && fs > 0.0f;
        const float fm = (sd - fs * sc) / fn;
        const uint16_t hs = f32_to_half(ok ? fs : s0), hm = f32_to_half(ok ? lo + fm : lo);
        const float e = int4_error(x, n, hs, hm, c); /* the next fit starts from this pair's codes */
        if (e < best) {
            best = e, bs = hs, bm = hm;
            memcpy(best_c, c, sizeof c);
        }
    }
    sm[0] = bs;
    sm[1] = bm;
    for (int r = 0; r < n / G; r++)
        for (int j = 0; j < G / 2; j++)
            codes[r * G / 2 + j] = (uint8_t)((uint8_t)best_c[r * G + j] | ((uint8_t)best_c[r * G + j + G / 2] << 4));
}

/* one group of 32 values: int8 codes and its scale */
static void quantize_int8(const float *x, int8_t *codes, uint16_t *scale) {
    float amax = 0.0f;
    for (int j = 0; j < G; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const uint16_t h = f32_to_half(amax / 127.0f);
    const float s = half_to_f32(h), div = s == 0.0f ? 1.0f : s;
    *scale = h;
    for (int j = 0; j < G; j++) {
        const float r = rintf(x[j] / div);
        codes[j] = (int8_t)(r < -127.0f ? -127.0f : r > 127.0f ? 127.0f : r);
    }
}

int minicpm_kv_quantize(int xtype, int kvkind, int value, const void *x, int64_t x_stride, int rows, int kv_heads,
                        int head_dim, const int64_t *slots, int64_t num_slots, void *codes, uint16_t *scales) {
    if ((kvkind != MINICPM_KV_INT8 && kvkind != MINICPM_KV_INT4) || head_dim % G) return MINICPM_BAD_KV;
    if (rows < 0 || kv_heads < 1 || head_dim < 1 || head_dim > MINICPM_MAX_HEAD_DIM) return MINICPM_BAD_SHAPE;
    for (int r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return MINICPM_BAD_SLOT;
    const int64_t width = kv_width(kvkind, head_dim);
    const int nsc = kv_scales(kvkind, head_dim, value), n = kv_group(kvkind, head_dim, value);
#pragma omp parallel for schedule(static) if ((int64_t)rows * kv_heads >= 256)
    for (int64_t i = 0; i < (int64_t)rows * kv_heads; i++) {
        const int64_t r = i / kv_heads, h = i % kv_heads;
        float row[MINICPM_MAX_HEAD_DIM];
        const int64_t at = r * x_stride + h * head_dim;
        for (int d = 0; d < head_dim; d++)
            row[d] = xtype ? bf16_to_f32(((const uint16_t *)x)[at + d]) : ((const float *)x)[at + d];
        const int64_t dst = slots[r] * kv_heads + h;
        for (int g = 0; g < head_dim / n; g++) {
            if (kvkind == MINICPM_KV_INT8)
                quantize_int8(row + g * n, (int8_t *)codes + dst * width + g * n, scales + dst * nsc + g);
            else
                quantize_int4(row + g * n, n, (uint8_t *)codes + dst * width + g * n / 2, scales + dst * nsc + 2 * g);
        }
    }
    return 0;
}
