/* Paged attention on CPU for rows that each see a prefix of their sequence's cached keys.
 *
 * Built at run time by minicpm/engine/cpu_kernels.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes; the OpenMP runtime is the one torch already loaded (same soname), so the
 * kernel's threads are torch's. See cpu_kernels.py for the contract; in short:
 *
 *   q      (rows, heads, head_dim), row stride q_stride elements, heads contiguous
 *   kc, vc (slots, kv_heads, head_dim) contiguous: one layer of the paged cache
 *   tables (seqs, width) int32 block ids; row r reads sequence row_seq[r]'s first row_len[r] keys
 *   out    (rows, heads, head_dim) contiguous, same dtype as q
 *
 * Two decode paths, both reading blocks in place in table order with an online softmax (running
 * max and sum in float32, accumulation in float32 for both dtypes), so nothing is gathered and
 * any block order costs the same:
 *   - AVX-512 (head_dim a multiple of 64; bfloat16 on AVX512-BF16), below the prefill kernel: a
 *     row's keys in fixed partitions, each read in address order (see decode_avx512);
 *   - portable (any CPU, any head_dim): a work item is a row (or, with few rows, a row's kv head)
 *     whose kv heads' query heads are scored together, so each key and value row is read once.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "minicpm.h"
#include "numeric.h"

/* n float32 values times ``scale`` into dst: float32, or rounded to bfloat16 where bf16 */
static inline void store_scaled(void *dst, const float *src, float scale, int n, int bf16) {
    for (int d = 0; d < n; d++) {
        if (bf16)
            ((uint16_t *)dst)[d] = f32_to_bf16(src[d] * scale);
        else
            ((float *)dst)[d] = src[d] * scale;
    }
}

/* 0 where kvkind, its scales and head_dim go together, else MINICPM_BAD_KV */
static int check_kv(int kvkind, const uint16_t *ks, const uint16_t *vs, int head_dim) {
    if (kvkind == MINICPM_KV_PLAIN) return 0;
    if (kvkind != MINICPM_KV_INT8 && kvkind != MINICPM_KV_INT4) return MINICPM_BAD_KV;
    if (ks == NULL || vs == NULL || head_dim % MINICPM_KV_GROUP != 0) return MINICPM_BAD_KV;
    return 0;
}

/* row ``row`` (slot * kv_heads + kv head) of a quantized layer of keys, or of values (``value``),
 * dequantized into dst (float32) */
static inline void dequant_row(int kind, int value, const void *codes, const uint16_t *scales, int64_t row,
                               int head_dim, float *dst) {
    const int groups = head_dim / MINICPM_KV_GROUP, wide = kv_group(kind, head_dim, value) == MINICPM_KV_VALUE_GROUP;
    if (kind == MINICPM_KV_INT8) {
        const int8_t *c = (const int8_t *)codes + row * head_dim;
        const uint16_t *sc = scales + row * groups;
        for (int g = 0; g < groups; g++) {
            const float s = half_to_f32(sc[g]);
            for (int j = 0; j < MINICPM_KV_GROUP; j++) dst[g * 32 + j] = (float)c[g * 32 + j] * s;
        }
    } else {
        const uint8_t *c = (const uint8_t *)codes + row * (head_dim / 2);
        const uint16_t *sc = scales + row * kv_scales(kind, head_dim, value);
        for (int g = 0; g < groups; g++) {
            const int si = wide ? g / 2 : g; /* run g of 32 values, and its pair */
            const float s = half_to_f32(sc[2 * si]), mn = half_to_f32(sc[2 * si + 1]);
            for (int j = 0; j < 16; j++) {
                dst[g * 32 + j] = (float)(c[g * 16 + j] & 15) * s + mn;
                dst[g * 32 + 16 + j] = (float)(c[g * 16 + j] >> 4) * s + mn;
            }
        }
    }
}

/* exp(x) for x <= 0 to ~2 ulp: 2^n * p(r), r = x - n ln2, |r| <= ln2/2; branch-free so loops vectorize */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = rintf(x * 1.44269504088896341f); /* inlined as a vector round (no errno, no traps) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

#define MAX_GROUP 64


typedef struct {
    const void *q, *kc, *vc;
    int kind; /* MINICPM_KV_*: kc / vc codes with scales ks / vs, or the q dtype's values */
    const uint16_t *ks, *vs;
    int64_t q_stride;
    const int32_t *tables, *row_seq, *row_len;
    int width, heads, kv_heads, groups, block_size;
    float scale;
    void *out;
} args_t;

/* One block of n keys and values (float32 rows, ``stride`` elements apart) folded into the
 * running softmax of each query head of the group: scores, new max, rescale, weighted values.
 * Loops run per head so its query and accumulator stay in registers across the block's rows. */
static inline __attribute__((always_inline)) void fold_block(const float *qf, const float *k, const float *v,
                                                             int64_t stride, int n, int groups, const int head_dim,
                                                             float *sc, float *mx, float *sm, float *acc) {
    for (int g = 0; g < groups; g++) {
        const float *qg = qf + g * head_dim;
        float *s = sc + g * n;
        float m = mx[g];
        for (int j = 0; j < n; j++) {
            const float *kr = k + j * stride;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++) dot += qg[d] * kr[d];
            s[j] = dot;
            m = dot > m ? dot : m;
        }
        const float correction = exp_nonpos(mx[g] - m); /* exp(-inf) = 0 on the first block */
        float total = 0.0f;
        for (int j = 0; j < n; j++) {
            s[j] = exp_nonpos(s[j] - m);
            total += s[j];
        }
        sm[g] = sm[g] * correction + total;
        mx[g] = m;
        float *ag = acc + g * head_dim;
        for (int d = 0; d < head_dim; d++) ag[d] *= correction;
        for (int j = 0; j < n; j++) {
            const float *vr = v + j * stride;
            const float p = s[j];
            for (int d = 0; d < head_dim; d++) ag[d] += p * vr[d];
        }
    }
}

/* One item, a row's kv heads kv0..kv1-1, for element type T: blocks are visited in table order and
 * each block's heads in turn, so a row taken whole reads its cache front to back. float32 blocks
 * are read in place; bfloat16 ones are widened into scratch first (one pass), then folded the
 * same way. ``head_dim`` is a literal at each call site (always_inline), so the loops over it
 * unroll into whole vectors. */
#define DEFINE_ITEM(NAME, T, LOAD, STORE, IN_PLACE)                                                 \
    static inline __attribute__((always_inline)) void NAME(const args_t *a, int row, int kv0, int kv1, \
                                                           const int head_dim, float *scratch) {    \
        const int groups = a->groups, block_size = a->block_size, nq = (kv1 - kv0) * groups;       \
        float *qf = scratch, *acc = qf + nq * head_dim, *mx = acc + nq * head_dim, *sm = mx + nq;  \
        float *sc = sm + nq, *kbuf = sc + groups * block_size, *vbuf = kbuf + block_size * head_dim; \
        const T *qr = (const T *)a->q + (int64_t)row * a->q_stride + (int64_t)kv0 * groups * head_dim; \
        const int32_t *table = a->tables + (int64_t)a->row_seq[row] * a->width;                      \
        const int len = a->row_len[row];                                                           \
        const int64_t step = (int64_t)a->kv_heads * head_dim;                                      \
        for (int h = 0; h < nq; h++) {                                                             \
            for (int d = 0; d < head_dim; d++) qf[h * head_dim + d] = LOAD(qr[h * head_dim + d]) * a->scale; \
            for (int d = 0; d < head_dim; d++) acc[h * head_dim + d] = 0.0f;                       \
            mx[h] = -INFINITY;                                                                     \
            sm[h] = 0.0f;                                                                          \
        }                                                                                          \
        for (int b = 0; b * block_size < len; b++) {                                               \
            const int n = len - b * block_size < block_size ? len - b * block_size : block_size;   \
            for (int kvh = kv0; kvh < kv1; kvh++) {                                                \
                const int64_t base = ((int64_t)table[b] * block_size * a->kv_heads + kvh) * head_dim; \
                const T *kb = (const T *)a->kc + base, *vb = (const T *)a->vc + base;               \
                const int h = (kvh - kv0) * groups;                                                \
                float *qh = qf + h * head_dim, *ah = acc + h * head_dim;                           \
                if (IN_PLACE && a->kind == MINICPM_KV_PLAIN) {                                     \
                    fold_block(qh, (const float *)kb, (const float *)vb, step, n, groups, head_dim, sc, mx + h, sm + h, ah); \
                } else if (a->kind != MINICPM_KV_PLAIN) {                                          \
                    const int64_t row0 = (int64_t)table[b] * block_size * a->kv_heads + kvh;        \
                    for (int j = 0; j < n; j++) {                                                  \
                        dequant_row(a->kind, 0, a->kc, a->ks, row0 + (int64_t)j * a->kv_heads, head_dim, kbuf + j * head_dim); \
                        dequant_row(a->kind, 1, a->vc, a->vs, row0 + (int64_t)j * a->kv_heads, head_dim, vbuf + j * head_dim); \
                    }                                                                              \
                    fold_block(qh, kbuf, vbuf, head_dim, n, groups, head_dim, sc, mx + h, sm + h, ah); \
                } else {                                                                           \
                    for (int j = 0; j < n; j++)                                                    \
                        for (int d = 0; d < head_dim; d++) {                                       \
                            kbuf[j * head_dim + d] = LOAD(kb[j * step + d]);                       \
                            vbuf[j * head_dim + d] = LOAD(vb[j * step + d]);                       \
                        }                                                                          \
                    fold_block(qh, kbuf, vbuf, head_dim, n, groups, head_dim, sc, mx + h, sm + h, ah); \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        T *o = (T *)a->out + ((int64_t)row * a->heads + (int64_t)kv0 * groups) * head_dim;         \
        for (int h = 0; h < nq; h++) {                                                             \
            const float inv = 1.0f / sm[h];                                                        \
            for (int d = 0; d < head_dim; d++) o[h * head_dim + d] = STORE(acc[h * head_dim + d] * inv); \
        }                                                                                          \
    }

static inline float load_f32(float x) { return x; }
static inline float store_f32(float x) { return x; }
DEFINE_ITEM(item_f32, float, load_f32, store_f32, 1)
DEFINE_ITEM(item_bf16, uint16_t, bf16_to_f32, f32_to_bf16, 0)

/* CALL with HD bound to head_dim, a literal at the common sizes (64, 128), so that each
 * specialisation of an always_inline body is fully unrolled */
#define WITH_HEAD_DIM(head_dim, CALL)       \
    switch (head_dim) {                     \
    case 64: {                              \
        const int HD = 64;                  \
        CALL;                               \
    } break;                                \
    case 128: {                             \
        const int HD = 128;                 \
        CALL;                               \
    } break;                                \
    default: {                              \
        const int HD = head_dim;            \
        CALL;                               \
    } break;                                \
    }

/* The portable decode path (any head_dim, any CPU): 0 or -3 (no memory). */
static int decode_portable(int dtype, const args_t *ap, int rows, int head_dim) {
    const args_t a = *ap;
    const int kv_heads = a.kv_heads, groups = a.groups, block_size = a.block_size;
    /* enough rows to keep every thread busy: a row is one item (its cache read front to back);
     * else one item per (row, kv head) */
    const int split = rows >= 4 * omp_get_max_threads() ? 1 : kv_heads;
    const int per_item = kv_heads / split, items = rows * split;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        size_t nq = (size_t)per_item * groups;
        float *scratch = malloc(sizeof(float) * (nq * (2 * head_dim + 2) + (size_t)block_size * (groups + 2 * head_dim)));
        if (scratch == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < items; item++) {
                const int row = item / split, kv0 = item % split * per_item, kv1 = kv0 + per_item;
                if (dtype == 0) {
                    WITH_HEAD_DIM(head_dim, item_f32(&a, row, kv0, kv1, HD, scratch))
                } else {
                    WITH_HEAD_DIM(head_dim, item_bf16(&a, row, kv0, kv1, HD, scratch))
                }
            }
            free(scratch);
        }
    }
    return failed ? -3 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * Prefill (AVX-512): one sequence's chunk of m new rows at positions past..past+m-1 attends
 * causally to the sequence's cached keys (the chunk's own already written), read through its
 * block table. Per kv head, the context's keys and values are first regrouped (once, shared by
 * every query tile) into the layout the multiply-adds want:
 *
 *   float32:  Kt [key block of 32][head_dim][32 keys]        Vt [key][head_dim]
 *   bfloat16: Kp [key block of 32][head_dim / 2][32 keys][2] Vp [key block][16 key pairs][head_dim][2]
 *
 * (bfloat16 runs on the CPU's dot-product instruction, AVX512-BF16, which multiplies pairs.) A tile
 * is 12 query rows of one kv head (positions x its query heads), its keys visited 32 at a time up
 * to the last row's length: scores are float32 sums (of exact products, in bfloat16), scaled,
 * masked past each row's position, folded into a running max and sum (float32); the
 * probabilities (rounded to bfloat16 in a bfloat16 model, as flash attention's bfloat16 kernels
 * round them) weigh the values in float32 sums. Keys past a row's position cost nothing beyond
 * the tile's last row. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define PREFILL_ROWS 12
#define KEYS 32
#define SPAN 64 /* keys per softmax step of the prefill tiles: two packed blocks (softmax_span: four vectors) */

/* the address of key ``key``'s kv head ``kvh`` in a layer of the cache (elements) */
static inline int64_t key_at(const int32_t *table, int kv_heads, int kvh, int head_dim, int block_size, int key) {
    return (((int64_t)table[key / block_size] * block_size + key % block_size) * kv_heads + kvh) * head_dim;
}

/* the key and value rows at element offset ``at`` of a layer (float32, of the kind's codes
 * dequantized: kc / vc codes, ks / vs scales), into k and v; their pointers returned in place */
static inline void kv_rows(int kind, const void *kc, const void *vc, const uint16_t *ks, const uint16_t *vs, int64_t at,
                           int head_dim, int bf16, float *k, float *v) {
    if (kind != MINICPM_KV_PLAIN) {
        dequant_row(kind, 0, kc, ks, at / head_dim, head_dim, k);
        dequant_row(kind, 1, vc, vs, at / head_dim, head_dim, v);
        if (bf16) /* the value a bfloat16 model's reference dequantizes to */
            for (int d = 0; d < head_dim; d++) {
                k[d] = bf16_to_f32(f32_to_bf16(k[d]));
                v[d] = bf16_to_f32(f32_to_bf16(v[d]));
            }
    } else if (bf16) {
        for (int d = 0; d < head_dim; d++) {
            k[d] = bf16_to_f32(((const uint16_t *)kc)[at + d]);
            v[d] = bf16_to_f32(((const uint16_t *)vc)[at + d]);
        }
    } else {
        memcpy(k, (const float *)kc + at, sizeof(float) * head_dim);
        memcpy(v, (const float *)vc + at, sizeof(float) * head_dim);
    }
}

/* rows r[0..15] of 16 32-bit lanes transposed in place: lane j of row i to lane i of row j. Four
 * rounds, one per index bit b: rows i and i + 2^b (bit b of i clear) swap the lanes whose bit b
 * differs from the row's. */
static inline void transpose16_epi32(__m512i r[16]) {
    for (int b = 0; b < 4; b++) {
        const int h = 1 << b;
        int lo_idx[16], hi_idx[16];
        for (int j = 0; j < 16; j++) {
            lo_idx[j] = j & h ? 16 + j - h : j;
            hi_idx[j] = j & h ? 16 + j : j + h;
        }
        const __m512i lo = _mm512_loadu_si512(lo_idx), hi = _mm512_loadu_si512(hi_idx);
        for (int i = 0; i < 16; i++)
            if (!(i & h)) {
                const __m512i a = r[i], c = r[i + h];
                r[i] = _mm512_permutex2var_epi32(a, lo, c);
                r[i + h] = _mm512_permutex2var_epi32(a, hi, c);
            }
    }
}

/* the 32 keys of key block kb of kv head kvh: pointers to their rows in the cache (``kind``
 * plain, of ``esize``-byte elements: 4 float32, 2 bfloat16), or to rows dequantized into kbuf /
 * vbuf in that type (bfloat16 rounded to nearest even: what the reference reads), or to zeros
 * past ctx */
static inline void block_rows(int kind, const void *kc, const void *vc, const uint16_t *ks, const uint16_t *vs,
                              const int32_t *table, int kv_heads, int kvh, int head_dim, int block_size, int ctx,
                              int kb, int esize, char *kbuf, char *vbuf, const void **krow,
                              const void **vrow) {
    static const float zeros[MINICPM_MAX_HEAD_DIM];
    const size_t row_bytes = (size_t)head_dim * esize;
    for (int c = 0; c < KEYS; c++) {
        const int key = kb * KEYS + c;
        const int64_t at = key < ctx ? key_at(table, kv_heads, kvh, head_dim, block_size, key) : -1;
        if (at < 0) {
            krow[c] = vrow[c] = zeros;
        } else if (kind == MINICPM_KV_PLAIN) {
            krow[c] = (const char *)kc + at * esize;
            vrow[c] = (const char *)vc + at * esize;
        } else {
            float k[MINICPM_MAX_HEAD_DIM], v[MINICPM_MAX_HEAD_DIM];
            kv_rows(kind, kc, vc, ks, vs, at, head_dim, 0, k, v);
            char *kd = kbuf + c * row_bytes, *vd = vbuf + c * row_bytes;
            if (esize == 2)
                for (int d = 0; d < head_dim; d++) {
                    ((uint16_t *)kd)[d] = f32_to_bf16(k[d]);
                    ((uint16_t *)vd)[d] = f32_to_bf16(v[d]);
                }
            else {
                memcpy(kd, k, row_bytes);
                memcpy(vd, v, row_bytes);
            }
            krow[c] = kd, vrow[c] = vd;
        }
    }
}

/* key block kb of kv head kvh into Kt [d][c] (transposed 16 x 16 at a time) and Vt [c][d]
 * (float32; a quantized cache's rows dequantized; keys past ctx zero) */
static void gather_keys_f32(int kind, const void *kc, const void *vc, const uint16_t *ks, const uint16_t *vs,
                            const int32_t *table, int kv_heads, int kvh, int head_dim, int block_size, int ctx, int kb,
                            float *kt, float *vt) {
    float kbuf[KEYS * head_dim], vbuf[KEYS * head_dim]; /* rows a quantized cache dequantizes to */
    const void *krow[KEYS], *vrow[KEYS];
    block_rows(kind, kc, vc, ks, vs, table, kv_heads, kvh, head_dim, block_size, ctx, kb, 4, (char *)kbuf,
               (char *)vbuf, krow, vrow);
    float *kb_t = kt + (int64_t)kb * KEYS * head_dim, *vb_t = vt + (int64_t)kb * KEYS * head_dim;
    for (int c0 = 0; c0 < KEYS; c0 += 16)
        for (int d0 = 0; d0 < head_dim; d0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const float *)krow[c0 + i] + d0);
            transpose16_epi32(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(kb_t + (int64_t)(d0 + i) * KEYS + c0, r[i]);
        }
    for (int c = 0; c < KEYS; c++) memcpy(vb_t + (int64_t)c * head_dim, vrow[c], sizeof(float) * head_dim);
}

