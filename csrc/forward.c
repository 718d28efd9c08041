/* The encoder forward pass over one packed batch (no vocabulary head).
 *
 * x (the [N, d] residual stream) = embedding(tokens) * embed_scale, then per
 * layer l (the [bracketed] steps only where the config has them):
 *   xb  = rmsnorm(x) ; qkv = xb Wqkv^T ; [rmsnorm each q, k head] ; rope(q, k)
 *   a   = attention(qkv)                  (scale, sliding window of layer l)
 *   x  += [post_attn_rmsnorm](a Wo^T)
 *   xb  = rmsnorm(x) ; gu = xb Wgu^T ; h = act(g) * u   (silu or gelu_tanh)
 *   x  += [post_ffn_rmsnorm](h Wdown^T)
 * Attention in layer l is bidirectional when l >= bidirectional_from >= 0. */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "deelm.h"

/* The per-batch context: positions, rotary table, int8 and LoRA scratch. */
void dl_batch_free(dl_batch *b) {
    free(b->pos);
    free(b->rope_cs);
    free(b->rope_cs_local);
    free(b->scratch);
    dl_qact_free(&b->qx);
    memset(b, 0, sizeof *b);
}

/* The widest input any linear layer takes. */
static int64_t widest_input(const dl_config *c) {
    int64_t w = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    return c->n_heads * c->head_dim > w ? c->n_heads * c->head_dim : w;
}

int dl_batch_init(dl_batch *b, const dl_model *m, const int64_t *seq_off, int64_t n_seq,
                  int n_threads) {
    const dl_config *c = &m->cfg;
    memset(b, 0, sizeof *b);
    const int64_t N = seq_off[n_seq];
    int64_t max_len = 0;
    for (int64_t s = 0; s < n_seq; s++)
        if (seq_off[s + 1] - seq_off[s] > max_len) max_len = seq_off[s + 1] - seq_off[s];
    b->seq_off = seq_off;
    b->n_seq = n_seq;
    b->n_rows = N;
    b->n_threads = n_threads > 0 ? n_threads : 1;
    const int64_t widest = widest_input(c);
    b->pos = (int32_t *)malloc((size_t)(N > 0 ? N : 1) * sizeof(int32_t));
    const size_t table = (size_t)(max_len > 0 ? max_len : 1) * c->head_dim * sizeof(float);
    b->rope_cs = (float *)malloc(table);
    b->rope_cs_local = c->rope_local ? (float *)malloc(table) : NULL;
    b->scratch = m->lora
                     ? (float *)malloc((size_t)dl_lora_scratch_floats(c, N, widest, m->lora->max_rank) * sizeof(float))
                     : NULL;
    int qerr = m->precision == DL_PRECISION_INT8 ? dl_qact_alloc(&b->qx, N, widest) : DL_OK;
    if (qerr || !b->pos || !b->rope_cs || (c->rope_local && !b->rope_cs_local) ||
        (m->lora && !b->scratch)) {
        dl_batch_free(b);
        return DL_ERR_NOMEM;
    }
    dl_rope_table(b->rope_cs, max_len, c->head_dim / 2, m->inv_freq);
    if (c->rope_local) dl_rope_table(b->rope_cs_local, max_len, c->head_dim / 2, m->inv_freq_local);
    for (int64_t s = 0; s < n_seq; s++)
        for (int64_t t = seq_off[s]; t < seq_off[s + 1]; t++) b->pos[t] = (int32_t)(t - seq_off[s]);
    return DL_OK;
}

/* Width of the q and k heads of a qkv row. */
static int64_t qk_width(const dl_config *c) { return (c->n_heads + c->n_kv_heads) * c->head_dim; }

const char *const dl_op_names[DL_N_OPS] = {
    [DL_OP_QKV] = "qkv", [DL_OP_ATTN_OUT] = "attn_output", [DL_OP_GATE_UP] = "gate_up",
    [DL_OP_DOWN] = "down", [DL_OP_ATTENTION] = "attention", [DL_OP_RMSNORM] = "rmsnorm",
    [DL_OP_ROPE] = "rope", [DL_OP_GLU] = "glu", [DL_OP_EMBED_POOL] = "embed_pool",
};

