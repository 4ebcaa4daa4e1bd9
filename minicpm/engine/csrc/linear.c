/* y = x W^T on CPU over a weight packed in column panels, for the few-row products of decoding.
 *
 * Built with paged_attention.c into one library by minicpm/engine/cpu_kernels.py; see
 * cpu_kernels.py for the contract (and the packing, done there). Layout: W (n, k) is packed once
 * into panels of PANEL = 32 output columns, panel p holding W[p*32 + c, j] at [p][j][c]
 * (zero-padded past n), so a panel is read front to back and the micro-kernel needs no
 * horizontal sums: each step broadcasts one input element per row and multiplies it into a panel
 * row of 32 outputs.
 *
 * Each output element is one sum over j in order 0..k-1 of x[m, j] * W[n, j] (fused multiply-add,
 * float32 accumulators), whatever the number of rows or threads: a row's result does not depend
 * on the rows computed beside it. Weights are float32, bfloat16, int8 with a scale per output
 * column, or int8 / int4 codes in groups with a scale and an optional minimum each (weight-only
 * quantization). GCC vector extensions give whole-vector code on any target (AVX-512, AVX2, NEON);
 * x86 intrinsics appear only in the int8 / int4 loads and in the bfloat16 prefill tiles, which run
 * (prompt rows, bfloat16 weights and inputs, a CPU with AVX512-BF16) on the dot-product
 * instruction: exact products summed in float32 two inputs at a time, still one sum per output
 * independent of the other rows, but not bitwise the decode tiles' sums.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "minicpm.h"

#define PANEL MINICPM_PANEL
#define ROWS 12 /* rows per micro-tile: 2 * ROWS accumulators of 16 lanes (24 of 32 AVX-512 registers) */

typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef int8_t v16c __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v16f load16_bf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* 16 int8 weights as floats. GCC turns the portable form into scalar inserts, so x86 gets the
 * sign-extending loads it has (AVX-512: one vpmovsxbd; AVX2: two); other targets the generic form. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16f load16_i8(const int8_t *p) {
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline v16f load16_i8(const int8_t *p) {
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    v16f v;
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
    return v;
}
#else
static inline v16f load16_i8(const int8_t *p) {
    v16c c;
    memcpy(&c, p, sizeof c);
    return __builtin_convertvector(__builtin_convertvector(c, v16i), v16f);
}
#endif

/* 32 int4 weights of one panel row (16 bytes: column c in byte c % 16, the low nibble for c < 16,
 * the high one for c >= 16) as two vectors of their values 0..15 */
static inline void load32_u4(const uint8_t *p, v16f *lo, v16f *hi) {
#if defined(__AVX512F__)
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = (v16f)_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = (v16f)_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
#else
    for (int c = 0; c < 16; c++) {
        (*lo)[c] = (float)(p[c] & 15);
        (*hi)[c] = (float)(p[c] >> 4);
    }
#endif
}

static inline uint16_t f32_to_bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* a tile's accumulators (two vectors of 16 outputs per row) into ``out``, rows of 32 */
static inline __attribute__((always_inline)) void store_tile(const v16f *acc0, const v16f *acc1, int rows, float *out) {
    for (int r = 0; r < rows; r++) {
        memcpy(out + r * PANEL, &acc0[r], sizeof(v16f));
        memcpy(out + r * PANEL + 16, &acc1[r], sizeof(v16f));
    }
}

/* rows x 32 outputs of one panel; ``rows`` is a literal at each call site (always_inline) */
#define DEFINE_TILE(NAME, WT, LOADW)                                                                \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t x_stride,       \
                                                           const WT *panel, int k, const int rows,  \
                                                           float *out) {                           \
        v16f acc0[ROWS], acc1[ROWS];                                                               \
        for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = (v16f){0};                              \
        for (int j = 0; j < k; j++) {                                                              \
            const v16f w0 = LOADW(panel + (int64_t)j * PANEL), w1 = LOADW(panel + (int64_t)j * PANEL + 16); \
            for (int r = 0; r < rows; r++) {                                                       \
                const float xv = x[r * x_stride + j];                                              \
                acc0[r] += xv * w0;                                                                \
                acc1[r] += xv * w1;                                                                \
            }                                                                                      \
        }                                                                                          \
        store_tile(acc0, acc1, rows, out);                                                         \
    }

DEFINE_TILE(tile_f32, float, load16)
DEFINE_TILE(tile_bf16, uint16_t, load16_bf16)
DEFINE_TILE(tile_i8, int8_t, load16_i8)

