/* The native kernels' one interface: every exported function, every struct passed across the
 * boundary, every constant both sides need, and the codes the kernels refuse arguments with.
 *
 * Every .c file in this directory includes it; minicpm/engine/cpu_kernels.py declares the same
 * functions (one table, _SIGNATURES) and, at load, refuses a library whose minicpm_abi_version()
 * or minicpm_struct_size() differ from what it declares. Change a prototype, a struct or a
 * constant here and bump MINICPM_ABI_VERSION (and cpu_kernels.ABI_VERSION) with it.
 */
#ifndef MINICPM_H
#define MINICPM_H

#include <stdint.h>

#define MINICPM_ABI_VERSION 7

#define MINICPM_PANEL 32    /* output columns per packed weight panel (linear.c) */
#define MINICPM_MAX_PARTS 3 /* weights stacked by output in one of the fused decoder's linears */
#define MINICPM_MAX_HEAD_DIM 512 /* the fused decoder's rotary buffer */

/* How a layer of the KV cache is stored (kvkind): in the activations' own dtype, or quantized in
 * groups of MINICPM_KV_GROUP values along head_dim (int4's values: MINICPM_KV_VALUE_GROUP where
 * head_dim is a multiple of it; numeric.h's kv_group) with float16 scales beside the codes
 * (minicpm/engine/attention/kv_format.py is the reference):
 *   INT8: codes (slots, kv_heads, head_dim) int8, x = code * scale; scales (slots, kv_heads,
 *         head_dim / 32) float16
 *   INT4: codes (slots, kv_heads, head_dim / 2) bytes, in each run of 32 values byte j holds value j
 *         (low nibble) and value j + 16 (high nibble), x = code * scale + min; scales (slots,
 *         kv_heads, head_dim / group, 2) float16: (scale, min) */
enum { MINICPM_KV_PLAIN = 0, MINICPM_KV_INT8 = 1, MINICPM_KV_INT4 = 2 };
#define MINICPM_KV_GROUP 32
#define MINICPM_KV_VALUE_GROUP 64

/* What a kernel returns for arguments it refuses (0: done). Each is checked before any write. */
enum {
    MINICPM_BAD_GROUP = -1,     /* more than 64 query heads per kv head */
    MINICPM_BAD_DTYPE = -2,     /* a dtype not built here */
    MINICPM_NO_MEMORY = -3,     /* out of memory for the kernel's scratch */
    MINICPM_BAD_ROW_SEQ = -4,   /* a row_seq entry is not a row of the block tables */
    MINICPM_BAD_ROW_LEN = -5,   /* a row length below 1 or beyond the table width times block_size */
    MINICPM_BAD_BLOCK = -6,     /* a block id outside the cache */
    MINICPM_BAD_HEAD_DIM = -7,  /* head_dim not a multiple of 64 (prefill), odd or too large (decode) */
    MINICPM_BAD_SLOT = -8,      /* a new token's slot outside the cache */
    MINICPM_SMALL_BUFFER = -9,  /* a work or scratch buffer smaller than the kernel needs */
    MINICPM_BAD_LAYER = -10,    /* a layer's linear with no parts, too many, or outside its output */
    MINICPM_BAD_SHAPE = -11,    /* a size below 1, or a cache layer smaller than its blocks */
    MINICPM_BAD_KV = -12,       /* a KV kind not known, no scales, or head_dim not a multiple of 32 */
};

/* one linear layer of the fused decoder: up to MINICPM_MAX_PARTS weights stacked by output, part p
 * writing columns [offset[p], offset[p] + n[p]) */
typedef struct {
    int parts;
    int wtype[MINICPM_MAX_PARTS], group[MINICPM_MAX_PARTS], n[MINICPM_MAX_PARTS], offset[MINICPM_MAX_PARTS];
    const void *packed[MINICPM_MAX_PARTS];
    const float *scales[MINICPM_MAX_PARTS], *mins[MINICPM_MAX_PARTS];
} minicpm_linear_t;

/* one decoder layer: its two norms' weights (activation dtype, hidden) and its four linears */
typedef struct {
    const void *norm1, *norm2;
    minicpm_linear_t qkv, o, gate_up, down;
} minicpm_layer_t;

