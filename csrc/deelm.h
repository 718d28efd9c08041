/* deelm C core: shared types and the functions each csrc/ file provides.
 *
 * Longer than the ~600 lines a file is held to, on purpose: this header is
 * the index of the core (every type, every function and its shapes, one
 * section per source file), and splitting it would scatter that index.
 *
 * Conventions used throughout:
 *  - A batch of sentences is "packed": the tokens of all sentences are laid
 *    end to end, with no padding. `seq_off[s] .. seq_off[s+1]` are the rows of
 *    sentence s, so a [N, d] activation holds N = seq_off[n_seq] token rows.
 *  - Matrices are row-major float32. A linear weight is [out, in] (one row per
 *    output feature, as GGUF stores it), so y = x W^T.
 *  - Functions return 0 on success and a negative DL_ERR_* code on failure;
 *    they never print and never abort.
 */
#ifndef DEELM_H
#define DEELM_H

#include <stddef.h>
#include <stdint.h>

/* A function built once per vector width and chosen at load time (an ifunc):
 * the baseline build is 4-wide SSE.
 * DL_FMA_CLONES: the same for loops written with __builtin_fmaf: the clones
 * run the fma instruction (512- or 256-bit), the baseline build calls fmaf;
 * all are exactly rounded, so they give the same bits.
 * A build with DL_ONE_CLONE / DL_ONE_FMA_CLONE defined (target strings), or
 * DL_BASELINE_CLONE, compiles that one clone only, whatever the CPU: that is
 * how tests/core/test_clones.py runs every clone on one machine (setup.py's
 * DEELM_ONE_CLONE=avx512f|avx2|default). */
#if defined(DL_ONE_CLONE)
#define DL_CLONES __attribute__((target(DL_ONE_CLONE)))
#define DL_FMA_CLONES __attribute__((target(DL_ONE_FMA_CLONE)))
#elif defined(DL_BASELINE_CLONE) || !(defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__))
#define DL_CLONES
#define DL_FMA_CLONES
#else
#define DL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define DL_FMA_CLONES __attribute__((target_clones("avx512f", "fma", "default")))
#endif

/* The most threads any entry point takes (a bound on OpenMP teams and on
 * per-thread scratch). */
#define DL_MAX_THREADS 1024

enum {
    DL_OK = 0,
    DL_ERR_NOMEM = -1,
    DL_ERR_VALUE = -2,
    DL_ERR_NONFINITE = -3, /* a layer's q/k/v or output overflowed to inf or NaN */
};

/* ---- tensor_types.c: GGML tensor encodings ------------------------------ */

/* The GGML type ids deelm decodes (values are the on-disk GGUF ids). */
enum {
    DL_TYPE_F32 = 0,
    DL_TYPE_F16 = 1,
    DL_TYPE_Q4_0 = 2,
    DL_TYPE_Q4_1 = 3,
    DL_TYPE_Q5_0 = 6,
    DL_TYPE_Q5_1 = 7,
    DL_TYPE_Q8_0 = 8,
    DL_TYPE_Q4_K = 12,
    DL_TYPE_Q5_K = 13,
    DL_TYPE_Q6_K = 14,
    DL_TYPE_BF16 = 30,
};

/* 1 if deelm can decode this type id. */
int dl_type_supported(int type);
/* Printable name of a type id ("Q4_1"), "unknown" otherwise. */
const char *dl_type_name(int type);
/* Elements per block (1 for plain float types), 0 if unsupported. */
int64_t dl_type_block_elems(int type);
/* Bytes per block, 0 if unsupported. */
int64_t dl_type_block_bytes(int type);
/* Bytes taken by one row of n_cols elements; -1 if n_cols is not a multiple
 * of the block size, the type is unsupported or the size overflows. */
int64_t dl_row_bytes(int type, int64_t n_cols);
/* Decodes n elements (a multiple of the block size) from src into dst.
 * Returns the number of non-finite decoded values (0 for a sound tensor). */
int64_t dl_dequantize(int type, const void *src, float *dst, int64_t n);
/* Block b (columns 32b..32b+31) of a row encoded in a type whose every 32
 * columns share one affine map, x[j] = d * (q[j] - zero) + m with q[j] an
 * unsigned byte: Q4_0, Q5_0 and Q8_0 (m = 0, zero = 8, 16, 128), Q4_1 and
 * Q5_1 (zero = 0), Q4_K and Q5_K (zero = 0, d = super-block scale x 6-bit
 * sub-block scale, m = -(super-block min x 6-bit sub-block min); both
 * products are exact in float32). Fills q[32], *d and *m; returns zero, or
 * -1 for types without this form (floats, Q6_K). */
