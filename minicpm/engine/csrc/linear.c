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
 * column, int8 codes in groups with a scale and an optional minimum each, or int4 codes in groups
 * with a scale and a minimum each, stored as one record per (panel, group) (load_q4) (weight-only
 * quantization). GCC vector extensions give whole-vector code on any target (AVX-512, AVX2, NEON);
 * x86 intrinsics appear only in the int8 / float16 loads and in the tiles that run on the
 * bfloat16 dot-product instruction (a CPU with AVX512-BF16): the prefill of bfloat16 inputs on
 * any weight (a grouped quantized weight's dequantized values rounded to bfloat16 first), and
 * int4 weights for bfloat16 decode rows. Those sum exact products in float32 an input pair at a
 * time: still one sum per output independent of the other rows, but not bitwise the float tiles'
 * sums.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "minicpm.h"
#include "numeric.h"

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

/* int4 panels are records, one per group of ``group`` inputs of a panel, read front to back (one
 * stream): the group's codes in chunks of 4 inputs x 32 columns (64 bytes each), then the 32
 * columns' scales, then their minimums. wtype 3: float32 scales and minimums; 5: float16 ones (half
 * the bytes, where every scale and minimum is a float16 value); 6: float16 scales and no minimums
 * stored, each being -8 x its scale (GGUF's Q4_0: a record as many bytes as Q4_0's blocks). A
 * chunk is 32 little-endian 16-bit words, word 2c + e (c < 16, e < 2) holding, from its low nibble
 * up, the codes of (input j + e, column c), (j + e, c + 16), (j + 2 + e, c) and (j + 2 + e, c +
 * 16): one 32-bit lane holds column c's codes of all four inputs (load_q4), and the words, read
 * as input pairs, are the bfloat16 dot product's operand order (tile_q4_dot). */
#define Q4_CHUNK 4

/* bytes of a record's scales (and of its minimums, where it stores them) */
static inline int q4_scale_bytes(int wtype) { return PANEL * (wtype == 3 ? 4 : 2); }

static inline int64_t q4_record_bytes(int group, int wtype) {
    return (int64_t)group * (PANEL / 2) + q4_scale_bytes(wtype) * (wtype == 6 ? 1 : 2);
}

/* where the code of (input j < group, column c) of a record lies: its byte, and 0 or 4, its shift */
static inline int64_t q4_place(int j, int c, int *shift) {
    const int t = j % Q4_CHUNK, word = 2 * (c % 16) + (t & 1), nibble = 2 * (t >> 1) + c / 16;
    *shift = (nibble & 1) * 4;
    return (int64_t)(j - t) * (PANEL / 2) + 2 * word + nibble / 2;
}

static inline v16f nibbles(v16u v, int shift) { return __builtin_convertvector((v16i)((v >> shift) & 15), v16f); }

/* the chunk of a record's inputs j .. j + 3 as w[t][h]: input j + t's columns 16 h .. 16 h + 15 */
static inline void load_q4(const uint8_t *codes, int j, v16f w[][2]) {
    v16u v;
    memcpy(&v, codes + (int64_t)j * (PANEL / 2), sizeof v);
    w[0][0] = nibbles(v, 0), w[0][1] = nibbles(v, 4), w[2][0] = nibbles(v, 8), w[2][1] = nibbles(v, 12);
    w[1][0] = nibbles(v, 16), w[1][1] = nibbles(v, 20), w[3][0] = nibbles(v, 24), w[3][1] = nibbles(v, 28);
}

/* 16 float16 values as floats */
static inline v16f load16_half(const uint8_t *p) {
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    v16f v;
    for (int c = 0; c < 16; c++) {
        uint16_t h;
        memcpy(&h, p + 2 * c, sizeof h);
        v[c] = half_to_f32(h);
    }
    return v;
#endif
}

/* a record's 32 scales (s[0..1]) and minimums (mn[0..1]), past its ``group`` inputs' codes */
static inline void q4_scales(const uint8_t *record, int group, int wtype, v16f s[2], v16f mn[2]) {
    const uint8_t *p = record + (int64_t)group * (PANEL / 2), *pm = p + q4_scale_bytes(wtype);
    for (int h = 0; h < 2; h++) {
        if (wtype == 3) {
            s[h] = load16((const float *)p + 16 * h);
            mn[h] = load16((const float *)pm + 16 * h);
        } else {
            s[h] = load16_half(p + 32 * h);
            mn[h] = wtype == 6 ? s[h] * -8.0f : load16_half(pm + 32 * h);
        }
    }
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

/* input j's 32 int8 weights of a grouped panel's group as w[0][0..1] */
static inline void load_q8(const int8_t *codes, int j, v16f w[][2]) {
    w[0][0] = load16_i8(codes + (int64_t)j * PANEL);
    w[0][1] = load16_i8(codes + (int64_t)j * PANEL + 16);
}

/* group g's 32 scales and minimums (none: mins NULL) of a grouped int8 panel, laid out (group, 32) */
static inline void q8_scales(const float *scales, const float *mins, int g, v16f s[2], v16f mn[2]) {
    for (int h = 0; h < 2; h++) {
        s[h] = load16(scales + (int64_t)g * PANEL + 16 * h);
        if (mins) mn[h] = load16(mins + (int64_t)g * PANEL + 16 * h);
    }
}

/* rows x 32 outputs of one grouped panel (int4 records or int8 codes), groups of ``group`` inputs:
 * per group, the weights' codes q are summed against x (and x alone, when there are minimums),
 * inputs in order, then ``scale * sum(x q) + min * sum(x)`` is added, which is
 * sum(x * (q * scale + min)) regrouped: each weight w ~ q * scale + min of its (column, group).
 * CODES is group g's codes (starting at input g0), LOADN reads N of its inputs' weights at a time,
 * SCALES reads its scales and minimums into s and mn, WITH_MINS whether there are minimums. */
#define DEFINE_GROUPED_TILE(NAME, WT, LOADN, N, CODES, SCALES, WITH_MINS)                                  \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t x_stride, const WT *panel, \
                                                           const float *scales, const float *mins, int k,  \
                                                           int group, int wtype, const int rows, float *out) { \
        (void)scales, (void)mins, (void)wtype;                                                             \
        const int with_mins = (WITH_MINS);                                                                 \
        v16f acc0[ROWS_Q4], acc1[ROWS_Q4];                                                                 \
        for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = (v16f){0};                                      \
        for (int g0 = 0, g = 0; g0 < k; g0 += group, g++) {                                                \
            const WT *codes = (CODES);                                                                     \
            v16f q0[ROWS_Q4], q1[ROWS_Q4], s[2], mn[2];                                                    \
            float sx[ROWS_Q4];                                                                             \
            for (int r = 0; r < rows; r++) {                                                               \
                q0[r] = q1[r] = (v16f){0};                                                                 \
                sx[r] = 0.0f;                                                                              \
            }                                                                                              \
            for (int j = 0; j < group; j += (N)) {                                                         \
                v16f w[N][2];                                                                              \
                LOADN(codes, j, w);                                                                        \
                for (int t = 0; t < (N); t++)                                                              \
                    for (int r = 0; r < rows; r++) {                                                       \
                        const float xv = x[r * x_stride + g0 + j + t];                                     \
                        q0[r] += xv * w[t][0];                                                             \
                        q1[r] += xv * w[t][1];                                                             \
                        if (with_mins) sx[r] += xv;                                                        \
                    }                                                                                      \
            }                                                                                              \
            SCALES;                                                                                        \
            for (int r = 0; r < rows; r++) {                                                               \
                acc0[r] += with_mins ? s[0] * q0[r] + mn[0] * sx[r] : s[0] * q0[r];                        \
                acc1[r] += with_mins ? s[1] * q1[r] + mn[1] * sx[r] : s[1] * q1[r];                        \
            }                                                                                              \
        }                                                                                                  \
        store_tile(acc0, acc1, rows, out);                                                                 \
    }

DEFINE_GROUPED_TILE(tile_q4, uint8_t, load_q4, Q4_CHUNK, panel + g * q4_record_bytes(group, wtype),
                    q4_scales(codes, group, wtype, s, mn), 1)
DEFINE_GROUPED_TILE(tile_q8, int8_t, load_q8, 1, panel + (int64_t)g0 * PANEL, q8_scales(scales, mins, g, s, mn),
                    mins != NULL)

#define DISPATCH_ROWS_GROUPED(TILE, x, xs, panel, scales, mins, k, group, wq, rows, out)   \
    switch (rows) {                                                                        \
    case 6: TILE(x, xs, panel, scales, mins, k, group, wq, 6, out); break;               \
    case 5: TILE(x, xs, panel, scales, mins, k, group, wq, 5, out); break;               \
    case 4: TILE(x, xs, panel, scales, mins, k, group, wq, 4, out); break;               \
    case 3: TILE(x, xs, panel, scales, mins, k, group, wq, 3, out); break;               \
    case 2: TILE(x, xs, panel, scales, mins, k, group, wq, 2, out); break;               \
    default: TILE(x, xs, panel, scales, mins, k, group, wq, 1, out); break;              \
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

/* where panel p of a packed weight of type wtype (k inputs, groups of ``group``) starts */
static inline const void *raw_panel(int wtype, const void *packed, int p, int k, int group) {
    const int64_t bytes = is_q4(wtype) ? (int64_t)(k / group) * q4_record_bytes(group, wtype)
                                       : (int64_t)k * (wtype == 0 ? 4 * PANEL : wtype == 1 ? 2 * PANEL : PANEL);
    return (const char *)packed + p * bytes;
}

/* panel p of a packed weight (wtype 1..6) as float32 weights: bfloat16 widened, codes dequantized
 * as ``code * scale (+ min)`` (two roundings, as minicpm.quant's dequantize) */
__attribute__((optimize("fp-contract=off"))) static void widen_panel(int wtype, const void *packed,
                                                                    const float *scales, const float *mins, int p,
                                                                    int k, int group, float *wide) {
    const int64_t count = (int64_t)k * PANEL;
    if (wtype == 1) {
        const uint16_t *w = (const uint16_t *)packed + p * count;
        for (int64_t i = 0; i < count; i++) wide[i] = bf16_to_f32(w[i]);
        return;
    }
    if (wtype == 2) {
        const int8_t *w = (const int8_t *)packed + p * count;
        for (int j = 0; j < k; j++)
            for (int c = 0; c < PANEL; c++) wide[(int64_t)j * PANEL + c] = (float)w[(int64_t)j * PANEL + c] * scales[p * PANEL + c];
        return;
    }
    if (is_q4(wtype)) {
        const uint8_t *panel = raw_panel(wtype, packed, p, k, group);
        for (int g0 = 0; g0 < k; g0 += group) {
            const uint8_t *record = panel + (int64_t)(g0 / group) * q4_record_bytes(group, wtype);
            v16f s[2], mn[2];
            q4_scales(record, group, wtype, s, mn);
            for (int j = 0; j < group; j += Q4_CHUNK) {
                v16f w[Q4_CHUNK][2];
                load_q4(record, j, w);
                for (int t = 0; t < Q4_CHUNK; t++)
                    for (int h = 0; h < 2; h++) {
                        const v16f scaled = w[t][h] * s[h], v = scaled + mn[h];
                        memcpy(wide + (int64_t)(g0 + j + t) * PANEL + 16 * h, &v, sizeof v);
                    }
            }
        }
        return;
    }
    const int64_t per_panel = (int64_t)(k / group) * PANEL;
    const float *ps = scales + p * per_panel, *pm = mins ? mins + p * per_panel : NULL;
    for (int j = 0; j < k; j++) {
        const float *s = ps + (int64_t)(j / group) * PANEL, *mn = pm ? pm + (int64_t)(j / group) * PANEL : NULL;
        float *dst = wide + (int64_t)j * PANEL;
        for (int c = 0; c < PANEL; c++) {
            float w = (float)((const int8_t *)packed)[p * count + (int64_t)j * PANEL + c] * s[c];
            if (mn) w = w + mn[c];
            dst[c] = w;
        }
    }
}

/* fn(ctx, i) for items i = 0 .. count - 1 on the OpenMP threads: each thread takes its own
 * contiguous share from the front, STEAL_CHUNK items at a time, then the others' remaining items
 * the same way (work stealing). A thread's weights stream front to back as with a static split,
 * and a thread the machine slows (another process on its core, a slower core) no longer keeps
 * the others waiting at the end. Which thread computes an item never changes its result. */
#define STEAL_CHUNK 2

typedef struct {
    int next, end;
    char pad[56]; /* a cache line each */
} steal_range;

static void parallel_items(int count, void (*fn)(const void *ctx, int i), const void *ctx) {
    const int most = omp_get_max_threads();
    if (count < 2 * most) { /* too few items to share out */
#pragma omp parallel for schedule(static)
        for (int i = 0; i < count; i++) fn(ctx, i);
        return;
    }
    steal_range ranges[most];
#pragma omp parallel
    {
        const int nt = omp_get_num_threads(), me = omp_get_thread_num();
        ranges[me].next = (int)((int64_t)count * me / nt);
        ranges[me].end = (int)((int64_t)count * (me + 1) / nt);
#pragma omp barrier
        for (int v = 0; v < nt; v++) {
            steal_range *r = &ranges[(me + v) % nt];
            for (int at; (at = __atomic_fetch_add(&r->next, STEAL_CHUNK, __ATOMIC_RELAXED)) < r->end;)
                for (int i = at; i < at + STEAL_CHUNK && i < r->end; i++) fn(ctx, i);
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
            for (int c = 0; c < cols; c++) dst[c] = f32_to_bf16(out[r * PANEL + c]);
        }
    }
}

/* row tile t of panel p into y. kind: the panel's weights as 0 float32, 1 bfloat16, 2 int8 with
 * per-column scales, 3 / 5 int4 records, 4 int8 codes in groups */
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
        const float *ps = kind == 4 ? scales + p * per_panel : NULL, *pm = kind == 4 && mins ? mins + p * per_panel : NULL;
        for (int h = 0; h < rows; h += ROWS_Q4) {
            const int sub = rows - h < ROWS_Q4 ? rows - h : ROWS_Q4;
            const float *xh = xt + (int64_t)h * x_stride;
            if (kind == 4)
                DISPATCH_ROWS_GROUPED(tile_q8, xh, x_stride, (const int8_t *)panel, ps, pm, k, group, 0, sub,
                                      out + h * PANEL)
            else
                DISPATCH_ROWS_GROUPED(tile_q4, xh, x_stride, (const uint8_t *)panel, NULL, NULL, k, group, kind,
                                      sub, out + h * PANEL)
        }
    }
    if (kind == 2)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < PANEL; c++) out[r * PANEL + c] *= scales[p * PANEL + c];
    store_rows(out, rows, r0, p, n, xtype, y, y_stride);
}

