/* Model lifetime: one allocation per weight array, all owned by dl_model
 * except the token embedding table, which stays in the caller's (mapped) file. */
#include <stdlib.h>

#include "deelm.h"

int64_t dl_qkv_dim(const dl_config *c) { return (c->n_heads + 2 * c->n_kv_heads) * c->head_dim; }

static float *zalloc(int64_t n) { return (float *)calloc((size_t)n, sizeof(float)); }

static int linear_alloc(dl_linear *w, int64_t out, int64_t in, int precision) {
    w->out = out;
    w->in = in;
    if (precision == DL_PRECISION_INT8) return dl_qmat_alloc(&w->q, out, in);
    return dl_fmat_alloc(&w->f, out, in);
}

static int64_t linear_bytes(int64_t out, int64_t in, int precision) {
    return precision == DL_PRECISION_INT8 ? dl_qmat_bytes(out, in) : dl_fmat_bytes(out, in);
}

int64_t dl_model_bytes(const dl_config *cfg, int precision, int qkv_bias) {
    const int64_t d = cfg->dim, f = cfg->hidden_dim, qkv = dl_qkv_dim(cfg);
    const int64_t dq = cfg->n_heads * cfg->head_dim, fl = (int64_t)sizeof(float);
    const int64_t layer = (int64_t)sizeof(dl_layer) + 2 * d * fl + (qkv_bias ? qkv * fl : 0)
                          + linear_bytes(qkv, d, precision) + linear_bytes(d, dq, precision)
                          + linear_bytes(2 * f, d, precision) + linear_bytes(d, f, precision);
    return (int64_t)sizeof(dl_model) + (d + cfg->head_dim / 2) * fl + cfg->n_layers * layer;
}

static void linear_free(dl_linear *w) {
    dl_fmat_free(&w->f);
    dl_qmat_free(&w->q);
}

dl_model *dl_model_alloc(const dl_config *cfg, int precision, int isa) {
    dl_model *m = (dl_model *)calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cfg = *cfg;
    m->precision = precision;
    m->isa = isa;
    const int64_t d = cfg->dim, f = cfg->hidden_dim, qkv = dl_qkv_dim(cfg);
    const int64_t dq = cfg->n_heads * cfg->head_dim;
    const int64_t hd = cfg->head_dim;
    m->output_norm = zalloc(d);
    m->inv_freq = zalloc(hd / 2);
    m->inv_freq_local = cfg->rope_local ? zalloc(hd / 2) : NULL;
    m->layers = (dl_layer *)calloc((size_t)cfg->n_layers, sizeof(dl_layer));
    if (!m->output_norm || !m->inv_freq || (cfg->rope_local && !m->inv_freq_local) || !m->layers)
        goto fail;
    for (int64_t l = 0; l < cfg->n_layers; l++) {
        dl_layer *ly = &m->layers[l];
        ly->attn_norm = zalloc(d);
        ly->ffn_norm = zalloc(d);
        if (!ly->attn_norm || !ly->ffn_norm || linear_alloc(&ly->wqkv, qkv, d, precision) ||
            linear_alloc(&ly->wo, d, dq, precision) ||
            linear_alloc(&ly->wgate_up, 2 * f, d, precision) ||
            linear_alloc(&ly->wdown, d, f, precision))
            goto fail;
        if (cfg->qk_norm && (!(ly->q_norm = zalloc(hd)) || !(ly->k_norm = zalloc(hd)))) goto fail;
        if (cfg->post_norms &&
            (!(ly->post_attn_norm = zalloc(d)) || !(ly->post_ffn_norm = zalloc(d))))
            goto fail;
    }
    return m;
fail:
    dl_model_free(m);
    return NULL;
}

void dl_model_free(dl_model *m) {
    if (!m) return;
    if (m->layers) {
        for (int64_t l = 0; l < m->cfg.n_layers; l++) {
            dl_layer *ly = &m->layers[l];
            free(ly->attn_norm);
            free(ly->bqkv);
            free(ly->ffn_norm);
            free(ly->q_norm);
            free(ly->k_norm);
            free(ly->post_attn_norm);
            free(ly->post_ffn_norm);
            linear_free(&ly->wqkv);
            linear_free(&ly->wo);
            linear_free(&ly->wgate_up);
            linear_free(&ly->wdown);
        }
        free(m->layers);
    }
    free(m->output_norm);
    free(m->inv_freq);
    free(m->inv_freq_local);
    free(m);
}
