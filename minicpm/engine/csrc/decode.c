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
 *   cache[slot[r]] = k, v          this layer's paged cache
 *   a = attention(q)               the paged kernel (paged_attention.c) over each row's blocks
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

#define MAX_PARTS 3

void minicpm_linear(int wtype, int xtype, const void *x, int64_t x_stride, const void *packed, const float *scales,
                    const float *mins, int group, int m, int n, int k, void *y, int64_t y_stride, float *scratch,
                    int prefill);
int minicpm_paged_attention(int dtype, const void *q, int64_t q_stride, const void *kc, const void *vc,
                            int64_t num_blocks, const int32_t *tables, int seqs, int width,
                            const int32_t *row_seq, const int32_t *row_len, int rows, int heads, int kv_heads,
                            int head_dim, int block_size, float scale, void *out);

/* one linear layer: up to MAX_PARTS weights stacked by output, part p writing columns
 * [offset[p], offset[p] + n[p]) */
typedef struct {
    int parts;
    int wtype[MAX_PARTS], group[MAX_PARTS], n[MAX_PARTS], offset[MAX_PARTS];
    const void *packed[MAX_PARTS];
    const float *scales[MAX_PARTS], *mins[MAX_PARTS];
} Linear;

typedef struct {
    const void *norm1, *norm2; /* activation dtype, hidden */
    Linear qkv, o, gate_up, down;
} Layer;

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

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

/* The decoder layers over ``m`` decode rows. h (m, hidden) in and out; cos / sin_signed (m,
 * head_dim) float32 (already rounded to the activation dtype); slots (m) cache slots of the new
 * tokens; k_cache / v_cache the whole cache, ``layer_stride`` elements per layer, each layer
 * (slots, kv_heads, head_dim); tables / row_seq / row_len as paged_attention.c takes them.
 * ``work`` holds m * (2 * hidden + (heads + 2 * kv_heads) * head_dim + heads * head_dim + 3 * inter)
 * activation elements and ``scratch`` m * max(hidden, inter, heads * head_dim) floats.
 * Returns 0, or paged_attention.c's refusal code (before any layer's cache is written for a
 * refused block table, since every layer reads the same one). */
int minicpm_decode_layers(int xtype, int m, int n_layers, const Layer *layers, void *h, const float *cos,
                          const float *sin_signed, const int64_t *slots, void *k_cache, void *v_cache,
                          int64_t layer_stride, int64_t num_blocks, const int32_t *tables, int seqs, int width,
                          const int32_t *row_seq, const int32_t *row_len, int block_size, int hidden, int heads,
                          int kv_heads, int head_dim, int inter, float eps, float residual_scale, float attn_scale,
                          void *work, float *scratch) {
    const int es = xtype ? 2 : 4;
    const int qkv_n = (heads + 2 * kv_heads) * head_dim, att_n = heads * head_dim, half = head_dim / 2;
    char *x = work, *qkv = x + (int64_t)m * hidden * es, *att = qkv + (int64_t)m * qkv_n * es;
    char *out = att + (int64_t)m * att_n * es, *gu = out + (int64_t)m * hidden * es;
    char *act = gu + (int64_t)m * 2 * inter * es;
    for (int L = 0; L < n_layers; L++) {
        const Layer *ly = &layers[L];
        rmsnorm(xtype, h, ly->norm1, m, hidden, eps, x);
        linear(&ly->qkv, xtype, x, m, hidden, qkv, qkv_n, scratch);
        char *kc = (char *)k_cache + L * layer_stride * es, *vc = (char *)v_cache + L * layer_stride * es;
        for (int r = 0; r < m; r++) {
            char *row = qkv + (int64_t)r * qkv_n * es;
            const float *c = cos + (int64_t)r * head_dim, *s = sin_signed + (int64_t)r * head_dim;
            for (int hh = 0; hh < heads + kv_heads; hh++) { /* q and k heads: rotate-half */
                float t[512];
                for (int i = 0; i < head_dim; i++) t[i] = get(xtype, row, (int64_t)hh * head_dim + i);
                for (int i = 0; i < head_dim; i++) {
                    const float a = t[i] * c[i], b = t[i < half ? i + half : i - half] * s[i];
                    put(xtype, row, (int64_t)hh * head_dim + i, a + b);
                }
            }
            const int64_t kv_bytes = (int64_t)kv_heads * head_dim * es;
            memcpy(kc + slots[r] * kv_bytes, row + (int64_t)heads * head_dim * es, kv_bytes);
            memcpy(vc + slots[r] * kv_bytes, row + (int64_t)(heads + kv_heads) * head_dim * es, kv_bytes);
        }
        const int code = minicpm_paged_attention(xtype, qkv, qkv_n, kc, vc, num_blocks, tables, seqs, width, row_seq,
                                                 row_len, m, heads, kv_heads, head_dim, block_size, attn_scale, att);
        if (code != 0) return code;
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