/* exp_nonpos over 16 lanes (the same steps, so the same values) */
static inline __m512 exp16_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* p * 2^n, n >= -126: exactly exp_nonpos's product */
}

static inline void scale_row(float *acc, int head_dim, float correction) {
    if (correction != 1.0f)
        for (int d = 0; d < head_dim; d++) acc[d] *= correction;
}

/* a tile's start: its query rows (rows past ``rows`` repeat row 0, their results unused), running
 * maxima and sums (16 lanes a row, summed across at the end), and its float32 accumulators zeroed */
static inline void tile_start(const void *const *q, int rows, const void **qq, float *mx, __m512 *sm, float *acc,
                              int head_dim) {
    for (int r = 0; r < PREFILL_ROWS; r++) {
        qq[r] = q[r < rows ? r : 0];
        mx[r] = -INFINITY;
        sm[r] = _mm512_setzero_ps();
    }
    memset(acc, 0, sizeof(float) * PREFILL_ROWS * head_dim);
}

/* accumulators of 6 rows x 64 dimensions (from r0, d0) in or out of registers */
static inline __attribute__((always_inline)) void acc_load(__m512 a[6][4], const float *acc, int r0, int d0,
                                                           int head_dim) {
    for (int r = 0; r < 6; r++)
        for (int i = 0; i < 4; i++) a[r][i] = _mm512_loadu_ps(acc + (r0 + r) * head_dim + d0 + 16 * i);
}

static inline __attribute__((always_inline)) void acc_store(__m512 a[6][4], float *acc, int r0, int d0,
                                                            int head_dim) {
    for (int r = 0; r < 6; r++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(acc + (r0 + r) * head_dim + d0 + 16 * i, a[r][i]);
}

/* One row's scores for SPAN keys (unscaled), of which the row sees the first ``seen`` (may be
 * <= 0), folded into its running max ``mx`` and its running sum's 16 lanes ``sm`` (summed across
 * only at the end); the probabilities (0 for unseen keys) replace the scores, or go to ``p16``
 * rounded to bfloat16 where it is given; returns the factor the row's accumulated values must be
 * multiplied by. */
static inline __attribute__((always_inline)) float softmax_span(float *scores, int seen, float scale, float *mx,
                                                                __m512 *sm, uint16_t *p16) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(scale);
    __m512 a[SPAN / 16];
    __mmask16 k[SPAN / 16];
    for (int i = 0; i < SPAN / 16; i++) {
        const int left = seen - 16 * i;
        k[i] = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        a[i] = _mm512_mask_mul_ps(ninf, k[i], _mm512_loadu_ps(scores + 16 * i), sc);
    }
    const float blk = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a[0], a[1]), _mm512_max_ps(a[2], a[3])));
    const float m = blk > *mx ? blk : *mx;
    const __m512 mv = _mm512_set1_ps(m);
    const float correction = exp_nonpos(*mx - m); /* exp(-inf) ~ 0 on the first span */
    __m512 sum = _mm512_mul_ps(*sm, _mm512_set1_ps(correction));
    for (int i = 0; i < SPAN / 16; i += 2) {
        const __m512 p0 = _mm512_maskz_mov_ps(k[i], exp16_nonpos(_mm512_sub_ps(a[i], mv)));
        const __m512 p1 = _mm512_maskz_mov_ps(k[i + 1], exp16_nonpos(_mm512_sub_ps(a[i + 1], mv)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
#if defined(__AVX512BF16__)
        if (p16) {
            _mm512_storeu_si512(p16 + 16 * i, (__m512i)_mm512_cvtne2ps_pbh(p1, p0)); /* p0's 16 first */
            continue;
        }
#else
        (void)p16;
#endif
        _mm512_storeu_ps(scores + 16 * i, p0);
        _mm512_storeu_ps(scores + 16 * i + 16, p1);
    }
    *sm = sum;
    *mx = m;
    return correction;
}

/* one float32 tile: rows (<= PREFILL_ROWS) query rows q[r] seeing the first len[r] keys (len
 * ascending), SPAN keys a softmax step (the packed context is a whole number of spans) */
static void prefill_tile_f32(const float *const *q, const int *len, int rows, const float *kt, const float *vt,
                             int head_dim, float scale, float *acc, float *const *out) {
    const int lim = len[rows - 1];
    float mx[PREFILL_ROWS], pr[PREFILL_ROWS][SPAN];
    __m512 sm[PREFILL_ROWS];
    const float *qq[PREFILL_ROWS];
    tile_start((const void *const *)q, rows, (const void **)qq, mx, sm, acc, head_dim);
    for (int k0 = 0; k0 < lim; k0 += SPAN) {
        for (int half = 0; half < SPAN / KEYS; half++) {
            const float *kb_t = kt + (int64_t)(k0 + half * KEYS) * head_dim;
            __m512 s0[PREFILL_ROWS], s1[PREFILL_ROWS];
            for (int r = 0; r < PREFILL_ROWS; r++) s0[r] = s1[r] = _mm512_setzero_ps();
            for (int d = 0; d < head_dim; d++) {
                const __m512 w0 = _mm512_loadu_ps(kb_t + (int64_t)d * KEYS), w1 = _mm512_loadu_ps(kb_t + (int64_t)d * KEYS + 16);
                for (int r = 0; r < PREFILL_ROWS; r++) {
                    const __m512 x = _mm512_set1_ps(qq[r][d]);
                    s0[r] = _mm512_fmadd_ps(x, w0, s0[r]);
                    s1[r] = _mm512_fmadd_ps(x, w1, s1[r]);
                }
            }
            for (int r = 0; r < rows; r++) {
                _mm512_storeu_ps(pr[r] + half * KEYS, s0[r]);
                _mm512_storeu_ps(pr[r] + half * KEYS + 16, s1[r]);
            }
        }
        for (int r = 0; r < rows; r++)
            scale_row(acc + r * head_dim, head_dim, softmax_span(pr[r], len[r] - k0, scale, &mx[r], &sm[r], NULL));
        for (int r = rows; r < PREFILL_ROWS; r++) memset(pr[r], 0, sizeof pr[r]);
        const float *vb_t = vt + (int64_t)k0 * head_dim;
        for (int r0 = 0; r0 < rows; r0 += 6)
            for (int d0 = 0; d0 < head_dim; d0 += 64) {
                __m512 a[6][4];
                acc_load(a, acc, r0, d0, head_dim);
                for (int j = 0; j < SPAN; j++) {
                    __m512 w[4];
                    for (int i = 0; i < 4; i++) w[i] = _mm512_loadu_ps(vb_t + (int64_t)j * head_dim + d0 + 16 * i);
                    for (int r = 0; r < 6; r++) {
                        const __m512 x = _mm512_set1_ps(pr[r0 + r][j]);
                        for (int i = 0; i < 4; i++) a[r][i] = _mm512_fmadd_ps(x, w[i], a[r][i]);
                    }
                }
                acc_store(a, acc, r0, d0, head_dim);
            }
    }
    for (int r = 0; r < rows; r++) store_scaled(out[r], acc + r * head_dim, 1.0f / _mm512_reduce_add_ps(sm[r]), head_dim, 0);
}
#define HAVE_PREFILL_F32 1
#else
#define HAVE_PREFILL_F32 0
#endif

#if defined(__AVX512BF16__)
/* key block kb of kv head kvh into Kp / Vp (bfloat16 pairs; keys past ctx zero): Kp [dp][c][2] =
 * the keys' (2 dp, 2 dp + 1) pairs, transposed 16 x 16 32-bit lanes at a time; Vp [c / 2][d][2] =
 * two keys' values interleaved by word permutes. A quantized cache's rows are dequantized first,
 * rounded to bfloat16 (the values a bfloat16 model's reference reads). */
static void pair_keys(int kind, const void *kcodes, const void *vcodes, const uint16_t *ks, const uint16_t *vs,
                      const int32_t *table, int kv_heads, int kvh, int head_dim, int block_size, int ctx, int kb,
                      uint16_t *kp, uint16_t *vp) {
    uint16_t kbuf[KEYS * head_dim], vbuf[KEYS * head_dim]; /* rows a quantized cache dequantizes to */
    const int hd2 = head_dim / 2;
    uint32_t *kt = (uint32_t *)(kp + (int64_t)kb * KEYS * head_dim);
    uint16_t *vt = vp + (int64_t)kb * KEYS * head_dim;
    const void *krow[KEYS], *vrow[KEYS];
    block_rows(kind, kcodes, vcodes, ks, vs, table, kv_heads, kvh, head_dim, block_size, ctx, kb, 2, (char *)kbuf,
               (char *)vbuf, krow, vrow);
    for (int c0 = 0; c0 < KEYS; c0 += 16)
        for (int w0 = 0; w0 < hd2; w0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const uint16_t *)krow[c0 + i] + 2 * w0);
            transpose16_epi32(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(kt + (int64_t)(w0 + i) * KEYS + c0, r[i]);
        }
    uint16_t first[32], second[32]; /* output words 2i, 2i + 1: a's and b's i-th (then 16 + i-th) */
    for (int i = 0; i < 16; i++) {
        first[2 * i] = (uint16_t)i, first[2 * i + 1] = (uint16_t)(32 + i);
        second[2 * i] = (uint16_t)(16 + i), second[2 * i + 1] = (uint16_t)(48 + i);
    }
    const __m512i lo = _mm512_loadu_si512(first), hi = _mm512_loadu_si512(second);
    for (int c = 0; c < KEYS; c += 2)
        for (int d0 = 0; d0 < head_dim; d0 += 32) {
            const __m512i a = _mm512_loadu_si512((const uint16_t *)vrow[c] + d0),
                          b = _mm512_loadu_si512((const uint16_t *)vrow[c + 1] + d0);
            uint16_t *dst = vt + ((int64_t)(c / 2) * head_dim + d0) * 2;
            _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
}

/* one bfloat16 tile: as prefill_tile_f32, on the dot-product instruction, SPAN keys a softmax
 * step (the packed context is a whole number of spans) */
static void prefill_tile_bf16(const uint16_t *const *q, const int *len, int rows, const uint16_t *kp,
                              const uint16_t *vp, int head_dim, float scale, float *acc, uint16_t *const *out) {
    const int hd2 = head_dim / 2, lim = len[rows - 1];
    float mx[PREFILL_ROWS], scores[PREFILL_ROWS][SPAN];
    __m512 sm[PREFILL_ROWS];
    uint16_t p16[PREFILL_ROWS][SPAN];
    const uint16_t *qq[PREFILL_ROWS];
    tile_start((const void *const *)q, rows, (const void **)qq, mx, sm, acc, head_dim);
    for (int k0 = 0; k0 < lim; k0 += SPAN) {
        for (int half = 0; half < SPAN / KEYS; half++) {
            const uint16_t *kt = kp + (int64_t)(k0 + half * KEYS) * head_dim;
            __m512 s0[PREFILL_ROWS], s1[PREFILL_ROWS];
            for (int r = 0; r < PREFILL_ROWS; r++) s0[r] = s1[r] = _mm512_setzero_ps();
            for (int dp = 0; dp < hd2; dp++) {
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(kt + (int64_t)dp * KEYS * 2);
                const __m512bh w1 = (__m512bh)_mm512_loadu_si512(kt + (int64_t)dp * KEYS * 2 + 32);
                for (int r = 0; r < PREFILL_ROWS; r++) {
                    uint32_t pair;
                    memcpy(&pair, qq[r] + 2 * dp, sizeof pair);
                    const __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair);
                    s0[r] = _mm512_dpbf16_ps(s0[r], x, w0);
                    s1[r] = _mm512_dpbf16_ps(s1[r], x, w1);
                }
            }
            for (int r = 0; r < rows; r++) {
                _mm512_storeu_ps(scores[r] + half * KEYS, s0[r]);
                _mm512_storeu_ps(scores[r] + half * KEYS + 16, s1[r]);
            }
        }
        for (int r = 0; r < rows; r++) {
            scale_row(acc + r * head_dim, head_dim, softmax_span(scores[r], len[r] - k0, scale, &mx[r], &sm[r], p16[r]));
        }
        for (int r = rows; r < PREFILL_ROWS; r++) memset(p16[r], 0, sizeof p16[r]);
        const uint16_t *vt = vp + (int64_t)k0 * head_dim;
        for (int r0 = 0; r0 < rows; r0 += 6)
            for (int d0 = 0; d0 < head_dim; d0 += 64) {
                __m512 a[6][4];
                acc_load(a, acc, r0, d0, head_dim);
                for (int jp = 0; jp < SPAN / 2; jp++) {
                    __m512bh w[4];
                    for (int i = 0; i < 4; i++)
                        w[i] = (__m512bh)_mm512_loadu_si512(vt + ((int64_t)jp * head_dim + d0 + 16 * i) * 2);
                    for (int r = 0; r < 6; r++) {
                        uint32_t pair;
                        memcpy(&pair, &p16[r0 + r][2 * jp], sizeof pair);
                        const __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair);
                        for (int i = 0; i < 4; i++) a[r][i] = _mm512_dpbf16_ps(a[r][i], x, w[i]);
                    }
                }
                acc_store(a, acc, r0, d0, head_dim);
            }
    }
    for (int r = 0; r < rows; r++) store_scaled(out[r], acc + r * head_dim, 1.0f / _mm512_reduce_add_ps(sm[r]), head_dim, 1);
}
#define HAVE_PREFILL_BF16 1
#else
#define HAVE_PREFILL_BF16 0
#endif

