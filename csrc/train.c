/* Training: the forward pass of the trained layers with their activations
 * kept, and its backward pass to the LoRA parameters.
 *
 * Layers below layer_from are frozen (and causal), so their output for a
 * sentence never changes: the caller computes it once (forward with stop_at)
 * and hands it in as x_in. Per trained layer l (x: [N, d] residual; the
 * [bracketed] steps where the config has them, forward.c):
 *   forward   x_mid = x_in + [post1](attn(rms1(x_in)))
 *             x_out = x_mid + [post2](mlp(rms2(x_mid)))
 *   backward  from dx_out, [post2] -> down -> glu -> gate/up -> rms2 -> (+ residual)
 *             -> [post1] -> o -> attention -> rope -> [q/k norms] -> q/k/v -> rms1
 *             -> (+ residual) = dx_in
 * Every norm's backward is dl_rmsnorm_backward with its frozen weight; the
 * embedding scale acts on the frozen input and needs none.
 * LoRA gradients are added at each linear layer on the way. Base weights are
 * frozen; the backward multiplies by them in float32 (dl_dense_weights, W^T
 * packed for dl_sgemm, so the backward too is the same on every isa and
 * thread count). */
#include <stdlib.h>
#include <string.h>

#include "deelm.h"

int dl_dense_weights_build(dl_dense_weights *dw, const dl_model *m, int64_t layer_from) {
    const int64_t L = m->cfg.n_layers;
    if (dw->wt && dw->layer_from <= layer_from) return DL_OK; /* already covers these layers */
    dl_dense_weights_free(dw);
    dw->wt = (dl_fmat *)calloc((size_t)(L * DL_N_FUSED), sizeof(dl_fmat));
    int64_t widest = 0;
    for (int64_t l = layer_from; l < L; l++) {
        const dl_layer *ly = &m->layers[l];
        const dl_linear *lin[DL_N_FUSED] = {&ly->wqkv, &ly->wo, &ly->wgate_up, &ly->wdown};
        for (int f = 0; f < DL_N_FUSED; f++) widest = lin[f]->in > widest ? lin[f]->in : widest;
    }
    float *row = (float *)malloc((size_t)(widest > 0 ? widest : 1) * sizeof(float));
    if (!dw->wt || !row) goto fail;
    dw->layer_from = layer_from;
    dw->n_layers = L;
    for (int64_t l = layer_from; l < L; l++) {
        const dl_layer *ly = &m->layers[l];
        const dl_linear *lin[DL_N_FUSED] = {&ly->wqkv, &ly->wo, &ly->wgate_up, &ly->wdown};
        for (int f = 0; f < DL_N_FUSED; f++) {
            dl_fmat *wt = &dw->wt[l * DL_N_FUSED + f];
            if (dl_fmat_alloc(wt, lin[f]->in, lin[f]->out)) goto fail;
            /* row o of W is column o of W^T */
            for (int64_t o = 0; o < lin[f]->out; o++) {
                dl_linear_row(lin[f], o, row);
                dl_fmat_set_col(wt, o, row);
            }
        }
    }
    free(row);
    return DL_OK;
fail:
    free(row);
    dl_dense_weights_free(dw);
    return DL_ERR_NOMEM;
}

void dl_dense_weights_free(dl_dense_weights *dw) {
    if (dw->wt)
        for (int64_t i = 0; i < dw->n_layers * DL_N_FUSED; i++) dl_fmat_free(&dw->wt[i]);
    free(dw->wt);
    memset(dw, 0, sizeof *dw);
}

void dl_train_state_free(dl_train_state *st) {
    if (!st) return;
    dl_batch_free(&st->batch);
    free(st->acts);
    free(st->arena);
    free(st->lora_arena);
    free(st->grad_arena);
    free(st->seq_off);
    free(st->pool);
    free(st);
}