#if defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
/* bfloat16 prefill (bfloat16 inputs, as a bfloat16 model's): the products run on the CPU's bfloat16
 * dot-product instruction, two inputs per multiply-add, twice the float32 tiles' pace. Products of
 * two bfloat16 values are exact in float32, so the sums are float32 sums of exact products, as
 * torch's bfloat16 matmul computes them (in another order: each lane adds an input pair at a
 * time). Each panel is first regrouped as pairs, [j/2][c][2] = W[c, j], W[c, j + 1], of bfloat16
 * weights (pairs_panel): a bfloat16 panel's as they are, an int8 per-column panel's codes
 * (exact; the sums scaled after), and any other quantized panel's dequantized weights
 * ``code * scale (+ min)`` (widen_panel) rounded to bfloat16, as torch's bfloat16 matmul would
 * take a dequantized weight: an error of at most 2^-9 of each weight, far under the quantization
 * step, for the bfloat16 model's pace. */
static void pairs_panel(int wtype, const void *packed, const float *scales, const float *mins, int p, int k,
                        int group, float *wide, uint16_t *pairs) {
    const int64_t count = (int64_t)k * PANEL;
    if (wtype == 1 || wtype == 2) {
        const uint16_t *w = (const uint16_t *)packed + p * count;
        const int8_t *q = (const int8_t *)packed + p * count;
        for (int j = 0; j < k; j += 2)
            for (int c = 0; c < PANEL; c++)
                for (int e = 0; e < 2; e++) {
                    const int64_t at = (int64_t)(j + e) * PANEL + c;
                    pairs[(int64_t)j * PANEL + 2 * c + e] = wtype == 1 ? w[at] : f32_to_bf16((float)q[at]);
                }
        return;
    }
    widen_panel(wtype, packed, scales, mins, p, k, group, wide);
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                           6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int j = 0; j < k; j += 2)
        for (int h = 0; h < 2; h++) {
            const float *lo = wide + (int64_t)j * PANEL + 16 * h;
            /* words 0-15: input j's 16 columns, 16-31: input j + 1's, then interleaved */
            const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(lo + PANEL), _mm512_loadu_ps(lo));
            _mm512_storeu_si512(pairs + (int64_t)j * PANEL + 32 * h, _mm512_permutexvar_epi16(order, (__m512i)b));
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