#define ROWS_Q4 6 /* grouped tiles keep a group's sums beside the accumulators: 4 * ROWS_Q4 vectors */

/* 32 int8 weights of one panel row as two vectors */
static inline void load32_i8(const int8_t *p, v16f *lo, v16f *hi) {
    *lo = load16_i8(p);
    *hi = load16_i8(p + 16);
}

/* rows x 32 outputs of one grouped panel (int4 codes or int8 codes), groups of ``group`` inputs:
 * per group, the weights' codes q are summed against x (and x alone, when there are minimums),
 * then ``scale * sum(x q) + min * sum(x)`` is added, which is sum(x * (q * scale + min))
 * regrouped: each weight w ~ q * scale + min of its (column, group). */
#define DEFINE_GROUPED_TILE(NAME, WT, LOAD32, ROW_ELEMS)                                               \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t x_stride, const WT *panel, \
                                                           const float *scales, const float *mins, int k,  \
                                                           int group, const int rows, float *out) {        \
        v16f acc0[ROWS_Q4], acc1[ROWS_Q4];                                                                 \
        for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = (v16f){0};                                      \
        for (int g0 = 0, g = 0; g0 < k; g0 += group, g++) {                                                \
            v16f q0[ROWS_Q4], q1[ROWS_Q4];                                                                 \
            float sx[ROWS_Q4];                                                                             \
            for (int r = 0; r < rows; r++) {                                                               \
                q0[r] = q1[r] = (v16f){0};                                                                 \
                sx[r] = 0.0f;                                                                              \
            }                                                                                              \
            for (int j = g0; j < g0 + group; j++) {                                                        \
                v16f w0, w1;                                                                               \
                LOAD32(panel + (int64_t)j * (ROW_ELEMS), &w0, &w1);                                        \
                for (int r = 0; r < rows; r++) {                                                           \
                    const float xv = x[r * x_stride + j];                                                  \
                    q0[r] += xv * w0;                                                                      \
                    q1[r] += xv * w1;                                                                      \
                    if (mins) sx[r] += xv;                                                                 \
                }                                                                                          \
            }                                                                                              \
            const v16f s0 = load16(scales + (int64_t)g * PANEL), s1 = load16(scales + (int64_t)g * PANEL + 16); \
            if (mins) {                                                                                    \
                const v16f m0 = load16(mins + (int64_t)g * PANEL), m1 = load16(mins + (int64_t)g * PANEL + 16); \
                for (int r = 0; r < rows; r++) {                                                           \
                    acc0[r] += s0 * q0[r] + m0 * sx[r];                                                    \
                    acc1[r] += s1 * q1[r] + m1 * sx[r];                                                    \
                }                                                                                          \
            } else {                                                                                       \
                for (int r = 0; r < rows; r++) {                                                           \
                    acc0[r] += s0 * q0[r];                                                                 \
                    acc1[r] += s1 * q1[r];                                                                 \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        store_tile(acc0, acc1, rows, out);                                                                 \
    }

DEFINE_GROUPED_TILE(tile_q4, uint8_t, load32_u4, PANEL / 2)
DEFINE_GROUPED_TILE(tile_q8, int8_t, load32_i8, PANEL)

#define DISPATCH_ROWS_GROUPED(TILE, x, xs, panel, scales, mins, k, group, rows, out) \
    switch (rows) {                                                                  \
    case 6: TILE(x, xs, panel, scales, mins, k, group, 6, out); break;               \
    case 5: TILE(x, xs, panel, scales, mins, k, group, 5, out); break;               \
    case 4: TILE(x, xs, panel, scales, mins, k, group, 4, out); break;               \
    case 3: TILE(x, xs, panel, scales, mins, k, group, 3, out); break;               \
    case 2: TILE(x, xs, panel, scales, mins, k, group, 2, out); break;               \
    default: TILE(x, xs, panel, scales, mins, k, group, 1, out); break;              \
    }

#define DISPATCH_ROWS(TILE, x, xs, panel, k, rows, out) \
    switch (rows) {                                     \
    case 12: TILE(x, xs, panel, k, 12, out); break;     \
    case 11: TILE(x, xs, panel, k, 11, out); break;     \
    case 10: TILE(x, xs, panel, k, 10, out); break;     \
    case 9: TILE(x, xs, panel, k, 9, out); break;       \
    case 8: TILE(x, xs, panel, k, 8, out); break;       \
    case 7: TILE(x, xs, panel, k, 7, out); break;       \
    case 6: TILE(x, xs, panel, k, 6, out); break;       \
    case 5: TILE(x, xs, panel, k, 5, out); break;       \
    case 4: TILE(x, xs, panel, k, 4, out); break;       \
    case 3: TILE(x, xs, panel, k, 3, out); break;       \
    case 2: TILE(x, xs, panel, k, 2, out); break;       \
    default: TILE(x, xs, panel, k, 1, out); break;      \
    }

/* where panel p of a packed weight of type wtype starts */
static inline const void *raw_panel(int wtype, const void *packed, int p, int k) {
    const int64_t bytes = (int64_t)k * (wtype == 0 ? 4 * PANEL : wtype == 1 ? 2 * PANEL : wtype == 3 ? PANEL / 2 : PANEL);
    return (const char *)packed + p * bytes;
}

/* panel p of a packed weight (wtype 1..4) as float32 weights: bfloat16 widened, codes dequantized
 * as ``code * scale (+ min)`` (two roundings, as minicpm.quant's dequantize) */
__attribute__((optimize("fp-contract=off"))) static void widen_panel(int wtype, const void *packed,
                                                                    const float *scales, const float *mins, int p,
                                                                    int k, int group, float *wide) {
    const int64_t count = (int64_t)k * PANEL;
    if (wtype == 1) {
        const uint16_t *w = (const uint16_t *)packed + p * count;
        for (int64_t i = 0; i < count; i++) {
            uint32_t u = (uint32_t)w[i] << 16;
            memcpy(&wide[i], &u, sizeof u);
        }
        return;
    }
    if (wtype == 2) {
        const int8_t *w = (const int8_t *)packed + p * count;
        for (int j = 0; j < k; j++)
            for (int c = 0; c < PANEL; c++) wide[(int64_t)j * PANEL + c] = (float)w[(int64_t)j * PANEL + c] * scales[p * PANEL + c];
        return;
    }
    const int64_t per_panel = (int64_t)(k / group) * PANEL;
    const float *ps = scales + p * per_panel, *pm = mins ? mins + p * per_panel : NULL;
    for (int j = 0; j < k; j++) {
        const float *s = ps + (int64_t)(j / group) * PANEL, *mn = pm ? pm + (int64_t)(j / group) * PANEL : NULL;
        float *dst = wide + (int64_t)j * PANEL;
        for (int c = 0; c < PANEL; c++) {
            float code;
            if (wtype == 3) {
                const uint8_t b = ((const uint8_t *)packed)[p * count / 2 + (int64_t)j * (PANEL / 2) + c % (PANEL / 2)];
                code = (float)(c < PANEL / 2 ? b & 15 : b >> 4);
            } else {
                code = (float)((const int8_t *)packed)[p * count + (int64_t)j * PANEL + c];
            }
            float w = code * s[c];
            if (mn) w = w + mn[c];
            dst[c] = w;
        }
    }
}

/* a tile's ``rows`` rows of 32 float32 outputs (from row r0, panel p) into y, float32 (xtype 0) or
 * bfloat16 rounded to nearest even (1); columns past n are dropped */
static inline void store_rows(const float *out, int rows, int r0, int p, int n, int xtype, void *y, int64_t y_stride) {
    const int c0 = p * PANEL, cols = n - c0 < PANEL ? n - c0 : PANEL;
    for (int r = 0; r < rows; r++) {
        if (xtype == 0) {
            memcpy((float *)y + (int64_t)(r0 + r) * y_stride + c0, out + r * PANEL, cols * sizeof(float));
        } else {
            uint16_t *dst = (uint16_t *)y + (int64_t)(r0 + r) * y_stride + c0;
            for (int c = 0; c < cols; c++) dst[c] = f32_to_bf16_rne(out[r * PANEL + c]);
        }
    }
}

/* row tile t of panel p into y. kind: the panel's weights as 0 float32, 1 bfloat16, 2 int8 with
 * per-column scales, 3 int4 / 4 int8 codes in groups */
static inline __attribute__((always_inline)) void run_tile(int kind, const void *panel, const float *scales, const float *mins, int p, int k,
                            int group, const float *xf, int64_t x_stride, int t, int m, int n, int xtype, void *y,
                            int64_t y_stride) {
    float out[ROWS * PANEL];
    const int r0 = t * ROWS, rows = m - r0 < ROWS ? m - r0 : ROWS;
    const float *xt = xf + (int64_t)r0 * x_stride;
    if (kind == 0) {
        DISPATCH_ROWS(tile_f32, xt, x_stride, (const float *)panel, k, rows, out)
    } else if (kind == 1) {
        DISPATCH_ROWS(tile_bf16, xt, x_stride, (const uint16_t *)panel, k, rows, out)
    } else if (kind == 2) {
        DISPATCH_ROWS(tile_i8, xt, x_stride, (const int8_t *)panel, k, rows, out)
    } else {
        const int64_t per_panel = (int64_t)(k / group) * PANEL;
        const float *ps = scales + p * per_panel, *pm = mins ? mins + p * per_panel : NULL;
        for (int h = 0; h < rows; h += ROWS_Q4) {
            const int sub = rows - h < ROWS_Q4 ? rows - h : ROWS_Q4;
            const float *xh = xt + (int64_t)h * x_stride;
            if (kind == 3)
                DISPATCH_ROWS_GROUPED(tile_q4, xh, x_stride, (const uint8_t *)panel, ps, pm, k, group, sub,
                                      out + h * PANEL)
            else
                DISPATCH_ROWS_GROUPED(tile_q8, xh, x_stride, (const int8_t *)panel, ps, pm, k, group, sub,
                                      out + h * PANEL)
        }
    }
    if (kind == 2)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < PANEL; c++) out[r * PANEL + c] *= scales[p * PANEL + c];
    store_rows(out, rows, r0, p, n, xtype, y, y_stride);
}

#if defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
/* bfloat16 prefill (bfloat16 weights and inputs, as a bfloat16 model's): the products run on the
 * CPU's bfloat16 dot-product instruction, two inputs per multiply-add, twice the float32 tiles'
 * pace. Products of two bfloat16 values are exact in float32, so the sums are float32 sums of exact
 * products, as torch's bfloat16 matmul computes them (in another order: each lane adds an input
 * pair at a time). The panel is first regrouped as pairs: [j/2][c][2] = W[c, j], W[c, j + 1]. */
static void pair_panel(const uint16_t *panel, int k, uint16_t *pairs) {
    for (int j = 0; j < k; j += 2)
        for (int c = 0; c < PANEL; c++) {
            pairs[(int64_t)j * PANEL + 2 * c] = panel[(int64_t)j * PANEL + c];
            pairs[(int64_t)j * PANEL + 2 * c + 1] = panel[(int64_t)(j + 1) * PANEL + c];
        }
}

static inline __attribute__((always_inline)) void tile_bf16_dot(const uint16_t *x, int64_t x_stride,
                                                                const uint16_t *pairs, int k, const int rows,
                                                                float *out) {
    __m512 acc0[ROWS], acc1[ROWS];
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int j = 0; j < k; j += 2) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(pairs + (int64_t)j * PANEL);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(pairs + (int64_t)j * PANEL + PANEL);
        for (int r = 0; r < rows; r++) {
            uint32_t pair;
            memcpy(&pair, x + r * x_stride + j, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            acc0[r] = _mm512_dpbf16_ps(acc0[r], xv, w0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], xv, w1);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm512_storeu_ps(out + r * PANEL, acc0[r]);
        _mm512_storeu_ps(out + r * PANEL + 16, acc1[r]);
    }
}

/* the bfloat16 prefill over all panels (see tile_bf16_dot); 0 when out of memory */
static int linear_bf16_dot(const uint16_t *x, int64_t x_stride, const uint16_t *packed, int m, int n, int k,
                           uint16_t *y, int64_t y_stride) {
    const int panels = (n + PANEL - 1) / PANEL, tiles = (m + ROWS - 1) / ROWS;
    int ok = 1;
#pragma omp parallel
    {
        uint16_t *pairs = malloc(sizeof(uint16_t) * (size_t)k * PANEL);
        if (!pairs) {
#pragma omp atomic write
            ok = 0;
        }
#pragma omp barrier
        if (ok) {
#pragma omp for schedule(static)
            for (int p = 0; p < panels; p++) {
                float out[ROWS * PANEL];
                pair_panel(packed + (int64_t)p * k * PANEL, k, pairs);
                for (int t = 0; t < tiles; t++) {
                    const int r0 = t * ROWS, rows = m - r0 < ROWS ? m - r0 : ROWS;
                    DISPATCH_ROWS(tile_bf16_dot, x + (int64_t)r0 * x_stride, x_stride, pairs, k, rows, out)
                    store_rows(out, rows, r0, p, n, 1, y, y_stride);
                }
            }
        }
        free(pairs);
    }
    return ok;
}
#else
#define HAVE_BF16_DOT 0
#endif

/* y (m, n), row stride y_stride, = x (m, k), row stride x_stride, times the packed W^T.
 * wtype: the packed weight's type (0 float32, 1 bfloat16, 2 int8 with one float32 scale per output
 * column in ``scales``: the int8 sums, exact in float32 accumulators, are scaled once at the end;
 * 3 int4 codes 0..15 in groups of ``group`` inputs (k a multiple of it), each (column, group) with
 * its float32 ``scales`` and ``mins``, laid out (panel, group, 32): w ~ code * scale + min;
 * 4 int8 codes in such groups, ``mins`` NULL for none);
 * x and y are float32 (xtype 0) or bfloat16 (xtype 1), widened into ``scratch`` (m * k floats)
 * first when bfloat16. ``prefill`` (many rows, none of them a decode row): each panel is first
 * widened to float32 weights (bfloat16 exactly; codes dequantized, ``code * scale + min``) and the
 * float32 tiles run over it, 1.1-1.4x faster from two row tiles up; otherwise every row is computed
 * from the packed panel as above, the same for any number of rows. */
void minicpm_linear(int wtype, int xtype, const void *x, int64_t x_stride, const void *packed, const float *scales,
                    const float *mins, int group, int m, int n, int k, void *y, int64_t y_stride, float *scratch,
                    int prefill) {
    const int panels = (n + PANEL - 1) / PANEL;
    const int tiles = (m + ROWS - 1) / ROWS;
#if HAVE_BF16_DOT
    if (prefill && tiles > 1 && wtype == 1 && xtype == 1 && k % 2 == 0 &&
        linear_bf16_dot((const uint16_t *)x, x_stride, (const uint16_t *)packed, m, n, k, (uint16_t *)y, y_stride))
        return;
#endif
    const float *xf = (const float *)x;
    if (xtype == 1) {
        for (int r = 0; r < m; r++)
            for (int j = 0; j < k; j++) {
                uint32_t u = (uint32_t)((const uint16_t *)x)[(int64_t)r * x_stride + j] << 16;
                memcpy(&scratch[(int64_t)r * k + j], &u, sizeof u);
            }
        xf = scratch;
        x_stride = k;
    }
    if (prefill && tiles > 1 && wtype != 0) { /* each panel widened to float32 weights once */
#pragma omp parallel
        {
            float *wide = malloc(sizeof(float) * (size_t)k * PANEL);
#pragma omp for schedule(static)
            for (int p = 0; p < panels; p++) {
                const int kind = 0;
                if (wide) widen_panel(wtype, packed, scales, mins, p, k, group, wide);
                for (int t = 0; t < tiles; t++) /* (no memory for the widened panel: from the packed one) */
                    run_tile(wide ? kind : wtype, wide ? (const void *)wide : raw_panel(wtype, packed, p, k), scales,
                             mins, p, k, group, xf, x_stride, t, m, n, xtype, y, y_stride);
            }
            free(wide);
        }
        return;
    }
#pragma omp parallel for schedule(static) collapse(2)
    for (int p = 0; p < panels; p++)
        for (int t = 0; t < tiles; t++)
            run_tile(wtype, raw_panel(wtype, packed, p, k), scales, mins, p, k, group, xf, x_stride, t, m, n, xtype,
                     y, y_stride);
}


/* int4 codes as a checkpoint stores them, two per byte along the input (row r: input 2i in the low
 * nibble of byte i, 2i + 1 in the high one), q (n, k / 2), into the panels' layout (panel, k, 16):
 * byte c of input j holds column c in its low nibble and column c + 16 in its high one; columns
 * past n are code 0. One pass, where unpacking and transposing in torch took four. */
void minicpm_pack_int4_panels(const uint8_t *q, int n, int k, uint8_t *out) {
    const int panels = (n + PANEL - 1) / PANEL, half = k / 2;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        uint8_t *dst = out + (int64_t)p * k * (PANEL / 2);
        for (int c = 0; c < PANEL / 2; c++) {
            const int r0 = p * PANEL + c, r1 = r0 + PANEL / 2;
            const uint8_t *a = r0 < n ? q + (int64_t)r0 * half : NULL, *b = r1 < n ? q + (int64_t)r1 * half : NULL;
            for (int j = 0; j < k; j++) {
                const int shift = (j & 1) * 4;
                const uint8_t lo = a ? (a[j >> 1] >> shift) & 15 : 0, hi = b ? (b[j >> 1] >> shift) & 15 : 0;
                dst[(int64_t)j * (PANEL / 2) + c] = (uint8_t)(lo | hi << 4);
            }
        }
    }
}