/* 1 where minicpm_paged_prefill serves dtype (0 float32: AVX-512; 1 bfloat16: AVX512-BF16) here */
int minicpm_paged_prefill_available(int dtype) { return dtype == 0 ? HAVE_PREFILL_F32 : dtype == 1 ? HAVE_PREFILL_BF16 : 0; }

/* q (m, heads, head_dim) float32 (dtype 0) or bfloat16 (1), row stride q_stride, heads contiguous;
 * kc, vc one layer's cache (slots, kv_heads, head_dim) in q's dtype; table: the sequence's
 * ``width`` block ids; the chunk's rows are positions past..past+m-1 and row t sees keys 0..past+t;
 * out (m, heads, head_dim) contiguous. Returns 0, or -1 (a group of query heads too large), -2 (a
 * dtype not built here), -3 (no memory), -5 (past + m beyond the table), -6 (a block id outside
 * the cache), -7 (head_dim not a multiple of 64). */
int minicpm_paged_prefill(int dtype, const void *q, int64_t q_stride, const void *kc, const void *vc,
                          int kvkind, const uint16_t *ks, const uint16_t *vs, int64_t num_blocks,
                          const int32_t *table, int width, int past, int m, int heads, int kv_heads, int head_dim,
                          int block_size, float scale, void *out) {
    if (!minicpm_paged_prefill_available(dtype)) return -2;
#if HAVE_PREFILL_F32
    if (m <= 0) return 0;
    if (check_kv(kvkind, ks, vs, head_dim) != 0 || head_dim > MINICPM_MAX_HEAD_DIM) return MINICPM_BAD_KV;
    if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP) return -1;
    if (head_dim <= 0 || head_dim % 64 != 0) return -7;
    const int ctx = past + m;
    if (past < 0 || ctx > (int64_t)width * block_size) return -5;
    for (int b = 0; b * block_size < ctx; b++)
        if (table[b] < 0 || table[b] >= num_blocks) return -6;
    const int groups = heads / kv_heads, esize = dtype == 0 ? 4 : 2;
    const int blocks = (ctx + SPAN - 1) / SPAN * (SPAN / KEYS); /* whole spans (the tiles' softmax steps) */
    const int tiles = (m * groups + PREFILL_ROWS - 1) / PREFILL_ROWS;
    const size_t packed = (size_t)blocks * KEYS * head_dim * esize;
    void *kp = malloc(packed), *vp = malloc(packed);
    int failed = kp == NULL || vp == NULL;
    if (!failed) {
#pragma omp parallel reduction(| : failed)
        {
            float *acc = malloc(sizeof(float) * PREFILL_ROWS * head_dim);
            if (acc == NULL) failed = 1;
            for (int kvh = 0; kvh < kv_heads; kvh++) {
#pragma omp for schedule(static)
                for (int kb = 0; kb < blocks; kb++) {
                    if (dtype == 0)
                        gather_keys_f32(kvkind, kc, vc, ks, vs, table, kv_heads, kvh, head_dim, block_size, ctx, kb,
                                        (float *)kp, (float *)vp);
#if HAVE_PREFILL_BF16
                    else
                        pair_keys(kvkind, kc, vc, ks, vs, table, kv_heads, kvh, head_dim, block_size, ctx, kb,
                                  (uint16_t *)kp, (uint16_t *)vp);
#endif
                }
#pragma omp for schedule(dynamic, 1)
                for (int t = 0; t < tiles; t++) {
                    if (acc == NULL) continue;
                    const void *qr[PREFILL_ROWS];
                    void *orow[PREFILL_ROWS];
                    int len[PREFILL_ROWS], rows = 0;
                    for (int i = t * PREFILL_ROWS; i < m * groups && rows < PREFILL_ROWS; i++, rows++) {
                        const int pos = i / groups, h = kvh * groups + i % groups;
                        qr[rows] = (const char *)q + ((int64_t)pos * q_stride + (int64_t)h * head_dim) * esize;
                        orow[rows] = (char *)out + (((int64_t)pos * heads + h) * head_dim) * esize;
                        len[rows] = past + pos + 1;
                    }
                    if (dtype == 0)
                        prefill_tile_f32((const float *const *)qr, len, rows, (const float *)kp, (const float *)vp,
                                         head_dim, scale, acc, (float *const *)orow);
#if HAVE_PREFILL_BF16
                    else
                        prefill_tile_bf16((const uint16_t *const *)qr, len, rows, (const uint16_t *)kp,
                                          (const uint16_t *)vp, head_dim, scale, acc, (uint16_t *const *)orow);
#endif
                }
            }
            free(acc);
        }
    }
    free(kp);
    free(vp);
    return failed ? -3 : 0;
#else
    (void)q, (void)q_stride, (void)kc, (void)vc, (void)num_blocks, (void)table, (void)width, (void)past, (void)m;
    (void)kvkind, (void)ks, (void)vs;
    (void)heads, (void)kv_heads, (void)head_dim, (void)block_size, (void)scale, (void)out;
    return -2;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Decode on AVX-512 (head_dim a multiple of 64; bfloat16 needs AVX512-BF16). Each row's keys are
 * cut into partitions of part_keys(its length) keys (whole blocks). A work item is one
 * partition of one row with all its kv heads. Per query head an item keeps a running max, sum
 * and float32 accumulator; a row of one partition is written out directly, a longer row's
 * partitions are merged in order afterwards. What a row computes depends only on its own length,
 * never on the other rows or the thread count.
 *
 * Inside a partition, windows of up to 16 slots of one block (every kv head of those slots: one
 * stretch of memory) are read in address order, which the hardware prefetchers follow (reading a
 * kv head at a time instead, 36 heads' rows 4.6 KiB apart, halved the bandwidth): see decode_part.
 * Scores: each (slot, head) pair's products are summed in a vector (float32: q pre-scaled, FMA;
 * bfloat16: the dot-product instruction on q's pairs, scaled after) and 16 pairs' vectors are
 * reduced together. Probabilities are float32 (exp16_nonpos); values are widened to float32 and
 * weighed by FMA. */
#if defined(__AVX512F__)
#define PART_KEYS 256
/* a row's partition: PART_KEYS keys, twice that from 8k keys and four times from 32k (fewer
 * partitions to start, prefetch into and merge where there are plenty; a function of the row's
 * own length only), rounded up to whole blocks */
static inline int part_keys(int row_len, int block_size) {
    const int keys = row_len >= 32768 ? 4 * PART_KEYS : row_len >= 8192 ? 2 * PART_KEYS : PART_KEYS;
    return (keys + block_size - 1) / block_size * block_size;
}
#if defined(__AVX512BF16__)
#define HAVE_DECODE_BF16 1
#else
#define HAVE_DECODE_BF16 0
#endif
/* bfloat16 queries against int8 / int4 keys by integer dot products (VNNI): see key_dot_vnni */
#if HAVE_DECODE_BF16 && defined(__AVX512VNNI__)
#define HAVE_DECODE_VNNI 1
#else
#define HAVE_DECODE_VNNI 0
#endif

/* per 128-bit lane L: the sums of z[0]'s, z[1]'s, z[2]'s and z[3]'s four values in lane L */
static inline __m512 lane_sums4(const __m512 z[4]) {
    const __m512d a = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(z[0], z[1]), _mm512_unpackhi_ps(z[0], z[1])));
    const __m512d b = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(z[2], z[3]), _mm512_unpackhi_ps(z[2], z[3])));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
}