#define ROWS_Q4_DOT 4 /* six accumulators a row */

/* rows x 32 outputs of an int4 panel for bfloat16 rows, on the dot-product instruction: a chunk's
 * words become four vectors of bfloat16 codes by one table lookup each (codes 0..15 are exact in
 * bfloat16), the (j, j + 1) and (j + 2, j + 3) input pairs of columns 0-15 and 16-31, each
 * multiplied into a pair of the row's inputs: exact products, summed in float32 in four chains a
 * row over a group; then ``scale * sum + min * sum(x)`` is added as in the float tiles, sum(x)
 * given in ``sx`` (the row's group sums, ``sx_stride`` floats a row). A row's result does not
 * depend on the rows beside it. */
static inline __attribute__((always_inline)) void tile_q4_dot(const uint16_t *x, int64_t x_stride, const uint8_t *panel,
                                                              const float *sx, int sx_stride, int k, int group,
                                                              int wtype, const int rows, float *out) {
    const __m512i table = _mm512_set_epi16(0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0,
                                           0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0, 0x4170, 0x4160,
                                           0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0,
                                           0x4080, 0x4040, 0x4000, 0x3f80, 0); /* bfloat16 (i & 15) at word i */
    const int64_t record_bytes = q4_record_bytes(group, wtype);
    __m512 acc0[ROWS_Q4_DOT], acc1[ROWS_Q4_DOT];
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int g0 = 0, g = 0; g0 < k; g0 += group, g++) {
        const uint8_t *record = panel + g * record_bytes;
        __m512 a0[ROWS_Q4_DOT], a1[ROWS_Q4_DOT], b0[ROWS_Q4_DOT], b1[ROWS_Q4_DOT];
        for (int r = 0; r < rows; r++) a0[r] = a1[r] = b0[r] = b1[r] = _mm512_setzero_ps();
        for (int j = 0; j < group; j += Q4_CHUNK) {
            const __m512i v = _mm512_loadu_si512(record + (int64_t)j * (PANEL / 2));
            const __m512bh wa = (__m512bh)_mm512_permutexvar_epi16(v, table);
            const __m512bh wb = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
            const __m512bh wc = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table);
            const __m512bh wd = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table);
            for (int r = 0; r < rows; r++) {
                uint32_t p0, p1;
                memcpy(&p0, x + r * x_stride + g0 + j, sizeof p0);
                memcpy(&p1, x + r * x_stride + g0 + j + 2, sizeof p1);
                const __m512bh x0 = (__m512bh)_mm512_set1_epi32((int)p0), x1 = (__m512bh)_mm512_set1_epi32((int)p1);
                a0[r] = _mm512_dpbf16_ps(a0[r], x0, wa);
                a1[r] = _mm512_dpbf16_ps(a1[r], x0, wb);
                b0[r] = _mm512_dpbf16_ps(b0[r], x1, wc);
                b1[r] = _mm512_dpbf16_ps(b1[r], x1, wd);
            }
        }
        v16f s[2], mn[2];
        q4_scales(record, group, wtype, s, mn);
        for (int r = 0; r < rows; r++) {
            const __m512 xs = _mm512_set1_ps(sx[r * sx_stride + g]);
            acc0[r] = _mm512_fmadd_ps((__m512)mn[0], xs, _mm512_fmadd_ps((__m512)s[0], _mm512_add_ps(a0[r], b0[r]), acc0[r]));
            acc1[r] = _mm512_fmadd_ps((__m512)mn[1], xs, _mm512_fmadd_ps((__m512)s[1], _mm512_add_ps(a1[r], b1[r]), acc1[r]));
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm512_storeu_ps(out + r * PANEL, acc0[r]);
        _mm512_storeu_ps(out + r * PANEL + 16, acc1[r]);
    }
}

