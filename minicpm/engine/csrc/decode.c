/* Every decoder layer of a decode step in one call: the eager model's operators, in its order and
 * with its roundings, for a step's decode rows (one token each, any number of rows).
 *
 * Built with linear.c and paged_attention.c into one library by minicpm/engine/cpu_kernels.py
 * (this file without floating-point contraction, so each product and sum rounds as torch's
 * separate operators do). Per layer, for rows r:
 *
 *   x = rmsnorm(h) * w1            float32 statistics; bfloat16: normalised, rounded, times w1
 *   qkv = x W_qkv^T                the panel kernel (linear.c), one or more stacked parts
 *   q, k = rope(q, k)              x * cos + swap_halves(x) * sin_signed, in float32, rounded
 *   q, k, v = q H, k H, v H        a rotated cache's Hadamard rotation (per 64 values), rounded
 *   cache[slot[r]] = k, v          this layer's paged cache
 *   a = attention(q)               the paged kernel (paged_attention.c) over each row's blocks
 *   a = a H                        rotated back (a rotated cache), rounded
 *   h = h + (a W_o^T) * s          s = scale_depth / sqrt(layers), skipped when 1
 *   x = rmsnorm(h) * w2
 *   g, u = x W_gu^T
 *   h = h + ((silu(g) * u) W_d^T) * s
 *
 * Activations are float32 or bfloat16 (xtype 0 / 1); every intermediate is rounded to that type
 * where torch's operator would round it. What differs from torch is the order of the two
 * reductions (the mean of squares, and exp in silu): last-bit differences in float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "minicpm.h"
#include "numeric.h"

typedef minicpm_linear_t Linear;
typedef minicpm_layer_t Layer;

/* element i of an activation-dtype array, and a store rounding to it */
static inline float get(int xtype, const void *p, int64_t i) {
    return xtype ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put(int xtype, void *p, int64_t i, float v) {
    if (xtype)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static inline float round_to(int xtype, float v) { return xtype ? bf16_to_f32(f32_to_bf16(v)) : v; }

static void linear(const Linear *l, int xtype, const void *x, int m, int k, void *y, int n_total, float *scratch) {
    const int es = xtype ? 2 : 4;
    for (int p = 0; p < l->parts; p++)
        minicpm_linear(l->wtype[p], xtype, x, k, l->packed[p], l->scales[p], l->mins[p], l->group[p], m, l->n[p], k,
                       (char *)y + (int64_t)l->offset[p] * es, n_total, scratch, 0);
}

/* torch's RMSNorm: float32 statistics; float32 activations (x * rstd) * w, bfloat16 ones
 * round(x * rstd) * w rounded */
static void rmsnorm(int xtype, const void *h, const void *w, int m, int dim, float eps, void *out) {
    for (int r = 0; r < m; r++) {
        float acc[16] = {0};
        for (int i = 0; i < dim; i++) {
            const float v = get(xtype, h, (int64_t)r * dim + i);
            acc[i % 16] += v * v;
        }
        float ss = 0.0f;
        for (int j = 0; j < 16; j++) ss += acc[j];
        const float rstd = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int i = 0; i < dim; i++) {
            const float v = round_to(xtype, get(xtype, h, (int64_t)r * dim + i) * rstd);
            put(xtype, out, (int64_t)r * dim + i, v * get(xtype, w, i));
        }
    }
}

/* h += y * scale (the product rounded first, as two torch operators) */
static void residual(int xtype, void *h, const void *y, int64_t count, float scale) {
    for (int64_t i = 0; i < count; i++) {
        const float b = scale != 1.0f ? round_to(xtype, get(xtype, y, i) * scale) : get(xtype, y, i);
        put(xtype, h, i, get(xtype, h, i) + b);
    }
}

void minicpm_decode_buffer_bytes(int xtype, int m, int hidden, int heads, int kv_heads, int head_dim, int inter,
                                 int64_t sizes[2]) {
    const int64_t es = xtype ? 2 : 4, rows = m > 0 ? m : 0;
    const int64_t per_row = 2 * (int64_t)hidden + (int64_t)(heads + 2 * kv_heads) * head_dim +
                            (int64_t)heads * head_dim + 3 * (int64_t)inter;
    int64_t widest = hidden > inter ? hidden : inter;
    widest = widest > (int64_t)heads * head_dim ? widest : (int64_t)heads * head_dim;
    sizes[0] = rows * per_row * es;
    sizes[1] = rows * widest * (int64_t)sizeof(float);
}

/* 0 where every part of ``l`` (k inputs) is a known weight type, grouped ones in groups dividing
 * k, writing inside its n_total outputs */
static int check_linear(const Linear *l, int k, int n_total) {
    if (l->parts < 1 || l->parts > MINICPM_MAX_PARTS) return MINICPM_BAD_LAYER;
    for (int p = 0; p < l->parts; p++) {
        const int w = l->wtype[p], grouped = w >= 3, records = is_q4(w); /* int4: scales in the records */
        if (w < 0 || w > 6 || l->n[p] < 1 || l->offset[p] < 0 || (int64_t)l->offset[p] + l->n[p] > n_total ||
            l->packed[p] == NULL)
            return MINICPM_BAD_LAYER;
        if ((w >= 2 && !records && l->scales[p] == NULL) || (grouped && (l->group[p] < 1 || k % l->group[p])) ||
            (records && l->group[p] % 4))
            return MINICPM_BAD_LAYER;
    }
    return 0;
}

#define ROTATION 64 /* kv_format.ROTATION */

/* ``n`` heads of ``head_dim`` activation-dtype values at p, each run of 64 times the orthonormal
 * Walsh-Hadamard matrix (Sylvester's order, as kv_format.hadamard) by the fast transform in
 * float32, rounded once to the activation dtype (kv_format.rotate_heads; the sums' order differs
 * from a matrix product's: last-bit differences in float32) */
static void rotate_heads(int xtype, void *p, int n, int head_dim) {
    float t[ROTATION];
    for (int64_t b = 0; b < (int64_t)n * head_dim; b += ROTATION) {
        for (int i = 0; i < ROTATION; i++) t[i] = get(xtype, p, b + i);
        for (int len = 1; len < ROTATION; len <<= 1)
            for (int i = 0; i < ROTATION; i += 2 * len)
                for (int j = i; j < i + len; j++) {
                    const float x = t[j], y = t[j + len];
                    t[j] = x + y;
                    t[j + len] = x - y;
                }
        for (int i = 0; i < ROTATION; i++) put(xtype, p, b + i, t[i] * 0.125f); /* 1 / sqrt(64), exact */
    }
}

/* The decoder layers over ``m`` decode rows. h (m, hidden) in and out; cos / sin_signed (m,
 * head_dim) float32 (already rounded to the activation dtype); slots (m) cache slots of the new
 * tokens; k_cache / v_cache the whole cache, ``layer_bytes`` bytes per layer, each layer
 * (num_blocks * block_size slots, kv_heads, head_dim) in the activation dtype, or codes of kvkind
 * (minicpm.h) with float16 scales k_scale / v_scale, ``k_scale_layer_stride`` /
 * ``v_scale_layer_stride`` scales per layer (the
 * new keys and values quantized as kv_format.py does); rotate: 1 where the cache is Hadamard-rotated
 * (q, k, v heads rotated before they are used and stored, the attention output rotated back; head_dim
 * a multiple of 64); tables / row_seq / row_len as
 * paged_attention.c takes them. ``work`` (``work_bytes``) and ``scratch`` (``scratch_bytes``) at
 * least what minicpm_decode_buffer_bytes asks for m rows. Every size, slot, row and block id is
 * checked before anything is written: returns 0, or the refusal code (minicpm.h) with the cache
 * and h untouched. */
int minicpm_decode_layers(int xtype, int m, int n_layers, const Layer *layers, void *h, const float *cos,
                          const float *sin_signed, const int64_t *slots, void *k_cache, void *v_cache,
                          int64_t layer_bytes, int kvkind, uint16_t *k_scale, uint16_t *v_scale,
                          int64_t k_scale_layer_stride, int64_t v_scale_layer_stride, int rotate, int64_t num_blocks,
                          const int32_t *tables, int seqs, int width, const int32_t *row_seq, const int32_t *row_len, int block_size, int hidden,
                          int heads, int kv_heads, int head_dim, int inter, float eps, float residual_scale,
                          float attn_scale, void *work, int64_t work_bytes, float *scratch, int64_t scratch_bytes) {
    if (xtype != 0 && xtype != 1) return MINICPM_BAD_DTYPE;
    if (m <= 0) return 0;
    if (n_layers < 0 || hidden < 1 || heads < 1 || kv_heads < 1 || inter < 1 || block_size < 1 || num_blocks < 0)
        return MINICPM_BAD_SHAPE;
    if (heads % kv_heads != 0 || heads / kv_heads > 64) return MINICPM_BAD_GROUP;
    if (head_dim < 2 || head_dim % 2 || head_dim > MINICPM_MAX_HEAD_DIM) return MINICPM_BAD_HEAD_DIM;
    const int64_t slots_in_cache = num_blocks * block_size;
    const int quant = kvkind != MINICPM_KV_PLAIN;
    if (quant && ((kvkind != MINICPM_KV_INT8 && kvkind != MINICPM_KV_INT4) || head_dim % MINICPM_KV_GROUP ||
                  k_scale == NULL || v_scale == NULL))
        return MINICPM_BAD_KV;
    if (kvkind != MINICPM_KV_PLAIN && kvkind != MINICPM_KV_INT8 && kvkind != MINICPM_KV_INT4) return MINICPM_BAD_KV;
    if (rotate && head_dim % ROTATION) return MINICPM_BAD_HEAD_DIM;
    /* a (slot, kv head) row's code bytes and float16 scales */
    const int64_t row_bytes = quant ? kv_width(kvkind, head_dim) : head_dim * (xtype ? 2 : 4);
    const int64_t key_scales = quant ? kv_scales(kvkind, head_dim, 0) : 0;
    const int64_t value_scales = quant ? kv_scales(kvkind, head_dim, 1) : 0;
    if (layer_bytes < slots_in_cache * kv_heads * row_bytes ||
        k_scale_layer_stride < slots_in_cache * kv_heads * key_scales ||
        v_scale_layer_stride < slots_in_cache * kv_heads * value_scales)
        return MINICPM_BAD_SHAPE;
    int64_t need[2];
    minicpm_decode_buffer_bytes(xtype, m, hidden, heads, kv_heads, head_dim, inter, need);
    if (work_bytes < need[0] || scratch_bytes < need[1]) return MINICPM_SMALL_BUFFER;
    for (int r = 0; r < m; r++)
        if (slots[r] < 0 || slots[r] >= slots_in_cache) return MINICPM_BAD_SLOT;
    const int rows_ok = minicpm_check_rows(num_blocks, tables, seqs, width, row_seq, row_len, m, block_size);
    if (rows_ok != 0) return rows_ok;
    const int qkv_n = (heads + 2 * kv_heads) * head_dim, att_n = heads * head_dim, half = head_dim / 2;
    for (int L = 0; L < n_layers; L++) {
        const Layer *ly = &layers[L];
        const int bad = check_linear(&ly->qkv, hidden, qkv_n) | check_linear(&ly->o, att_n, hidden) |
                        check_linear(&ly->gate_up, hidden, 2 * inter) | check_linear(&ly->down, inter, hidden);
        if (bad || ly->norm1 == NULL || ly->norm2 == NULL) return MINICPM_BAD_LAYER;
    }
    const int es = xtype ? 2 : 4;
    char *x = work, *qkv = x + (int64_t)m * hidden * es, *att = qkv + (int64_t)m * qkv_n * es;
    char *out = att + (int64_t)m * att_n * es, *gu = out + (int64_t)m * hidden * es;
    char *act = gu + (int64_t)m * 2 * inter * es;
    for (int L = 0; L < n_layers; L++) {
        const Layer *ly = &layers[L];
        rmsnorm(xtype, h, ly->norm1, m, hidden, eps, x);
        linear(&ly->qkv, xtype, x, m, hidden, qkv, qkv_n, scratch);
        char *kc = (char *)k_cache + L * layer_bytes, *vc = (char *)v_cache + L * layer_bytes;
        uint16_t *ks = quant ? k_scale + L * k_scale_layer_stride : NULL;
        uint16_t *vs = quant ? v_scale + L * v_scale_layer_stride : NULL;
        for (int r = 0; r < m; r++) {
            char *row = qkv + (int64_t)r * qkv_n * es;
            const float *c = cos + (int64_t)r * head_dim, *s = sin_signed + (int64_t)r * head_dim;
            for (int hh = 0; hh < heads + kv_heads; hh++) { /* q and k heads: rotate-half */
                float t[MINICPM_MAX_HEAD_DIM];
                for (int i = 0; i < head_dim; i++) t[i] = get(xtype, row, (int64_t)hh * head_dim + i);
                for (int i = 0; i < head_dim; i++) {
                    const float a = t[i] * c[i], b = t[i < half ? i + half : i - half] * s[i];
                    put(xtype, row, (int64_t)hh * head_dim + i, a + b);
                }
            }
            if (rotate) /* q, k and v heads: the cache's Hadamard rotation */
                rotate_heads(xtype, row, heads + 2 * kv_heads, head_dim);
            if (quant) {
                /* the slots were checked above: these cannot refuse */
                minicpm_kv_quantize(xtype, kvkind, 0, row + (int64_t)heads * head_dim * es, 0, 1, kv_heads, head_dim,
                                    slots + r, slots_in_cache, kc, ks);
                minicpm_kv_quantize(xtype, kvkind, 1, row + (int64_t)(heads + kv_heads) * head_dim * es, 0, 1,
                                    kv_heads, head_dim, slots + r, slots_in_cache, vc, vs);
            } else {
                const int64_t kv_bytes = (int64_t)kv_heads * head_dim * es;
                memcpy(kc + slots[r] * kv_bytes, row + (int64_t)heads * head_dim * es, kv_bytes);
                memcpy(vc + slots[r] * kv_bytes, row + (int64_t)(heads + kv_heads) * head_dim * es, kv_bytes);
            }
        }
        const int code = minicpm_paged_attention(xtype, qkv, qkv_n, kc, vc, kvkind, ks, vs, num_blocks, tables, seqs,
                                                 width, row_seq, row_len, m, heads, kv_heads, head_dim, block_size,
                                                 attn_scale, att);
        if (code != 0) return code;
        if (rotate) /* each output head rotated back (the matrix is its own inverse) */
            for (int r = 0; r < m; r++) rotate_heads(xtype, att + (int64_t)r * att_n * es, heads, head_dim);
        linear(&ly->o, xtype, att, m, att_n, out, hidden, scratch);
        residual(xtype, h, out, (int64_t)m * hidden, residual_scale);
        rmsnorm(xtype, h, ly->norm2, m, hidden, eps, x);
        linear(&ly->gate_up, xtype, x, m, hidden, gu, 2 * inter, scratch);
        for (int r = 0; r < m; r++)
            for (int i = 0; i < inter; i++) {
                const float g = get(xtype, gu, (int64_t)r * 2 * inter + i);
                const float silu = round_to(xtype, g / (1.0f + expf(-g)));
                put(xtype, act, (int64_t)r * inter + i, silu * get(xtype, gu, (int64_t)r * 2 * inter + inter + i));
            }
        linear(&ly->down, xtype, act, m, inter, out, hidden, scratch);
        residual(xtype, h, out, (int64_t)m * hidden, residual_scale);
    }
    return 0;
}