/* ---------------------------------------------------------------------------- GGUF blocks
 * A GGUF tensor's blocks decoded into minicpm.quant's layouts (quant.py's _decode is the reference,
 * bit for bit): codes int8 (Q8_0, Q6_K) or int4 two per byte in input order (Q4_0, Q4_1, Q4_K),
 * and a float32 scale (and minimum) per group of 32 (Q6_K: 16) inputs; blocks lie along rows, so
 * block b's codes, scales and minimums follow block b - 1's. kind: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q4_K,
 * 4 Q6_K. Every product is one float32 multiply, as numpy's. */
static inline float half_to_float(const uint8_t *p) {
    const uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 31, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 31) {
        bits = sign | 0x7F800000u | man << 13; /* inf, nan (payload kept) */
    } else if (exp) {
        bits = sign | (exp + 112) << 23 | man << 13;
    } else if (man) { /* subnormal: man * 2^-24, normalized */
        uint32_t m = man, e = 113;
        while (!(m & 0x400)) {
            m <<= 1;
            e--;
        }
        bits = sign | e << 23 | (m & 0x3FF) << 13;
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ggml's nibble order over a run of len bytes (weight j < len in byte j's low nibble, weight
 * len + j in its high one) -> the same 2 len weights in order, two per byte (2m in byte m's low
 * nibble, 2m + 1 in its high one). */