typedef struct {
    int wtype;
    const uint16_t *x;
    int64_t x_stride;
    const void *packed;
    int group, m, n, k;
    uint16_t *y;
    int64_t y_stride;
    const float *sx;
    int tiles;
} q4_dot_job;

/* item i of linear_q4_dot: panel i / tiles, row tile i % tiles */
static void q4_dot_item(const void *ctx, int i) {
    const q4_dot_job *j = ctx;
    const int p = i / j->tiles, t = i % j->tiles, groups = j->k / j->group;
    float out[ROWS_Q4_DOT * PANEL];
    const int r0 = t * ROWS_Q4_DOT, rows = j->m - r0 < ROWS_Q4_DOT ? j->m - r0 : ROWS_Q4_DOT;
    const uint16_t *xt = j->x + (int64_t)r0 * j->x_stride;
    const uint8_t *panel = raw_panel(j->wtype, j->packed, p, j->k, j->group);
    const float *st = j->sx + (int64_t)r0 * groups;
#define Q4_DOT(ROWS) tile_q4_dot(xt, j->x_stride, panel, st, groups, j->k, j->group, j->wtype, ROWS, out)
    switch (rows) {
    case 4: Q4_DOT(4); break;
    case 3: Q4_DOT(3); break;
    case 2: Q4_DOT(2); break;
    default: Q4_DOT(1); break;
    }
#undef Q4_DOT
    store_rows(out, rows, r0, p, j->n, 1, j->y, j->y_stride);
}