int64_t dl_layer_acts_floats(const dl_config *c, int64_t R, int separate_residuals) {
    /* x and xb, or x_in, x_mid, x_out, xb1 and xb2 */
    const int64_t rows_of_d = separate_residuals ? 5 : 2;
    int64_t per_row = rows_of_d * c->dim + dl_qkv_dim(c) + c->n_heads * c->head_dim + 3 * c->hidden_dim;
    if (c->post_norms) per_row += (separate_residuals ? 2 : 1) * c->dim; /* ao (and fo) */
    if (c->qk_norm && separate_residuals) per_row += qk_width(c);         /* qk_raw */
    return R * per_row;
}

void dl_layer_acts_carve(dl_layer_acts *a, const dl_config *c, int64_t R, float *mem,
                         int separate_residuals) {
    const int64_t d = c->dim;
    memset(a, 0, sizeof *a);
    a->x_in = a->x_mid = a->x_out = mem;
    mem += R * d;
    if (separate_residuals) {
        a->x_mid = mem; mem += R * d;
        a->x_out = mem; mem += R * d;
    }
    a->xb1 = a->xb2 = mem; mem += R * d;
    if (separate_residuals) {
        a->xb2 = mem; mem += R * d;
    }
    a->qkv = mem; mem += R * dl_qkv_dim(c);
    a->att = mem; mem += R * c->n_heads * c->head_dim;
    a->gu = mem; mem += R * 2 * c->hidden_dim;
    a->h = mem; mem += R * c->hidden_dim;
    if (c->post_norms) {
        a->ao = mem; mem += R * d;
        if (separate_residuals) {
            a->fo = mem; mem += R * d;
        } else {
            a->fo = a->ao;
        }
    }
    if (c->qk_norm && separate_residuals) a->qk_raw = mem;
}

const float *dl_layer_rope(const dl_model *m, int64_t l, const dl_batch *b) {
    return m->cfg.rope_local && m->layers[l].window > 0 ? b->rope_cs_local : b->rope_cs;
}

static void embed_tokens(const dl_model *m, const int32_t *tokens, int64_t n, float *x, int nt) {
    const int64_t d = m->cfg.dim;
    const float scale = m->cfg.embed_scale;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        float *xt = x + t * d;
        dl_dequantize(m->tok_embd_type, m->tok_embd + (int64_t)tokens[t] * m->tok_embd_row_bytes,
                      xt, d);
        if (scale != 1.0f)
            for (int64_t i = 0; i < d; i++) xt[i] *= scale;
    }
}

/* Row-parallel forms of the per-token ops. */
static void rmsnorm_rows(float *out, const float *x, const float *w, int64_t n, int64_t d,
                         float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n; t++) dl_rmsnorm_forward(out + t * d, x + t * d, w, 1, d, eps);
}

/* RMSNorm over head_dim of every q head (weights wq [hd]) and k head (wk)
 * of the n rows of qkv [n, stride], in place. */
static void qk_norm_rows(float *qkv, int64_t n, int64_t stride, const dl_config *c, const float *wq,
                         const float *wk, int nt) {
    const int64_t hd = c->head_dim;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n; t++)
        for (int64_t h = 0; h < c->n_heads + c->n_kv_heads; h++) {
            float *v = qkv + t * stride + h * hd;
            dl_rmsnorm_forward(v, v, h < c->n_heads ? wq : wk, 1, hd, c->rms_eps);
        }
}

/* y[t] += rmsnorm(x[t]) * w, row-parallel. */
static void rmsnorm_add_rows(float *y, const float *x, const float *w, int64_t n, int64_t d,
                             float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n; t++) dl_rmsnorm_add_forward(y + t * d, x + t * d, w, 1, d, eps);
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


/* 1 if no element of x is inf or NaN: x * 0 is NaN exactly for those. */
static int all_finite(const float *x, int64_t n) {
    float probe = 0.0f;
    for (int64_t i = 0; i < n; i++) probe += x[i] * 0.0f;
    return probe == 0.0f;
}