/* lane j: the sum of z[j]'s 16 lanes */
static inline __m512 sum16(const __m512 z[16]) {
    __m512 y[4];
    for (int i = 0; i < 4; i++) y[i] = lane_sums4(z + 4 * i);
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x44), _mm512_shuffle_f32x4(y[0], y[1], 0xEE));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x44), _mm512_shuffle_f32x4(y[2], y[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* 16 bfloat16 values widened to float32 (exact) */
static inline __m512 widen16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 load16(const void *p, int bf16) {
    return bf16 ? widen16((const uint16_t *)p) : _mm512_loadu_ps((const float *)p);
}

/* a vector whose lanes sum to the dot product of q (float32, pre-scaled; or bfloat16) and key row k */
static inline __attribute__((always_inline)) __m512 key_dot(const void *q, const void *k, const int head_dim,
                                                            int bf16) {
    __m512 z = _mm512_setzero_ps();
#if HAVE_DECODE_BF16
    if (bf16) {
        const uint16_t *qh = (const uint16_t *)q, *kh = (const uint16_t *)k;
        for (int d = 0; d < head_dim; d += 32)
            z = _mm512_dpbf16_ps(z, (__m512bh)_mm512_loadu_si512(qh + d), (__m512bh)_mm512_loadu_si512(kh + d));
        return z;
    }
#endif
    const float *qf = (const float *)q, *kf = (const float *)k;
    for (int d = 0; d < head_dim; d += 16) z = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d), _mm512_loadu_ps(kf + d), z);
    return z;
}

/* float16 to float32 (one instruction where the CPU has F16C) */
static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return half_to_f32(h);
#endif
}

/* the 32 codes of group g of a quantized row (int8: 32 bytes; int4: 16 bytes, value j low and
 * j + 16 high) as two float32 vectors: values 0-15 and 16-31 */
static inline __attribute__((always_inline)) void codes32(const uint8_t *row, int g, int kind, __m512 *c0,
                                                          __m512 *c1) {
    if (kind == MINICPM_KV_INT8) {
        *c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + g * 32))));
        *c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + g * 32 + 16))));
    } else {
        const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + g * 16)));
        *c0 = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15)));
        *c1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
    }
}

/* n float16 values widened to float32 (16 at a time) */
static inline void widen_halves(const uint16_t *src, int n, float *dst) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++) dst[i] = h2f(src[i]);
}

/* a vector whose lanes sum to the dot product of qf (float32, pre-scaled) and a quantized key row
 * (codes k, its scales ks widened to float32): per group, scale * (q . codes) (+ min * sum(q) for int4) */
static inline __attribute__((always_inline)) __m512 key_dot_q(const float *qf, const uint8_t *k, const float *ks,
                                                              const int head_dim, int kind) {
    __m512 z = _mm512_setzero_ps();
    for (int g = 0; g < head_dim / 32; g++) {
        __m512 c0, c1;
        codes32(k, g, kind, &c0, &c1);
        const __m512 q0 = _mm512_loadu_ps(qf + g * 32), q1 = _mm512_loadu_ps(qf + g * 32 + 16);
        const __m512 d = _mm512_fmadd_ps(q1, c1, _mm512_mul_ps(q0, c0));
        if (kind == MINICPM_KV_INT8) {
            z = _mm512_fmadd_ps(d, _mm512_set1_ps(ks[g]), z);
        } else {
            z = _mm512_fmadd_ps(d, _mm512_set1_ps(ks[2 * g]), z);
            z = _mm512_fmadd_ps(_mm512_add_ps(q0, q1), _mm512_set1_ps(ks[2 * g + 1]), z);
        }
    }
    return z;
}

#if HAVE_DECODE_VNNI
/* The 64 int4 codes of two runs of 32 (32 bytes at p; byte j of a run holds its values j and
 * j + 16) as 64 unsigned bytes 0-15, by 128-bit lane: run 0's values 0-15, run 1's 0-15, run 0's
 * 16-31, run 1's 16-31 (INT4_LANE: the first value of each lane, relative to the 64) */
static const int INT4_LANE[4] = {0, 32, 16, 48};

static inline __attribute__((always_inline)) __m512i int4_bytes(const uint8_t *p) {
    const __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_and_si512(_mm512_mask_srli_epi16(x, 0xFFFF0000, x, 4), _mm512_set1_epi8(15));
}

/* A query head prepared for integer dot products with quantized keys (bfloat16 activations), at
 * ``vnni_head(room, h, head_dim)``. Its pre-scaled float32 values q are rounded to integers
 * qi = round(q / qs) of at most 32512 in magnitude (qs = max|q| / 32512: finer than bfloat16's own
 * rounding of every value within 2^7 of the largest), split as qi = 256 * hi + lo with hi and lo
 * signed bytes. Per 64 values (a chunk): ``corr``, 16 lanes of 4 values each, holds -128 * (the
 * lane's sum of hi), then of lo, for int8 keys (whose signed codes are read as unsigned bytes
 * code + 128; int4 codes are unsigned already: 0); ``qmv`` holds, in each group's 8 lanes (int4's
 * lane order: lanes 0-3 and 8-11 the chunk's first group of 32, 4-7 and 12-15 its second), the sum
 * of q over that group divided by 8 qs (int4's minimum term, spread over the lanes). The row's qs
 * per head are kept apart (``vnni_qs``), repeated past the last head so that 16 consecutive
 * (slot, head) pairs read theirs with one load. */
#define VNNI_CORR 0   /* int32[head_dim / 64][32] */
#define VNNI_QMV(hd) ((hd) / 64 * 128)  /* float[head_dim / 64][16] */
#define VNNI_HI(hd) ((hd) / 64 * 192)   /* int8[head_dim] */
#define VNNI_LO(hd) ((hd) / 64 * 192 + (hd)) /* int8[head_dim] */
#define VNNI_PAIR_BYTES 384 /* vnni_pair's room: its bytes, then its lanes */
#define VNNI_PAIR_QS 256
#define VNNI_PAIR_QSUM 320
#define VNNI_START_BYTES 128 /* vnni_start's room: 16 int32 corrections, 16 qs */

/* bytes one prepared head takes (a multiple of 64) */
static inline size_t vnni_head_bytes(int head_dim) { return (size_t)head_dim / 64 * 192 + (size_t)2 * head_dim; }

/* bytes of the room decode_part's prepared row takes: the qs of heads + 16 pairs, then the heads */
static inline size_t vnni_room(int heads, int head_dim) {
    return ((size_t)(heads + 16) * 4 + 63) / 64 * 64 + (size_t)heads * vnni_head_bytes(head_dim) +
           (size_t)(heads + 1) / 2 * VNNI_PAIR_BYTES + (size_t)heads * VNNI_START_BYTES;
}

static inline float *vnni_qs(char *room) { return (float *)room; }

static inline char *vnni_head(char *room, int heads, int h, int head_dim) {
    return room + ((size_t)(heads + 16) * 4 + 63) / 64 * 64 + (size_t)h * vnni_head_bytes(head_dim);
}

/* int4 keys at head_dim 64: heads 2i and 2i + 1 prepared together (key_pair_vnni), at
 * vnni_pair(room, heads, i): 64 bytes each of the pair's hi bytes for the codes' low nibbles (head
 * 2i's 32, then 2i + 1's), hi for the high nibbles, lo for the low, lo for the high; then the
 * lanes of the eight (slot, head) pairs of heads 2i.. 2i + 7 (modulo heads) in sums8's order
 * (lane 4 L + j: head 2i + 2 j + L / 2, group L % 2): 16 floats of each head's qs, 16 of its sum
 * of q over the group (vnni_pair_lanes) */
static inline char *vnni_pair(char *room, int heads, int i) {
    return vnni_head(room, heads, heads, 64) + (size_t)i * VNNI_PAIR_BYTES;
}

/* int8 keys at head_dim 64, MHA: the lanes of the eight (slot, head) pairs of heads h.. h + 7
 * (modulo heads) in sums16_int8's order (lane 4 M + i: head h + i + 4 (M / 2), group M % 2), at
 * vnni_start(room, heads, h): 16 int32 of each head's +128 correction over the group (-128 times
 * the group's sum of qi), 16 floats of its qs (vnni_start_lanes) */
static inline char *vnni_start(char *room, int heads, int h) {
    return vnni_pair(room, heads, (heads + 1) / 2) + (size_t)h * VNNI_START_BYTES;
}

/* head h's query q (head_dim float32) prepared into ``room`` (see above) */
static void vnni_prepare(const float *q, int heads, int h, int head_dim, int kind, char *room) {
    char *hp = vnni_head(room, heads, h, head_dim);
    int32_t *corr = (int32_t *)(hp + VNNI_CORR);
    float *qmv = (float *)(hp + VNNI_QMV(head_dim));
    int8_t *hi = (int8_t *)(hp + VNNI_HI(head_dim)), *lo = (int8_t *)(hp + VNNI_LO(head_dim));
    float top = 0.0f;
    for (int d = 0; d < head_dim; d++) top = fabsf(q[d]) > top ? fabsf(q[d]) : top;
    const float qs = top > 0.0f ? top / 32512.0f : 1.0f, inv = 1.0f / qs;
    for (int d = 0; d < head_dim; d++) { /* position d of the codes' order (int4: int4_bytes') */
        const int at = kind == MINICPM_KV_INT4 ? d / 64 * 64 + INT4_LANE[d % 64 / 16] + d % 16 : d;
        long qi = lrintf(q[at] * inv);
        qi = qi > 32512 ? 32512 : qi < -32512 ? -32512 : qi;
        const long hq = (qi + 128) >> 8; /* floor((qi + 128) / 256): lo in [-128, 127], hi in [-127, 127] */
        hi[d] = (int8_t)hq;
        lo[d] = (int8_t)(qi - 256 * hq);
    }
    for (int c = 0; c < head_dim / 64; c++) {
        for (int l = 0; l < 16; l++) {
            int32_t sh = 0, sl = 0;
            for (int j = 0; j < 4; j++) sh += hi[64 * c + 4 * l + j], sl += lo[64 * c + 4 * l + j];
            corr[32 * c + l] = kind == MINICPM_KV_INT8 ? -128 * sh : 0;
            corr[32 * c + 16 + l] = kind == MINICPM_KV_INT8 ? -128 * sl : 0;
        }
        for (int gg = 0; gg < 2; gg++) {
            float t = 0.0f;
            for (int j = 0; j < 32; j++) t += q[64 * c + 32 * gg + j];
            for (int l = 0; l < 16; l++) /* int4's lanes of run gg: 4 of each 8 (int4_bytes) */
                if (l / 4 % 2 == gg) qmv[16 * c + l] = t / (8.0f * qs);
        }
    }
    float *qsw = vnni_qs(room);
    for (int i = h; i < heads + 16; i += heads) qsw[i] = qs;
    if (kind == MINICPM_KV_INT4 && head_dim == 64) { /* this head's half of its pair (vnni_pair) */
        char *pp = vnni_pair(room, heads, h / 2) + 32 * (h % 2);
        memcpy(pp, hi, 32), memcpy(pp + 64, hi + 32, 32), memcpy(pp + 128, lo, 32), memcpy(pp + 192, lo + 32, 32);
    }
}

/* the pairs' lanes (vnni_pair) once every head is prepared; qf: the row's float32 query */
static void vnni_pair_lanes(const float *qf, int heads, char *room) {
    const float *qs = vnni_qs(room);
    for (int i = 0; i < heads / 2; i++) {
        float *lq = (float *)(vnni_pair(room, heads, i) + VNNI_PAIR_QS), *ls = (float *)(vnni_pair(room, heads, i) + VNNI_PAIR_QSUM);
        for (int lane = 0; lane < 16; lane++) {
            const int h = (2 * i + 2 * (lane % 4) + lane / 8) % heads, g = lane / 4 % 2;
            float t = 0.0f;
            for (int d = 0; d < 32; d++) t += qf[(int64_t)h * 64 + 32 * g + d];
            lq[lane] = qs[h], ls[lane] = t;
        }
    }
}

/* the start lanes (vnni_start) once every head is prepared (int8 keys, head_dim 64) */
static void vnni_start_lanes(int heads, char *room) {
    const float *qs = vnni_qs(room);
    for (int h0 = 0; h0 < heads; h0++) {
        int32_t *corr = (int32_t *)vnni_start(room, heads, h0);
        float *lq = (float *)(vnni_start(room, heads, h0) + 64);
        for (int lane = 0; lane < 16; lane++) {
            const int h = (h0 + lane % 4 + 4 * (lane / 8)) % heads, g = lane / 4 % 2;
            const char *hp = vnni_head(room, heads, h, 64);
            const int8_t *hi = (const int8_t *)(hp + VNNI_HI(64)), *lo = (const int8_t *)(hp + VNNI_LO(64));
            int32_t t = 0;
            for (int d = 32 * g; d < 32 * g + 32; d++) t += 256 * hi[d] + lo[d];
            corr[lane] = -128 * t, lq[lane] = qs[h];
        }
    }
}

/* int4 keys at head_dim 64, MHA: the (slot, head) pairs p and p + 1 of heads 2i and 2i + 1 (their
 * key rows k: 64 bytes, one after the other) in one vector of int32: per 128-bit lane, head 2i's
 * group 0, its group 1, head 2i + 1's group 0, group 1, the four lanes summing to the group's
 * (q . codes) / qs. The 64 bytes' low nibbles and high nibbles are two vectors of codes (values
 * 0-15 of each group in the first, 16-31 in the second), each dotted with the matching hi and lo
 * bytes (vnni_pair). */