/* int4 records times bfloat16 rows (see tile_q4_dot); ``sx`` (m * k / group floats) takes each
 * row's group sums of x first, inputs in order */
static void linear_q4_dot(int wtype, const uint16_t *x, int64_t x_stride, const void *packed, int group, int m,
                          int n, int k, uint16_t *y, int64_t y_stride, float *sx) {
    const int panels = (n + PANEL - 1) / PANEL, tiles = (m + ROWS_Q4_DOT - 1) / ROWS_Q4_DOT, groups = k / group;
#pragma omp parallel for schedule(static) if ((int64_t)m * k >= 1 << 16) /* prompt rows: not on one core */
    for (int r = 0; r < m; r++)
        for (int g = 0; g < groups; g++) {
            float sum = 0.0f;
            for (int j = g * group; j < (g + 1) * group; j++) sum += bf16_to_f32(x[(int64_t)r * x_stride + j]);
            sx[(int64_t)r * groups + g] = sum;
        }
    const q4_dot_job job = {wtype, x, x_stride, packed, group, m, n, k, y, y_stride, sx, tiles};
    parallel_items(panels * tiles, q4_dot_item, &job);
}

/* the bfloat16 prefill over all panels (see pairs_panel and tile_bf16_dot); 0 when out of memory */
static int linear_bf16_dot(int wtype, const uint16_t *x, int64_t x_stride, const void *packed, const float *scales,
                           const float *mins, int group, int m, int n, int k, uint16_t *y, int64_t y_stride) {
    const int panels = (n + PANEL - 1) / PANEL, tiles = (m + ROWS - 1) / ROWS;
    const size_t wide_floats = wtype == 1 || wtype == 2 ? 0 : (size_t)k * PANEL;
    int ok = 1;
#pragma omp parallel
    {
        uint16_t *pairs = malloc(sizeof(uint16_t) * (size_t)k * PANEL);
        float *wide = malloc(sizeof(float) * (wide_floats ? wide_floats : 1));
        if (!pairs || !wide) {
#pragma omp atomic write
            ok = 0;
        }
#pragma omp barrier
        if (ok) {
#pragma omp for schedule(static)
            for (int p = 0; p < panels; p++) {
                float out[ROWS * PANEL];
                pairs_panel(wtype, packed, scales, mins, p, k, group, wide, pairs);
                for (int t = 0; t < tiles; t++) {
                    const int r0 = t * ROWS, rows = m - r0 < ROWS ? m - r0 : ROWS;
                    DISPATCH_ROWS(tile_bf16_dot, x + (int64_t)r0 * x_stride, x_stride, pairs, k, rows, out)
                    if (wtype == 2)
                        for (int r = 0; r < rows; r++)
                            for (int c = 0; c < PANEL; c++) out[r * PANEL + c] *= scales[p * PANEL + c];
                    store_rows(out, rows, r0, p, n, 1, y, y_stride);
                }
            }
        }
        free(pairs);
        free(wide);
    }
    return ok;
}
#else
#define HAVE_BF16_DOT 0
#endif

