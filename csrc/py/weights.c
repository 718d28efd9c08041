/* Binding a model file's tensors to a dl_model: each tensor's type, shape and
 * bytes checked against the config, then decoded (float32) or packed (int8)
 * into its place. */
#include "py/py.h" /* first: Python.h sets the feature macros */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A weight as Python hands it over: (type id, ne0 = columns, ne1 = rows, buffer). */
typedef struct {
    int type;
    int64_t cols, rows;
    Py_buffer view;
} tensor_ref;

/* "F32, F16, ..." : the type names dl_type_supported accepts, for messages. */
static const char *supported_type_names(void) {
    static char names[256];
    if (!names[0]) {
        size_t len = 0;
        for (int t = 0; t < 64; t++)
            if (dl_type_supported(t))
                len += (size_t)snprintf(names + len, sizeof names - len, "%s%s", len ? ", " : "",
                                        dl_type_name(t));
    }
    return names;
}

/* Looks up `name`, checks its type, shape (cols x rows) and byte size.
 * Returns 1 and fills *t (caller releases t->view) if found, 0 if absent and
 * optional, -1 with an exception set otherwise. */
static int get_tensor(PyObject *tensors, const char *name, int64_t cols, int64_t rows,
                      int optional, tensor_ref *t) {
    PyObject *v = PyDict_GetItemString(tensors, name);
    if (!v) {
        if (optional) return 0;
        PyErr_Format(PyExc_ValueError, "tensor '%s' is missing", name);
        return -1;
    }
    PyObject *buf;
    long long type, ne0, ne1;
    if (!PyTuple_Check(v) || !PyArg_ParseTuple(v, "LLLO", &type, &ne0, &ne1, &buf)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "tensor '%s': expected (type, ne0, ne1, buffer)", name);
        return -1;
    }
    if (type < 0 || type > 1000 || !dl_type_supported((int)type)) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' has tensor type %lld, which deelm does not "
                     "support (supported: %s)", name, type, supported_type_names());
        return -1;
    }
    if (ne0 != cols || ne1 != rows) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' has shape [%lld, %lld]; the model config "
                     "needs [%lld, %lld]", name, ne0, ne1, (long long)cols, (long long)rows);
        return -1;
    }
    int64_t rb = dl_row_bytes((int)type, cols);
    if (rb < 0) {
        PyErr_Format(PyExc_ValueError, "tensor '%s': row length %lld is not a multiple of the %s "
                     "block of %lld", name, (long long)cols, dl_type_name((int)type),
                     (long long)dl_type_block_elems((int)type));
        return -1;
    }
    if (PyObject_GetBuffer(buf, &t->view, PyBUF_SIMPLE) < 0) return -1;
    if (rows > 0 && rb > INT64_MAX / rows) {
        PyBuffer_Release(&t->view);
        PyErr_Format(PyExc_ValueError, "tensor '%s' is too large", name);
        return -1;
    }
    if ((int64_t)t->view.len != rb * rows) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' holds %lld bytes; %s [%lld, %lld] needs %lld",
                     name, (long long)t->view.len, dl_type_name((int)type), (long long)cols,
                     (long long)rows, (long long)(rb * rows));
        PyBuffer_Release(&t->view);
        return -1;
    }
    t->type = (int)type;
    t->cols = cols;
    t->rows = rows;
    return 1;
}

/* Decodes a checked tensor into dst ([rows, cols] floats) and releases it. */
static int decode_ref(const char *name, tensor_ref *t, float *dst) {
    int64_t bad = dl_dequantize(t->type, t->view.buf, dst, t->cols * t->rows);
    PyBuffer_Release(&t->view);
    if (bad) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' holds %lld non-finite values (corrupted file?)",
                     name, (long long)bad);
        return -1;
    }
    return 0;
}

static int decode_tensor(PyObject *tensors, const char *name, int64_t cols, int64_t rows,
                         float *dst) {
    tensor_ref t;
    if (get_tensor(tensors, name, cols, rows, 0, &t) < 0) return -1;
    return decode_ref(name, &t, dst);
}

