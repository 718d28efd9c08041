/* Model lifetime: one allocation per weight array, all owned by dl_model
 * except the token embedding table, which stays in the caller's (mapped) file. */
#include <stdlib.h>

#include "deelm.h"

int64_t dl_qkv_dim(const dl_config *c) { return (c->n_heads + 2 * c->n_kv_heads) * c->head_dim; }

static float *zalloc(int64_t n) { return (float *)calloc((size_t)n, sizeof(float)); }

dl_model *dl_model_alloc(const dl_config *cfg) {
    dl_model *m = (dl_model *)calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cfg = *cfg;
    const int64_t d = cfg->dim, f = cfg->hidden_dim, qkv = dl_qkv_dim(cfg);
    const int64_t dq = cfg->n_heads * cfg->head_dim;
    m->output_norm = zalloc(d);
    m->inv_freq = zalloc(cfg->head_dim / 2);
    m->layers = (dl_layer *)calloc((size_t)cfg->n_layers, sizeof(dl_layer));
    if (!m->output_norm || !m->inv_freq || !m->layers) goto fail;
    for (int64_t l = 0; l < cfg->n_layers; l++) {
        dl_layer *ly = &m->layers[l];
        ly->attn_norm = zalloc(d);
        ly->wqkv = zalloc(qkv * d);
        ly->wo = zalloc(d * dq);
        ly->ffn_norm = zalloc(d);
        ly->wgate_up = zalloc(2 * f * d);
        ly->wdown = zalloc(d * f);
        if (!ly->attn_norm || !ly->wqkv || !ly->wo || !ly->ffn_norm || !ly->wgate_up || !ly->wdown)
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
            free(ly->wqkv);
            free(ly->bqkv);
            free(ly->wo);
            free(ly->ffn_norm);
            free(ly->wgate_up);
            free(ly->wdown);
        }
        free(m->layers);
    }
    free(m->output_norm);
    free(m->inv_freq);
    free(m);
}