typedef struct {
    int wtype;
    const void *packed;
    const float *scales, *mins;
    int k, group;
    const float *xf;
    int64_t x_stride;
    int m, n, xtype;
    void *y;
    int64_t y_stride;
    int tiles;
} tile_job;

/* item i of minicpm_linear's decode rows: panel i / tiles, row tile i % tiles (run_tile) */
static void tile_item(const void *ctx, int i) {
    const tile_job *j = ctx;
    const int p = i / j->tiles, t = i % j->tiles;
    run_tile(j->wtype, raw_panel(j->wtype, j->packed, p, j->k, j->group), j->scales, j->mins, p, j->k, j->group, j->xf,
             j->x_stride, t, j->m, j->n, j->xtype, j->y, j->y_stride);
}

/* y (m, n), row stride y_stride, = x (m, k), row stride x_stride, times the packed W^T.
 * wtype: the packed weight's type (0 float32, 1 bfloat16, 2 int8 with one float32 scale per output
 * column in ``scales``: the int8 sums, exact in float32 accumulators, are scaled once at the end;
 * 3 / 5 / 6 int4 codes 0..15 in groups of ``group`` inputs (k a multiple of it), each (column,
 * group) with its scale and minimum in records (load_q4; ``scales`` and ``mins`` unused):
 * w ~ code * scale + min, bfloat16 rows on tile_q4_dot where the CPU has it;
 * 4 int8 codes in groups, their float32 ``scales`` and ``mins`` laid out (panel, group, 32),
 * ``mins`` NULL for none);
 * x and y are float32 (xtype 0) or bfloat16 (xtype 1), widened into ``scratch`` (m * k floats)
 * first when bfloat16 (int4 on the dot product: the rows' group sums there instead). ``prefill``
 * (many rows, none of them a decode row), from two row tiles up: each panel is first widened once,
 * for bfloat16 rows (where the CPU has the dot product) to bfloat16 pairs (pairs_panel: a quantized
 * panel's grouped weights rounded to bfloat16) and the dot-product tile runs over it; for float32
 * rows to float32 weights (bfloat16 exactly; codes dequantized, ``code * scale + min``) and the
 * float32 tiles run over it; otherwise every row is computed from the packed panel as above, the
 * same for any number of rows. */
