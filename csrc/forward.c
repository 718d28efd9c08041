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

#include "deelm.h"

/* OpenBLAS takes other code paths (GEMV, small-matrix kernels) for GEMMs with
 * very few rows, which round differently: a one-token sentence alone would
 * then not match the same sentence inside a batch. Every GEMM therefore runs
 * on at least this many rows, the rows past N being zeros that stay zero
 * (rmsnorm, attention and SwiGLU of a zero row are never computed or are 0). */
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
} run_state;

static void run_state_free(run_state *r) {
    free(r->x); free(r->xb); free(r->qkv); free(r->att);
    free(r->gu); free(r->h); free(r->pos); free(r->scratch); free(r->rope_cs);
}

static int run_state_alloc(run_state *r, const dl_config *c, int64_t n, int64_t max_len) {
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
    if (!r->rope_cs || !r->x || !r->xb || !r->qkv || !r->att || !r->gu || !r->h || !r->pos || !r->scratch) {
        run_state_free(r);
        return DL_ERR_NOMEM;
    }
    return DL_OK;
}

static void embed_tokens(const dl_model *m, const int32_t *tokens, int64_t n, float *x) {
    const int64_t d = m->cfg.dim;
    for (int64_t t = 0; t < n; t++)
        dl_dequantize(m->tok_embd_type, m->tok_embd + (int64_t)tokens[t] * m->tok_embd_row_bytes,
                      x + t * d, d);
}

static void record(const dl_model *m, const dl_forward_args *a, int64_t slot, const float *x,
                   int64_t n, float *scratch) {
    const int64_t d = m->cfg.dim;
    if (a->hidden) memcpy(a->hidden + slot * n * d, x, (size_t)(n * d) * sizeof(float));
    if (a->layer_pooled)
        dl_pool_forward(a->layer_pooled + slot * a->n_seq * d, x, a->seq_off, a->pool, a->n_seq,
                        m->output_norm, d, m->cfg.rms_eps, scratch);
}

int dl_model_forward(const dl_model *m, const dl_forward_args *a) {
    const dl_config *c = &m->cfg;
    const int64_t N = a->seq_off[a->n_seq], d = c->dim, f = c->hidden_dim;
    const int64_t qkv = dl_qkv_dim(c), dq = c->n_heads * c->head_dim;
    const int nt = a->n_threads > 0 ? a->n_threads : 1;
    int64_t max_len = 0;
    for (int64_t s = 0; s < a->n_seq; s++)
        if (a->seq_off[s + 1] - a->seq_off[s] > max_len) max_len = a->seq_off[s + 1] - a->seq_off[s];
    const int64_t R = N > MIN_GEMM_ROWS ? N : MIN_GEMM_ROWS; /* rows of every GEMM */
    run_state r;
    int err = run_state_alloc(&r, c, R, max_len);
    if (err) return err;
    dl_rope_table(r.rope_cs, max_len, c->head_dim / 2, m->inv_freq);

    for (int64_t s = 0; s < a->n_seq; s++)
        for (int64_t t = a->seq_off[s]; t < a->seq_off[s + 1]; t++)
            r.pos[t] = (int32_t)(t - a->seq_off[s]);
    embed_tokens(m, a->tokens, N, r.x);
    record(m, a, 0, r.x, N, r.scratch);

    for (int64_t l = 0; l < c->n_layers; l++) {
        const dl_layer *ly = &m->layers[l];
        const int causal = !(a->bidirectional_from >= 0 && l >= a->bidirectional_from);

        dl_rmsnorm_forward(r.xb, r.x, ly->attn_norm, N, d, c->rms_eps);
        dl_linear_forward(r.qkv, r.xb, ly->wqkv, R, d, qkv, 0.0f, nt);
        if (ly->bqkv)
            for (int64_t t = 0; t < N; t++)
                for (int64_t i = 0; i < qkv; i++) r.qkv[t * qkv + i] += ly->bqkv[i];
        /* q and k heads are contiguous in the row: rotate nh + nkv heads */
        dl_rope_forward(r.qkv, N, qkv, c->n_heads + c->n_kv_heads, c->head_dim, r.pos,
                        r.rope_cs, c->rope_style);
        err = dl_attention_forward(r.att, r.qkv, qkv, a->seq_off, a->n_seq, c->n_heads,
                                   c->n_kv_heads, c->head_dim, causal, nt);
        if (err) break;
        dl_linear_forward(r.x, r.att, ly->wo, R, dq, d, 1.0f, nt);

        dl_rmsnorm_forward(r.xb, r.x, ly->ffn_norm, N, d, c->rms_eps);
        dl_linear_forward(r.gu, r.xb, ly->wgate_up, R, d, 2 * f, 0.0f, nt);
        dl_swiglu_forward(r.h, r.gu, N, f, nt);
        dl_linear_forward(r.x, r.h, ly->wdown, R, f, d, 1.0f, nt);

        record(m, a, l + 1, r.x, N, r.scratch);
    }
    if (!err) {
        dl_pool_forward(a->pooled, r.x, a->seq_off, a->pool, a->n_seq, m->output_norm, d,
                        c->rms_eps, r.scratch);
        if (a->token_out) dl_rmsnorm_forward(a->token_out, r.x, m->output_norm, N, d, c->rms_eps);
    }
    run_state_free(&r);
    return err;
}