static inline __attribute__((always_inline)) __m512i key_pair_vnni(const char *pp, const uint8_t *k) {
    const __m512i x = _mm512_loadu_si512(k), m = _mm512_set1_epi8(15);
    const __m512i low = _mm512_and_si512(x, m), high = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);
    __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(pp));
    a = _mm512_dpbusd_epi32(a, high, _mm512_loadu_si512(pp + 64));
    a = _mm512_slli_epi32(a, 8);
    a = _mm512_dpbusd_epi32(a, low, _mm512_loadu_si512(pp + 128));
    return _mm512_dpbusd_epi32(a, high, _mm512_loadu_si512(pp + 192));
}

/* per 128-bit lane L: the sums of z[0]'s, z[1]'s, z[2]'s and z[3]'s four int32 in lane L */
static inline __m512i lane_sums4i(const __m512i z[4]) {
    const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(z[0], z[1]), _mm512_unpackhi_epi32(z[0], z[1]));
    const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(z[2], z[3]), _mm512_unpackhi_epi32(z[2], z[3]));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}

/* The scores of 16 consecutive (slot, head) pairs of a window (nothing past ``live`` of them),
 * the first of head h0 (even), from key_pair_vnni's z[i] (pairs 2i and 2i + 1): each group's
 * integer sum (lane_sums4i; exact) times its scale and the head's qs, plus its minimum times the
 * head's sum of q over the group, the two groups of a pair added. ks: the first pair's scales
 * (s0 m0 s1 m1, float16, every pair's in turn). */
static inline __attribute__((always_inline)) __m512 sums8(const __m512i z[8], const uint16_t *ks, int live,
                                                          const char *lanes0, const char *lanes1) {
    const __m512i y[2] = {lane_sums4i(z), lane_sums4i(z + 4)}; /* lane 4 L + j: pair 2 j + L / 2, group L % 2 */
    const __m512i pick = _mm512_setr_epi32(0, 8, 16, 24, 2, 10, 18, 26, 4, 12, 20, 28, 6, 14, 22, 30);
    const __m512i pick_min = _mm512_add_epi32(pick, _mm512_set1_epi32(1));
    const char *lanes[2] = {lanes0, lanes1};
    __m512 part[2];
    for (int e = 0; e < 2; e++) { /* pairs 8 e.. 8 e + 7 */
        const int halves = live - 8 * e <= 0 ? 0 : live - 8 * e >= 8 ? 32 : 4 * (live - 8 * e);
        const __mmask16 m0 = halves >= 16 ? 0xffff : (__mmask16)((1u << halves) - 1);
        const __mmask16 m1 = halves <= 16 ? 0 : halves >= 32 ? 0xffff : (__mmask16)((1u << (halves - 16)) - 1);
        const __m512 f0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m0, ks + 32 * e));      /* pairs 0-3 */
        const __m512 f1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m1, ks + 32 * e + 16)); /* pairs 4-7 */
        const __m512 sv = _mm512_permutex2var_ps(f0, pick, f1), mv = _mm512_permutex2var_ps(f0, pick_min, f1);
        const __m512 qs = _mm512_loadu_ps((const float *)(lanes[e] + VNNI_PAIR_QS));
        const __m512 qsum = _mm512_loadu_ps((const float *)(lanes[e] + VNNI_PAIR_QSUM));
        const __m512 g = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(y[e]), sv), qs, _mm512_mul_ps(mv, qsum));
        part[e] = _mm512_add_ps(g, _mm512_shuffle_f32x4(g, g, 0xB1)); /* lanes 0-3: pairs 0 2 4 6, 8-11: 1 3 5 7 */
    }
    return _mm512_permutex2var_ps(part[0], _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 16, 24, 17, 25, 18, 26, 19, 27),
                                  part[1]);
}

/* int8 keys at head_dim 64: a key row's 64 codes (read as code + 128) dotted with head hp's hi,
 * shifted by 8, dotted with its lo: lanes 0-7 sum to group 0's (q . (codes + 128)) / qs, 8-15 to
 * group 1's (exact: |sum| < 2^24) */
static inline __attribute__((always_inline)) __m512i key_row_int8(const char *hp, const uint8_t *k) {
    const __m512i codes = _mm512_xor_si512(_mm512_loadu_si512(k), _mm512_set1_epi8((char)0x80));
    const __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(hp + VNNI_HI(64)));
    return _mm512_dpbusd_epi32(_mm512_slli_epi32(a, 8), codes, _mm512_loadu_si512(hp + VNNI_LO(64)));
}

/* The scores of 16 consecutive (slot, head) pairs (nothing past ``live`` of them; MHA, head_dim
 * 64, int8), the first of head h0, from key_row_int8's z[i]: each group's integer sum (exact)
 * plus its +128 correction, times its scale and the head's qs, the two groups of a pair added.
 * ks: the first pair's scales (s0 s1, float16, every pair's in turn); start0, start1: the lanes
 * (vnni_start) of heads h0 and h0 + 8. */
static inline __attribute__((always_inline)) __m512 sums16_int8(const __m512i z[16], const uint16_t *ks, int live,
                                                                const char *start0, const char *start1) {
    const __m512i pick = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    const char *start[2] = {start0, start1};
    __m512 part[2];
    for (int e = 0; e < 2; e++) { /* pairs 8 e.. 8 e + 7 */
        const __m512i y0 = lane_sums4i(z + 8 * e), y1 = lane_sums4i(z + 8 * e + 4);
        /* lane 4 M + i: pair 8 e + i + 4 (M / 2), group M % 2 */
        const __m512i v = _mm512_add_epi32(_mm512_shuffle_i32x4(y0, y1, 0x88), _mm512_shuffle_i32x4(y0, y1, 0xDD));
        const int n = live - 8 * e <= 0 ? 0 : live - 8 * e >= 8 ? 8 : live - 8 * e;
        const __m512 f = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << (2 * n)) - 1), ks + 16 * e));
        const __m512 sv = _mm512_permutexvar_ps(pick, f);
        const __m512i corr = _mm512_loadu_si512(start[e]);
        const __m512 qs = _mm512_loadu_ps((const float *)(start[e] + 64));
        const __m512 g = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(v, corr)), sv), qs);
        part[e] = _mm512_add_ps(g, _mm512_shuffle_f32x4(g, g, 0xB1)); /* lanes 0-3: pairs 0-3, 8-11: 4-7 */
    }
    return _mm512_permutex2var_ps(part[0], _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                                  part[1]);
}

/* A vector whose lanes sum to (q . dequantized key row) / qs (codes k, its scales ks widened to
 * float32: int8 one per 32 values, int4 a scale and a minimum per 32), by integer dot products:
 * per 64 values, the codes as 64 unsigned bytes (int8: code + 128, in order; int4: int4_bytes'
 * order, which hi and lo follow), dotted with hi, shifted by 8, dotted with lo (exact: |sum| <
 * 2^24), less the +128 correction, then each lane times its group's scale (int8: lanes 0-7 the
 * first group of 32, 8-15 the second; int4: lanes 0-3 and 8-11 the first); int4 adds each group's
 * minimum times its qmv lanes. */
static inline __attribute__((always_inline)) __m512 key_dot_vnni(const char *hp, const uint8_t *k, const float *ks,
                                                                 const int head_dim, const int kind) {
    __m512 z = _mm512_setzero_ps();
    const __m512i lanes1 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int c = 0; c < head_dim / 64; c++) {
        __m512i codes;
        if (kind == MINICPM_KV_INT8) {
            codes = _mm512_xor_si512(_mm512_loadu_si512(k + 64 * c), _mm512_set1_epi8((char)0x80));
        } else {
            codes = int4_bytes(k + 32 * c);
        }
        const int32_t *corr = (const int32_t *)(hp + VNNI_CORR) + 32 * c;
        __m512i a = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr), codes, _mm512_loadu_si512(hp + VNNI_HI(head_dim) + 64 * c));
        a = _mm512_add_epi32(_mm512_slli_epi32(a, 8), _mm512_loadu_si512(corr + 16));
        a = _mm512_dpbusd_epi32(a, codes, _mm512_loadu_si512(hp + VNNI_LO(head_dim) + 64 * c));
        if (kind == MINICPM_KV_INT8) { /* scales s0 s1: lanes 0-7 s0, 8-15 s1 */
            const __m512 x = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_load_sd((const double *)(ks + 2 * c))));
            const __m512 sv = _mm512_permutexvar_ps(lanes1, x);
            z = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, z);
        } else { /* s0 m0 s1 m1; lanes 0-3 and 8-11 run 0, 4-7 and 12-15 run 1 (int4_bytes) */
            const __m512i runs = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
            const __m512 x = _mm512_broadcast_f32x4(_mm_loadu_ps(ks + 4 * c));
            const __m512 sv = _mm512_permutexvar_ps(runs, x);
            const __m512 mv = _mm512_permutexvar_ps(_mm512_add_epi32(runs, _mm512_set1_epi32(1)), x);
            z = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, z);
            z = _mm512_fmadd_ps(mv, _mm512_loadu_ps((const float *)(hp + VNNI_QMV(head_dim)) + 16 * c), z);
        }
    }
    return z;
}
#endif

#if HAVE_DECODE_VNNI
/* 64 codes of a quantized value row (int8 codes d0..d0+63: 64 bytes at ``p``, in order; int4: the
 * 32 bytes of two runs at ``p``, as int4_bytes orders them) as 64 bytes */
static inline __attribute__((always_inline)) __m512i value_bytes(const uint8_t *p, int kind) {
    return kind == MINICPM_KV_INT8 ? _mm512_loadu_si512(p) : int4_bytes(p);
}

/* value_weights' room per scale group, in words of hp (heads rounded up to 16): 4 of packed hi
 * bytes (one per four slots of the 16), 4 of lo, the steps, the minimum terms */
#define VW_HI 0
#define VW_LO 4
#define VW_STEP 8
#define VW_MTERM 9
#define VW_SET 10

/* The window's value weights, for every query head at once (16 heads a vector), per value scale
 * group s (one per 32 values, or per 64 where ``wide``): w = p * scale of the (slot, head) pair,
 * rounded to 16-bit integers against the head's largest over the window (u = round(65535 w /
 * max w) = 256 hi + lo: finer than the bfloat16 values themselves), four slots' bytes packed into
 * one 32-bit word per head (slot t4 + k in byte k), hi and lo apart; with the head's step max w /
 * 65535 and, for int4, its minimum term sum(p * min), into ``vw`` (VW_SET words of hp per scale
 * group). */
static void value_weights(const float *sc, const float *vs, int n, int heads, int groups, int kv_heads, int nvs,
                          int nsg, int kind, float *vw) {
    const int hp = (heads + 15) / 16 * 16, per = kind == MINICPM_KV_INT8 ? 1 : 2;
    for (int s = 0; s < nsg; s++) {
        float *set = vw + (size_t)s * VW_SET * hp;
        int32_t *phi = (int32_t *)set + VW_HI * hp, *plo = (int32_t *)set + VW_LO * hp;
        float *step = set + VW_STEP * hp, *mterm = set + VW_MTERM * hp;
        for (int h0 = 0; h0 < heads; h0 += 16) {
            const __mmask16 hm = heads - h0 >= 16 ? 0xffff : (__mmask16)((1u << (heads - h0)) - 1);
            /* the scale (and int4's minimum) of head h0 + lane's value row in slot t: index */
            const int live = heads - h0, mha = groups == 1 && nvs == 2; /* mha: the scales two floats apart */
            int32_t ix[16] = {0}; /* otherwise gathered: head h0 + l's row's scale (of group s) */
            if (!mha)
                for (int l = 0; l < 16; l++) ix[l] = ((h0 + (l < live ? l : 0)) / groups) * nvs + per * s;
            const __m512i idx = _mm512_loadu_si512(ix);
            const __mmask16 m0 = live >= 8 ? 0xffff : (__mmask16)((1u << (2 * live)) - 1);
            const __mmask16 m1 = live >= 16 ? 0xffff : live > 8 ? (__mmask16)((1u << (2 * live - 16)) - 1) : 0;
            const __m512i even = _mm512_add_epi32(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                                                  _mm512_set1_epi32(per * s));
            __m512 w[16], top = _mm512_setzero_ps(), mt = _mm512_setzero_ps();
            for (int t = 0; t < n; t++) {
                const float *st = vs + (int64_t)t * kv_heads * nvs;
                const __m512 p = _mm512_maskz_loadu_ps(hm, sc + t * heads + h0);
                __m512 sv, mv = _mm512_setzero_ps();
                if (mha) {
                    const __m512 a0 = _mm512_maskz_loadu_ps(m0, st + 2 * h0), a1 = _mm512_maskz_loadu_ps(m1, st + 2 * h0 + 16);
                    sv = _mm512_permutex2var_ps(a0, even, a1);
                    if (kind == MINICPM_KV_INT4) mv = _mm512_permutex2var_ps(a0, _mm512_add_epi32(even, _mm512_set1_epi32(1)), a1);
                } else {
                    sv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), hm, idx, st, 4);
                    if (kind == MINICPM_KV_INT4) mv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), hm, idx, st + 1, 4);
                }
                w[t] = _mm512_mul_ps(p, sv);
                top = _mm512_max_ps(top, w[t]);
                if (kind == MINICPM_KV_INT4) mt = _mm512_fmadd_ps(p, mv, mt);
            }
            const __mmask16 pos = _mm512_cmp_ps_mask(top, _mm512_setzero_ps(), _CMP_GT_OQ);
            const __m512 inv = _mm512_maskz_div_ps(pos, _mm512_set1_ps(65535.0f), top);
            _mm512_storeu_ps(step + h0, _mm512_div_ps(top, _mm512_set1_ps(65535.0f)));
            _mm512_storeu_ps(mterm + h0, mt);
            for (int t4 = 0; t4 < 16; t4 += 4) {
                __m512i bh = _mm512_setzero_si512(), bl = _mm512_setzero_si512();
                for (int k = 0; k < 4 && t4 + k < n; k++) {
                    const __m512i u = _mm512_cvtps_epi32(_mm512_mul_ps(w[t4 + k], inv));
                    bh = _mm512_or_si512(bh, _mm512_slli_epi32(_mm512_srli_epi32(u, 8), 8 * k));
                    bl = _mm512_or_si512(bl, _mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(255)), 8 * k));
                }
                _mm512_storeu_si512(phi + (t4 / 4) * hp + h0, bh);
                _mm512_storeu_si512(plo + (t4 / 4) * hp + h0, bl);
            }
        }
    }
}