/* Where one file tensor goes: a float vector, or rows row0.. of a linear layer. */
typedef struct {
    float *vec;
    dl_linear *lin;
    int64_t row0;
} weight_dst;

/* A layer's weights: the nine of LLaMA's block, then the q/k head norms
 * (cfg.qk_norm) and the post-norms (cfg.post_norms). */
#define MAX_LAYER_TENSORS 13
typedef struct {
    const char *suffix;
    int64_t cols, rows;
    weight_dst dst; /* its place in ly (zeros when ly is NULL) */
} layer_spec;

/* The weights layer ly (or any layer, when ly is NULL) of config c reads;
 * returns their count. q, k, v are stacked into one fused matrix, gate and
 * up into another. */
static int layer_specs(const dl_config *c, dl_layer *ly, layer_spec s[MAX_LAYER_TENSORS]) {
    const int64_t d = c->dim, f = c->hidden_dim, hd = c->head_dim;
    const int64_t dq = c->n_heads * hd, dkv = c->n_kv_heads * hd;
    dl_layer none;
    memset(&none, 0, sizeof none);
    dl_layer *y = ly ? ly : &none;
    const layer_spec base[9] = {
        {"attn_norm", d, 1, {y->attn_norm, NULL, 0}},
        {"attn_q", d, dq, {NULL, &y->wqkv, 0}},
        {"attn_k", d, dkv, {NULL, &y->wqkv, dq}},
        {"attn_v", d, dkv, {NULL, &y->wqkv, dq + dkv}},
        {"attn_output", dq, d, {NULL, &y->wo, 0}},
        {"ffn_norm", d, 1, {y->ffn_norm, NULL, 0}},
        {"ffn_gate", d, f, {NULL, &y->wgate_up, 0}},
        {"ffn_up", d, f, {NULL, &y->wgate_up, f}},
        {"ffn_down", f, d, {NULL, &y->wdown, 0}},
    };
    memcpy(s, base, sizeof base);
    int n = 9;
    if (c->qk_norm) {
        s[n++] = (layer_spec){"attn_q_norm", hd, 1, {y->q_norm, NULL, 0}};
        s[n++] = (layer_spec){"attn_k_norm", hd, 1, {y->k_norm, NULL, 0}};
    }
    if (c->post_norms) {
        s[n++] = (layer_spec){"post_attention_norm", d, 1, {y->post_attn_norm, NULL, 0}};
        s[n++] = (layer_spec){"post_ffw_norm", d, 1, {y->post_ffn_norm, NULL, 0}};
    }
    return n;
}

/* Decodes (float32) or packs (int8) a checked tensor into its place and
 * releases it. */
static int store_ref(const char *name, tensor_ref *t, weight_dst dst) {
    if (dst.vec) return decode_ref(name, t, dst.vec);
    dl_linear *w = dst.lin;
    if (w->f.p) {
        float *rows = (float *)malloc((size_t)(t->rows * t->cols) * sizeof(float));
        if (!rows) {
            PyBuffer_Release(&t->view);
            PyErr_NoMemory();
            return -1;
        }
        int err = decode_ref(name, t, rows);
        if (!err) dl_fmat_set_rows(&w->f, dst.row0, rows, t->rows);
        free(rows);
        return err;
    }
    float *scratch = (float *)malloc((size_t)t->cols * sizeof(float));
    int64_t bad = scratch ? dl_qmat_pack_rows(&w->q, dst.row0, t->type, t->view.buf, t->rows, scratch)
                          : DL_ERR_NOMEM;
    free(scratch);
    PyBuffer_Release(&t->view);
    if (bad == DL_ERR_NOMEM) {
        PyErr_NoMemory();
        return -1;
    }
    if (bad < 0) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' does not fit its layer", name);
        return -1;
    }
    if (bad) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' holds %lld non-finite values (corrupted file?)",
                     name, (long long)bad);
        return -1;
    }
    return 0;
}

