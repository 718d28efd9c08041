/* The encoder forward pass over one packed batch (no vocabulary head).
 *
 * Per layer l (x is the [N, d] residual stream):
 *   xb  = rmsnorm(x) ; qkv = xb Wqkv^T ; rope(q, k) ; a = attention(qkv)
 *   x  += a Wo^T
 *   xb  = rmsnorm(x) ; gu = xb Wgu^T ; h = silu(g) * u
 *   x  += h Wdown^T
 * Attention in layer l is bidirectional when l >= bidirectional_from >= 0. */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "deelm.h"

/* OpenBLAS takes other code paths (GEMV, small-matrix kernels) for GEMMs with
 * very few rows, which round differently: a one-token sentence alone would
 * then not match the same sentence inside a batch. In float32 precision every
 * GEMM therefore runs on at least this many rows, the rows past N being zeros
 * that stay zero (rmsnorm, attention and SwiGLU of a zero row are never
 * computed or are 0). The int8 GEMM computes each row alike whatever the
 * number of rows and needs no padding. */
#define MIN_GEMM_ROWS 32

typedef struct { /* activations of one call, sized for N tokens */
    float *x;    /* [N, d] */
    float *xb;   /* [N, d] */
    float *qkv;  /* [N, qkv] */
    float *att;  /* [N, nh hd] */
    float *gu;   /* [N, 2f] */
    float *h;    /* [N, f] */
    int32_t *pos;/* [N] position of each token inside its sentence */
    float *scratch; /* [d] */
    float *rope_cs; /* [max_len, hd/2, 2] */
    dl_qact qx;     /* int8 copy of a GEMM input: [N, max(d, nh hd, f)] */
} run_state;

static void run_state_free(run_state *r) {
    free(r->x); free(r->xb); free(r->qkv); free(r->att);
    free(r->gu); free(r->h); free(r->pos); free(r->scratch); free(r->rope_cs);
    dl_qact_free(&r->qx);
}

static int run_state_alloc(run_state *r, const dl_config *c, int64_t n, int64_t max_len,
                           int precision) {
    memset(r, 0, sizeof *r);
    const size_t N = (size_t)n;
    /* zeroed: the padding rows must be 0 */
    r->x = calloc(N * c->dim, sizeof(float));
    r->xb = calloc(N * c->dim, sizeof(float));
    r->qkv = calloc(N * dl_qkv_dim(c), sizeof(float));
    r->att = calloc(N * c->n_heads * c->head_dim, sizeof(float));
    r->gu = calloc(N * 2 * c->hidden_dim, sizeof(float));
    r->h = calloc(N * c->hidden_dim, sizeof(float));
    r->pos = malloc(N * sizeof(int32_t));
    r->scratch = malloc(c->dim * sizeof(float));
    r->rope_cs = malloc((size_t)(max_len > 0 ? max_len : 1) * c->head_dim * sizeof(float));
    int64_t widest = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    if (c->n_heads * c->head_dim > widest) widest = c->n_heads * c->head_dim;
    int qerr = precision == DL_PRECISION_INT8 ? dl_qact_alloc(&r->qx, n, widest) : DL_OK;
    if (qerr || !r->rope_cs || !r->x || !r->xb || !r->qkv || !r->att || !r->gu || !r->h || !r->pos ||
        !r->scratch) {
        run_state_free(r);
        return DL_ERR_NOMEM;
    }
    return DL_OK;
}

static void embed_tokens(const dl_model *m, const int32_t *tokens, int64_t n, float *x, int nt) {
    const int64_t d = m->cfg.dim;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n; t++)
        dl_dequantize(m->tok_embd_type, m->tok_embd + (int64_t)tokens[t] * m->tok_embd_row_bytes,
                      x + t * d, d);
}

/* Row-parallel forms of the per-token ops. */
static void rmsnorm_rows(float *out, const float *x, const float *w, int64_t n, int64_t d,
                         float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n; t++) dl_rmsnorm_forward(out + t * d, x + t * d, w, 1, d, eps);
}

static void rope_rows(float *qkv, int64_t n, int64_t stride, const dl_config *c,
                      const int32_t *pos, const float *cs, int nt) {
    /* q and k heads are contiguous in the row: rotate nh + nkv heads */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n; t++)
        dl_rope_forward(qkv + t * stride, 1, stride, c->n_heads + c->n_kv_heads, c->head_dim,
                        pos + t, cs, c->rope_style);
}

static void record(const dl_model *m, const dl_forward_args *a, int64_t slot, const float *x,
                   int64_t n, float *scratch) {
    const int64_t d = m->cfg.dim;
    if (a->hidden) memcpy(a->hidden + slot * n * d, x, (size_t)(n * d) * sizeof(float));
    if (a->layer_pooled)
        dl_pool_forward(a->layer_pooled + slot * a->n_seq * d, x, a->seq_off, a->pool, a->n_seq,
                        m->output_norm, d, m->cfg.rms_eps, scratch);
}