static inline void pack_halves(const uint8_t *qs, int len, uint8_t *out) {
    for (int m = 0; m < len / 2; m++) {
        out[m] = (uint8_t)((qs[2 * m] & 15) | qs[2 * m + 1] << 4);
        out[len / 2 + m] = (uint8_t)(qs[2 * m] >> 4 | (qs[2 * m + 1] & 0xF0));
    }
}

int minicpm_gguf_decode(int kind, const uint8_t *blocks, int64_t count, void *codes, float *scales, float *mins) {
    static const int block_bytes[] = {34, 18, 20, 144, 210};
    if (kind < 0 || kind > 4) {
        return -1;
    }
    const int size = block_bytes[kind];
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *b = blocks + i * size;
        if (kind == 0) { /* Q8_0: d, 32 int8 codes */
            memcpy((int8_t *)codes + i * 32, b + 2, 32);
            scales[i] = half_to_float(b);
        } else if (kind == 1 || kind == 2) { /* Q4_0: d, 16 bytes (w = d (q - 8)); Q4_1: d, m, 16 bytes */
            const float d = half_to_float(b);
            pack_halves(b + (kind == 1 ? 2 : 4), 16, (uint8_t *)codes + i * 16);
            scales[i] = d;
            mins[i] = kind == 1 ? -8.0f * d : half_to_float(b + 2);
        } else if (kind == 3) { /* Q4_K: d, dmin, 12 bytes of 6-bit scales and mins, 4 runs of 32 bytes */
            const float d = half_to_float(b), dmin = half_to_float(b + 2);
            const uint8_t *s = b + 4;
            for (int g = 0; g < 8; g++) {
                const int sc = g < 4 ? s[g] & 63 : (s[g + 4] & 15) | (s[g - 4] >> 6) << 4;
                const int mn = g < 4 ? s[g + 4] & 63 : s[g + 4] >> 4 | (s[g] >> 6) << 4;
                scales[i * 8 + g] = d * (float)sc;
                mins[i * 8 + g] = -(dmin * (float)mn);
            }
            for (int r = 0; r < 4; r++) {
                pack_halves(b + 16 + r * 32, 32, (uint8_t *)codes + i * 128 + r * 32);
            }
        } else { /* Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d */
            const float d = half_to_float(b + 208);
            int8_t *out = (int8_t *)codes + i * 256;
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = b + h * 64, *qh = b + 128 + h * 32;
                for (int j = 0; j < 128; j++) {
                    const int quarter = j / 32, l = j % 32;
                    const int low = (quarter & 1 ? ql[32 + l] : ql[l]) >> (quarter & 2 ? 4 : 0) & 15;
                    const int high = qh[l] >> (2 * quarter) & 3;
                    out[h * 128 + j] = (int8_t)((low | high << 4) - 32);
                }
            }
            for (int g = 0; g < 16; g++) {
                scales[i * 16 + g] = d * (float)(int8_t)b[192 + g];
            }
        }
    }
    return 0;
}