static int bind_layer(dl_model *m, int64_t l, PyObject *tensors) {
    const dl_config *c = &m->cfg;
    dl_layer *ly = &m->layers[l];
    const int64_t hd = c->head_dim;
    const int64_t dq = c->n_heads * hd, dkv = c->n_kv_heads * hd;
    layer_spec spec[MAX_LAYER_TENSORS];
    const int n_spec = layer_specs(c, ly, spec);
    char name[64];
    for (int i = 0; i < n_spec; i++) {
        snprintf(name, sizeof name, "blk.%lld.%s", (long long)l, spec[i].suffix);
        tensor_ref t;
        if (get_tensor(tensors, name, spec[i].cols, spec[i].rows, 0, &t) < 0) return -1;
        if (store_ref(name, &t, spec[i].dst) < 0) return -1;
    }
    /* optional q/k/v biases (Qwen2); an absent one is zero */
    static const char *bias_names[3] = {"attn_q.bias", "attn_k.bias", "attn_v.bias"};
    const int64_t bias_len[3] = {dq, dkv, dkv}, bias_at[3] = {0, dq, dq + dkv};
    for (int i = 0; i < 3; i++) {
        snprintf(name, sizeof name, "blk.%lld.%s", (long long)l, bias_names[i]);
        tensor_ref t;
        int found = get_tensor(tensors, name, bias_len[i], 1, 1, &t);
        if (found <= 0) {
            if (found < 0) return -1;
            continue;
        }
        if (!ly->bqkv && !(ly->bqkv = (float *)calloc((size_t)(dq + 2 * dkv), sizeof(float)))) {
            PyBuffer_Release(&t.view);
            PyErr_NoMemory();
            return -1;
        }
        if (decode_ref(name, &t, ly->bqkv + bias_at[i]) < 0) return -1;
    }
    return 0;
}

/* Checks every required tensor's type, shape and byte size against the config
 * before anything is allocated from it: a corrupted dimension must fail here,
 * not after gigabytes of weight buffers were requested. */
int dl_py_check_all_shapes(PyObject *tensors, const dl_config *c) {
    layer_spec spec[MAX_LAYER_TENSORS];
    const int n_spec = layer_specs(c, NULL, spec);
    char name[64];
    tensor_ref t;
    if (get_tensor(tensors, "token_embd", c->dim, c->vocab_size, 0, &t) < 0) return -1;
    PyBuffer_Release(&t.view);
    if (get_tensor(tensors, "output_norm", c->dim, 1, 0, &t) < 0) return -1;
    PyBuffer_Release(&t.view);
    for (int64_t l = 0; l < c->n_layers; l++)
        for (int i = 0; i < n_spec; i++) {
            snprintf(name, sizeof name, "blk.%lld.%s", (long long)l, spec[i].suffix);
            if (get_tensor(tensors, name, spec[i].cols, spec[i].rows, 0, &t) < 0) return -1;
            PyBuffer_Release(&t.view);
        }
    return 0;
}

int dl_py_bind_weights(dl_model *m, PyObject *tensors, Py_buffer *embd_view, int *has_view) {
    const dl_config c = m->cfg;
    tensor_ref embd;
    if (get_tensor(tensors, "token_embd", c.dim, c.vocab_size, 0, &embd) < 0) return -1;
    *embd_view = embd.view;
    *has_view = 1;
    m->tok_embd = (const uint8_t *)embd.view.buf;
    m->tok_embd_type = embd.type;
    m->tok_embd_row_bytes = dl_row_bytes(embd.type, c.dim);
    {   /* the table stays encoded; check once that every row decodes finitely */
        float *row = (float *)malloc((size_t)c.dim * sizeof(float));
        if (!row) {
            PyErr_NoMemory();
            return -1;
        }
        int64_t bad = 0;
        for (int64_t v = 0; v < c.vocab_size; v++)
            bad += dl_dequantize(m->tok_embd_type, m->tok_embd + v * m->tok_embd_row_bytes, row, c.dim);
        free(row);
        if (bad) {
            PyErr_Format(PyExc_ValueError, "tensor 'token_embd' holds %lld non-finite values "
                         "(corrupted file?)", (long long)bad);
            return -1;
        }
    }
    if (decode_tensor(tensors, "output_norm", c.dim, 1, m->output_norm) < 0) return -1;
    for (int64_t l = 0; l < c.n_layers; l++)
        if (bind_layer(m, l, tensors) < 0) return -1;
    return 0;
}
