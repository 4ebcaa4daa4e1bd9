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
 * A work item is a row (or, with few rows, a row's kv head): a kv head's query heads are scored
 * together, so each key and value row is read once; blocks are read in place, in table order, with an online
 * softmax (running max and sum in float32), so nothing is gathered and any block order costs the
 * same. Accumulation is float32 for both float32 and bfloat16 inputs.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
                if (IN_PLACE) {                                                                    \
                    fold_block(qh, (const float *)kb, (const float *)vb, step, n, groups, head_dim, sc, mx + h, sm + h, ah); \
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

/* head_dim as a literal at the common sizes, so each specialisation is fully unrolled */
#define DISPATCH_HEAD_DIM(ITEM, a, row, kv0, kv1, head_dim, scratch) \
    switch (head_dim) {                                                  \
    case 64: ITEM(a, row, kv0, kv1, 64, scratch); break;                 \
    case 128: ITEM(a, row, kv0, kv1, 128, scratch); break;               \
    default: ITEM(a, row, kv0, kv1, head_dim, scratch); break;           \
    }

/* Returns 0, or a negative code for arguments it refuses: a group too large (-1), a dtype (-2), no
 * memory (-3), a row's sequence (-4) or length (-5) out of range, a block id outside the cache (-6). */
int minicpm_paged_attention(int dtype, const void *q, int64_t q_stride, const void *kc, const void *vc,
                            int64_t num_blocks, const int32_t *tables, int seqs, int width,
                            const int32_t *row_seq, const int32_t *row_len, int rows, int heads, int kv_heads,
                            int head_dim, int block_size, float scale, void *out) {
    if (rows <= 0) return 0;
    if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP) return -1;
    if (dtype != 0 && dtype != 1) return -2;
    for (int r = 0; r < rows; r++) { /* every block a row reads must be in the cache */
        if (row_seq[r] < 0 || row_seq[r] >= seqs) return -4;
        if (row_len[r] < 1 || row_len[r] > (int64_t)width * block_size) return -5;
        const int32_t *table = tables + (int64_t)row_seq[r] * width;
        for (int b = 0; b * block_size < row_len[r]; b++)
            if (table[b] < 0 || table[b] >= num_blocks) return -6;
    }
    const int groups = heads / kv_heads;
    const args_t a = {q, kc, vc, q_stride, tables, row_seq, row_len, width, heads, kv_heads, groups, block_size, scale, out};
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
                    DISPATCH_HEAD_DIM(item_f32, &a, row, kv0, kv1, head_dim, scratch)
                } else {
                    DISPATCH_HEAD_DIM(item_bf16, &a, row, kv0, kv1, head_dim, scratch)
                }
            }
            free(scratch);
        }
    }
    return failed ? -3 : 0;
}