/* Adds the time since b->clock to op_seconds[op] (when timing) and restarts it. */
static void lap(dl_batch *b, int op) {
    if (!b->op_seconds) return;
    const double now = omp_get_wtime();
    b->op_seconds[op] += now - b->clock;
    b->clock = now;
}

/* One linear layer of layer l plus its LoRA adapters: y (=, or +=) x W^T. */
static void linear(const dl_model *m, int64_t l, int fused, float *y, const float *x,
                   int accumulate, const dl_layer_acts *a, dl_batch *b) {
    const dl_layer *ly = &m->layers[l];
    const dl_linear *w = fused == DL_FUSED_QKV ? &ly->wqkv : fused == DL_FUSED_O ? &ly->wo
                         : fused == DL_FUSED_GATE_UP ? &ly->wgate_up : &ly->wdown;
    dl_linear_forward(w, y, x, b->n_rows, accumulate, &b->qx, m->isa, b->n_threads);
    if (m->lora)
        dl_lora_forward(m->lora, &m->cfg, l, fused, y, w->out, x, b->n_rows, a->lora_t[fused],
                        b->drop, b->scratch, b->n_threads);
}

/* x_out = x_in + [post_norm](y), y = x W^T of fused layer `fused` into y_buf
 * when there is a post-norm (w_post), else accumulated into x_out directly. */
static void residual_branch(const dl_model *m, int64_t l, int fused, float *x_out,
                            const float *x_in, float *y_buf, const float *w_post, const float *x,
                            const dl_layer_acts *a, dl_batch *b) {
    const int64_t R = b->n_rows, d = m->cfg.dim;
    if (x_out != x_in) memcpy(x_out, x_in, (size_t)(R * d) * sizeof(float));
    if (!w_post) {
        linear(m, l, fused, x_out, x, 1, a, b);
        return;
    }
    linear(m, l, fused, y_buf, x, 0, a, b);
    rmsnorm_add_rows(x_out, y_buf, w_post, b->n_rows, d, m->cfg.rms_eps, b->n_threads);
}

int dl_layer_forward(const dl_model *m, int64_t l, int causal, const dl_layer_acts *a,
                     dl_batch *b) {
    const dl_config *c = &m->cfg;
    const dl_layer *ly = &m->layers[l];
    const int64_t N = b->n_rows, d = c->dim, qkv = dl_qkv_dim(c);
    const int nt = b->n_threads;

    rmsnorm_rows(a->xb1, a->x_in, ly->attn_norm, N, d, c->rms_eps, nt);
    lap(b, DL_OP_RMSNORM);
    linear(m, l, DL_FUSED_QKV, a->qkv, a->xb1, 0, a, b);
    if (ly->bqkv)
        for (int64_t t = 0; t < N; t++)
            for (int64_t i = 0; i < qkv; i++) a->qkv[t * qkv + i] += ly->bqkv[i];
    lap(b, DL_OP_QKV);
    if (c->qk_norm) {
        if (a->qk_raw)
            for (int64_t t = 0; t < N; t++)
                memcpy(a->qk_raw + t * qk_width(c), a->qkv + t * qkv,
                       (size_t)qk_width(c) * sizeof(float));
        qk_norm_rows(a->qkv, N, qkv, c, ly->q_norm, ly->k_norm, nt);
        lap(b, DL_OP_RMSNORM);
    }
    rope_rows(a->qkv, N, qkv, c, b->pos, dl_layer_rope(m, l, b), nt);
    if (!all_finite(a->qkv, N * qkv)) return DL_ERR_NONFINITE;
    lap(b, DL_OP_ROPE);
    const dl_attn_spec spec = {c->attn_scale, causal, ly->window};
    int err = dl_attention_forward(a->att, a->qkv, qkv, b->seq_off, b->n_seq, c->n_heads,
                                   c->n_kv_heads, c->head_dim, spec, nt);
    if (err) return err;
    lap(b, DL_OP_ATTENTION);
    residual_branch(m, l, DL_FUSED_O, a->x_mid, a->x_in, a->ao, ly->post_attn_norm, a->att, a, b);
    lap(b, DL_OP_ATTN_OUT);

    rmsnorm_rows(a->xb2, a->x_mid, ly->ffn_norm, N, d, c->rms_eps, nt);
    lap(b, DL_OP_RMSNORM);
    linear(m, l, DL_FUSED_GATE_UP, a->gu, a->xb2, 0, a, b);
    lap(b, DL_OP_GATE_UP);
    dl_glu_forward(c->ffn_act, a->h, a->gu, N, c->hidden_dim, nt);
    lap(b, DL_OP_GLU);
    residual_branch(m, l, DL_FUSED_DOWN, a->x_out, a->x_mid, a->fo, ly->post_ffn_norm, a->h, a, b);
    lap(b, DL_OP_DOWN);
    return all_finite(a->x_out, N * d) ? DL_OK : DL_ERR_NONFINITE;
}