int dl_block32(int type, const uint8_t *row, int64_t b, uint8_t q[32], float *d, float *m);
float dl_fp16_to_fp32(uint16_t h);

/* ---- fork.c ------------------------------------------------------------------ */

/* Registers a pthread_atfork handler that lets the forking thread's OpenMP team
 * go, so a forked child can run parallel passes (its copy of the team would
 * wait for workers that fork did not copy). Call once, at module load. */
int dl_fork_safety_install(void);

/* ---- cpu.c: instruction-set paths ----------------------------------------- */

/* The GEMM paths of qgemm.c and sgemm.c. All give bitwise identical results. */
enum {
    DL_ISA_SCALAR = 0,     /* portable C */
    DL_ISA_AVX2 = 1,       /* AVX2 + FMA: vpmaddubsw integer dots */
    DL_ISA_AVX512VNNI = 2, /* AVX-512 VNNI: vpdpbusd integer dots */
    DL_N_ISAS
};
/* Their names, indexed by DL_ISA_* ("scalar", "avx2", "avx512vnni"). */
extern const char *const dl_isa_names[DL_N_ISAS];
int dl_isa_supported(int isa);
int dl_isa_best(void);
const char *dl_isa_name(int isa);
int dl_isa_from_name(const char *name); /* -1 if unknown */
/* The CPU features a path needs, as its target attribute lists them (isa.h). */
const char *dl_isa_features(int isa);

enum { DL_PEAK_FP32 = 0, DL_PEAK_INT8 = 1, DL_PEAK_FP32_AVX2 = 2, DL_PEAK_INT8_AVX2 = 3 };
/* Measured peak of float32 FMA or int8 dot products (512-bit FMA and
 * vpdpbusd; 256-bit FMA and vpmaddubsw for the _AVX2 kinds), in G
 * operations/s (a multiply-add counts 2) over n_threads; 0 if this CPU lacks
 * the instructions. */
double dl_peak_gops(int kind, int n_threads, int64_t iters);

/* ---- qweight.c: linear weights packed for integer dot products ------------ */

#define DL_QBLOCK 32 /* weights and activations share a scale per 32 columns */
#define DL_QPANEL 16 /* output rows packed together: one 512-bit vector of int32 */

/* W[r, k] = d[r, b] * q[r, k] + m[r, b] for k in block b, with q an unsigned
 * byte. This holds exactly for the types dl_block32 reads (Q4_0, Q4_1, Q5_0,
 * Q5_1, Q8_0, Q4_K, Q5_K: m = -zero * d for the symmetric ones); float
 * weights and Q6_K (two scales per 32 columns) are rounded to 8 bits per
 * block.
 * Layout, panel p = rows 16p..16p+15, block b = columns 32b..32b+31:
 *   q: [n_panels, n_blocks, 8 groups of 4 columns, 16 rows, 4 columns]
 *      (one group of one panel is the 64-byte operand of one vpdpbusd)
 *   d, m: [n_panels, n_blocks, 16]
 * Rows past `rows` and columns past `cols` are zero. */
typedef struct {
    int64_t rows, cols;
    int64_t n_panels, n_blocks;
    int max_q;   /* largest q stored: <= 15 lets the AVX2 path skip a pass */
    uint8_t *q;
    float *d;
    float *m;
} dl_qmat;

int dl_qmat_alloc(dl_qmat *w, int64_t rows, int64_t cols);
/* Bytes dl_qmat_alloc takes for a [rows, cols] matrix. */
int64_t dl_qmat_bytes(int64_t rows, int64_t cols);
void dl_qmat_free(dl_qmat *w);
/* Packs n_rows rows of a GGUF-encoded matrix (type, cols = w->cols) into rows
 * row0.. of w. scratch: [cols] floats. Returns the number of non-finite
 * weights met (0 for a sound tensor) or a negative DL_ERR_* code. */
int64_t dl_qmat_pack_rows(dl_qmat *w, int64_t row0, int type, const void *src, int64_t n_rows,
                          float *scratch);
/* The float weights w represents, row r: out[cols]. */
void dl_qmat_row(const dl_qmat *w, int64_t r, float *out);

/* ---- sgemm.c: float32 weights and their GEMM ----------------------------- */

#define DL_FPANEL 16 /* output rows packed together: one 512-bit vector of floats */

/* A float32 [rows, cols] matrix in panels of 16 rows, panel p = rows
 * 16p..16p+15:  p: [n_panels, cols, 16]  (element (r, k) at
 * p[((r / 16) cols + k) 16 + r % 16]); rows past `rows` are zero. */
typedef struct {
    int64_t rows, cols, n_panels;
    float *p;
} dl_fmat;