/* the structs minicpm_struct_size() measures */
enum { MINICPM_STRUCT_LINEAR = 0, MINICPM_STRUCT_LAYER = 1 };

/* the interface's identity (abi.c) */
int minicpm_abi_version(void);
int64_t minicpm_struct_size(int which); /* sizeof one of the structs above, -1 for an unknown one */
int minicpm_constant(int which);         /* 0 MINICPM_PANEL, 1 MINICPM_MAX_PARTS, 2 MINICPM_MAX_HEAD_DIM; -1 else */

/* linear.c */
void minicpm_linear(int wtype, int xtype, const void *x, int64_t x_stride, const void *packed, const float *scales,
                    const float *mins, int group, int m, int n, int k, void *y, int64_t y_stride, float *scratch,
                    int prefill);
void minicpm_pack_int4_panels(const uint8_t *q, const void *scales, const void *mins, int n, int k, int group,
                              int wtype, uint8_t *out);
int minicpm_gguf_decode(int kind, const uint8_t *blocks, int64_t count, void *codes, float *scales, float *mins);

/* paged_attention.c */
int minicpm_paged_attention(int dtype, const void *q, int64_t q_stride, const void *kc, const void *vc,
                            int kvkind, const uint16_t *ks, const uint16_t *vs, int64_t num_blocks, const int32_t *tables, int seqs, int width, const int32_t *row_seq,
                            const int32_t *row_len, int rows, int heads, int kv_heads, int head_dim, int block_size,
                            float scale, void *out);
int minicpm_paged_prefill_available(int dtype);
int minicpm_paged_prefill(int dtype, const void *q, int64_t q_stride, const void *kc, const void *vc,
                          int kvkind, const uint16_t *ks, const uint16_t *vs, int64_t num_blocks, const int32_t *table, int width, int past, int m, int heads,
                          int kv_heads, int head_dim, int block_size, float scale, void *out);
/* 0 where every row's sequence, length and the block ids it reads are inside the tables and the
 * cache, else the refusal code (what minicpm_paged_attention checks first) */
int minicpm_check_rows(int64_t num_blocks, const int32_t *tables, int seqs, int width, const int32_t *row_seq,
                       const int32_t *row_len, int rows, int block_size);

/* kv_quant.c */
/* rows (rows x kv_heads of head_dim values, activation dtype, row stride x_stride elements) of
 * keys, or of values (``value``: their groups, kv_group), quantized into codes and scales at row
 * index slot[r] * kv_heads + h, exactly as kv_format.py's quantize does; every slot checked
 * against num_slots first. Returns 0, MINICPM_BAD_KV,
 * MINICPM_BAD_SHAPE or MINICPM_BAD_SLOT (nothing written). */
int minicpm_kv_quantize(int xtype, int kvkind, int value, const void *x, int64_t x_stride, int rows, int kv_heads,
                        int head_dim, const int64_t *slots, int64_t num_slots, void *codes, uint16_t *scales);

/* decode.c */
/* the bytes of the work (activation dtype) and scratch (float32) buffers minicpm_decode_layers
 * needs for m rows, into sizes[0] and sizes[1] */
void minicpm_decode_buffer_bytes(int xtype, int m, int hidden, int heads, int kv_heads, int head_dim, int inter,
                                 int64_t sizes[2]);
int minicpm_decode_layers(int xtype, int m, int n_layers, const minicpm_layer_t *layers, void *h, const float *cos,
                          const float *sin_signed, const int64_t *slots, void *k_cache, void *v_cache,
                          int64_t layer_bytes, int kvkind, uint16_t *k_scale, uint16_t *v_scale,
                          int64_t k_scale_layer_stride, int64_t v_scale_layer_stride, int rotate, int64_t num_blocks,
                          const int32_t *tables, int seqs, int width, const int32_t *row_seq, const int32_t *row_len, int block_size, int hidden,
                          int heads, int kv_heads, int head_dim, int inter, float eps, float residual_scale,
                          float attn_scale, void *work, int64_t work_bytes, float *scratch, int64_t scratch_bytes);

#endif
