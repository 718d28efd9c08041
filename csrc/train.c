/* Training: the forward pass of the trained layers with their activations
 * kept, and its backward pass to the LoRA parameters.
 *
 * Layers below layer_from are frozen (and causal), so their output for a
 * sentence never changes: the caller computes it once (forward with stop_at)
 * and hands it in as x_in. Per trained layer l (x: [N, d] residual):
 *   forward   x_mid = x_in + attn(rms1(x_in)) ; x_out = x_mid + mlp(rms2(x_mid))
 *   backward  from dx_out, down -> swiglu -> gate/up -> rms2 -> (+ residual)
 *             -> o -> attention -> rope -> q/k/v -> rms1 -> (+ residual) = dx_in
 * LoRA gradients are added at each linear layer on the way. Base weights are
 * frozen; the backward multiplies by them in float32 (dl_dense_weights). */
#include <stdlib.h>
#include <string.h>

#include "deelm.h"

int dl_dense_weights_build(dl_dense_weights *dw, const dl_model *m, int64_t layer_from) {
    const int64_t L = m->cfg.n_layers;
    if (dw->w && dw->layer_from <= layer_from) return DL_OK; /* already covers these layers */
    dl_dense_weights_free(dw);
    dw->w = (const float **)calloc((size_t)(L * DL_N_FUSED), sizeof(float *));
    dw->owned = (float **)calloc((size_t)(L * DL_N_FUSED), sizeof(float *));
    if (!dw->w || !dw->owned) goto fail;
    dw->layer_from = layer_from;
    dw->n_layers = L;
    for (int64_t l = layer_from; l < L; l++) {
        const dl_layer *ly = &m->layers[l];
        const dl_linear *lin[DL_N_FUSED] = {&ly->wqkv, &ly->wo, &ly->wgate_up, &ly->wdown};
        for (int f = 0; f < DL_N_FUSED; f++) {
            const size_t i = (size_t)(l * DL_N_FUSED + f);
            if (!(dw->w[i] = dl_linear_dense(lin[f], &dw->owned[i]))) goto fail;
        }
    }
    return DL_OK;
fail:
    dl_dense_weights_free(dw);
    return DL_ERR_NOMEM;
}