/* Copies of the batch layout the state outlives the caller's arrays with. */
static int copy_layout(dl_train_state *st, const int64_t *seq_off, const int64_t *pool,
                       int64_t n_seq) {
    st->seq_off = (int64_t *)malloc((size_t)(n_seq + 1) * sizeof(int64_t));
    st->pool = (int64_t *)malloc((size_t)(2 * n_seq + 1) * sizeof(int64_t));
    if (!st->seq_off || !st->pool) return DL_ERR_NOMEM;
    memcpy(st->seq_off, seq_off, (size_t)(n_seq + 1) * sizeof(int64_t));
    memcpy(st->pool, pool, (size_t)(2 * n_seq) * sizeof(int64_t));
    st->n_seq = n_seq;
    return DL_OK;
}

/* The backward's gradient buffers, [R, ...]: dx (d), dxb (d), datt (nh hd),
 * dqkv (qkv), dgu (2f), dh (f), then dpost (d) with post_norms and dqk
 * ((nh + nkv) hd) with qk_norm. Also the forward's pooling scratch. */
typedef struct {
    float *dx, *dxb, *datt, *dqkv, *dgu, *dh, *dpost, *dqk;
} grad_bufs;

static int64_t grad_floats(const dl_config *c, int64_t R) {
    int64_t per_row = 2 * c->dim + c->n_heads * c->head_dim + dl_qkv_dim(c) + 3 * c->hidden_dim;
    if (c->post_norms) per_row += c->dim;
    if (c->qk_norm) per_row += (c->n_heads + c->n_kv_heads) * c->head_dim;
    return R * per_row;
}

static grad_bufs carve_grads(const dl_config *c, int64_t R, float *mem) {
    grad_bufs g = {0};
    g.dx = mem; mem += R * c->dim;
    g.dxb = mem; mem += R * c->dim;
    g.datt = mem; mem += R * c->n_heads * c->head_dim;
    g.dqkv = mem; mem += R * dl_qkv_dim(c);
    g.dgu = mem; mem += R * 2 * c->hidden_dim;
    g.dh = mem; mem += R * c->hidden_dim;
    if (c->post_norms) {
        g.dpost = mem; mem += R * c->dim;
    }
    if (c->qk_norm) g.dqk = mem;
    return g;
}

/* One arena for every trained layer's activations, one for LoRA's saved
 * products. */
static int alloc_activations(dl_train_state *st, const dl_model *m) {
    const dl_config *c = &m->cfg;
    const int64_t N = st->batch.n_rows, nl = st->n_trained;
    const int64_t per_layer = dl_layer_acts_floats(c, N, 1);
    int64_t lora_floats = 0;
    for (int64_t i = 0; i < nl; i++)
        for (int f = 0; f < DL_N_FUSED; f++)
            lora_floats += dl_lora_save_size(m->lora, st->layer_from + i, f, N);
    st->acts = (dl_layer_acts *)calloc((size_t)nl, sizeof(dl_layer_acts));
    st->arena = (float *)calloc((size_t)(per_layer * nl), sizeof(float));
    st->lora_arena = (float *)malloc((size_t)(lora_floats > 0 ? lora_floats : 1) * sizeof(float));
    st->grad_arena = (float *)calloc((size_t)grad_floats(c, N), sizeof(float));
    if (!st->acts || !st->arena || !st->lora_arena || !st->grad_arena) return DL_ERR_NOMEM;
    float *lt = st->lora_arena;
    for (int64_t i = 0; i < nl; i++) {
        dl_layer_acts *a = &st->acts[i];
        dl_layer_acts_carve(a, c, N, st->arena + i * per_layer, 1);
        for (int f = 0; f < DL_N_FUSED; f++) {
            const int64_t size = dl_lora_save_size(m->lora, st->layer_from + i, f, N);
            a->lora_t[f] = size ? lt : NULL;
            lt += size;
        }
        /* layer i reads layer i - 1's output in place (it never writes x_in) */
        if (i > 0) a->x_in = st->acts[i - 1].x_out;
    }
    return DL_OK;
}