int dl_fmat_alloc(dl_fmat *w, int64_t rows, int64_t cols);
/* Bytes dl_fmat_alloc takes for a [rows, cols] matrix; -1 on overflow. */
int64_t dl_fmat_bytes(int64_t rows, int64_t cols);
void dl_fmat_free(dl_fmat *w);
/* Rows row0 .. row0 + n_rows of w from src [n_rows, cols]. */
void dl_fmat_set_rows(dl_fmat *w, int64_t row0, const float *src, int64_t n_rows);
/* Column k of w from src [rows] (to pack a transposed matrix row by row). */
void dl_fmat_set_col(dl_fmat *w, int64_t k, const float *src);
/* Row r of w: out[cols]. */
void dl_fmat_row(const dl_fmat *w, int64_t r, float *out);
/* y[t, r] (=, or += when accumulate) sum_k x[t, k] W[r, k] for t < n,
 * r < w->rows; x: [n, w->cols], y has row stride ldy. Each output is one
 * chain of fmas over k in order, from zero, then added to y when
 * accumulating: bitwise the same on every isa, for any n and thread count. */
void dl_sgemm(float *y, int64_t ldy, const float *x, int64_t n, const dl_fmat *w, int accumulate,
              int isa, int n_threads);

/* ---- qactivation.c: activations as int8 blocks ---------------------------- */

/* x[t, k] ~ d[t, b] * q[t, k] + (the outliers of row t); s[t, b] is the exact
 * float sum of block b of row t without its outlier (for the m term of the
 * weights).  q: [rows, n_blocks * 32]; d, s: [rows, n_blocks].
 * A block's largest value is an outlier when it exceeds DL_OUTLIER_RATIO
 * times the block's next largest: it is then kept in float (out_k, out_v),
 * its q is 0, and the rest of the block is scaled without it.
 * n_out: [rows]; out_k, out_v: [rows, n_blocks], the first n_out[t] used. */
#ifndef DL_OUTLIER_RATIO /* >= 1; settable at build time so a test can vary it */
#define DL_OUTLIER_RATIO 4.0f
#endif
typedef struct {
    int64_t rows, n_blocks;
    int8_t *q;
    float *d;
    float *s;
    int32_t *n_out;
    int32_t *out_k;
    float *out_v;
} dl_qact;

int dl_qact_alloc(dl_qact *a, int64_t rows, int64_t max_cols);
/* Bytes dl_qact_alloc takes. */
int64_t dl_qact_bytes(int64_t rows, int64_t max_cols);
void dl_qact_free(dl_qact *a);
/* Quantizes x [n, cols] (n <= a->rows) into a, blocks of 32, round to
 * nearest, |q| <= 127; columns past cols are zero. Bitwise the same on
 * every isa. */
void dl_quantize_rows(dl_qact *a, const float *x, int64_t n, int64_t cols, int isa, int n_threads);

/* ---- qgemm.c -------------------------------------------------------------- */

/* y[t, r] (=, or += when accumulate) sum_b (w.d[r,b] x.d[t,b]) * dot_b(w.q[r], x.q[t])
 *                                          + w.m[r,b] x.s[t,b]
 * for t < n, r < w->rows, then y[t, r] += v W[r, k] for each outlier (k, v)
 * of row t in column order; y has row stride ldy. Each output is computed by
 * the same operations in the same order on every ISA path, for any n and
 * thread count, so results are bitwise reproducible. */
void dl_qgemm(float *y, int64_t ldy, const dl_qact *x, int64_t n, const dl_qmat *w,
              int accumulate, int isa, int n_threads);

/* ---- model.c: configuration and weights --------------------------------- */

typedef struct {
    int64_t n_layers;    /* L */
    int64_t dim;         /* d, residual width */
    int64_t hidden_dim;  /* f, SwiGLU inner width */
    int64_t n_heads;     /* query heads */
    int64_t n_kv_heads;  /* key/value heads (grouped-query attention) */
    int64_t head_dim;    /* hd */
    int64_t vocab_size;  /* V */
    float rms_eps;
    int rope_style;      /* DL_ROPE_* */
    /* Block features beyond LLaMA's (Gemma-3 has all of them). A LLaMA model
     * has embed_scale 1, attn_scale 1/sqrt(hd), DL_ACT_SILU and the flags 0,
     * and then computes exactly what it did before these fields existed. */
    float embed_scale;   /* token embeddings are multiplied by this (Gemma: sqrt(d)) */
    float attn_scale;    /* attention scores are q.k times this */
    int ffn_act;         /* DL_ACT_* of the gated feed-forward unit */
    int qk_norm;         /* 1: RMSNorm over hd on every q and k head, before RoPE */
    int post_norms;      /* 1: RMSNorm on the attention and the MLP outputs before
                            each residual add */
    int rope_local;      /* 1: layers with a sliding window rotate with their own
                            frequencies (dl_model.inv_freq_local) */
} dl_config;