/* 16 accumulator values at o rescaled by ``correction`` plus their run's integer weighted sums u
 * taken back by the run's step and minimum term (sw: the run's weights from value_weights, head h's) */
static inline __attribute__((always_inline)) void weigh_run(float *o, __m512i u, const float *sw, int hp,
                                                            float correction) {
    const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), _mm512_set1_ps(sw[VW_STEP * hp]), _mm512_set1_ps(sw[VW_MTERM * hp]));
    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), _mm512_set1_ps(correction), sum));
}

/* One query head's accumulator acc (head_dim floats) rescaled by ``correction`` and given the
 * window's n <= 16 value rows (codes at v + t * slot) weighed by the head's weights from
 * value_weights (vw, head h): per 64 values, four rows at a time are interleaved into 32-bit lanes
 * of 4 bytes (one value of each row) and summed against hi and against lo by vpdpbusd in int32
 * (exact: |sum| <= 16 * 255 * 127 each), combined as 256 hi-sum + lo-sum, taken back to 16-value
 * runs in the values' order and scaled by the step; int4's minima add the minimum term. */
static inline __attribute__((always_inline)) void values_vnni(const uint8_t *v, int64_t slot, const float *vw, int hp,
                                                              int h, int n, float correction, float *acc,
                                                              const int head_dim, const int kind, const int wide) {
    const int cbytes = kind == MINICPM_KV_INT8 ? 64 : 32;
    for (int c = 0; c < head_dim / 64; c++) {
        const int s0 = wide ? c : 2 * c, s1 = wide ? c : 2 * c + 1; /* the two runs' scale groups */
        const int32_t *ws0 = (const int32_t *)vw + (size_t)s0 * VW_SET * hp + h; /* head h's weights: run 0's */
        const int32_t *ws1 = (const int32_t *)vw + (size_t)s1 * VW_SET * hp + h;   /* and run 1's */
        __m512i t[4], tl[4];
        for (int j = 0; j < 4; j++) t[j] = tl[j] = _mm512_setzero_si512();
        for (int t4 = 0; t4 < n; t4 += 4) {
            __m512i r[4];
            for (int i = 0; i < 4; i++)
                r[i] = t4 + i < n ? value_bytes(v + (t4 + i) * slot + (int64_t)c * cbytes, kind) : _mm512_setzero_si512();
            const __m512i a = _mm512_unpacklo_epi8(r[0], r[1]), b = _mm512_unpackhi_epi8(r[0], r[1]);
            const __m512i e = _mm512_unpacklo_epi8(r[2], r[3]), f = _mm512_unpackhi_epi8(r[2], r[3]);
            /* lane (128-bit L, 32-bit k) of x[j]: code 16 L + 4 j + k of rows t4..t4+3 (int8: that
             * value; int4: value INT4_LANE[L] + 4 j + k) */
            const __m512i x[4] = {_mm512_unpacklo_epi16(a, e), _mm512_unpackhi_epi16(a, e), _mm512_unpacklo_epi16(b, f),
                                  _mm512_unpackhi_epi16(b, f)};
            const int q = (t4 / 4) * hp;
            const __m512i wh = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(ws0[VW_HI * hp + q]),
                                                       _mm512_set1_epi32(ws1[VW_HI * hp + q]));
            const __m512i wl = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(ws0[VW_LO * hp + q]),
                                                       _mm512_set1_epi32(ws1[VW_LO * hp + q]));
            for (int j = 0; j < 4; j++) {
                t[j] = _mm512_dpbusd_epi32(t[j], wh, x[j]);
                tl[j] = _mm512_dpbusd_epi32(tl[j], wl, x[j]);
            }
        }
        for (int j = 0; j < 4; j++) t[j] = _mm512_add_epi32(_mm512_slli_epi32(t[j], 8), tl[j]); /* |t| < 2^31 */
        /* back to the values' order: the 128-bit lanes of t transposed */
        const __m512 u0 = _mm512_shuffle_f32x4(_mm512_castsi512_ps(t[0]), _mm512_castsi512_ps(t[1]), 0x44);
        const __m512 u1 = _mm512_shuffle_f32x4(_mm512_castsi512_ps(t[2]), _mm512_castsi512_ps(t[3]), 0x44);
        const __m512 u2 = _mm512_shuffle_f32x4(_mm512_castsi512_ps(t[0]), _mm512_castsi512_ps(t[1]), 0xEE);
        const __m512 u3 = _mm512_shuffle_f32x4(_mm512_castsi512_ps(t[2]), _mm512_castsi512_ps(t[3]), 0xEE);
        const __m512 nat[4] = {_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD),
                               _mm512_shuffle_f32x4(u2, u3, 0x88), _mm512_shuffle_f32x4(u2, u3, 0xDD)};
        for (int m = 0; m < 4; m++) { /* nat[m]: values 16 m.. (int8), INT4_LANE[m].. (int4) */
            const int at = kind == MINICPM_KV_INT4 ? INT4_LANE[m] : 16 * m;
            float *o = acc + 64 * c + at;
            weigh_run(o, _mm512_castps_si512(nat[m]), (const float *)(at < 32 ? ws0 : ws1), hp, correction);
        }
    }
}
#endif

#if HAVE_DECODE_VNNI && defined(__AVX512VBMI__)
/* values_vnni for int4 codes, with byte permutes: per 64 values, four rows' 32 packed bytes (two
 * runs of 16, byte j holding a run's values j and j + 16) are picked by two vpermt2b into 32-bit
 * lanes of four bytes (one per row) and split into their low and high nibbles: four vectors of
 * codes already in the values' order (0-15, 16-31, 32-47, 48-63), each inside one run, so each is
 * summed against its run's weights as they stand and no lanes are moved back afterwards. */
static inline __attribute__((always_inline)) void values_int4_vbmi(const uint8_t *v, int64_t slot, const float *vw,
                                                                   int hp, int h, int n, float correction, float *acc,
                                                                   const int head_dim, const int wide) {
    /* byte 4 l + k of the first pick: row k's packed byte l (rows 0 and 1 in the first source's
     * halves, 2 and 3 in the second's); the second pick: bytes 16 + l */
    const __m512i pick0 = _mm512_add_epi8(
        _mm512_set1_epi32(0x60402000),
        _mm512_set_epi8(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12, 11, 11, 11, 11, 10, 10, 10, 10,
                        9, 9, 9, 9, 8, 8, 8, 8, 7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2,
                        1, 1, 1, 1, 0, 0, 0, 0));
    const __m512i pick1 = _mm512_add_epi8(pick0, _mm512_set1_epi8(16)), m15 = _mm512_set1_epi8(15);
    for (int c = 0; c < head_dim / 64; c++) {
        const int s0 = wide ? c : 2 * c, s1 = wide ? c : 2 * c + 1; /* the two runs' scale groups */
        const int32_t *ws[2] = {(const int32_t *)vw + (size_t)s0 * VW_SET * hp + h,
                                (const int32_t *)vw + (size_t)s1 * VW_SET * hp + h};
        __m512i t[4], tl[4];
        for (int j = 0; j < 4; j++) t[j] = tl[j] = _mm512_setzero_si512();
        for (int t4 = 0; t4 < n; t4 += 4) {
            __m256i r[4];
            for (int i = 0; i < 4; i++)
                r[i] = t4 + i < n ? _mm256_loadu_si256((const __m256i *)(v + (t4 + i) * slot + (int64_t)c * 32))
                                  : _mm256_setzero_si256();
            const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(r[0]), r[1], 1);
            const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(r[2]), r[3], 1);
            const __m512i x0 = _mm512_permutex2var_epi8(a, pick0, b), x1 = _mm512_permutex2var_epi8(a, pick1, b);
            const __m512i x[4] = {_mm512_and_si512(x0, m15), _mm512_and_si512(_mm512_srli_epi16(x0, 4), m15),
                                  _mm512_and_si512(x1, m15), _mm512_and_si512(_mm512_srli_epi16(x1, 4), m15)};
            const int q = (t4 / 4) * hp;
            for (int j = 0; j < 4; j++) {
                t[j] = _mm512_dpbusd_epi32(t[j], _mm512_set1_epi32(ws[j / 2][VW_HI * hp + q]), x[j]);
                tl[j] = _mm512_dpbusd_epi32(tl[j], _mm512_set1_epi32(ws[j / 2][VW_LO * hp + q]), x[j]);
            }
        }
        for (int j = 0; j < 4; j++) { /* values 16 j.. of the chunk, run j / 2 */
            const __m512i u = _mm512_add_epi32(_mm512_slli_epi32(t[j], 8), tl[j]); /* |u| < 2^31 */
            weigh_run(acc + 64 * c + 16 * j, u, (const float *)ws[j / 2], hp, correction);
        }
    }
}
#define HAVE_VALUES_VBMI 1
#else
#define HAVE_VALUES_VBMI 0
#endif

#if HAVE_DECODE_VNNI
/* The scores of 16 (slot, head) pairs into sc (nothing past ``live`` of them), the first of head
 * h (even): int4 keys at head_dim 64, MHA, heads even, two pairs a vector (key_pair_vnni, sums8);
 * k: the first pair's key row (``width`` bytes a row), ks its scales. Returns the head after. */
static inline __attribute__((always_inline)) int scores16_int4(char *vq, int heads, int h, const uint8_t *k,
                                                               int64_t width, const uint16_t *ks, int live, float *sc) {
    const int h0 = h;
    __m512i z[8];
    for (int i = 0; i < 8; i++) {
        z[i] = 2 * i < live ? key_pair_vnni(vnni_pair(vq, heads, h / 2), k + (int64_t)2 * i * width) : _mm512_setzero_si512();
        h += 2;
        h = h == heads ? 0 : h;
    }
    _mm512_storeu_ps(sc, sums8(z, ks, live, vnni_pair(vq, heads, h0 / 2), vnni_pair(vq, heads, (h0 + 8) % heads / 2)));
    return h;
}

/* scores16_int4 for int8 keys at head_dim 64, MHA, a pair a vector (key_row_int8, sums16_int8) */
static inline __attribute__((always_inline)) int scores16_int8(char *vq, int heads, int h, const uint8_t *k,
                                                               int64_t width, const uint16_t *ks, int live, float *sc) {
    const int h0 = h;
    __m512i z[16];
    for (int i = 0; i < 16; i++) {
        z[i] = i < live ? key_row_int8(vnni_head(vq, heads, h, 64), k + (int64_t)i * width) : _mm512_setzero_si512();
        h = h + 1 == heads ? 0 : h + 1;
    }
    _mm512_storeu_ps(sc, sums16_int8(z, ks, live, vnni_start(vq, heads, h0), vnni_start(vq, heads, (h0 + 8) % heads)));
    return h;
}
#endif

/* The next window's codes and scales (keys' codes, values' codes, keys' scales, values' scales: one
 * stretch each), asked for into L2 a share at a time: ``per[r]`` lines of stretch r per call, from
 * ``at[r]`` up to ``end[r]``. The calls are spread over the whole window, its key batches and its
 * kv heads' values alike, so memory is read while either is computed. Asked for only in the key
 * phase, and without the scales, the loads stalled on the scales (the hardware's prefetcher does
 * not run ahead of their short stretches) and memory sat idle while values were weighed (see
 * docs/benchmarks.md for the measurement). Two windows ahead measured no faster. A partition's
 * first window is asked for whole as it starts, and during its last window the first of the
 * partition the thread will likely take next (without, each partition began with a stall). */
typedef struct {
    const char *at[4], *end[4];
    int64_t per[4];
    int wait; /* calls of ask_ahead until the next that asks */
} ahead_t;

/* the stretches (start, bytes: 0 for none) set to be asked for over ``calls`` calls of ask_ahead,
 * of which every ``thin``-th asks (ask_ahead) */
static inline void ahead_set(ahead_t *ah, const char *const start[4], const int64_t bytes[4], int calls,
                             const int thin) {
    const int asking = (calls + thin - 1) / thin;
    for (int r = 0; r < 4; r++) {
        const char *first = (const char *)((uintptr_t)start[r] & ~(uintptr_t)63);
        const int64_t lines = bytes[r] ? (start[r] + bytes[r] - first + 63) / 64 : 0;
        ah->at[r] = first, ah->end[r] = first + lines * 64;
        ah->per[r] = (lines + asking - 1) / asking;
    }
    ah->wait = 1;
}