int dl_train_forward(const dl_model *m, const dl_train_args *a, dl_train_state **out) {
    const dl_config *c = &m->cfg;
    *out = NULL;
    dl_train_state *st = (dl_train_state *)calloc(1, sizeof *st);
    if (!st) return DL_ERR_NOMEM;
    st->layer_from = a->layer_from;
    st->n_trained = c->n_layers - a->layer_from;
    st->bidirectional_from = a->bidirectional_from;
    st->drop = a->drop;
    int err = copy_layout(st, a->seq_off, a->pool, a->n_seq);
    if (!err) err = dl_batch_init(&st->batch, m, st->seq_off, st->n_seq, a->n_threads);
    if (!err) err = alloc_activations(st, m);
    if (err) {
        dl_train_state_free(st);
        return err;
    }
    dl_batch *b = &st->batch;
    b->drop = a->drop;
    const int64_t N = b->n_rows, d = c->dim;
    memcpy(st->acts[0].x_in, a->x_in, (size_t)(N * d) * sizeof(float));
    for (int64_t i = 0; i < st->n_trained && !err; i++) {
        const int64_t l = st->layer_from + i;
        const int causal = !(a->bidirectional_from >= 0 && l >= a->bidirectional_from);
        err = dl_layer_forward(m, l, causal, &st->acts[i], b);
    }
    if (err) {
        dl_train_state_free(st);
        return err;
    }
    dl_pool_forward(a->pooled, st->acts[st->n_trained - 1].x_out, st->seq_off, st->pool,
                    st->n_seq, m->output_norm, d, c->rms_eps, st->grad_arena);
    *out = st;
    return DL_OK;
}

/* dL/dy for x_out = x_in + [post-norm](y), given dx = dL/dx_out: dx itself
 * without a post-norm, else the norm's backward at its input y, in dpost. */
static const float *post_norm_backward(const dl_config *c, const float *dx, const float *y,
                                       const float *w_post, float *dpost, int64_t N, int nt) {
    if (!w_post) return dx;
    memset(dpost, 0, (size_t)(N * c->dim) * sizeof(float));
    dl_rmsnorm_backward(dpost, dx, y, w_post, N, c->dim, c->rms_eps, nt);
    return dpost;
}

/* The q/k head norms' backward: the q and k columns of dqkv [N, qkv] hold the
 * gradient at the normed heads and get the one at their inputs qk_raw
 * [N, (nh + nkv) hd]. dqk: [N, (nh + nkv) hd] scratch. */
static void qk_norm_backward(const dl_config *c, const dl_layer *ly, float *dqkv, const float *qk_raw,
                             float *dqk, int64_t N, int nt) {
    const int64_t hd = c->head_dim, heads = c->n_heads + c->n_kv_heads, w = heads * hd;
    const int64_t qkv = dl_qkv_dim(c);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < N; t++) {
        float *g = dqk + t * w;
        memset(g, 0, (size_t)w * sizeof(float));
        for (int64_t h = 0; h < heads; h++)
            dl_rmsnorm_backward_row(g + h * hd, dqkv + t * qkv + h * hd, 1.0f, qk_raw + t * w + h * hd,
                                    h < c->n_heads ? ly->q_norm : ly->k_norm, hd, c->rms_eps);
        memcpy(dqkv + t * qkv, g, (size_t)w * sizeof(float));
    }
}