int64_t dl_forward_bytes(const dl_config *c, int precision, int64_t lora_rank, int64_t n_rows,
                         int64_t max_len, int n_threads) {
    const int64_t R = n_rows, widest = widest_input(c), fl = sizeof(float);
    const int64_t batch = (n_rows > 0 ? n_rows : 1) * (int64_t)sizeof(int32_t)       /* pos */
                          + (c->rope_local ? 2 : 1) * (max_len > 0 ? max_len : 1) * c->head_dim * fl /* rope tables */
                          + (lora_rank ? dl_lora_scratch_floats(c, R, widest, lora_rank) * fl : 0)
                          + (precision == DL_PRECISION_INT8 ? dl_qact_bytes(R, widest) : 0);
    return batch + dl_layer_acts_floats(c, R, 0) * fl + dl_attention_bytes(max_len, c->head_dim, n_threads);
}

int dl_model_forward(const dl_model *m, const dl_forward_args *a) {
    const dl_config *c = &m->cfg;
    const int64_t N = a->seq_off[a->n_seq], d = c->dim;
    const int64_t stop = a->residual_out && a->stop_at < c->n_layers ? a->stop_at : c->n_layers;
    dl_batch b;
    int err = dl_batch_init(&b, m, a->seq_off, a->n_seq, a->n_threads);
    if (err) return err;
    b.op_seconds = a->op_seconds;
    b.clock = a->op_seconds ? omp_get_wtime() : 0.0;
    float *mem = (float *)calloc((size_t)dl_layer_acts_floats(c, N, 0), sizeof(float));
    if (!mem) {
        dl_batch_free(&b);
        return DL_ERR_NOMEM;
    }
    dl_layer_acts acts;
    dl_layer_acts_carve(&acts, c, N, mem, 0);
    float *scratch = acts.xb2 + 0; /* [d], free between layers */

    embed_tokens(m, a->tokens, N, acts.x_in, b.n_threads);
    record(m, a, 0, acts.x_in, N, scratch);
    lap(&b, DL_OP_EMBED_POOL);
    for (int64_t l = 0; l < stop && !err; l++) {
        const int causal = !(a->bidirectional_from >= 0 && l >= a->bidirectional_from);
        err = dl_layer_forward(m, l, causal, &acts, &b);
        if (!err) record(m, a, l + 1, acts.x_out, N, scratch);
        lap(&b, DL_OP_EMBED_POOL);
    }
    if (!err && a->residual_out) memcpy(a->residual_out, acts.x_out, (size_t)(N * d) * sizeof(float));
    if (!err && a->pooled)
        dl_pool_forward(a->pooled, acts.x_out, a->seq_off, a->pool, a->n_seq, m->output_norm, d,
                        c->rms_eps, scratch);
    if (!err && a->token_out)
        dl_rmsnorm_forward(a->token_out, acts.x_out, m->output_norm, N, d, c->rms_eps);
    lap(&b, DL_OP_EMBED_POOL);
    free(mem);
    dl_batch_free(&b);
    return err;
}