/* The activation of the gated feed-forward unit h = act(gate) * up. */
enum {
    DL_ACT_SILU = 0,      /* SwiGLU: LLaMA, Mistral, Qwen2 */
    DL_ACT_GELU_TANH = 1, /* GeGLU with tanh-approximated GELU: Gemma */
};

/* How linear layers compute. */
enum {
    DL_PRECISION_F32 = 0,  /* weights decoded to float32 (dl_fmat): dl_sgemm */
    DL_PRECISION_INT8 = 1, /* weights packed (dl_qmat), activations int8: qgemm */
    DL_N_PRECISIONS
};
/* Their names, indexed by DL_PRECISION_* ("float32", "int8"). */
extern const char *const dl_precision_names[DL_N_PRECISIONS];
int dl_precision_from_name(const char *name); /* -1 if unknown */

/* One linear layer y = x W^T, W: [out, in], in the model's precision. */
typedef struct {
    int64_t out, in;
    dl_fmat f;   /* when DL_PRECISION_F32 (f.p != NULL) */
    dl_qmat q;   /* when DL_PRECISION_INT8 */
} dl_linear;

typedef struct {
    float *attn_norm;    /* [d] */
    dl_linear wqkv;      /* [(nh + 2 nkv) hd, d]: q, k, v projections stacked */
    float *bqkv;         /* [(nh + 2 nkv) hd] or NULL */
    dl_linear wo;        /* [d, nh hd] */
    float *ffn_norm;     /* [d] */
    dl_linear wgate_up;  /* [2 f, d]: gate rows then up rows */
    dl_linear wdown;     /* [d, f] */
    float *q_norm;       /* [hd] when cfg.qk_norm, else NULL */
    float *k_norm;       /* [hd] when cfg.qk_norm, else NULL */
    float *post_attn_norm; /* [d] when cfg.post_norms, else NULL */
    float *post_ffn_norm;  /* [d] when cfg.post_norms, else NULL */
    int64_t window;      /* sliding window (dl_attn_spec), 0 for none */
} dl_layer;

typedef struct {
    dl_config cfg;
    /* The token embedding table stays in its file encoding; rows are decoded
     * on lookup. Its bytes belong to the caller and must outlive the model. */
    const uint8_t *tok_embd; /* [V rows of tok_embd_row_bytes] */
    int tok_embd_type;
    int64_t tok_embd_row_bytes;
    float *output_norm;      /* [d] */
    float *inv_freq;         /* [hd / 2] rotary frequencies */
    float *inv_freq_local;   /* [hd / 2] those of layers with a window, when cfg.rope_local */
    dl_layer *layers;        /* [L] */
    int precision;           /* DL_PRECISION_* */
    int isa;                 /* DL_ISA_* path of the int8 GEMM */
    const struct dl_lora *lora; /* LoRA adapters added to the linear layers, or NULL */
    int64_t owned_bytes;     /* what dl_model_alloc allocated */
} dl_model;

/* Allocates the model's owned arrays (all zero) for cfg, the linear layers in
 * the given precision, q/k/v biases when the file has them (qkv_bias; a
 * layer without them keeps zeros); NULL on no memory. */
dl_model *dl_model_alloc(const dl_config *cfg, int precision, int isa, int qkv_bias);
/* Bytes dl_model_alloc takes: the same walk over the layout, counting (the
 * structs included). The token embedding table is not counted: it stays in
 * the caller's mapped file. */
int64_t dl_model_bytes(const dl_config *cfg, int precision, int qkv_bias);
void dl_model_free(dl_model *m);
/* Width of the fused q|k|v projection output. */
int64_t dl_qkv_dim(const dl_config *cfg);

/* ---- rmsnorm.c ---------------------------------------------------------- */

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, for rows t in [0, n).
 * x, out: [n, d]; w: [d]. out may alias x. */
void dl_rmsnorm_forward(float *out, const float *x, const float *w,
                        int64_t n, int64_t d, float eps);
/* dx[t] += d out[t] / d x[t] applied to dout[t] (w is frozen: no dw).
 * dx, dout, x: [n, d]. Row-parallel over n_threads. */
void dl_rmsnorm_backward(float *dx, const float *dout, const float *x, const float *w,
                         int64_t n, int64_t d, float eps, int n_threads);
/* One row of it, for c * dout. */
void dl_rmsnorm_backward_row(float *dx, const float *dout, float c, const float *x,
                             const float *w, int64_t d, float eps);
/* y[t] += rmsnorm(x[t]) * w, for rows t in [0, n): a normed branch added to
 * the residual stream (Gemma's post-norms). x, y: [n, d]. */
