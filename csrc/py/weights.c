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

/* The place of schema tensor t in layer ly. */
static weight_dst destination(const dl_config *c, const dl_tensor_spec *t, dl_layer *ly) {
    char *base = (char *)ly;
    if (t->module < 0) return (weight_dst){*(float **)(base + t->field), NULL, 0};
    const int64_t row0 = dl_module_row0(c, t->module);
    if (t->feature == DL_FEAT_QKV_BIAS) return (weight_dst){ly->bqkv + row0, NULL, 0};
    return (weight_dst){NULL, (dl_linear *)(base + dl_fused_field[dl_modules[t->module].fused]), row0};
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

/* Looks up blk.<l>.<t's name> as get_tensor does (the biases are optional). */
static int layer_tensor(PyObject *tensors, const dl_config *c, int64_t l, const dl_tensor_spec *t,
                        char name[64], tensor_ref *ref) {
    int64_t cols, rows;
    dl_tensor_shape(c, t, &cols, &rows);
    snprintf(name, 64, "blk.%lld.%s", (long long)l, dl_tensor_name(t));
    return get_tensor(tensors, name, cols, rows, t->feature == DL_FEAT_QKV_BIAS, ref);
}

static int bind_layer(dl_model *m, int64_t l, PyObject *tensors, int qkv_bias) {
    const dl_config *c = &m->cfg;
    char name[64];
    for (int i = 0; i < DL_N_LAYER_TENSORS; i++) {
        const dl_tensor_spec *t = &dl_layer_tensors[i];
        if (!dl_feature_on(c, t->feature, qkv_bias)) continue;
        tensor_ref ref;
        const int found = layer_tensor(tensors, c, l, t, name, &ref);
        if (found < 0) return -1;
        if (found && store_ref(name, &ref, destination(c, t, &m->layers[l])) < 0) return -1;
    }
    return 0;
}

/* Checks every tensor's type, shape and byte size against the config before
 * anything is allocated from it: a corrupted dimension must fail here, not
 * after gigabytes of weight buffers were requested. *qkv_bias: whether any
 * layer has a q/k/v bias. */
int dl_py_check_all_shapes(PyObject *tensors, const dl_config *c, int *qkv_bias) {
    char name[64];
    tensor_ref t;
    *qkv_bias = 0;
    if (get_tensor(tensors, "token_embd", c->dim, c->vocab_size, 0, &t) < 0) return -1;
    PyBuffer_Release(&t.view);
    if (get_tensor(tensors, "output_norm", c->dim, 1, 0, &t) < 0) return -1;
    PyBuffer_Release(&t.view);
    for (int64_t l = 0; l < c->n_layers; l++)
        for (int i = 0; i < DL_N_LAYER_TENSORS; i++) {
            const dl_tensor_spec *s = &dl_layer_tensors[i];
            if (!dl_feature_on(c, s->feature, 1)) continue;
            const int found = layer_tensor(tensors, c, l, s, name, &t);
            if (found < 0) return -1;
            if (found) PyBuffer_Release(&t.view);
            if (found && s->feature == DL_FEAT_QKV_BIAS) *qkv_bias = 1;
        }
    return 0;
}

int dl_py_bind_weights(dl_model *m, PyObject *tensors, int qkv_bias, Py_buffer *embd_view,
                       int *has_view) {
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
        if (bind_layer(m, l, tensors, qkv_bias) < 0) return -1;
    return 0;
}