/* Layer l's backward: on entry g->dx = dL/dx_out, on return dL/dx_in. */
static int layer_backward(const dl_model *m, const dl_dense_weights *dw, dl_train_state *st,
                          int64_t i, float *grad, const grad_bufs *g) {
    const dl_config *c = &m->cfg;
    dl_batch *b = &st->batch;
    const dl_layer_acts *a = &st->acts[i];
    const int64_t l = st->layer_from + i, N = b->n_rows, d = c->dim, f = c->hidden_dim;
    const int64_t qkv = dl_qkv_dim(c);
    const int nt = b->n_threads;
    const dl_layer *ly = &m->layers[l];
    const dl_fmat *W = dw->wt + l * DL_N_FUSED;
    const dl_lora *lo = m->lora;
    float *dx = g->dx, *dxb = g->dxb;

    /* x_out = x_mid + [post2](down(h)) */
    const float *dy = post_norm_backward(c, dx, a->fo, ly->post_ffn_norm, g->dpost, N, nt);
    dl_linear_backward(g->dh, dy, &W[DL_FUSED_DOWN], N, m->isa, nt);
    dl_lora_backward(lo, c, l, DL_FUSED_DOWN, grad, g->dh, dy, d, a->h, N,
                     a->lora_t[DL_FUSED_DOWN], b->drop, b->scratch, nt);
    dl_glu_backward(c->ffn_act, g->dgu, g->dh, a->gu, N, f, nt);
    dl_linear_backward(dxb, g->dgu, &W[DL_FUSED_GATE_UP], N, m->isa, nt);
    dl_lora_backward(lo, c, l, DL_FUSED_GATE_UP, grad, dxb, g->dgu, 2 * f, a->xb2, N,
                     a->lora_t[DL_FUSED_GATE_UP], b->drop, b->scratch, nt);
    dl_rmsnorm_backward(dx, dxb, a->x_mid, ly->ffn_norm, N, d, c->rms_eps, nt);

    /* x_mid = x_in + [post1](o(attention(rope([qk norms](qkv(rms1(x_in))))))) */
    dy = post_norm_backward(c, dx, a->ao, ly->post_attn_norm, g->dpost, N, nt);
    dl_linear_backward(g->datt, dy, &W[DL_FUSED_O], N, m->isa, nt);
    dl_lora_backward(lo, c, l, DL_FUSED_O, grad, g->datt, dy, d, a->att, N, a->lora_t[DL_FUSED_O],
                     b->drop, b->scratch, nt);
    const int causal = !(st->bidirectional_from >= 0 && l >= st->bidirectional_from);
    const dl_attn_spec spec = {c->attn_scale, causal, ly->window};
    int err = dl_attention_backward(g->dqkv, g->datt, a->qkv, qkv, b->seq_off, b->n_seq, c->n_heads,
                                    c->n_kv_heads, c->head_dim, spec, nt);
    if (err) return err;
    dl_rope_backward(g->dqkv, N, qkv, c->n_heads + c->n_kv_heads, c->head_dim, b->pos,
                     dl_layer_rope(m, l, b), c->rope_style);
    if (c->qk_norm) qk_norm_backward(c, ly, g->dqkv, a->qk_raw, g->dqk, N, nt);
    dl_linear_backward(dxb, g->dqkv, &W[DL_FUSED_QKV], N, m->isa, nt);
    dl_lora_backward(lo, c, l, DL_FUSED_QKV, grad, dxb, g->dqkv, qkv, a->xb1, N,
                     a->lora_t[DL_FUSED_QKV], b->drop, b->scratch, nt);
    dl_rmsnorm_backward(dx, dxb, a->x_in, ly->attn_norm, N, d, c->rms_eps, nt);
    return DL_OK;
}

int dl_train_backward(const dl_model *m, const dl_dense_weights *dw, dl_train_state *st,
                      const float *d_pooled, float *grad, float *dx_in) {
    const dl_config *c = &m->cfg;
    const int64_t N = st->batch.n_rows, d = c->dim;
    const grad_bufs g = carve_grads(c, N, st->grad_arena);
    memset(g.dx, 0, (size_t)(N * d) * sizeof(float));
    dl_pool_backward(g.dx, d_pooled, st->acts[st->n_trained - 1].x_out, st->seq_off, st->pool,
                     st->n_seq, m->output_norm, d, c->rms_eps, st->batch.n_threads);
    for (int64_t i = st->n_trained - 1; i >= 0; i--) {
        int err = layer_backward(m, dw, st, i, grad, &g);
        if (err) return err;
    }
    if (dx_in) memcpy(dx_in, g.dx, (size_t)(N * d) * sizeof(float));
    return DL_OK;
}