void dl_rmsnorm_add_forward(float *y, const float *x, const float *w, int64_t n, int64_t d,
                            float eps);

/* ---- rope.c -------------------------------------------------------------- */

enum {
    DL_ROPE_INTERLEAVED = 0, /* pairs (2j, 2j+1): GGUF files of LLaMA models */
    DL_ROPE_HALF = 1,        /* pairs (j, j + hd/2): Hugging Face checkpoints */
};

/* cs[p, j] = (cos, sin) of p * inv_freq[j].  cs: [n_pos, half, 2]. */
void dl_rope_table(float *cs, int64_t n_pos, int64_t half, const float *inv_freq);
/* Rotates, in place, n_heads vectors of head_dim in each of the n rows of x,
 * row t at position pos[t] (< the table's n_pos). Row stride is `stride` floats.
 * x: [n, stride], the heads at x[t*stride + h*hd]; cs from dl_rope_table. */
void dl_rope_forward(float *x, int64_t n, int64_t stride, int64_t n_heads,
                     int64_t head_dim, const int32_t *pos, const float *cs, int style);
/* The rotation is orthogonal, so its backward rotates the gradient dx (laid
 * out like x, in place) by the opposite angle. */
void dl_rope_backward(float *dx, int64_t n, int64_t stride, int64_t n_heads,
                      int64_t head_dim, const int32_t *pos, const float *cs, int style);

/* ---- attention.c --------------------------------------------------------- */

/* Which keys each query sees, and the score scale. Query i of a sentence
 * attends to key j of the same sentence when
 *   causal:         j <= i, and i - j < window when window > 0;
 *   bidirectional:  any j,  and |i - j| < window when window > 0.
 * The bidirectional window is the causal one mirrored (window - 1 neighbours
 * on each side), which is also what transformers' Gemma-3 does with
 * use_bidirectional_attention, up to its choice of window size. */
typedef struct {
    float scale;    /* scores are q.k * scale */
    int causal;
    int64_t window; /* 0: the whole sentence */
} dl_attn_spec;

/* Bytes of the scratch dl_attention_forward allocates (one per thread). */
int64_t dl_attention_bytes(int64_t max_len, int64_t head_dim, int n_threads);
/* Scaled dot-product attention per sentence and head, grouped-query.
 * qkv: [N, qkv_stride] rows holding q (nh hd) then k (nkv hd) then v (nkv hd);
 * out: [N, nh hd]. Keys as `spec` says, never across sentences.
 * Parallel over (sentence, head) with n_threads; returns DL_ERR_NOMEM if the
 * per-thread score buffers cannot be allocated. */
int dl_attention_forward(float *out, const float *qkv, int64_t qkv_stride,
                         const int64_t *seq_off, int64_t n_seq,
                         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                         dl_attn_spec spec, int n_threads);
/* Gradients of dl_attention_forward: given its input qkv (q and k already
 * rotated) and dout [N, nh hd], writes dqkv [N, qkv_stride] (dq, dk, dv in
 * the layout of qkv). Parallel over (sentence, key/value head), so the
 * query heads sharing a k/v head add their dk, dv in a fixed order. */
int dl_attention_backward(float *dqkv, const float *dout, const float *qkv, int64_t qkv_stride,
                          const int64_t *seq_off, int64_t n_seq,
                          int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                          dl_attn_spec spec, int n_threads);

/* ---- glu.c: the gated feed-forward activation ------------------------------ */

/* out[t, j] = act(gu[t, j]) * gu[t, f + j] for act = DL_ACT_SILU (SwiGLU) or
 * DL_ACT_GELU_TANH (GeGLU).  gu: [n, 2f]; out: [n, f]. */
void dl_glu_forward(int act, float *out, const float *gu, int64_t n, int64_t f, int n_threads);
/* dgu [n, 2f] (written) from dout [n, f] and the forward input gu. */
void dl_glu_backward(int act, float *dgu, const float *dout, const float *gu, int64_t n, int64_t f,
                     int n_threads);

/* ---- linear.c ------------------------------------------------------------ */

/* y (=, or += when accumulate) x W^T in W's precision, all tokens of the
 * batch in one GEMM. x: [n, W.in]; y: [n, W.out]. qx: scratch for the int8
 * copy of x (rows >= n, cols >= in). */
void dl_linear_forward(const dl_linear *w, float *y, const float *x, int64_t n, int accumulate,
                       dl_qact *qx, int isa, int n_threads);
/* dx = dy W, with wt = W^T packed ([in, out], from dl_dense_weights_build).
 * dy: [n, out]; dx: [n, in]. Same order guarantee as dl_sgemm. */