void dl_dense_weights_free(dl_dense_weights *dw) {
    if (dw->owned)
        for (int64_t i = 0; i < dw->n_layers * DL_N_FUSED; i++) free(dw->owned[i]);
    free(dw->owned);
    free((void *)dw->w);
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
 * dqkv (qkv), dgu (2f), dh (f). Also the forward's pooling scratch. */
static int64_t grad_floats(const dl_config *c, int64_t R) {
    return R * (2 * c->dim + c->n_heads * c->head_dim + dl_qkv_dim(c) + 3 * c->hidden_dim);
}

/* One arena for every trained layer's activations, one for LoRA's saved
 * products; the padding rows of the float32 GEMMs start (and stay) zero. */
static int alloc_activations(dl_train_state *st, const dl_model *m) {
    const dl_config *c = &m->cfg;
    const int64_t R = st->batch.gemm_rows, N = st->batch.n_rows, nl = st->n_trained;
    const int64_t per_layer = dl_layer_acts_floats(c, R, 1);
    int64_t lora_floats = 0;
    for (int64_t i = 0; i < nl; i++)
        for (int f = 0; f < DL_N_FUSED; f++)
            lora_floats += dl_lora_save_size(m->lora, st->layer_from + i, f, N);
    st->acts = (dl_layer_acts *)calloc((size_t)nl, sizeof(dl_layer_acts));
    st->arena = (float *)calloc((size_t)(per_layer * nl), sizeof(float));
    st->lora_arena = (float *)malloc((size_t)(lora_floats > 0 ? lora_floats : 1) * sizeof(float));
    st->grad_arena = (float *)calloc((size_t)grad_floats(c, R), sizeof(float));
    if (!st->acts || !st->arena || !st->lora_arena || !st->grad_arena) return DL_ERR_NOMEM;
    float *lt = st->lora_arena;
    for (int64_t i = 0; i < nl; i++) {
        dl_layer_acts *a = &st->acts[i];
        dl_layer_acts_carve(a, c, R, st->arena + i * per_layer, 1);
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

/* Layer l's backward: on entry dx = dL/dx_out, on return dL/dx_in. */
static int layer_backward(const dl_model *m, const dl_dense_weights *dw, dl_train_state *st,
                          int64_t i, float *grad, float *dx, float *dxb, float *datt,
                          float *dqkv, float *dgu, float *dh) {
    const dl_config *c = &m->cfg;
    dl_batch *b = &st->batch;
    const dl_layer_acts *a = &st->acts[i];
    const int64_t l = st->layer_from + i, N = b->n_rows, d = c->dim, f = c->hidden_dim;
    const int64_t qkv = dl_qkv_dim(c), dq = c->n_heads * c->head_dim;
    const int nt = b->n_threads;
    const dl_layer *ly = &m->layers[l];
    const float *const *W = dw->w + l * DL_N_FUSED;
    const dl_lora *lo = m->lora;

    /* x_out = x_mid + down(h) */
    dl_linear_backward(dh, dx, W[DL_FUSED_DOWN], N, f, d, 0, nt);
    dl_lora_backward(lo, c, l, DL_FUSED_DOWN, grad, dh, dx, d, a->h, N, a->lora_t[DL_FUSED_DOWN],
                     b->drop, b->scratch, nt);
    dl_swiglu_backward(dgu, dh, a->gu, N, f, nt);
    dl_linear_backward(dxb, dgu, W[DL_FUSED_GATE_UP], N, d, 2 * f, 0, nt);
    dl_lora_backward(lo, c, l, DL_FUSED_GATE_UP, grad, dxb, dgu, 2 * f, a->xb2, N,
                     a->lora_t[DL_FUSED_GATE_UP], b->drop, b->scratch, nt);
    dl_rmsnorm_backward(dx, dxb, a->x_mid, ly->ffn_norm, N, d, c->rms_eps, nt);

    /* x_mid = x_in + o(attention(rope(qkv(rms1(x_in))))) */
    dl_linear_backward(datt, dx, W[DL_FUSED_O], N, dq, d, 0, nt);
    dl_lora_backward(lo, c, l, DL_FUSED_O, grad, datt, dx, d, a->att, N, a->lora_t[DL_FUSED_O],
                     b->drop, b->scratch, nt);
    const int causal = !(st->bidirectional_from >= 0 && l >= st->bidirectional_from);
    int err = dl_attention_backward(dqkv, datt, a->qkv, qkv, b->seq_off, b->n_seq, c->n_heads,
                                    c->n_kv_heads, c->head_dim, causal, nt);
    if (err) return err;
    dl_rope_backward(dqkv, N, qkv, c->n_heads + c->n_kv_heads, c->head_dim, b->pos, b->rope_cs,
                     c->rope_style);
    dl_linear_backward(dxb, dqkv, W[DL_FUSED_QKV], N, d, qkv, 0, nt);
    dl_lora_backward(lo, c, l, DL_FUSED_QKV, grad, dxb, dqkv, qkv, a->xb1, N,
                     a->lora_t[DL_FUSED_QKV], b->drop, b->scratch, nt);
    dl_rmsnorm_backward(dx, dxb, a->x_in, ly->attn_norm, N, d, c->rms_eps, nt);
    return DL_OK;
}

int dl_train_backward(const dl_model *m, const dl_dense_weights *dw, dl_train_state *st,
                      const float *d_pooled, float *grad, float *dx_in) {
    const dl_config *c = &m->cfg;
    const int64_t R = st->batch.gemm_rows, N = st->batch.n_rows, d = c->dim;
    float *dx = st->grad_arena, *dxb = dx + R * d, *datt = dxb + R * d;
    float *dqkv = datt + R * c->n_heads * c->head_dim, *dgu = dqkv + R * dl_qkv_dim(c);
    float *dh = dgu + R * 2 * c->hidden_dim;
    memset(dx, 0, (size_t)(R * d) * sizeof(float));
    dl_pool_backward(dx, d_pooled, st->acts[st->n_trained - 1].x_out, st->seq_off, st->pool,
                     st->n_seq, m->output_norm, d, c->rms_eps, st->batch.n_threads);
    for (int64_t i = st->n_trained - 1; i >= 0; i--) {
        int err = layer_backward(m, dw, st, i, grad, dx, dxb, datt, dqkv, dgu, dh);
        if (err) return err;
    }
    if (dx_in) memcpy(dx_in, dx, (size_t)(N * d) * sizeof(float));
    return DL_OK;
}