void minicpm_linear(int wtype, int xtype, const void *x, int64_t x_stride, const void *packed, const float *scales,
                    const float *mins, int group, int m, int n, int k, void *y, int64_t y_stride, float *scratch,
                    int prefill) {
    const int panels = (n + PANEL - 1) / PANEL;
    const int tiles = (m + ROWS - 1) / ROWS;
#if HAVE_BF16_DOT
    if (prefill && tiles > 1 && wtype != 0 && xtype == 1 && k % 2 == 0 &&
        linear_bf16_dot(wtype, (const uint16_t *)x, x_stride, packed, scales, mins, group, m, n, k, (uint16_t *)y,
                        y_stride))
        return;
    if (is_q4(wtype) && xtype == 1) { /* decode rows (and prefill rows where memory ran out) */
        linear_q4_dot(wtype, (const uint16_t *)x, x_stride, packed, group, m, n, k, (uint16_t *)y, y_stride, scratch);
        return;
    }
#endif
    const float *xf = (const float *)x;
    if (xtype == 1) {
        for (int r = 0; r < m; r++)
            for (int j = 0; j < k; j++) scratch[(int64_t)r * k + j] = bf16_to_f32(((const uint16_t *)x)[(int64_t)r * x_stride + j]);
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
                    run_tile(wide ? kind : wtype, wide ? (const void *)wide : raw_panel(wtype, packed, p, k, group), scales,
                             mins, p, k, group, xf, x_stride, t, m, n, xtype, y, y_stride);
            }
            free(wide);
        }
        return;
    }
    const tile_job job = {wtype, packed, scales, mins, k, group, xf, x_stride, m, n, xtype, y, y_stride, tiles};
    parallel_items(panels * tiles, tile_item, &job);
}