void dl_linear_backward(float *dx, const float *dy, const dl_fmat *wt, int64_t n, int isa,
                        int n_threads);
/* Row r of W as float32: out[W.in]. */
void dl_linear_row(const dl_linear *w, int64_t r, float *out);

/* ---- pooling.c ----------------------------------------------------------- */

/* out[s] = mean over t in [pool[2s], pool[2s+1]) of rmsnorm(x[seq_off[s] + t]).
 * x: [N, d]; pool: [n_seq, 2] token ranges relative to each sentence;
 * out: [n_seq, d]. scratch: [d]. */
void dl_pool_forward(float *out, const float *x, const int64_t *seq_off,
                     const int64_t *pool, int64_t n_seq, const float *norm_w,
                     int64_t d, float eps, float *scratch);
/* dx[rows of sentence s] += the gradient of out[s] (dout [n_seq, d]) through
 * the mean and the final norm. dx, x: [N, d]. */
void dl_pool_backward(float *dx, const float *dout, const float *x, const int64_t *seq_off,
                      const int64_t *pool, int64_t n_seq, const float *norm_w, int64_t d,
                      float eps, int n_threads);

/* ---- lora.c -------------------------------------------------------------- */

/* The projections a LoRA adapter can target, in PEFT's names. */
enum {
    DL_MOD_Q, DL_MOD_K, DL_MOD_V, DL_MOD_O, DL_MOD_GATE, DL_MOD_UP, DL_MOD_DOWN, DL_N_MODULES
};
/* The fused linear layers of dl_layer the modules live in. */
enum { DL_FUSED_QKV, DL_FUSED_O, DL_FUSED_GATE_UP, DL_FUSED_DOWN, DL_N_FUSED };

#define DL_LORA_MAX_RANK 256

/* One adapted projection: W' = W + scale B A, A: [rank, in], B: [out, rank],
 * both inside the flat parameter buffer at off_a, off_b (in floats). */
typedef struct {
    int64_t layer, module, rank, in, out, off_a, off_b;
    float scale;
} dl_lora_entry;

typedef struct dl_lora {
    int64_t n_entries;
    const dl_lora_entry *entries; /* sorted by (layer, module) */
    const float *params;          /* all A and B matrices; owned by the caller */
    const int32_t *slot;          /* [L, DL_N_MODULES] entry index, or -1 */
    int64_t max_rank;
} dl_lora;

/* Which fused layer a module belongs to and its first output row there
 * (schema.c). */
int dl_module_fused(int module);
int64_t dl_module_row0(const dl_config *c, int module);

/* Dropout of a LoRA input, as a function of its coordinates: the same mask in
 * the forward and the backward pass without storing it. p = 0: no dropout. */
typedef struct {
    float p;
    uint64_t seed;
} dl_dropout;

/* For each adapted module of (layer, fused): y[:, row0 + o] += scale (drop(x) A^T B^T).
 * y: [n, ldy]; x: [n, in]. t_save: [n, rank] per entry, in module order,
 * receives drop(x) A^T for the backward (or NULL). scratch: dl_lora_scratch_floats. */
void dl_lora_forward(const dl_lora *lo, const dl_config *c, int64_t layer, int fused, float *y,
                     int64_t ldy, const float *x, int64_t n, float *t_save, dl_dropout drop,
                     float *scratch, int n_threads);
/* Backward of dl_lora_forward: grad (same layout as params) += dA, dB;
 * dx[n, in] += the LoRA path's input gradient. dy: [n, ldy]. */
void dl_lora_backward(const dl_lora *lo, const dl_config *c, int64_t layer, int fused,
                      float *grad, float *dx, const float *dy, int64_t ldy, const float *x,
                      int64_t n, const float *t_save, dl_dropout drop, float *scratch,
                      int n_threads);
/* Floats of the scratch dl_lora_forward and dl_lora_backward take for n rows
 * whose widest input is `widest`, with adapters of rank <= max_rank:
 * [n, max(widest, max_rank)] rows, then B^T. */
int64_t dl_lora_scratch_floats(const dl_config *c, int64_t n, int64_t widest, int64_t max_rank);
/* Floats of t_save one layer's fused layer needs for n rows. */
int64_t dl_lora_save_size(const dl_lora *lo, int64_t layer, int fused, int64_t n);

/* ---- schema.c: what a layer is made of ----------------------------------- */

/* The widths a tensor dimension can have, in terms of the config. */
enum { DL_W_ONE, DL_W_D, DL_W_F, DL_W_HD, DL_W_DQ, DL_W_DKV, DL_W_VOCAB, DL_N_WIDTHS };
int64_t dl_width(const dl_config *c, int w);
const char *dl_width_name(int w); /* "d", "dq", ... */

