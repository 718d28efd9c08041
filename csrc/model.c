/* Model lifetime: the arrays dl_model owns (everything but the token
 * embedding table, which stays in the caller's mapped file).
 *
 * One walk over the model's layout (model_arrays) both counts and
 * allocates, in the manner of llm.c's parameter-sizes table: dl_model_bytes
 * is that walk counting, dl_model_alloc the same walk allocating, so the
 * estimate and the allocation cannot drift apart. The layer's part of the
 * layout is the layer schema (schema.c). */
#include <stdlib.h>
#include <string.h>

#include "deelm.h"

const char *const dl_precision_names[DL_N_PRECISIONS] = {
    [DL_PRECISION_F32] = "float32", [DL_PRECISION_INT8] = "int8",
};

int dl_precision_from_name(const char *name) {
    for (int p = 0; p < DL_N_PRECISIONS; p++)
        if (strcmp(name, dl_precision_names[p]) == 0) return p;
    return -1;
}

int64_t dl_qkv_dim(const dl_config *c) { return (c->n_heads + 2 * c->n_kv_heads) * c->head_dim; }

/* The walk's state: m == NULL counts only; otherwise each array is
 * allocated into m, and a failure is remembered. */
typedef struct {
    dl_model *m;
    int failed;
    int64_t bytes;
} walk;

/* A float array of n at *slot (slot is NULL when counting). */
static void vec(walk *w, float **slot, int64_t n) {
    w->bytes += n * (int64_t)sizeof(float);
    if (slot && !(*slot = (float *)calloc((size_t)n, sizeof(float)))) w->failed = 1;
}

static void linear(walk *w, dl_linear *lin, int64_t out, int64_t in, int precision) {
    if (precision == DL_PRECISION_INT8) {
        w->bytes += dl_qmat_bytes(out, in);
        if (lin && dl_qmat_alloc(&lin->q, out, in)) w->failed = 1;
    } else {
        w->bytes += dl_fmat_bytes(out, in);
        if (lin && dl_fmat_alloc(&lin->f, out, in)) w->failed = 1;
    }
    if (lin) {
        lin->out = out;
        lin->in = in;
    }
}

static void layer_arrays(walk *w, const dl_config *c, int precision, int qkv_bias, dl_layer *ly) {
    w->bytes += (int64_t)sizeof(dl_layer);
    for (int f = 0; f < DL_N_FUSED; f++)
        linear(w, ly ? (dl_linear *)((char *)ly + dl_fused_field[f]) : NULL, dl_fused_rows(c, f),
               dl_fused_cols(c, f), precision);
    for (int i = 0; i < DL_N_LAYER_TENSORS; i++) {
        const dl_tensor_spec *t = &dl_layer_tensors[i];
        if (t->module >= 0 || !dl_feature_on(c, t->feature, qkv_bias)) continue;
        vec(w, ly ? (float **)((char *)ly + t->field) : NULL, dl_width(c, t->width));
    }
    if (qkv_bias) vec(w, ly ? &ly->bqkv : NULL, dl_qkv_dim(c)); /* the three biases, fused */
}

static int64_t model_arrays(const dl_config *c, int precision, int qkv_bias, dl_model *m) {
    walk w = {m, 0, (int64_t)sizeof(dl_model)};
    vec(&w, m ? &m->output_norm : NULL, c->dim);
    vec(&w, m ? &m->inv_freq : NULL, c->head_dim / 2);
    if (c->rope_local) vec(&w, m ? &m->inv_freq_local : NULL, c->head_dim / 2);
    for (int64_t l = 0; l < c->n_layers && !w.failed; l++)
        layer_arrays(&w, c, precision, qkv_bias, m ? &m->layers[l] : NULL);
    return w.failed ? -1 : w.bytes;
}

int64_t dl_model_bytes(const dl_config *cfg, int precision, int qkv_bias) {
    return model_arrays(cfg, precision, qkv_bias, NULL);
}

dl_model *dl_model_alloc(const dl_config *cfg, int precision, int isa, int qkv_bias) {
    dl_model *m = (dl_model *)calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cfg = *cfg;
    m->precision = precision;
    m->isa = isa;
    m->layers = (dl_layer *)calloc((size_t)cfg->n_layers, sizeof(dl_layer));
    if (!m->layers || (m->owned_bytes = model_arrays(cfg, precision, qkv_bias, m)) < 0) {
        dl_model_free(m);
        return NULL;
    }
    return m;
}

static void linear_free(dl_linear *w) {
    dl_fmat_free(&w->f);
    dl_qmat_free(&w->q);
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