/* int4 codes as a checkpoint stores them, two per byte along the input (row r: input 2i in the low
 * nibble of byte i, 2i + 1 in the high one), q (n, k / 2), into records of kind ``wtype`` (3, 5
 * or 6; see load_q4), with ``scales`` and ``mins`` already in the panels' order (panel, group, 32)
 * and the records' type (float32 for 3, float16 else; mins unused for 6); columns past n are code
 * 0. One pass, where unpacking and transposing in torch took four. */
void minicpm_pack_int4_panels(const uint8_t *q, const void *scales, const void *mins, int n, int k, int group,
                              int wtype, uint8_t *out) {
    const int panels = (n + PANEL - 1) / PANEL, bytes = k / 2, groups = k / group, sb = q4_scale_bytes(wtype);
    const int64_t record_bytes = q4_record_bytes(group, wtype);
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++)
        for (int g = 0; g < groups; g++) {
            uint8_t *record = out + ((int64_t)p * groups + g) * record_bytes, *tail = record + (int64_t)group * (PANEL / 2);
            const int64_t at = ((int64_t)p * groups + g) * sb;
            memset(record, 0, (size_t)group * (PANEL / 2));
            for (int c = 0; c < PANEL && p * PANEL + c < n; c++) {
                const uint8_t *row = q + (int64_t)(p * PANEL + c) * bytes;
                for (int j = 0; j < group; j++) {
                    const int i = g * group + j, code = (row[i >> 1] >> ((i & 1) * 4)) & 15;
                    int shift;
                    record[q4_place(j, c, &shift)] |= (uint8_t)(code << shift);
                }
            }
            memcpy(tail, (const char *)scales + at, (size_t)sb);
            if (wtype != 6) memcpy(tail + sb, (const char *)mins + at, (size_t)sb);
        }
}

/* ---------------------------------------------------------------------------- GGUF blocks
 * A GGUF tensor's blocks decoded into minicpm.quant's layouts (quant.py's _decode is the reference,
 * bit for bit): codes int8 (Q8_0, Q6_K) or int4 two per byte in input order (Q4_0, Q4_1, Q4_K),
 * and a float32 scale (and minimum) per group of 32 (Q6_K: 16) inputs; blocks lie along rows, so
 * block b's codes, scales and minimums follow block b - 1's. kind: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q4_K,
 * 4 Q6_K. Every product is one float32 multiply, as numpy's. */
static inline float half_to_float(const uint8_t *p) { return half_to_f32((uint16_t)(p[0] | p[1] << 8)); }

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