/* one call's share of each stretch asked for, on every ``thin``-th call (the first included; thin:
 * a constant where it is called, as ahead_set's). Each asking call's bookkeeping costs about what
 * a few prefetches do, so int4 windows (about 9 lines a call at MiniCPM's shape) ask on every
 * other call; int8's (about 17) on every call, as thinning them measured no faster (see
 * docs/benchmarks.md). */
static inline __attribute__((always_inline)) void ask_ahead(ahead_t *ah, const int thin) {
    if (thin > 1 && --ah->wait > 0) return;
    ah->wait = thin;
    for (int r = 0; r < 4; r++) {
        const char *p = ah->at[r], *stop = p + ah->per[r] * 64 < ah->end[r] ? p + ah->per[r] * 64 : ah->end[r];
        for (; p < stop; p += 64) _mm_prefetch(p, _MM_HINT_T1);
        ah->at[r] = p;
    }
}

/* ahead_set for the window of a row's keys that starts at key w (table: the row's block table)
 * and ends at whichever comes first of key k1, the block's end and 16 keys later: its four
 * stretches of a layer whose (slot, head) rows are ``width`` bytes with nsc key scales and nvs
 * value scales */
static inline void ahead_window(ahead_t *ah, const args_t *a, const int32_t *table, int w, int k1, int64_t width,
                                int nsc, int nvs, int calls, const int thin) {
    const int bs = a->block_size, kv_heads = a->kv_heads, n = k1 - w < 16 ? k1 - w : 16;
    const int m = bs - w % bs < n ? bs - w % bs : n;
    const int64_t f = (int64_t)table[w / bs] * bs + w % bs, slot = kv_heads * width;
    const char *start[4] = {(const char *)a->kc + f * slot, (const char *)a->vc + f * slot,
                            (const char *)(a->ks + f * kv_heads * nsc), (const char *)(a->vs + f * kv_heads * nvs)};
    const int64_t bytes[4] = {m * slot, m * slot, (int64_t)m * kv_heads * nsc * 2, (int64_t)m * kv_heads * nvs * 2};
    ahead_set(ah, start, bytes, calls, thin);
}

/* a work item's keys k0..k1-1 of its row, and next0..next1-1: the partition of the same row that
 * the thread will likely take next (next0 -1: none guessed) */
typedef struct {
    int k0, k1, next0, next1;
} span_t;

/* keys sp.k0..sp.k1-1 of ``row`` (k0 on a block edge), every query head, into the running max mx, sum
 * sm (both heads rounded up to 16) and accumulators acc (heads x head_dim). A window of up to 16
 * keys inside one block (every kv head of up to 16 consecutive slots: one stretch of memory) is
 * read in address order:
 *   keys:   (slot, head) pairs 16 at a time, their product vectors reduced together into sc
 *           (slots x heads scores);
 *   softmax: 16 heads at a time, over the window's slots (probabilities back into sc, each head's
 *           rescaling factor into cr);
 *   values: 8 slots at a time, each kv head's rows of those slots weighed into its query heads'
 *           accumulators (8 streams, each in address order).
 * qf: room for the row's pre-scaled float32 query (and vq for its VNNI form); ``ready``: both hold
 * this row's already (the thread's previous partition was of the same row). */
static inline __attribute__((always_inline)) void decode_part(const args_t *a, int row, const span_t sp,
                                                              const int head_dim, int bf16, float *qf, float *sc,
                                                              float *cr, float *mx, float *sm, float *acc, float *fs,
                                                              char *vq, const int vnni_on, const int kind_on,
                                                              const int ready) {
    const int groups = a->groups, bs = a->block_size, kv_heads = a->kv_heads, heads = a->heads;
    const int k0 = sp.k0, k1 = sp.k1;
    /* kind_on: the KV kind as a constant where nonzero (-1: a plain cache, so that instance carries
     * none of the quantized paths' code, whose registers and layout cost a plain cache 5%) */
    const int kind = kind_on > 0 ? kind_on : kind_on < 0 ? MINICPM_KV_PLAIN : a->kind;
    const int esize = bf16 ? 2 : 4, quant = kind != MINICPM_KV_PLAIN;
    const int64_t width = quant ? kv_width(kind, head_dim) : head_dim * esize; /* bytes of a (slot, head) row */
    const int nsc = quant ? kv_scales(kind, head_dim, 0) : 0;                    /* a key row's scales */
    const int nvs = quant ? kv_scales(kind, head_dim, 1) : 0;                    /* a value row's */
    const int wide = quant && kv_group(kind, head_dim, 1) == 64;                 /* a value scale per 64 */
    const int64_t slot = (int64_t)kv_heads * width; /* bytes from one slot to the next */
    const int32_t *table = a->tables + (int64_t)a->row_seq[row] * a->width;
    const char *qrow = (const char *)a->q + (int64_t)row * a->q_stride * esize;
    if (!ready && !bf16) /* ready: qf (and vq) hold this row's query prepared already */
        for (int i = 0; i < heads * head_dim; i++) qf[i] = ((const float *)qrow)[i] * a->scale;
    else if (!ready && quant) /* quantized keys are scored in float32 */
        for (int i = 0; i < heads * head_dim; i++) qf[i] = bf16_to_f32(((const uint16_t *)qrow)[i]) * a->scale;
    const char *qb = bf16 && !quant ? qrow : (const char *)qf;
    const int qsize = bf16 && !quant ? 2 : 4;
#if HAVE_DECODE_VNNI
    /* bfloat16 queries against quantized keys: integer dot products (see vnni_prepare) */
    const int vnni = vnni_on && quant && bf16; /* vnni_on: a constant at each call (two instances) */
    const int paired = vnni && kind == MINICPM_KV_INT4 && head_dim == 64 && groups == 1 && heads % 2 == 0;
    const int rows16 = vnni && kind == MINICPM_KV_INT8 && head_dim == 64 && groups == 1; /* sums16_int8 */
    if (vnni && !ready) {
        for (int h = 0; h < heads; h++) vnni_prepare(qf + (int64_t)h * head_dim, heads, h, head_dim, kind, vq);
        if (paired) vnni_pair_lanes(qf, heads, vq);
        if (rows16) vnni_start_lanes(heads, vq);
    }
    const int hp = (heads + 15) / 16 * 16, nsg = quant ? head_dim / kv_group(kind, head_dim, 1) : 0;
    float *vwr = (float *)(vq + vnni_room(heads, head_dim)); /* value_weights' room */
#else
    (void)vq, (void)vnni_on;
    const int paired = 0, rows16 = 0, vnni = 0;
#endif
    const int thin = vnni && kind == MINICPM_KV_INT4 ? 2 : 1; /* ask_ahead's */
    for (int h = 0; h < (heads + 15) / 16 * 16; h++) {
        mx[h] = -INFINITY;
        sm[h] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * heads * head_dim);
    if (quant) { /* the first window asked for at once (where the thread guessed right, again: cheap) */
        ahead_t first;
        ahead_window(&first, a, table, k0, k1, width, nsc, nvs, 1, 1);
        ask_ahead(&first, 1);
    }
    int n;
    for (int w0 = k0; w0 < k1; w0 += n) {
        const int room = bs - w0 % bs;
        n = k1 - w0 < 16 ? k1 - w0 : 16;
        n = room < n ? room : n;
        const int64_t first = (int64_t)table[w0 / bs] * bs + w0 % bs, at = first * slot;
        const char *kw = (const char *)a->kc + at, *vw = (const char *)a->vc + at;
        /* a quantized window's scales, keys' then values', widened once (16 slots x kv heads at most) */
        const float *ksw = fs, *vsw = fs + 16 * kv_heads * nsc;
        /* a quantized cache: the next window's codes and scales asked for into L2, a share per
         * key batch and per kv head's values (without, the hardware's prefetcher fell behind; a
         * plain cache is read at memory speed without, and no faster with); after the last
         * window, the first of the thread's likely next partition */
        ahead_t ah = {{NULL, NULL, NULL, NULL}, {NULL, NULL, NULL, NULL}, {0, 0, 0, 0}, 1};
        const int calls = (n * heads + 15) / 16 + (vnni ? kv_heads : 0);
        if (quant && w0 + n < k1)
            ahead_window(&ah, a, table, w0 + n, k1, width, nsc, nvs, calls, thin);
        else if (quant && sp.next0 >= 0)
            ahead_window(&ah, a, table, sp.next0, sp.next1, width, nsc, nvs, calls, thin);
        if (quant) {
            if (!paired && !rows16) /* those read their key scales as float16 */
                widen_halves(a->ks + first * kv_heads * nsc, n * kv_heads * nsc, fs);
            widen_halves(a->vs + first * kv_heads * nvs, n * kv_heads * nvs, fs + 16 * kv_heads * nsc);
        }
        /* scores of the (slot, head) pairs in order, 16 at a time */
        const int pairs = n * heads;
        const char *qh = qb, *kr = kw; /* the pair's query head and key row */
        const float *kscale = ksw;     /* and the key row's scales */
        int h = 0, g = 0;
#if HAVE_DECODE_VNNI
        if (paired || rows16) { /* int4 / int8, head_dim 64, MHA: scores16_int4 / scores16_int8 */
            const uint16_t *ks = a->ks + first * kv_heads * nsc;
            for (int f0 = 0; f0 < pairs; f0 += 16) {
                ask_ahead(&ah, thin);
                const uint8_t *kf = (const uint8_t *)kw + (int64_t)f0 * width;
                const uint16_t *kss = ks + (int64_t)f0 * nsc;
                if (f0 + 16 <= pairs) /* a whole batch: its bounds known when compiled */
                    h = paired ? scores16_int4(vq, heads, h, kf, width, kss, 16, sc + f0)
                               : scores16_int8(vq, heads, h, kf, width, kss, 16, sc + f0);
                else
                    h = paired ? scores16_int4(vq, heads, h, kf, width, kss, pairs - f0, sc + f0)
                               : scores16_int8(vq, heads, h, kf, width, kss, pairs - f0, sc + f0);
            }
        } else
#endif
        for (int f0 = 0; f0 < pairs; f0 += 16) {
            __m512 z[16];
            if (quant) ask_ahead(&ah, thin);
#if HAVE_DECODE_VNNI
            const int h_first = h; /* the batch's first head: the qs of its 16 pairs from there */
#endif
            for (int i = 0; i < 16; i++) {
                if (f0 + i < pairs) {
#if HAVE_DECODE_VNNI
                    if (vnni)
                        z[i] = key_dot_vnni(vnni_head(vq, heads, h, head_dim), (const uint8_t *)kr, kscale, head_dim, kind);
                    else
#endif
                    z[i] = quant ? key_dot_q((const float *)qh, (const uint8_t *)kr, kscale, head_dim, kind)
                                 : key_dot(qh, kr, head_dim, bf16);
                    qh += head_dim * qsize;
                    if (++g == groups) g = 0, kr += width, kscale += nsc;
                    if (++h == heads) h = 0, qh = qb; /* kr has reached the next slot */
                } else {
                    z[i] = _mm512_setzero_ps();
                }
            }
            __m512 s = sum16(z);
            if (bf16 && !quant) s = _mm512_mul_ps(s, _mm512_set1_ps(a->scale));
#if HAVE_DECODE_VNNI
            if (vnni) s = _mm512_mul_ps(s, _mm512_loadu_ps(vnni_qs(vq) + h_first));
#endif
            _mm512_storeu_ps(sc + f0, s);
        }
        /* the window's softmax, 16 heads at a time */
        for (int h0 = 0; h0 < heads; h0 += 16) {
            const __mmask16 hm = heads - h0 >= 16 ? 0xffff : (__mmask16)((1u << (heads - h0)) - 1);
            const __m512 old = _mm512_loadu_ps(mx + h0);
            __m512 m = old;
            for (int t = 0; t < n; t++) m = _mm512_max_ps(m, _mm512_maskz_loadu_ps(hm, sc + t * heads + h0));
            const __m512 correction = exp16_nonpos(_mm512_sub_ps(old, m)); /* exp(-inf) ~ 0 at first */
            __m512 total = _mm512_setzero_ps();
            for (int t = 0; t < n; t++) {
                const __m512 p = exp16_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(hm, sc + t * heads + h0), m));
                _mm512_mask_storeu_ps(sc + t * heads + h0, hm, p);
                total = _mm512_add_ps(total, p);
            }
            _mm512_storeu_ps(mx + h0, m);
            _mm512_storeu_ps(sm + h0, _mm512_fmadd_ps(_mm512_loadu_ps(sm + h0), correction, total));
            _mm512_storeu_ps(cr + h0, correction);
        }
#if HAVE_DECODE_VNNI
        if (vnni) { /* values of the whole window by integer dot products (see values_vnni) */
            value_weights(sc, vsw, n, heads, groups, kv_heads, nvs, nsg, kind, vwr);
            for (int kvh = 0; kvh < kv_heads; kvh++) {
                ask_ahead(&ah, thin);
                for (int g = 0; g < groups; g++) {
                    const int hh = kvh * groups + g;
#if HAVE_VALUES_VBMI
                    if (kind == MINICPM_KV_INT4)
                        values_int4_vbmi((const uint8_t *)vw + (int64_t)kvh * width, slot, vwr, hp, hh, n, cr[hh],
                                         acc + (int64_t)hh * head_dim, head_dim, wide);
                    else
#endif
                    values_vnni((const uint8_t *)vw + (int64_t)kvh * width, slot, vwr, hp, hh, n, cr[hh],
                                acc + (int64_t)hh * head_dim, head_dim, kind, wide);
                }
            }
            continue;
        }