/* Which config a tensor belongs to: every model, cfg.qk_norm, cfg.post_norms,
 * or files with q/k/v biases (optional per tensor; an absent one is zero). */
enum { DL_FEAT_BASE, DL_FEAT_QK_NORM, DL_FEAT_POST_NORMS, DL_FEAT_QKV_BIAS };
int dl_feature_on(const dl_config *c, int feature, int qkv_bias);

/* A projection: its PEFT and file names, input and output widths (DL_W_*)
 * and the fused linear layer it lives in, rows stacked in module order. */
typedef struct {
    const char *peft, *tensor;
    int in, out;
    int fused;
} dl_module_spec;
extern const dl_module_spec dl_modules[DL_N_MODULES];
/* offsetof(dl_layer, the dl_linear of each DL_FUSED_*) */
extern const size_t dl_fused_field[DL_N_FUSED];
int64_t dl_fused_rows(const dl_config *c, int fused);
int64_t dl_fused_cols(const dl_config *c, int fused);

/* One tensor of a layer, blk.N.<name>: a projection (module >= 0, feature
 * DL_FEAT_BASE: shape [out, in] of the module, rows row0.. of its fused
 * layer), a vector (module < 0: [width], the float * at `field` of dl_layer)
 * or a bias (module >= 0, DL_FEAT_QKV_BIAS: [out], at row0 of bqkv). */
typedef struct {
    const char *name; /* NULL for a projection: the module's tensor name */
    int feature;
    int width;
    int module;
    size_t field;
} dl_tensor_spec;
#define DL_N_LAYER_TENSORS 16
extern const dl_tensor_spec dl_layer_tensors[DL_N_LAYER_TENSORS];
const char *dl_tensor_name(const dl_tensor_spec *t);
/* GGUF's order: cols (ne0) then rows (ne1); a vector has one row. */
void dl_tensor_shape(const dl_config *c, const dl_tensor_spec *t, int64_t *cols, int64_t *rows);

/* ---- forward.c ----------------------------------------------------------- */

typedef struct {
    const int32_t *tokens;  /* [N] token ids */
    const int64_t *seq_off; /* [n_seq + 1], seq_off[0] = 0, seq_off[n_seq] = N */
    int64_t n_seq;
    const int64_t *pool;    /* [n_seq, 2] pooled token range of each sentence */
    int64_t bidirectional_from; /* layers with index >= this attend both ways; -1: none */
    int n_threads;
    /* outputs; any may be NULL except pooled */
    float *pooled;        /* [n_seq, d] final-layer pooled embedding */
    float *layer_pooled;  /* [L + 1, n_seq, d] pooled, final norm applied, after
                             the embedding (0) and after every layer (1..L) */
    float *hidden;        /* [L + 1, N, d] raw residual stream, same indexing */
    float *token_out;     /* [N, d] final-norm token states */
    double *op_seconds;   /* [DL_N_OPS] wall time per kind of op, added to; or NULL */
    float *residual_out;  /* when set: run layers [0, stop_at) only, write the residual */
    int64_t stop_at;      /* stream there [N, d] (pooled may then be NULL) */
} dl_forward_args;

/* The kinds of op the forward pass times (op_seconds indices). */
enum {
    DL_OP_QKV, DL_OP_ATTN_OUT, DL_OP_GATE_UP, DL_OP_DOWN, /* linear layers */
    DL_OP_ATTENTION, DL_OP_RMSNORM, DL_OP_ROPE, DL_OP_GLU, DL_OP_EMBED_POOL, DL_N_OPS
};
/* Their names, indexed by DL_OP_* (forward.c; tests/core/test_names.py holds the
 * table to the enum). */
extern const char *const dl_op_names[DL_N_OPS];

/* Runs the model over one packed batch. Inputs must have been validated
 * (token ids < V, offsets increasing, ranges inside their sentence). */
int dl_model_forward(const dl_model *m, const dl_forward_args *a);

/* What all layers of one batch share. */
typedef struct {
    const int64_t *seq_off;
    int64_t n_seq;
    int64_t n_rows;     /* N tokens */
    int32_t *pos;       /* [N] position of each token in its sentence */
    float *rope_cs;     /* [max_len, hd/2, 2] */
    float *rope_cs_local; /* [max_len, hd/2, 2] from inv_freq_local, when cfg.rope_local */
    dl_qact qx;         /* int8 copy of a GEMM input */
    float *scratch;     /* LoRA scratch [R, widest input], when the model has LoRA */
    dl_dropout drop;    /* LoRA dropout (training), p = 0 otherwise */
    int n_threads;
    double *op_seconds; /* timing, or NULL */
    double clock;
} dl_batch;