/* Adds the time since *t to op_seconds[op] (when timing) and restarts *t. */
static void lap(const dl_forward_args *a, int op, double *t) {
    if (!a->op_seconds) return;
    const double now = omp_get_wtime();
    a->op_seconds[op] += now - *t;
    *t = now;
}

int dl_model_forward(const dl_model *m, const dl_forward_args *a) {
    const dl_config *c = &m->cfg;
    const int64_t N = a->seq_off[a->n_seq], d = c->dim, f = c->hidden_dim;
    const int64_t qkv = dl_qkv_dim(c);
    const int nt = a->n_threads > 0 ? a->n_threads : 1;
    int64_t max_len = 0;
    for (int64_t s = 0; s < a->n_seq; s++)
        if (a->seq_off[s + 1] - a->seq_off[s] > max_len) max_len = a->seq_off[s + 1] - a->seq_off[s];
    /* rows of every GEMM */
    const int64_t R = m->precision == DL_PRECISION_F32 && N < MIN_GEMM_ROWS ? MIN_GEMM_ROWS : N;
    double clock = a->op_seconds ? omp_get_wtime() : 0.0;
    run_state r;
    int err = run_state_alloc(&r, c, R, max_len, m->precision);
    if (err) return err;
    dl_rope_table(r.rope_cs, max_len, c->head_dim / 2, m->inv_freq);

    for (int64_t s = 0; s < a->n_seq; s++)
        for (int64_t t = a->seq_off[s]; t < a->seq_off[s + 1]; t++)
            r.pos[t] = (int32_t)(t - a->seq_off[s]);
    embed_tokens(m, a->tokens, N, r.x, nt);
    record(m, a, 0, r.x, N, r.scratch);
    lap(a, DL_OP_EMBED_POOL, &clock);

    for (int64_t l = 0; l < c->n_layers; l++) {
        const dl_layer *ly = &m->layers[l];
        const int causal = !(a->bidirectional_from >= 0 && l >= a->bidirectional_from);

        rmsnorm_rows(r.xb, r.x, ly->attn_norm, N, d, c->rms_eps, nt);
        lap(a, DL_OP_RMSNORM, &clock);
        dl_linear_forward(&ly->wqkv, r.qkv, r.xb, R, 0, &r.qx, m->isa, nt);
        if (ly->bqkv)
            for (int64_t t = 0; t < N; t++)
                for (int64_t i = 0; i < qkv; i++) r.qkv[t * qkv + i] += ly->bqkv[i];
        lap(a, DL_OP_QKV, &clock);
        rope_rows(r.qkv, N, qkv, c, r.pos, r.rope_cs, nt);
        lap(a, DL_OP_ROPE, &clock);
        err = dl_attention_forward(r.att, r.qkv, qkv, a->seq_off, a->n_seq, c->n_heads,
                                   c->n_kv_heads, c->head_dim, causal, nt);
        if (err) break;
        lap(a, DL_OP_ATTENTION, &clock);
        dl_linear_forward(&ly->wo, r.x, r.att, R, 1, &r.qx, m->isa, nt);
        lap(a, DL_OP_ATTN_OUT, &clock);

        rmsnorm_rows(r.xb, r.x, ly->ffn_norm, N, d, c->rms_eps, nt);
        lap(a, DL_OP_RMSNORM, &clock);
        dl_linear_forward(&ly->wgate_up, r.gu, r.xb, R, 0, &r.qx, m->isa, nt);
        lap(a, DL_OP_GATE_UP, &clock);
        dl_swiglu_forward(r.h, r.gu, N, f, nt);
        lap(a, DL_OP_SWIGLU, &clock);
        dl_linear_forward(&ly->wdown, r.x, r.h, R, 1, &r.qx, m->isa, nt);
        lap(a, DL_OP_DOWN, &clock);

        record(m, a, l + 1, r.x, N, r.scratch);
        lap(a, DL_OP_EMBED_POOL, &clock);
    }
    lap(a, DL_OP_EMBED_POOL, &clock);
    if (!err) {
        dl_pool_forward(a->pooled, r.x, a->seq_off, a->pool, a->n_seq, m->output_norm, d,
                        c->rms_eps, r.scratch);
        if (a->token_out) dl_rmsnorm_forward(a->token_out, r.x, m->output_norm, N, d, c->rms_eps);
    }
    lap(a, DL_OP_EMBED_POOL, &clock);
    run_state_free(&r);
    return err;
}