#endif
        /* values, 8 slots at a time */
        for (int j8 = 0; j8 < n; j8 += 8) {
            const int m8 = n - j8 < 8 ? n - j8 : 8;
            for (int kvh = 0; kvh < kv_heads; kvh++)
                for (int g = 0; g < groups; g++) {
                    const int hh = kvh * groups + g;
                    for (int d0 = 0; d0 < head_dim; d0 += 64) {
                        float *ah = acc + (int64_t)hh * head_dim + d0;
                        __m512 acc4[4];
                        for (int i = 0; i < 4; i++) acc4[i] = _mm512_loadu_ps(ah + 16 * i);
                        if (j8 == 0) {
                            const __m512 c = _mm512_set1_ps(cr[hh]);
                            for (int i = 0; i < 4; i++) acc4[i] = _mm512_mul_ps(acc4[i], c);
                        }
                        if (quant) {
                            for (int t = j8; t < j8 + m8; t++) {
                                const float p = sc[t * heads + hh];
                                const uint8_t *vr = (const uint8_t *)vw + t * slot + (int64_t)kvh * width;
                                const float *vs = vsw + ((int64_t)t * kv_heads + kvh) * nvs;
                                for (int gg = 0; gg < 2; gg++) {
                                    const int gi = d0 / 32 + gg, si = wide ? gi / 2 : gi; /* run, scale */
                                    __m512 c0, c1;
                                    codes32(vr, gi, kind, &c0, &c1);
                                    const float s0 = vs[kind == MINICPM_KV_INT4 ? 2 * si : si];
                                    const __m512 ps = _mm512_set1_ps(p * s0);
                                    acc4[2 * gg] = _mm512_fmadd_ps(ps, c0, acc4[2 * gg]);
                                    acc4[2 * gg + 1] = _mm512_fmadd_ps(ps, c1, acc4[2 * gg + 1]);
                                    if (kind == MINICPM_KV_INT4) {
                                        const __m512 pm = _mm512_set1_ps(p * vs[2 * si + 1]);
                                        acc4[2 * gg] = _mm512_add_ps(acc4[2 * gg], pm);
                                        acc4[2 * gg + 1] = _mm512_add_ps(acc4[2 * gg + 1], pm);
                                    }
                                }
                            }
                        } else {
                            for (int t = j8; t < j8 + m8; t++) {
                                const __m512 pj = _mm512_set1_ps(sc[t * heads + hh]);
                                const char *vr = vw + t * slot + ((int64_t)kvh * head_dim + d0) * esize;
                                for (int i = 0; i < 4; i++) acc4[i] = _mm512_fmadd_ps(pj, load16(vr + 16 * i * esize, bf16), acc4[i]);
                            }
                        }
                        for (int i = 0; i < 4; i++) _mm512_storeu_ps(ah + 16 * i, acc4[i]);
                    }
                }
        }
    }
}

/* decode_part's instances, each a function of its own: one instance's code never moves another's
 * (inlined into one function, the plain cache's unchanged loops ran 3-10% slower or faster as the
 * code around them grew or shrank). BF16: bfloat16 activations; VNNI, KIND: decode_part's vnni_on and kind_on. */
#define DECODE_INSTANCE(NAME, BF16, VNNI, KIND)                                                                  \
    static __attribute__((noinline)) void NAME(const args_t *a, int row, const span_t sp, int head_dim, float *qf, \
                                               float *sc, float *cr, float *mx, float *sm, float *acc, float *fs,   \
                                               char *vq, int ready) {                                               \
        WITH_HEAD_DIM(head_dim, decode_part(a, row, sp, HD, BF16, qf, sc, cr, mx, sm, acc, fs, vq, VNNI, KIND, ready)) \
    }
#if HAVE_DECODE_BF16
DECODE_INSTANCE(decode_bf16_int8, 1, 1, MINICPM_KV_INT8)
DECODE_INSTANCE(decode_bf16_int4, 1, 1, MINICPM_KV_INT4)
DECODE_INSTANCE(decode_bf16_plain, 1, 0, -1)
DECODE_INSTANCE(decode_bf16_quant, 1, 0, 0)
#endif
DECODE_INSTANCE(decode_f32_plain, 0, 0, -1)
DECODE_INSTANCE(decode_f32_quant, 0, 0, 0)

/* 1 where decode_avx512 serves dtype and head_dim on this build */
static int decode_avx512_serves(int dtype, int head_dim) {
    return head_dim % 64 == 0 && (dtype == 0 || (dtype == 1 && HAVE_DECODE_BF16));
}

/* The decode path above: 0 or -3 (no memory). */
static int decode_avx512(int dtype, const args_t *ap, int rows, int head_dim) {
    const args_t a = *ap;
    const int heads = a.heads, bf16 = dtype == 1;
    const int64_t state = (int64_t)heads * (head_dim + 2); /* a partition's max, sum, accumulator per head */
    /* items: every row's partitions in order; a row of several keeps each partition's state */
    int *first = malloc(sizeof(int) * ((size_t)rows + 1));
    int64_t *spill = malloc(sizeof(int64_t) * (size_t)rows);
    if (first == NULL || spill == NULL) {
        free(first);
        free(spill);
        return -3;
    }
    int64_t spilled = 0;
    first[0] = 0;
    for (int r = 0; r < rows; r++) {
        const int part = part_keys(a.row_len[r], a.block_size), parts = (a.row_len[r] + part - 1) / part;
        first[r + 1] = first[r] + parts;
        spill[r] = parts > 1 ? spilled : -1;
        spilled += parts > 1 ? parts * state : 0;
    }
    const int items = first[rows];
    float *states = spilled ? malloc(sizeof(float) * (size_t)spilled) : NULL;
    int failed = spilled && states == NULL;
    if (!failed) {
#pragma omp parallel reduction(| : failed)
        {
            const size_t hp = (size_t)(heads + 15) / 16 * 16;
            const size_t window_scales = a.kind != MINICPM_KV_PLAIN ? 2 * 16 * (size_t)a.kv_heads * kv_scales(a.kind, head_dim, 0) : 0;
            const size_t floats = ((size_t)heads * 2 * head_dim + 3 * hp + 16 * (size_t)heads + 16 + window_scales + 15) / 16 * 16;
#if HAVE_DECODE_VNNI
            const size_t vroom = a.kind != MINICPM_KV_PLAIN ? vnni_room(heads, head_dim) + (size_t)head_dim / 32 * VW_SET * hp * 4 : 0;
#else
            const size_t vroom = 0;
#endif
            float *qf = malloc(sizeof(float) * floats + vroom);
            float *acc = qf + (size_t)heads * head_dim, *mx = acc + (size_t)heads * head_dim, *sm = mx + hp;
            float *cr = sm + hp, *sc = cr + hp, *fs = sc + 16 * (size_t)heads + 16;
            char *vq = (char *)(qf + floats);
            if (qf == NULL) failed = 1;
            int row = 0, ready_row = -1;
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < items; item++) {
                if (qf == NULL) continue;
                while (first[row + 1] <= item) row++;
                while (first[row] > item) row--;
                const int part = part_keys(a.row_len[row], a.block_size), p = item - first[row], k0 = p * part;
                const int k1 = a.row_len[row] - k0 < part ? a.row_len[row] : k0 + part;
                const int ready = row == ready_row; /* this thread prepared the row's query last */
                ready_row = row;
                /* the thread's likely next item: this one plus the thread count (items are handed
                 * out in order); only its prefetch depends on the guess, never a result */
                const int guess = item + omp_get_num_threads(), g0 = (guess - first[row]) * part;
                const span_t sp = {k0, k1, guess < first[row + 1] ? g0 : -1,
                                   a.row_len[row] - g0 < part ? a.row_len[row] : g0 + part};
                if (bf16) {
#if HAVE_DECODE_BF16
                    if (HAVE_DECODE_VNNI && a.kind == MINICPM_KV_INT8)
                        decode_bf16_int8(&a, row, sp, head_dim, qf, sc, cr, mx, sm, acc, fs, vq, ready);
                    else if (HAVE_DECODE_VNNI && a.kind == MINICPM_KV_INT4)
                        decode_bf16_int4(&a, row, sp, head_dim, qf, sc, cr, mx, sm, acc, fs, vq, ready);
                    else if (a.kind == MINICPM_KV_PLAIN)
                        decode_bf16_plain(&a, row, sp, head_dim, qf, sc, cr, mx, sm, acc, fs, vq, ready);
                    else
                        decode_bf16_quant(&a, row, sp, head_dim, qf, sc, cr, mx, sm, acc, fs, vq, ready);
#endif
                } else if (a.kind == MINICPM_KV_PLAIN) {
                    decode_f32_plain(&a, row, sp, head_dim, qf, sc, cr, mx, sm, acc, fs, vq, ready);
                } else {
                    decode_f32_quant(&a, row, sp, head_dim, qf, sc, cr, mx, sm, acc, fs, vq, ready);
                }
                if (spill[row] < 0) { /* the row's only partition: its output */
                    for (int h = 0; h < heads; h++)
                        store_scaled((char *)a.out + ((int64_t)row * heads + h) * head_dim * (bf16 ? 2 : 4),
                                     acc + (int64_t)h * head_dim, 1.0f / sm[h], head_dim, bf16);
                } else {
                    float *st = states + spill[row] + p * state;
                    for (int h = 0; h < heads; h++) {
                        st[h * (head_dim + 2)] = mx[h];
                        st[h * (head_dim + 2) + 1] = sm[h];
                        memcpy(st + h * (head_dim + 2) + 2, acc + (int64_t)h * head_dim, sizeof(float) * head_dim);
                    }
                }
            }
            /* the partitions of each long row merged in order, per (row, head) */
#pragma omp for schedule(static)
            for (int rh = 0; rh < rows * heads; rh++) {
                const int r = rh / heads, h = rh % heads, parts = first[r + 1] - first[r];
                if (spill[r] < 0 || qf == NULL) continue;
                const float *st = states + spill[r] + h * (head_dim + 2);
                float m = -INFINITY, total = 0.0f;
                for (int p = 0; p < parts; p++) m = st[p * state] > m ? st[p * state] : m;
                float *o = acc; /* this thread's room for one head */
                memset(o, 0, sizeof(float) * head_dim);
                for (int p = 0; p < parts; p++) {
                    const float *sp = st + p * state, w = exp_nonpos(sp[0] - m);
                    total += sp[1] * w;
                    for (int d = 0; d < head_dim; d++) o[d] += sp[2 + d] * w;
                }
                store_scaled((char *)a.out + ((int64_t)r * heads + h) * head_dim * (bf16 ? 2 : 4), o, 1.0f / total,
                             head_dim, bf16);
            }
            free(qf);
        }
    }
    free(states);
    free(first);
    free(spill);
    return failed ? -3 : 0;
}
#else
static int decode_avx512_serves(int dtype, int head_dim) {
    (void)dtype, (void)head_dim;
    return 0;
}
static int decode_avx512(int dtype, const args_t *ap, int rows, int head_dim) {
    (void)dtype, (void)ap, (void)rows, (void)head_dim;
    return -2;
}
#endif

int minicpm_check_rows(int64_t num_blocks, const int32_t *tables, int seqs, int width, const int32_t *row_seq,
                       const int32_t *row_len, int rows, int block_size) {
    if (block_size < 1) return MINICPM_BAD_SHAPE;
    for (int r = 0; r < rows; r++) { /* every block a row reads must be in the cache */
        if (row_seq[r] < 0 || row_seq[r] >= seqs) return MINICPM_BAD_ROW_SEQ;
        if (row_len[r] < 1 || row_len[r] > (int64_t)width * block_size) return MINICPM_BAD_ROW_LEN;
        const int32_t *table = tables + (int64_t)row_seq[r] * width;
        for (int b = 0; b * block_size < row_len[r]; b++)
            if (table[b] < 0 || table[b] >= num_blocks) return MINICPM_BAD_BLOCK;
    }
    return 0;
}

/* Returns 0, or a negative code for arguments it refuses: a group too large (-1), a dtype (-2), no
 * memory (-3), a row's sequence (-4) or length (-5) out of range, a block id outside the cache (-6). */
int minicpm_paged_attention(int dtype, const void *q, int64_t q_stride, const void *kc, const void *vc,
                            int kvkind, const uint16_t *ks, const uint16_t *vs, int64_t num_blocks,
                            const int32_t *tables, int seqs, int width, const int32_t *row_seq,
                            const int32_t *row_len, int rows, int heads, int kv_heads, int head_dim, int block_size,
                            float scale, void *out) {
    if (rows <= 0) return 0;
    if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP) return -1;
    if (dtype != 0 && dtype != 1) return -2;
    if (check_kv(kvkind, ks, vs, head_dim) != 0) return MINICPM_BAD_KV;
    const int checked = minicpm_check_rows(num_blocks, tables, seqs, width, row_seq, row_len, rows, block_size);
    if (checked != 0) return checked;
    const args_t a = {q,     kc,       vc,     kvkind,           ks,         vs,    q_stride, tables, row_seq,
                      row_len, width, heads, kv_heads, heads / kv_heads, block_size, scale, out};
    return decode_avx512_serves(dtype, head_dim) ? decode_avx512(dtype, &a, rows, head_dim)
                                                 : decode_portable(dtype, &a, rows, head_dim);
}