int dl_batch_init(dl_batch *b, const dl_model *m, const int64_t *seq_off, int64_t n_seq,
                  int n_threads);
/* Bytes dl_model_forward allocates at most for a batch of n_rows tokens whose
 * longest sentence has max_len: the batch context, one set of layer
 * activations and the attention's per-thread scratch (not the caller's
 * output arrays). lora_rank: the largest rank of
 * the applied LoRA adapters, 0 for none. */
int64_t dl_forward_bytes(const dl_config *c, int precision, int64_t lora_rank, int64_t n_rows,
                         int64_t max_len, int n_threads);
void dl_batch_free(dl_batch *b);

/* The activations of one layer, [R, ...] each. Inference reuses one set for
 * every layer, the residual updated in place (x_in == x_mid == x_out,
 * xb1 == xb2, ao == fo, no qk_raw); training keeps every trained layer's own
 * for the backward. */
typedef struct {
    float *x_in, *x_mid, *x_out; /* [R, d] residual before, after attention, after the MLP */
    float *xb1, *xb2;            /* [R, d] normed inputs of the attention and the MLP */
    float *qkv;                  /* [R, qkv] q, k normed (qk_norm) and rotated */
    float *qk_raw;               /* [R, (nh + nkv) hd] q, k before their norm (training,
                                    qk_norm), else NULL */
    float *att;                  /* [R, nh hd] attention output */
    float *ao, *fo;              /* [R, d] attention and MLP outputs before their post-norm
                                    (post_norms), else NULL */
    float *gu;                   /* [R, 2f] */
    float *h;                    /* [R, f] */
    float *lora_t[DL_N_FUSED];   /* LoRA's drop(x) A^T per fused layer (training), or NULL */
} dl_layer_acts;

/* Floats one set of activations takes, and how it is laid out in them. */
int64_t dl_layer_acts_floats(const dl_config *c, int64_t R, int separate_residuals);
void dl_layer_acts_carve(dl_layer_acts *a, const dl_config *c, int64_t R, float *mem,
                         int separate_residuals);
/* The rotary table layer l uses in batch b. */
const float *dl_layer_rope(const dl_model *m, int64_t l, const dl_batch *b);
/* Layer l on a->x_in, writing the rest of a. DL_ERR_NONFINITE when its q/k/v
 * or its output holds inf or NaN (attention would otherwise turn an inf key
 * into finite garbage: an overflowing weight or adapter must not pass
 * silently). */
int dl_layer_forward(const dl_model *m, int64_t l, int causal, const dl_layer_acts *a,
                     dl_batch *b);

/* ---- train.c ------------------------------------------------------------- */

/* The frozen linear weights of layers >= layer_from, transposed and packed
 * (W^T as a dl_fmat [in, out]) for the backward's dx = dy W.
 * wt: [L, DL_N_FUSED], empty (p == NULL) below layer_from. */
typedef struct {
    int64_t n_layers, layer_from;
    dl_fmat *wt;
} dl_dense_weights;

int dl_dense_weights_build(dl_dense_weights *dw, const dl_model *m, int64_t layer_from);
void dl_dense_weights_free(dl_dense_weights *dw);

typedef struct {
    const float *x_in;          /* [N, d] residual entering layer layer_from */
    const int64_t *seq_off;     /* [n_seq + 1] */
    int64_t n_seq;
    const int64_t *pool;        /* [n_seq, 2] */
    int64_t layer_from;         /* first trained layer, < L */
    int64_t bidirectional_from; /* -1: causal */
    dl_dropout drop;
    int n_threads;
    float *pooled;              /* out: [n_seq, d] */
} dl_train_args;

/* What the backward needs of one training forward pass. */
typedef struct {
    int64_t layer_from, n_trained, bidirectional_from, n_seq;
    int64_t *seq_off, *pool;
    dl_dropout drop;
    dl_batch batch;
    dl_layer_acts *acts;  /* [n_trained] */
    float *arena;         /* the activations */
    float *lora_arena;    /* LoRA's saved drop(x) A^T */
    float *grad_arena;    /* the backward's gradient buffers */
} dl_train_state;

/* Runs layers [layer_from, L) keeping their activations; *out receives the
 * state dl_train_backward needs (free with dl_train_state_free). */
int dl_train_forward(const dl_model *m, const dl_train_args *a, dl_train_state **out);
/* grad (laid out like the LoRA parameters) += dL/dparams for dL/dpooled =
 * d_pooled [n_seq, d]; dx_in [N, d] receives dL/dx_in when not NULL. */
int dl_train_backward(const dl_model *m, const dl_dense_weights *dw, dl_train_state *st,
                      const float *d_pooled, float *grad, float *dx_in);
void dl_train_state_free(dl_train_state *st);

#endif
