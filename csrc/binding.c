/* deelm._core: the only file that knows about Python objects.
 *
 * Model(config: dict, tensors: dict) binds weights once; Model.forward runs one
 * packed batch with the GIL released. The op functions (rmsnorm, rope, ...)
 * expose single kernels so tests can compare each with a reference. Every
 * size coming from Python (and so from a file) is checked here before C uses it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deelm.h"

/* Upper bound on any one model dimension: far above real models, low enough
 * that products of a few of them cannot overflow int64. */
#define DIM_LIMIT (1 << 24)

typedef struct {
    PyObject_HEAD
    dl_model *model;
    Py_buffer embd_view; /* keeps the token embedding bytes alive */
    int has_embd_view;
    /* LoRA adapters: the parameters stay in the caller's NumPy array (an
     * optimiser updates them in place), kept alive here */
    dl_lora lora;
    dl_lora_entry *lora_entries;
    int32_t *lora_slot;
    PyObject *lora_params;
    dl_dense_weights dense;  /* float32 weights for the backward */
    dl_train_state *train;   /* the last train_forward, until its backward */
    /* Guards everything above that a GIL-free pass reads or a call changes:
     * forward passes share it; setting or clearing LoRA and the training
     * calls (which own dense and train) take it alone. A thread always lets
     * the GIL go before it waits for the lock, so the two cannot deadlock. */
    pthread_rwlock_t lock;
    int lock_ready;
} ModelObject;

static void lock_alone(ModelObject *self) {
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&self->lock);
    Py_END_ALLOW_THREADS
}

static void unlock(ModelObject *self) { pthread_rwlock_unlock(&self->lock); }

/* ---- helpers ------------------------------------------------------------ */

static int get_i64(PyObject *dict, const char *key, int64_t lo, int64_t hi, int64_t *out) {
    PyObject *v = PyDict_GetItemString(dict, key);
    if (!v) {
        PyErr_Format(PyExc_ValueError, "model config lacks '%s'", key);
        return -1;
    }
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "model config '%s' is not an integer", key);
        return -1;
    }
    if (x < lo || x > hi) {
        PyErr_Format(PyExc_ValueError, "model config '%s' = %lld is outside [%lld, %lld]", key, x,
                     (long long)lo, (long long)hi);
        return -1;
    }
    *out = (int64_t)x;
    return 0;
}

static int get_f32(PyObject *dict, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(dict, key);
    if (!v) {
        PyErr_Format(PyExc_ValueError, "model config lacks '%s'", key);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "model config '%s' is not a number", key);
        return -1;
    }
    if (!isfinite(x)) {
        PyErr_Format(PyExc_ValueError, "model config '%s' is not finite", key);
        return -1;
    }
    *out = (float)x;
    return 0;
}

/* DL_PRECISION_* named by Python; -1 with an exception set if unknown. */
static int parse_precision(const char *name) {
    if (strcmp(name, "int8") == 0) return DL_PRECISION_INT8;
    if (strcmp(name, "float32") == 0) return DL_PRECISION_F32;
    PyErr_Format(PyExc_ValueError, "precision must be 'int8' or 'float32', got '%s'", name);
    return -1;
}

/* The ISA path named by Python ("auto" = the best this CPU runs); -1 with an
 * exception set if unknown or not runnable here. */
static int parse_isa(const char *name) {
    int isa = strcmp(name, "auto") == 0 ? dl_isa_best() : dl_isa_from_name(name);
    if (isa < 0) {
        PyErr_Format(PyExc_ValueError, "isa must be 'auto', 'avx512vnni', 'avx2' or 'scalar', "
                     "got '%s'", name);
        return -1;
    }
    if (!dl_isa_supported(isa)) {
        PyErr_Format(PyExc_ValueError, "this CPU cannot run the isa '%s' path", name);
        return -1;
    }
    return isa;
}

/* The exception for a DL_ERR_* code; always -1. */
static int raise_err(int err, const char *what) {
    if (err == DL_ERR_NOMEM) PyErr_NoMemory();
    else if (err == DL_ERR_NONFINITE)
        PyErr_Format(PyExc_FloatingPointError, "%s produced non-finite values: a layer's "
                     "activations overflowed to inf or NaN (weights or adapter values out of "
                     "range)", what);
    else PyErr_Format(PyExc_RuntimeError, "%s failed (code %d)", what, err);
    return -1;
}

/* Every entry point that takes a thread count checks it here. */
static int check_threads(int threads) {
    if (threads < 1 || threads > DL_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be in [1, %d], got %d", DL_MAX_THREADS, threads);
        return -1;
    }
    return 0;
}

/* (nh + 2 nkv) hd, the width of a q|k|v row, from Python integers: -1 with an
 * exception when a size is not positive, nh is not a multiple of nkv, or the
 * width overflows. */
static int64_t qkv_width(long long nh, long long nkv, long long hd) {
    long long heads, width;
    if (nh < 1 || nkv < 1 || hd < 1 || nh % nkv || __builtin_mul_overflow(nkv, 2LL, &heads) ||
        __builtin_add_overflow(heads, nh, &heads) || __builtin_mul_overflow(heads, hd, &width) ||
        width > PY_SSIZE_T_MAX / (long long)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "attention: head counts and head_dim must be positive, "
                        "n_heads a multiple of n_kv_heads, and (n_heads + 2 n_kv_heads) head_dim "
                        "must fit in memory");
        return -1;
    }
    return width;
}

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
static int check_all_shapes(PyObject *tensors, const dl_config *c) {
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

/* ---- Model type --------------------------------------------------------- */

static void lora_clear(ModelObject *self) {
    dl_train_state_free(self->train);
    self->train = NULL;
    if (self->model) self->model->lora = NULL;
    free(self->lora_entries);
    free(self->lora_slot);
    self->lora_entries = NULL;
    self->lora_slot = NULL;
    memset(&self->lora, 0, sizeof self->lora);
    Py_CLEAR(self->lora_params);
}

static PyObject *Model_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    ModelObject *self = (ModelObject *)PyType_GenericNew(type, args, kwds);
    if (!self) return NULL;
    /* writers first where the C library can (glibc): a stream of encodes
     * from many threads must not hold off an adapter swap forever */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
#if defined(__GLIBC__) && defined(__USE_GNU)
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
#endif
    const int failed = pthread_rwlock_init(&self->lock, &attr) != 0;
    pthread_rwlockattr_destroy(&attr);
    if (failed) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->lock_ready = 1;
    return (PyObject *)self;
}

static void Model_dealloc(ModelObject *self) {
    lora_clear(self);
    dl_dense_weights_free(&self->dense);
    dl_model_free(self->model);
    if (self->has_embd_view) PyBuffer_Release(&self->embd_view);
    if (self->lock_ready) pthread_rwlock_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A float32 vector config entry of n values (a new reference), or NULL with
 * an exception set. */
static PyObject *get_vector(PyObject *cfg, const char *key, int64_t n) {
    PyObject *v = PyDict_GetItemString(cfg, key);
    if (!v) {
        PyErr_Format(PyExc_ValueError, "model config lacks '%s'", key);
        return NULL;
    }
    PyObject *arr = PyArray_FROMANY(v, NPY_FLOAT32, 1, 1, NPY_ARRAY_CARRAY);
    if (arr && PyArray_DIM((PyArrayObject *)arr, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s has %lld entries; head_dim needs %lld", key,
                     (long long)PyArray_DIM((PyArrayObject *)arr, 0), (long long)n);
        Py_CLEAR(arr);
    }
    return arr;
}

/* The arrays of a model config, besides its scalars in dl_config. */
typedef struct {
    PyObject *inv_freq;       /* float32 [hd / 2] */
    PyObject *inv_freq_local; /* float32 [hd / 2], or NULL */
    PyObject *window;         /* int64 [L], or NULL (no sliding window anywhere) */
} config_arrays;

static void config_arrays_clear(config_arrays *a) {
    Py_CLEAR(a->inv_freq);
    Py_CLEAR(a->inv_freq_local);
    Py_CLEAR(a->window);
}

static int has_key(PyObject *dict, const char *key) { return PyDict_GetItemString(dict, key) != NULL; }

/* The block features beyond LLaMA's (dl_config); each key is optional and
 * defaults to LLaMA's block. */
static int parse_features(PyObject *cfg, dl_config *c, config_arrays *arr) {
    c->embed_scale = 1.0f;
    c->attn_scale = 1.0f / sqrtf((float)c->head_dim);
    c->ffn_act = DL_ACT_SILU;
    int64_t flag;
    if (has_key(cfg, "embed_scale") && get_f32(cfg, "embed_scale", &c->embed_scale) < 0) return -1;
    if (has_key(cfg, "attn_scale") && get_f32(cfg, "attn_scale", &c->attn_scale) < 0) return -1;
    if (!(c->embed_scale > 0.0f) || !(c->attn_scale > 0.0f)) {
        PyErr_Format(PyExc_ValueError, "embed_scale %g and attn_scale %g must be positive",
                     (double)c->embed_scale, (double)c->attn_scale);
        return -1;
    }
    PyObject *act = PyDict_GetItemString(cfg, "ffn_act");
    if (act) {
        const char *name = PyUnicode_Check(act) ? PyUnicode_AsUTF8(act) : NULL;
        if (name && strcmp(name, "silu") == 0) c->ffn_act = DL_ACT_SILU;
        else if (name && strcmp(name, "gelu_tanh") == 0) c->ffn_act = DL_ACT_GELU_TANH;
        else {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "model config 'ffn_act' must be 'silu' or 'gelu_tanh'");
            return -1;
        }
    }
    if (has_key(cfg, "qk_norm")) {
        if (get_i64(cfg, "qk_norm", 0, 1, &flag) < 0) return -1;
        c->qk_norm = (int)flag;
    }
    if (has_key(cfg, "post_norms")) {
        if (get_i64(cfg, "post_norms", 0, 1, &flag) < 0) return -1;
        c->post_norms = (int)flag;
    }
    if (has_key(cfg, "inv_freq_local")) {
        if (!(arr->inv_freq_local = get_vector(cfg, "inv_freq_local", c->head_dim / 2))) return -1;
        c->rope_local = 1;
    }
    PyObject *w = PyDict_GetItemString(cfg, "sliding_window");
    if (w) {
        arr->window = PyArray_FROMANY(w, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY);
        if (!arr->window) return -1;
        const int64_t n = PyArray_DIM((PyArrayObject *)arr->window, 0);
        if (n != c->n_layers) {
            PyErr_Format(PyExc_ValueError, "sliding_window has %lld entries for %lld layers",
                         (long long)n, (long long)c->n_layers);
            return -1;
        }
        const int64_t *v = (const int64_t *)PyArray_DATA((PyArrayObject *)arr->window);
        for (int64_t l = 0; l < n; l++)
            if (v[l] < 0 || v[l] > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "sliding_window[%lld] = %lld is outside [0, %d]",
                             (long long)l, (long long)v[l], INT32_MAX);
                return -1;
            }
    }
    return 0;
}

/* Fills c and arr (release with config_arrays_clear, also on failure). */
static int parse_config(PyObject *cfg, dl_config *c, config_arrays *arr) {
    int64_t rope_style;
    if (get_i64(cfg, "n_layers", 1, 4096, &c->n_layers) < 0 ||
        get_i64(cfg, "dim", 1, DIM_LIMIT, &c->dim) < 0 ||
        get_i64(cfg, "hidden_dim", 1, DIM_LIMIT, &c->hidden_dim) < 0 ||
        get_i64(cfg, "n_heads", 1, 4096, &c->n_heads) < 0 ||
        get_i64(cfg, "n_kv_heads", 1, 4096, &c->n_kv_heads) < 0 ||
        get_i64(cfg, "head_dim", 2, 4096, &c->head_dim) < 0 ||
        get_i64(cfg, "vocab_size", 1, INT32_MAX, &c->vocab_size) < 0 ||
        get_i64(cfg, "rope_style", 0, 1, &rope_style) < 0 || get_f32(cfg, "rms_eps", &c->rms_eps) < 0)
        return -1;
    c->rope_style = (int)rope_style;
    if (c->n_heads % c->n_kv_heads != 0) {
        PyErr_Format(PyExc_ValueError, "n_heads %lld is not a multiple of n_kv_heads %lld",
                     (long long)c->n_heads, (long long)c->n_kv_heads);
        return -1;
    }
    if (c->head_dim % 2 != 0) {
        PyErr_Format(PyExc_ValueError, "head_dim %lld is odd; rotary embedding needs pairs",
                     (long long)c->head_dim);
        return -1;
    }
    if (!(c->rms_eps > 0.0f && c->rms_eps < 1.0f)) {
        PyErr_Format(PyExc_ValueError, "rms_eps %g is outside (0, 1)", (double)c->rms_eps);
        return -1;
    }
    if (!(arr->inv_freq = get_vector(cfg, "inv_freq", c->head_dim / 2))) return -1;
    return parse_features(cfg, c, arr);
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "tensors", "precision", "isa", NULL};
    PyObject *cfg, *tensors;
    const char *precision_name = "int8", *isa_name = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!|ss", kwlist, &PyDict_Type, &cfg, &PyDict_Type,
                                     &tensors, &precision_name, &isa_name))
        return -1;
    const int precision = parse_precision(precision_name);
    if (precision < 0) return -1;
    const int isa = parse_isa(isa_name);
    if (isa < 0) return -1;
    if (self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Model is already initialised");
        return -1;
    }
    dl_config c;
    memset(&c, 0, sizeof c);
    config_arrays arr = {NULL, NULL, NULL};
    if (parse_config(cfg, &c, &arr) < 0 || check_all_shapes(tensors, &c) < 0) {
        config_arrays_clear(&arr);
        return -1;
    }
    dl_model *m = dl_model_alloc(&c, precision, isa);
    if (!m) {
        config_arrays_clear(&arr);
        PyErr_NoMemory();
        return -1;
    }
    const size_t half = (size_t)(c.head_dim / 2) * sizeof(float);
    memcpy(m->inv_freq, PyArray_DATA((PyArrayObject *)arr.inv_freq), half);
    if (arr.inv_freq_local)
        memcpy(m->inv_freq_local, PyArray_DATA((PyArrayObject *)arr.inv_freq_local), half);
    if (arr.window)
        for (int64_t l = 0; l < c.n_layers; l++)
            m->layers[l].window = ((const int64_t *)PyArray_DATA((PyArrayObject *)arr.window))[l];
    config_arrays_clear(&arr);

    tensor_ref embd;
    if (get_tensor(tensors, "token_embd", c.dim, c.vocab_size, 0, &embd) < 0) goto fail;
    self->embd_view = embd.view;
    self->has_embd_view = 1;
    m->tok_embd = (const uint8_t *)embd.view.buf;
    m->tok_embd_type = embd.type;
    m->tok_embd_row_bytes = dl_row_bytes(embd.type, c.dim);
    {   /* the table stays encoded; check once that every row decodes finitely */
        float *row = (float *)malloc((size_t)c.dim * sizeof(float));
        if (!row) {
            PyErr_NoMemory();
            goto fail;
        }
        int64_t bad = 0;
        for (int64_t v = 0; v < c.vocab_size; v++)
            bad += dl_dequantize(m->tok_embd_type, m->tok_embd + v * m->tok_embd_row_bytes, row, c.dim);
        free(row);
        if (bad) {
            PyErr_Format(PyExc_ValueError, "tensor 'token_embd' holds %lld non-finite values "
                         "(corrupted file?)", (long long)bad);
            goto fail;
        }
    }
    if (decode_tensor(tensors, "output_norm", c.dim, 1, m->output_norm) < 0) goto fail;
    for (int64_t l = 0; l < c.n_layers; l++)
        if (bind_layer(m, l, tensors) < 0) goto fail;
    self->model = m;
    return 0;
fail:
    dl_model_free(m);
    if (self->has_embd_view) {
        PyBuffer_Release(&self->embd_view);
        self->has_embd_view = 0;
    }
    return -1;
}

static int check_ready(ModelObject *self) {
    if (!self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Model is not initialised");
        return -1;
    }
    return 0;
}

/* Validates a packed batch: offsets start at 0, strictly increase (no empty
 * sentence) and end at N; token ids are in the vocabulary; pool ranges are
 * non-empty and inside their sentence. */
static int check_batch(const dl_config *c, PyArrayObject *tok, PyArrayObject *off,
                       PyArrayObject *pool, int64_t *n_seq_out) {
    const int64_t N = PyArray_DIM(tok, 0), n_seq = PyArray_DIM(off, 0) - 1;
    const int32_t *t = (const int32_t *)PyArray_DATA(tok);
    const int64_t *o = (const int64_t *)PyArray_DATA(off);
    const int64_t *p = (const int64_t *)PyArray_DATA(pool);
    if (n_seq < 0) {
        PyErr_SetString(PyExc_ValueError, "seq_offsets needs at least one entry");
        return -1;
    }
    if (PyArray_DIM(pool, 0) != n_seq || PyArray_DIM(pool, 1) != 2) {
        PyErr_SetString(PyExc_ValueError, "pool must have shape [n_sentences, 2]");
        return -1;
    }
    if (o[0] != 0 || o[n_seq] != N) {
        PyErr_SetString(PyExc_ValueError, "seq_offsets must start at 0 and end at len(tokens)");
        return -1;
    }
    for (int64_t s = 0; s < n_seq; s++) {
        const int64_t len = o[s + 1] - o[s];
        if (len <= 0) {
            PyErr_Format(PyExc_ValueError, "sentence %lld has no tokens", (long long)s);
            return -1;
        }
        if (len > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "sentence %lld is too long", (long long)s);
            return -1;
        }
        if (p[2 * s] < 0 || p[2 * s] >= p[2 * s + 1] || p[2 * s + 1] > len) {
            PyErr_Format(PyExc_ValueError, "pool range [%lld, %lld) of sentence %lld is not a "
                         "non-empty range inside its %lld tokens", (long long)p[2 * s],
                         (long long)p[2 * s + 1], (long long)s, (long long)len);
            return -1;
        }
    }
    for (int64_t i = 0; i < N; i++)
        if (t[i] < 0 || (int64_t)t[i] >= c->vocab_size) {
            PyErr_Format(PyExc_ValueError, "token id %d at position %lld is outside the "
                         "vocabulary of %lld", t[i], (long long)i, (long long)c->vocab_size);
            return -1;
        }
    *n_seq_out = n_seq;
    return 0;
}

static PyObject *new_f32(int nd, npy_intp *dims) {
    return PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
}

static PyObject *Model_forward(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "seq_offsets", "pool", "bidirectional_from", "threads",
                             "layers", "hidden", "token_states", "op_seconds", NULL};
    PyObject *tok_o, *off_o, *pool_o, *prof_o = Py_None;
    long long k = -1;
    int threads = 1, want_layers = 0, want_hidden = 0, want_tokens = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|LipppO", kwlist, &tok_o, &off_o, &pool_o, &k,
                                     &threads, &want_layers, &want_hidden, &want_tokens, &prof_o))
        return NULL;
    double *op_seconds = NULL;
    if (prof_o != Py_None) {
        /* a float64 array the pass adds its per-op wall times to, in place */
        if (!PyArray_Check(prof_o) || PyArray_TYPE((PyArrayObject *)prof_o) != NPY_FLOAT64 ||
            PyArray_NDIM((PyArrayObject *)prof_o) != 1 ||
            PyArray_DIM((PyArrayObject *)prof_o, 0) != DL_N_OPS ||
            !PyArray_ISCARRAY((PyArrayObject *)prof_o)) {
            PyErr_Format(PyExc_ValueError, "op_seconds must be a writable float64 array of %d",
                         DL_N_OPS);
            return NULL;
        }
        op_seconds = (double *)PyArray_DATA((PyArrayObject *)prof_o);
    }
    if (check_ready(self) < 0) return NULL;
    const dl_config *c = &self->model->cfg;
    if (k < -1 || k >= c->n_layers) {
        PyErr_Format(PyExc_ValueError, "bidirectional_from must be -1 (causal) or a layer index "
                     "in [0, %lld), got %lld", (long long)c->n_layers, k);
        return NULL;
    }
    if (check_threads(threads) < 0) return NULL;
    PyArrayObject *tok = NULL, *off = NULL, *pool = NULL;
    PyObject *pooled = NULL, *layers = NULL, *hidden = NULL, *tstates = NULL, *ret = NULL;
    tok = (PyArrayObject *)PyArray_FROMANY(tok_o, NPY_INT32, 1, 1, NPY_ARRAY_CARRAY);
    off = tok ? (PyArrayObject *)PyArray_FROMANY(off_o, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    pool = off ? (PyArrayObject *)PyArray_FROMANY(pool_o, NPY_INT64, 2, 2, NPY_ARRAY_CARRAY) : NULL;
    if (!pool) goto done;
    int64_t n_seq;
    if (check_batch(c, tok, off, pool, &n_seq) < 0) goto done;
    const int64_t N = PyArray_DIM(tok, 0), L = c->n_layers, d = c->dim;

    npy_intp dp[2] = {(npy_intp)n_seq, (npy_intp)d};
    npy_intp dl[3] = {(npy_intp)(L + 1), (npy_intp)n_seq, (npy_intp)d};
    npy_intp dh[3] = {(npy_intp)(L + 1), (npy_intp)N, (npy_intp)d};
    npy_intp dt[2] = {(npy_intp)N, (npy_intp)d};
    pooled = new_f32(2, dp);
    if (!pooled) goto done;
    if (want_layers && !(layers = new_f32(3, dl))) goto done;
    if (want_hidden && !(hidden = new_f32(3, dh))) goto done;
    if (want_tokens && !(tstates = new_f32(2, dt))) goto done;

    dl_forward_args a = {
        .tokens = (const int32_t *)PyArray_DATA(tok),
        .seq_off = (const int64_t *)PyArray_DATA(off),
        .n_seq = n_seq,
        .pool = (const int64_t *)PyArray_DATA(pool),
        .bidirectional_from = (int64_t)k,
        .n_threads = threads,
        .pooled = (float *)PyArray_DATA((PyArrayObject *)pooled),
        .layer_pooled = layers ? (float *)PyArray_DATA((PyArrayObject *)layers) : NULL,
        .hidden = hidden ? (float *)PyArray_DATA((PyArrayObject *)hidden) : NULL,
        .token_out = tstates ? (float *)PyArray_DATA((PyArrayObject *)tstates) : NULL,
        .op_seconds = op_seconds,
    };
    int err;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&self->lock);
    err = n_seq > 0 ? dl_model_forward(self->model, &a) : DL_OK;
    pthread_rwlock_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    if (err && raise_err(err, "forward pass") < 0) goto done;
    ret = PyTuple_Pack(4, pooled, layers ? layers : Py_None, hidden ? hidden : Py_None,
                       tstates ? tstates : Py_None);
done:
    Py_XDECREF(tok);
    Py_XDECREF(off);
    Py_XDECREF(pool);
    Py_XDECREF(pooled);
    Py_XDECREF(layers);
    Py_XDECREF(hidden);
    Py_XDECREF(tstates);
    return ret;
}

/* ---- LoRA and training ---------------------------------------------------- */

/* Input and output width of a module in this model. */
static void module_dims(const dl_config *c, int module, int64_t *in, int64_t *out) {
    const int64_t d = c->dim, f = c->hidden_dim, dq = c->n_heads * c->head_dim;
    const int64_t dkv = c->n_kv_heads * c->head_dim;
    const int64_t ins[DL_N_MODULES] = {d, d, d, dq, d, d, f};
    const int64_t outs[DL_N_MODULES] = {dq, dkv, dkv, d, f, f, d};
    *in = ins[module];
    *out = outs[module];
}

/* Checks a LoRA table against the model and the parameter buffer: every
 * entry's matrices must lie inside params, entries sorted by (layer, module)
 * without repeats, dimensions those of the module. */
static int check_lora_table(const dl_config *c, const int64_t *t, const float *scales,
                            int64_t n, int64_t size) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t *e = t + 7 * i;
        const int64_t layer = e[0], module = e[1], rank = e[2], in = e[3], out = e[4];
        const int64_t off_a = e[5], off_b = e[6];
        if (layer < 0 || layer >= c->n_layers || module < 0 || module >= DL_N_MODULES) {
            PyErr_Format(PyExc_ValueError, "LoRA entry %lld: layer %lld / module %lld outside "
                         "the model's %lld layers and %d modules", (long long)i, (long long)layer,
                         (long long)module, (long long)c->n_layers, DL_N_MODULES);
            return -1;
        }
        int64_t want_in, want_out;
        module_dims(c, (int)module, &want_in, &want_out);
        if (in != want_in || out != want_out || rank < 1 || rank > DL_LORA_MAX_RANK) {
            PyErr_Format(PyExc_ValueError, "LoRA entry %lld (layer %lld module %lld): rank %lld "
                         "in %lld out %lld, but the module is %lld -> %lld and the rank must be "
                         "in [1, %d]", (long long)i, (long long)layer, (long long)module,
                         (long long)rank, (long long)in, (long long)out, (long long)want_in,
                         (long long)want_out, DL_LORA_MAX_RANK);
            return -1;
        }
        if (off_a < 0 || off_b < 0 || off_a > size - rank * in || off_b > size - rank * out) {
            PyErr_Format(PyExc_ValueError, "LoRA entry %lld: its matrices at %lld and %lld do "
                         "not fit the %lld parameters", (long long)i, (long long)off_a,
                         (long long)off_b, (long long)size);
            return -1;
        }
        if (i > 0 && (layer < t[7 * (i - 1)] || (layer == t[7 * (i - 1)] && module <= t[7 * (i - 1) + 1]))) {
            PyErr_Format(PyExc_ValueError, "LoRA entries must be sorted by (layer, module) "
                         "without repeats (entry %lld)", (long long)i);
            return -1;
        }
        if (!isfinite(scales[i])) {
            PyErr_Format(PyExc_ValueError, "LoRA entry %lld has a non-finite scale", (long long)i);
            return -1;
        }
    }
    return 0;
}

static PyObject *Model_set_lora(ModelObject *self, PyObject *args) {
    PyObject *to, *so, *po;
    if (!PyArg_ParseTuple(args, "OOO", &to, &so, &po)) return NULL;
    if (check_ready(self) < 0) return NULL;
    if (!PyArray_Check(po) || PyArray_TYPE((PyArrayObject *)po) != NPY_FLOAT32 ||
        PyArray_NDIM((PyArrayObject *)po) != 1 || !PyArray_ISCARRAY((PyArrayObject *)po)) {
        PyErr_SetString(PyExc_TypeError, "params must be a writable C-contiguous 1-d float32 "
                        "array (it is used in place)");
        return NULL;
    }
    PyArrayObject *tab = (PyArrayObject *)PyArray_FROMANY(to, NPY_INT64, 2, 2, NPY_ARRAY_CARRAY);
    PyArrayObject *sc = tab ? (PyArrayObject *)PyArray_FROMANY(so, NPY_FLOAT32, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    PyObject *ret = NULL;
    if (!sc) goto done;
    const dl_config *c = &self->model->cfg;
    const int64_t n = PyArray_DIM(tab, 0), size = PyArray_DIM((PyArrayObject *)po, 0);
    if (PyArray_DIM(tab, 1) != 7 || PyArray_DIM(sc, 0) != n || n < 1) {
        PyErr_SetString(PyExc_ValueError, "LoRA table must be int64 [n >= 1, 7] and scales [n]");
        goto done;
    }
    if (check_lora_table(c, PyArray_DATA(tab), PyArray_DATA(sc), n, size) < 0) goto done;
    dl_lora_entry *entries = (dl_lora_entry *)malloc((size_t)n * sizeof *entries);
    int32_t *slot = (int32_t *)malloc((size_t)(c->n_layers * DL_N_MODULES) * sizeof(int32_t));
    if (!entries || !slot) {
        free(entries);
        free(slot);
        PyErr_NoMemory();
        goto done;
    }
    lock_alone(self);
    lora_clear(self);
    for (int64_t i = 0; i < c->n_layers * DL_N_MODULES; i++) slot[i] = -1;
    int64_t max_rank = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t *e = (const int64_t *)PyArray_DATA(tab) + 7 * i;
        entries[i] = (dl_lora_entry){e[0], e[1], e[2], e[3], e[4], e[5], e[6],
                                     ((const float *)PyArray_DATA(sc))[i]};
        slot[e[0] * DL_N_MODULES + e[1]] = (int32_t)i;
        if (e[2] > max_rank) max_rank = e[2];
    }
    Py_INCREF(po);
    self->lora_params = po;
    self->lora_entries = entries;
    self->lora_slot = slot;
    self->lora = (dl_lora){n, entries, (const float *)PyArray_DATA((PyArrayObject *)po), slot,
                           max_rank};
    self->model->lora = &self->lora;
    unlock(self);
    ret = Py_None;
    Py_INCREF(ret);
done:
    Py_XDECREF(tab);
    Py_XDECREF(sc);
    return ret;
}

static PyObject *Model_clear_lora(ModelObject *self, PyObject *unused) {
    (void)unused;
    lock_alone(self);
    lora_clear(self);
    unlock(self);
    Py_RETURN_NONE;
}


static int check_k(const dl_config *c, long long k) {
    if (k < -1 || k >= c->n_layers) {
        PyErr_Format(PyExc_ValueError, "bidirectional_from must be -1 (causal) or a layer index "
                     "in [0, %lld), got %lld", (long long)c->n_layers, k);
        return -1;
    }
    return 0;
}


static PyObject *Model_residual(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "seq_offsets", "layer", "bidirectional_from", "threads",
                             NULL};
    PyObject *tok_o, *off_o;
    long long layer, k = -1;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOL|Li", kwlist, &tok_o, &off_o, &layer, &k,
                                     &threads))
        return NULL;
    if (check_ready(self) < 0) return NULL;
    const dl_config *c = &self->model->cfg;
    if (check_k(c, k) < 0 || check_threads(threads) < 0) return NULL;
    if (layer < 0 || layer >= c->n_layers) {
        PyErr_Format(PyExc_ValueError, "layer must be in [0, %lld), got %lld",
                     (long long)c->n_layers, layer);
        return NULL;
    }
    PyArrayObject *tok = (PyArrayObject *)PyArray_FROMANY(tok_o, NPY_INT32, 1, 1, NPY_ARRAY_CARRAY);
    PyArrayObject *off = tok ? (PyArrayObject *)PyArray_FROMANY(off_o, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    PyArrayObject *pool = NULL;
    PyObject *res = NULL, *ret = NULL;
    if (!off) goto done;
    /* a whole-sentence pool range per sentence, only for check_batch */
    const int64_t n_seq = PyArray_DIM(off, 0) - 1;
    npy_intp pd[2] = {(npy_intp)(n_seq > 0 ? n_seq : 0), 2};
    pool = (PyArrayObject *)PyArray_ZEROS(2, pd, NPY_INT64, 0);
    if (!pool) goto done;
    for (int64_t s = 0; s < n_seq; s++) {
        const int64_t *o = PyArray_DATA(off);
        ((int64_t *)PyArray_DATA(pool))[2 * s + 1] = o[s + 1] - o[s];
    }
    int64_t ns;
    if (check_batch(c, tok, off, pool, &ns) < 0) goto done;
    npy_intp dims[2] = {PyArray_DIM(tok, 0), (npy_intp)c->dim};
    if (!(res = new_f32(2, dims))) goto done;
    dl_forward_args a = {
        .tokens = PyArray_DATA(tok), .seq_off = PyArray_DATA(off), .n_seq = ns,
        .pool = PyArray_DATA(pool), .bidirectional_from = k, .n_threads = threads,
        .stop_at = layer, .residual_out = PyArray_DATA((PyArrayObject *)res),
    };
    int err;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&self->lock);
    err = ns > 0 ? dl_model_forward(self->model, &a) : DL_OK;
    pthread_rwlock_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    if (err && raise_err(err, "forward pass") < 0) goto done;
    ret = res;
    Py_INCREF(ret);
done:
    Py_XDECREF(tok);
    Py_XDECREF(off);
    Py_XDECREF(pool);
    Py_XDECREF(res);
    return ret;
}

static PyObject *Model_train_forward(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "seq_offsets", "pool", "layer_from", "bidirectional_from",
                             "threads", "dropout", "seed", NULL};
    PyObject *x_o, *off_o, *pool_o;
    long long layer_from, k = -1;
    int threads = 1;
    float dropout = 0.0f;
    PyObject *seed_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOL|LifO", kwlist, &x_o, &off_o, &pool_o,
                                     &layer_from, &k, &threads, &dropout, &seed_o))
        return NULL;
    unsigned long long seed = 0;
    if (seed_o) { /* the K format would wrap -1 and 2**64 around silently */
        PyObject *as_int = PyBool_Check(seed_o) ? NULL : PyNumber_Index(seed_o);
        if (as_int) seed = PyLong_AsUnsignedLongLong(as_int);
        Py_XDECREF(as_int);
        if (!as_int || PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "seed must be an int in [0, 2**64)");
            return NULL;
        }
    }
    if (check_ready(self) < 0) return NULL;
    const dl_config *c = &self->model->cfg;
    if (check_k(c, k) < 0 || check_threads(threads) < 0) return NULL;
    if (!self->model->lora) {
        PyErr_SetString(PyExc_RuntimeError, "train_forward needs LoRA parameters: call set_lora");
        return NULL;
    }
    if (layer_from < 0 || layer_from >= c->n_layers) {
        PyErr_Format(PyExc_ValueError, "layer_from must be in [0, %lld), got %lld",
                     (long long)c->n_layers, layer_from);
        return NULL;
    }
    if (!(dropout >= 0.0f && dropout < 1.0f)) {
        PyErr_Format(PyExc_ValueError, "dropout must be in [0, 1), got %g", (double)dropout);
        return NULL;
    }
    for (int64_t i = 0; i < self->lora.n_entries; i++)
        if (self->lora.entries[i].layer < layer_from) {
            PyErr_Format(PyExc_ValueError, "LoRA adapts layer %lld, below layer_from %lld: "
                         "frozen layers cannot be trained", (long long)self->lora.entries[i].layer,
                         layer_from);
            return NULL;
        }
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(x_o, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY);
    PyArrayObject *off = x ? (PyArrayObject *)PyArray_FROMANY(off_o, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    PyArrayObject *pool = off ? (PyArrayObject *)PyArray_FROMANY(pool_o, NPY_INT64, 2, 2, NPY_ARRAY_CARRAY) : NULL;
    PyArrayObject *tok = NULL;
    PyObject *pooled = NULL, *ret = NULL;
    if (!pool) goto done;
    if (PyArray_DIM(x, 1) != c->dim) {
        PyErr_Format(PyExc_ValueError, "x must be [N, %lld]", (long long)c->dim);
        goto done;
    }
    {   /* check_batch wants token ids: zeros of the right length */
        npy_intp td[1] = {PyArray_DIM(x, 0)};
        if (!(tok = (PyArrayObject *)PyArray_ZEROS(1, td, NPY_INT32, 0))) goto done;
    }
    int64_t n_seq;
    if (check_batch(c, tok, off, pool, &n_seq) < 0) goto done;
    if (n_seq < 1) {
        PyErr_SetString(PyExc_ValueError, "train_forward needs at least one sentence");
        goto done;
    }
    for (npy_intp i = 0; i < PyArray_SIZE(x); i++)
        if (!isfinite(((const float *)PyArray_DATA(x))[i])) {
            PyErr_SetString(PyExc_ValueError, "x holds non-finite values");
            goto done;
        }
    npy_intp dp[2] = {(npy_intp)n_seq, (npy_intp)c->dim};
    if (!(pooled = new_f32(2, dp))) goto done;
    lock_alone(self);
    dl_train_state_free(self->train);
    self->train = NULL;
    if (!self->model->lora) { /* cleared by another thread since the check above */
        unlock(self);
        PyErr_SetString(PyExc_RuntimeError, "train_forward needs LoRA parameters: call set_lora");
        goto done;
    }
    dl_train_args a = {
        .x_in = PyArray_DATA(x), .seq_off = PyArray_DATA(off), .n_seq = n_seq,
        .pool = PyArray_DATA(pool), .layer_from = layer_from, .bidirectional_from = k,
        .drop = {dropout, (uint64_t)seed}, .n_threads = threads,
        .pooled = PyArray_DATA((PyArrayObject *)pooled),
    };
    int err;
    dl_train_state *st = NULL;
    Py_BEGIN_ALLOW_THREADS
    err = dl_dense_weights_build(&self->dense, self->model, layer_from);
    if (!err) err = dl_train_forward(self->model, &a, &st);
    Py_END_ALLOW_THREADS
    self->train = err ? NULL : st;
    unlock(self);
    if (err && raise_err(err, "training forward pass") < 0) goto done;
    ret = pooled;
    Py_INCREF(ret);
done:
    Py_XDECREF(x);
    Py_XDECREF(off);
    Py_XDECREF(pool);
    Py_XDECREF(tok);
    Py_XDECREF(pooled);
    return ret;
}

static PyObject *Model_train_backward(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"d_pooled", "grad", "input_grad", NULL};
    PyObject *dp_o, *g_o;
    int want_dx = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|p", kwlist, &dp_o, &g_o, &want_dx))
        return NULL;
    if (check_ready(self) < 0) return NULL;
    const dl_config *c = &self->model->cfg;
    PyArrayObject *dp = (PyArrayObject *)PyArray_FROMANY(dp_o, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY);
    if (!dp) return NULL;
    PyObject *dx = NULL, *ret = NULL;
    /* the state belongs to whichever call holds the lock: check it there */
    lock_alone(self);
    dl_train_state *st = self->train;
    if (!st) {
        PyErr_SetString(PyExc_RuntimeError, "train_backward needs a train_forward first (each "
                        "forward allows one backward)");
        goto done;
    }
    if (!PyArray_Check(g_o) || PyArray_TYPE((PyArrayObject *)g_o) != NPY_FLOAT32 ||
        PyArray_NDIM((PyArrayObject *)g_o) != 1 || !PyArray_ISCARRAY((PyArrayObject *)g_o) ||
        PyArray_DIM((PyArrayObject *)g_o, 0) != PyArray_DIM((PyArrayObject *)self->lora_params, 0)) {
        PyErr_SetString(PyExc_TypeError, "grad must be a writable C-contiguous float32 array "
                        "shaped like the LoRA parameters (it is added to in place)");
        goto done;
    }
    if (PyArray_DIM(dp, 0) != st->n_seq || PyArray_DIM(dp, 1) != c->dim) {
        PyErr_Format(PyExc_ValueError, "d_pooled must be [%lld, %lld], the pooled output's shape",
                     (long long)st->n_seq, (long long)c->dim);
        goto done;
    }
    npy_intp dd[2] = {(npy_intp)st->batch.n_rows, (npy_intp)c->dim};
    if (want_dx && !(dx = new_f32(2, dd))) goto done;
    int err;
    float *grad = PyArray_DATA((PyArrayObject *)g_o);
    Py_BEGIN_ALLOW_THREADS
    err = dl_train_backward(self->model, &self->dense, st, PyArray_DATA(dp), grad,
                            dx ? PyArray_DATA((PyArrayObject *)dx) : NULL);
    Py_END_ALLOW_THREADS
    dl_train_state_free(st);
    self->train = NULL;
    if (err && raise_err(err, "backward pass") < 0) goto done;
    ret = dx ? dx : Py_None;
    Py_INCREF(ret);
done:
    unlock(self);
    Py_XDECREF(dp);
    Py_XDECREF(dx);
    return ret;
}

static PyObject *Model_get_config(ModelObject *self, void *closure) {
    (void)closure;
    if (check_ready(self) < 0) return NULL;
    const dl_model *m = self->model;
    const dl_config *c = &m->cfg;
    PyObject *window = PyList_New(c->n_layers);
    if (!window) return NULL;
    for (int64_t l = 0; l < c->n_layers; l++) {
        PyObject *w = PyLong_FromLongLong((long long)m->layers[l].window);
        if (!w) {
            Py_DECREF(window);
            return NULL;
        }
        PyList_SET_ITEM(window, l, w);
    }
    return Py_BuildValue(
        "{s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:d,s:i,s:s,s:s,s:s,s:d,s:d,s:s,s:i,s:i,s:i,s:N}",
        "n_layers", (long long)c->n_layers, "dim", (long long)c->dim, "hidden_dim",
        (long long)c->hidden_dim, "n_heads", (long long)c->n_heads, "n_kv_heads",
        (long long)c->n_kv_heads, "head_dim", (long long)c->head_dim, "vocab_size",
        (long long)c->vocab_size, "rms_eps", (double)c->rms_eps, "rope_style", c->rope_style,
        "token_embd_type", dl_type_name(m->tok_embd_type), "precision",
        m->precision == DL_PRECISION_INT8 ? "int8" : "float32", "isa",
        dl_isa_name(m->isa), "embed_scale",
        (double)c->embed_scale, "attn_scale", (double)c->attn_scale, "ffn_act",
        c->ffn_act == DL_ACT_GELU_TANH ? "gelu_tanh" : "silu", "qk_norm", c->qk_norm,
        "post_norms", c->post_norms, "rope_local", c->rope_local, "sliding_window", window);
}

static PyMethodDef Model_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Model_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(tokens, seq_offsets, pool, bidirectional_from=-1, threads=1, layers=False, "
     "hidden=False, token_states=False) -> (pooled, layer_pooled, hidden, token_states)\n\n"
     "Runs one packed batch. tokens: int32 [N]; seq_offsets: int64 [n+1]; pool: int64 [n, 2] "
     "token range pooled in each sentence. Outputs not asked for are None. op_seconds: "
     "optional float64 array of len(OP_NAMES) to which the wall time of each kind of op is "
     "added."},
    {"set_lora", (PyCFunction)Model_set_lora, METH_VARARGS,
     "set_lora(table int64[n, 7], scales float32[n], params float32[size]): adapters "
     "(layer, module, rank, in, out, off_A, off_B) added to every later pass; params is used in "
     "place, so updating it updates the model"},
    {"clear_lora", (PyCFunction)Model_clear_lora, METH_NOARGS, "clear_lora(): drop the adapters"},
    {"residual", (PyCFunction)(void (*)(void))Model_residual, METH_VARARGS | METH_KEYWORDS,
     "residual(tokens, seq_offsets, layer, bidirectional_from=-1, threads=1) -> float32 [N, d], "
     "the residual stream entering `layer` (layers below it run, nothing else)"},
    {"train_forward", (PyCFunction)(void (*)(void))Model_train_forward,
     METH_VARARGS | METH_KEYWORDS,
     "train_forward(x[N, d], seq_offsets, pool, layer_from, bidirectional_from=-1, threads=1, "
     "dropout=0.0, seed=0) -> pooled [n, d]: layers >= layer_from on x (from residual()), "
     "keeping what train_backward needs"},
    {"train_backward", (PyCFunction)(void (*)(void))Model_train_backward,
     METH_VARARGS | METH_KEYWORDS,
     "train_backward(d_pooled[n, d], grad float32[size], input_grad=False) -> dL/dx [N, d] or "
     "None; adds dL/dparams to grad"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Model_getset[] = {
    {"config", (getter)Model_get_config, NULL, "model dimensions as a dict", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "deelm._core.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(config, tensors): LLaMA-family or Gemma-3 weights bound for the forward pass.",
    .tp_new = Model_new,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
};

/* ---- single ops, for tests ------------------------------------------------ */

static PyArrayObject *as_f32(PyObject *o, int nd) {
    return (PyArrayObject *)PyArray_FROMANY(o, NPY_FLOAT32, nd, nd, NPY_ARRAY_CARRAY);
}

static PyObject *op_rmsnorm(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo, *wo;
    float eps;
    if (!PyArg_ParseTuple(args, "OOf", &xo, &wo, &eps)) return NULL;
    PyArrayObject *x = as_f32(xo, 2), *w = x ? as_f32(wo, 1) : NULL;
    PyObject *out = NULL;
    if (w && PyArray_DIM(w, 0) != PyArray_DIM(x, 1))
        PyErr_SetString(PyExc_ValueError, "w must have x.shape[1] entries");
    else if (w && (out = PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0)))
        dl_rmsnorm_forward((float *)PyArray_DATA((PyArrayObject *)out), PyArray_DATA(x),
                           PyArray_DATA(w), PyArray_DIM(x, 0), PyArray_DIM(x, 1), eps);
    Py_XDECREF(x);
    Py_XDECREF(w);
    return out;
}

/* rope(...) and rope_backward(...): the backward rotates by minus the angle. */
static PyObject *rope_op(PyObject *args, int inverse) {
    PyObject *xo, *po, *fo;
    int style;
    if (!PyArg_ParseTuple(args, "OOOi", &xo, &po, &fo, &style)) return NULL;
    /* x: [n, heads, hd]; pos: int32 [n]; inv_freq: [hd/2] */
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(xo, NPY_FLOAT32, 3, 3,
                                                        NPY_ARRAY_CARRAY | NPY_ARRAY_ENSURECOPY);
    PyArrayObject *pos = x ? (PyArrayObject *)PyArray_FROMANY(po, NPY_INT32, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    PyArrayObject *fr = pos ? as_f32(fo, 1) : NULL;
    PyObject *ret = NULL;
    float *cs = NULL;
    if (!fr) goto done;
    const int64_t n = PyArray_DIM(x, 0), heads = PyArray_DIM(x, 1), hd = PyArray_DIM(x, 2);
    if (PyArray_DIM(pos, 0) != n || hd % 2 || PyArray_DIM(fr, 0) != hd / 2 || (style != 0 && style != 1)) {
        PyErr_SetString(PyExc_ValueError, "rope: inconsistent shapes or style");
        goto done;
    }
    int32_t maxp = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t p = ((int32_t *)PyArray_DATA(pos))[i];
        if (p < 0) {
            PyErr_SetString(PyExc_ValueError, "rope: negative position");
            goto done;
        }
        if (p > maxp) maxp = p;
    }
    cs = (float *)malloc(((size_t)maxp + 1) * (size_t)hd * sizeof(float));
    if (!cs) {
        PyErr_NoMemory();
        goto done;
    }
    dl_rope_table(cs, (int64_t)maxp + 1, hd / 2, PyArray_DATA(fr));
    (inverse ? dl_rope_backward : dl_rope_forward)(PyArray_DATA(x), n, heads * hd, heads, hd,
                                                   PyArray_DATA(pos), cs, style);
    ret = (PyObject *)x;
    Py_INCREF(ret);
done:
    free(cs);
    Py_XDECREF(x);
    Py_XDECREF(pos);
    Py_XDECREF(fr);
    return ret;
}

static PyObject *op_rope(PyObject *mod, PyObject *args) {
    (void)mod;
    return rope_op(args, 0);
}

static PyObject *op_rope_backward(PyObject *mod, PyObject *args) {
    (void)mod;
    return rope_op(args, 1);
}

/* The attention spec of the test ops: scale 0 means 1/sqrt(hd). */
static int attn_spec(dl_attn_spec *spec, long long hd, int causal, double scale, long long window) {
    if (!(scale >= 0.0 && isfinite(scale)) || window < 0 || window > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "attention: scale must be >= 0 (0: 1/sqrt(hd)) and "
                        "window in [0, 2^31)");
        return -1;
    }
    spec->scale = scale > 0.0 ? (float)scale : 1.0f / sqrtf((float)hd);
    spec->causal = causal;
    spec->window = window;
    return 0;
}

static PyObject *op_attention(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *qo, *oo;
    long long nh, nkv, hd, window = 0;
    int causal, threads;
    double scale = 0.0;
    if (!PyArg_ParseTuple(args, "OOLLLpi|dL", &qo, &oo, &nh, &nkv, &hd, &causal, &threads, &scale,
                          &window))
        return NULL;
    PyArrayObject *qkv = as_f32(qo, 2);
    PyArrayObject *off = qkv ? (PyArrayObject *)PyArray_FROMANY(oo, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    PyObject *out = NULL;
    if (!off) goto done;
    const int64_t N = PyArray_DIM(qkv, 0), n_seq = PyArray_DIM(off, 0) - 1;
    const int64_t *o = PyArray_DATA(off);
    const int64_t width = qkv_width(nh, nkv, hd);
    if (width < 0 || check_threads(threads) < 0) goto done;
    if (PyArray_DIM(qkv, 1) != width || n_seq < 0 || o[0] != 0 || o[n_seq] != N) {
        PyErr_SetString(PyExc_ValueError, "attention: inconsistent shapes");
        goto done;
    }
    {   /* softmax turns an inf or NaN key into finite garbage: refuse it */
        const float *q = PyArray_DATA(qkv);
        for (int64_t i = 0; i < N * width; i++)
            if (!isfinite(q[i])) {
                PyErr_SetString(PyExc_ValueError, "attention: qkv holds inf or NaN");
                goto done;
            }
    }
    dl_attn_spec spec;
    if (attn_spec(&spec, hd, causal, scale, window) < 0) goto done;
    for (int64_t s = 0; s < n_seq; s++)
        if (o[s + 1] < o[s]) {
            PyErr_SetString(PyExc_ValueError, "attention: offsets decrease");
            goto done;
        }
    npy_intp dims[2] = {(npy_intp)N, (npy_intp)(nh * hd)};
    out = new_f32(2, dims);
    if (!out) goto done;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = dl_attention_forward(PyArray_DATA((PyArrayObject *)out), PyArray_DATA(qkv),
                               width, o, n_seq, nh, nkv, hd, spec, threads);
    Py_END_ALLOW_THREADS
    if (err) {
        Py_CLEAR(out);
        PyErr_NoMemory();
    }
done:
    Py_XDECREF(qkv);
    Py_XDECREF(off);
    return out;
}

/* swiglu(gu) and geglu(gu): the gated unit with the activation `act`. */
static PyObject *glu_op(PyObject *args, int act) {
    PyObject *go;
    if (!PyArg_ParseTuple(args, "O", &go)) return NULL;
    PyArrayObject *gu = as_f32(go, 2);
    if (!gu) return NULL;
    PyObject *out = NULL;
    if (PyArray_DIM(gu, 1) % 2) {
        PyErr_SetString(PyExc_ValueError, "glu: the fused input needs an even width");
    } else {
        npy_intp dims[2] = {PyArray_DIM(gu, 0), PyArray_DIM(gu, 1) / 2};
        if ((out = new_f32(2, dims)))
            dl_glu_forward(act, PyArray_DATA((PyArrayObject *)out), PyArray_DATA(gu), dims[0],
                           dims[1], 1);
    }
    Py_DECREF(gu);
    return out;
}

static PyObject *op_swiglu(PyObject *mod, PyObject *args) {
    (void)mod;
    return glu_op(args, DL_ACT_SILU);
}

static PyObject *op_geglu(PyObject *mod, PyObject *args) {
    (void)mod;
    return glu_op(args, DL_ACT_GELU_TANH);
}

static PyObject *op_linear(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo, *wo;
    int threads = 1;
    const char *isa_name = "auto";
    if (!PyArg_ParseTuple(args, "OO|is", &xo, &wo, &threads, &isa_name)) return NULL;
    const int isa = parse_isa(isa_name);
    if (isa < 0) return NULL;
    PyArrayObject *x = as_f32(xo, 2), *w = x ? as_f32(wo, 2) : NULL;
    PyObject *out = NULL;
    dl_fmat f;
    memset(&f, 0, sizeof f);
    if (w && check_threads(threads) < 0) {
    } else if (w && PyArray_DIM(w, 1) != PyArray_DIM(x, 1)) {
        PyErr_SetString(PyExc_ValueError, "linear: x is [n, in], w is [out, in]");
    } else if (w) {
        npy_intp dims[2] = {PyArray_DIM(x, 0), PyArray_DIM(w, 0)};
        if (dl_fmat_alloc(&f, dims[1], PyArray_DIM(w, 1))) {
            PyErr_NoMemory();
        } else if ((out = new_f32(2, dims))) {
            dl_fmat_set_rows(&f, 0, PyArray_DATA(w), dims[1]);
            Py_BEGIN_ALLOW_THREADS
            dl_sgemm(PyArray_DATA((PyArrayObject *)out), dims[1], PyArray_DATA(x), dims[0], &f, 0,
                     isa, threads);
            Py_END_ALLOW_THREADS
        }
    }
    dl_fmat_free(&f);
    Py_XDECREF(x);
    Py_XDECREF(w);
    return out;
}

/* Packs a GGUF-encoded [rows, cols] weight for the int8 GEMM; -1 with an
 * exception on bad sizes or non-finite weights. */
static int pack_weight(dl_qmat *w, int type, Py_buffer *buf, long long rows, long long cols) {
    int64_t rb = dl_row_bytes(type, cols);
    if (!dl_type_supported(type) || rows < 1 || cols < 1 || rows > DIM_LIMIT || cols > DIM_LIMIT ||
        rb < 0 || rb * rows != (int64_t)buf->len) {
        PyErr_SetString(PyExc_ValueError, "weight: unsupported type or bytes do not match [rows, cols]");
        return -1;
    }
    float *scratch = (float *)malloc((size_t)cols * sizeof(float));
    if (!scratch || dl_qmat_alloc(w, rows, cols)) {
        free(scratch);
        PyErr_NoMemory();
        return -1;
    }
    int64_t bad = dl_qmat_pack_rows(w, 0, type, buf->buf, rows, scratch);
    free(scratch);
    if (bad) {
        dl_qmat_free(w);
        PyErr_SetString(PyExc_ValueError, "weight holds non-finite values");
        return -1;
    }
    return 0;
}

static PyObject *op_qlinear(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo;
    int type, threads = 1;
    Py_buffer buf;
    long long rows, cols;
    const char *isa_name = "auto";
    if (!PyArg_ParseTuple(args, "Oiy*LL|si", &xo, &type, &buf, &rows, &cols, &isa_name, &threads))
        return NULL;
    PyArrayObject *x = NULL;
    PyObject *out = NULL;
    dl_qmat w;
    dl_qact qx;
    int have_w = 0;
    memset(&qx, 0, sizeof qx);
    const int isa = parse_isa(isa_name);
    if (isa < 0) goto done;
    if (check_threads(threads) < 0) goto done;
    if (pack_weight(&w, type, &buf, rows, cols) < 0) goto done;
    have_w = 1;
    if (!(x = as_f32(xo, 2))) goto done;
    if (PyArray_DIM(x, 1) != cols) {
        PyErr_SetString(PyExc_ValueError, "qlinear: x must be [n, cols]");
        goto done;
    }
    const int64_t n = PyArray_DIM(x, 0);
    npy_intp dims[2] = {(npy_intp)n, (npy_intp)rows};
    if (!(out = new_f32(2, dims))) goto done;
    if (dl_qact_alloc(&qx, n, cols)) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    dl_quantize_rows(&qx, PyArray_DATA(x), n, cols, isa, threads);
    dl_qgemm(PyArray_DATA((PyArrayObject *)out), rows, &qx, n, &w, 0, isa, threads);
    Py_END_ALLOW_THREADS
done:
    if (have_w) dl_qmat_free(&w);
    dl_qact_free(&qx);
    PyBuffer_Release(&buf);
    Py_XDECREF(x);
    return out;
}

static PyObject *op_qweight(PyObject *mod, PyObject *args) {
    (void)mod;
    int type;
    Py_buffer buf;
    long long rows, cols;
    if (!PyArg_ParseTuple(args, "iy*LL", &type, &buf, &rows, &cols)) return NULL;
    dl_qmat w;
    PyObject *out = NULL;
    if (pack_weight(&w, type, &buf, rows, cols) == 0) {
        npy_intp dims[2] = {(npy_intp)rows, (npy_intp)cols};
        if ((out = new_f32(2, dims)))
            for (int64_t r = 0; r < rows; r++)
                dl_qmat_row(&w, r, (float *)PyArray_DATA((PyArrayObject *)out) + r * cols);
        dl_qmat_free(&w);
    }
    PyBuffer_Release(&buf);
    return out;
}

static PyObject *op_quantize_rows(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo;
    const char *isa_name = "auto";
    if (!PyArg_ParseTuple(args, "O|s", &xo, &isa_name)) return NULL;
    const int isa = parse_isa(isa_name);
    if (isa < 0) return NULL;
    PyArrayObject *x = as_f32(xo, 2);
    if (!x) return NULL;
    const int64_t n = PyArray_DIM(x, 0), cols = PyArray_DIM(x, 1);
    const int64_t nb = (cols + DL_QBLOCK - 1) / DL_QBLOCK;
    dl_qact a;
    PyObject *q = NULL, *d = NULL, *s = NULL, *ret = NULL;
    if (dl_qact_alloc(&a, n, cols)) {
        Py_DECREF(x);
        return PyErr_NoMemory();
    }
    dl_quantize_rows(&a, PyArray_DATA(x), n, cols, isa, 1);
    npy_intp qd[2] = {(npy_intp)n, (npy_intp)(nb * DL_QBLOCK)}, sd[2] = {(npy_intp)n, (npy_intp)nb};
    q = PyArray_SimpleNew(2, qd, NPY_INT8);
    d = new_f32(2, sd);
    s = new_f32(2, sd);
    if (q && d && s) {
        memcpy(PyArray_DATA((PyArrayObject *)q), a.q, (size_t)(n * nb * DL_QBLOCK));
        memcpy(PyArray_DATA((PyArrayObject *)d), a.d, (size_t)(n * nb) * sizeof(float));
        memcpy(PyArray_DATA((PyArrayObject *)s), a.s, (size_t)(n * nb) * sizeof(float));
        ret = PyTuple_Pack(3, q, d, s);
    }
    Py_XDECREF(q);
    Py_XDECREF(d);
    Py_XDECREF(s);
    dl_qact_free(&a);
    Py_DECREF(x);
    return ret;
}

static PyObject *op_isa_info(PyObject *mod, PyObject *args) {
    (void)mod;
    (void)args;
    PyObject *supported = PyList_New(0);
    if (!supported) return NULL;
    for (int isa = DL_ISA_SCALAR; isa <= DL_ISA_AVX512VNNI; isa++)
        if (dl_isa_supported(isa)) {
            PyObject *name = PyUnicode_FromString(dl_isa_name(isa));
            if (!name || PyList_Append(supported, name) < 0) {
                Py_XDECREF(name);
                Py_DECREF(supported);
                return NULL;
            }
            Py_DECREF(name);
        }
    PyObject *features = PyDict_New();
    for (int isa = DL_ISA_SCALAR; features && isa <= DL_ISA_AVX512VNNI; isa++) {
        PyObject *f = PyUnicode_FromString(dl_isa_features(isa));
        if (!f || PyDict_SetItemString(features, dl_isa_name(isa), f) < 0) Py_CLEAR(features);
        Py_XDECREF(f);
    }
    if (!features) {
        Py_DECREF(supported);
        return NULL;
    }
    return Py_BuildValue("{s:s,s:N,s:N}", "best", dl_isa_name(dl_isa_best()), "supported", supported,
                         "features", features);
}

/* memory_estimate(config, precision, n_tokens, max_len, threads=1, lora_rank=0,
 * qkv_bias=False) -> {'weights': bytes the model's own arrays take,
 * 'forward': bytes one forward call allocates for a batch of n_tokens tokens
 * whose longest sentence has max_len}: the allocators' own arithmetic. */
static PyObject *op_memory_estimate(PyObject *mod, PyObject *args, PyObject *kwds) {
    (void)mod;
    static char *kwlist[] = {"config", "precision", "n_tokens", "max_len", "threads", "lora_rank",
                             "qkv_bias", NULL};
    PyObject *cfg;
    const char *precision_name;
    long long n_tokens, max_len;
    long long lora_rank = 0;
    int threads = 1, qkv_bias = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!sLL|iLp", kwlist, &PyDict_Type, &cfg,
                                     &precision_name, &n_tokens, &max_len, &threads, &lora_rank,
                                     &qkv_bias))
        return NULL;
    const int precision = parse_precision(precision_name);
    if (precision < 0) return NULL;
    if (check_threads(threads) < 0) return NULL;
    if (n_tokens < 0 || n_tokens > INT32_MAX || max_len < 0 || max_len > n_tokens ||
        lora_rank < 0 || lora_rank > DL_LORA_MAX_RANK) {
        PyErr_SetString(PyExc_ValueError, "memory_estimate needs 0 <= max_len <= n_tokens <= 2^31 "
                        "and 0 <= lora_rank <= 256");
        return NULL;
    }
    dl_config c;
    memset(&c, 0, sizeof c);
    config_arrays arr = {NULL, NULL, NULL};
    const int bad = parse_config(cfg, &c, &arr) < 0;
    config_arrays_clear(&arr);
    if (bad) return NULL;
    return Py_BuildValue("{s:L,s:L}", "weights", (long long)dl_model_bytes(&c, precision, qkv_bias),
                         "forward", (long long)dl_forward_bytes(&c, precision, lora_rank, n_tokens,
                                                                max_len, threads));
}

static PyObject *op_peak_gops(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *kind;
    int threads = 1;
    long long iters = 100000000;
    if (!PyArg_ParseTuple(args, "s|iL", &kind, &threads, &iters)) return NULL;
    int k = strcmp(kind, "int8") == 0 ? DL_PEAK_INT8 : strcmp(kind, "fp32") == 0 ? DL_PEAK_FP32
            : strcmp(kind, "int8_avx2") == 0 ? DL_PEAK_INT8_AVX2
            : strcmp(kind, "fp32_avx2") == 0 ? DL_PEAK_FP32_AVX2 : -1;
    if (check_threads(threads) < 0) return NULL;
    if (k < 0 || iters < 1000) {
        PyErr_SetString(PyExc_ValueError, "peak_gops(kind 'int8', 'fp32', 'int8_avx2' or 'fp32_avx2', "
                        "iters >= 1000)");
        return NULL;
    }
    double g;
    Py_BEGIN_ALLOW_THREADS
    g = dl_peak_gops(k, threads, iters);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(g);
}

static PyObject *op_dequantize(PyObject *mod, PyObject *args) {
    (void)mod;
    int type;
    Py_buffer buf;
    long long n;
    if (!PyArg_ParseTuple(args, "iy*L", &type, &buf, &n)) return NULL;
    PyObject *out = NULL;
    int64_t rb = dl_row_bytes(type, n);
    if (!dl_type_supported(type)) {
        PyErr_Format(PyExc_ValueError, "tensor type %d is not supported", type);
    } else if (rb < 0) {
        PyErr_Format(PyExc_ValueError, "%s: %lld elements are not a whole number of its blocks of "
                     "%lld", dl_type_name(type), n, (long long)dl_type_block_elems(type));
    } else if (rb != (int64_t)buf.len) {
        PyErr_Format(PyExc_ValueError, "%s: %lld elements need %lld bytes, got %lld",
                     dl_type_name(type), n, (long long)rb, (long long)buf.len);
    } else {
        npy_intp dims[1] = {(npy_intp)n};
        if ((out = new_f32(1, dims)))
            dl_dequantize(type, buf.buf, PyArray_DATA((PyArrayObject *)out), n);
    }
    PyBuffer_Release(&buf);
    return out;
}

static PyObject *op_type_info(PyObject *mod, PyObject *args) {
    (void)mod;
    int type;
    if (!PyArg_ParseTuple(args, "i", &type)) return NULL;
    if (!dl_type_supported(type)) Py_RETURN_NONE;
    return Py_BuildValue("(sLL)", dl_type_name(type), (long long)dl_type_block_elems(type),
                         (long long)dl_type_block_bytes(type));
}

/* ---- backward ops, for tests ---------------------------------------------- */

/* A C-contiguous float32 array with the same shape as `like`, or NULL with
 * an exception set. */
static PyArrayObject *f32_like(PyObject *o, PyArrayObject *like, const char *name) {
    PyArrayObject *a = as_f32(o, PyArray_NDIM(like));
    if (a && !PyArray_SAMESHAPE(a, like)) {
        PyErr_Format(PyExc_ValueError, "%s must have the shape of the forward input", name);
        Py_CLEAR(a);
    }
    return a;
}

static PyObject *op_rmsnorm_backward(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo, *wo, *go;
    float eps;
    if (!PyArg_ParseTuple(args, "OOfO", &xo, &wo, &eps, &go)) return NULL;
    PyArrayObject *x = as_f32(xo, 2), *w = x ? as_f32(wo, 1) : NULL;
    PyArrayObject *g = w ? f32_like(go, x, "dout") : NULL;
    PyObject *dx = NULL;
    if (g && PyArray_DIM(w, 0) != PyArray_DIM(x, 1))
        PyErr_SetString(PyExc_ValueError, "w must have x.shape[1] entries");
    else if (g && (dx = PyArray_ZEROS(2, PyArray_DIMS(x), NPY_FLOAT32, 0)))
        dl_rmsnorm_backward(PyArray_DATA((PyArrayObject *)dx), PyArray_DATA(g), PyArray_DATA(x),
                            PyArray_DATA(w), PyArray_DIM(x, 0), PyArray_DIM(x, 1), eps, 1);
    Py_XDECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(g);
    return dx;
}

/* swiglu_backward(gu, dout) and geglu_backward(gu, dout). */
static PyObject *glu_backward_op(PyObject *args, int act) {
    PyObject *go, *do_;
    if (!PyArg_ParseTuple(args, "OO", &go, &do_)) return NULL;
    PyArrayObject *gu = as_f32(go, 2), *dout = gu ? as_f32(do_, 2) : NULL;
    PyObject *dgu = NULL;
    if (dout && (PyArray_DIM(gu, 1) % 2 || PyArray_DIM(dout, 0) != PyArray_DIM(gu, 0) ||
                 2 * PyArray_DIM(dout, 1) != PyArray_DIM(gu, 1)))
        PyErr_SetString(PyExc_ValueError, "glu_backward: gu [n, 2f] and dout [n, f]");
    else if (dout && (dgu = new_f32(2, PyArray_DIMS(gu))))
        dl_glu_backward(act, PyArray_DATA((PyArrayObject *)dgu), PyArray_DATA(dout),
                        PyArray_DATA(gu), PyArray_DIM(gu, 0), PyArray_DIM(dout, 1), 1);
    Py_XDECREF(gu);
    Py_XDECREF(dout);
    return dgu;
}

static PyObject *op_swiglu_backward(PyObject *mod, PyObject *args) {
    (void)mod;
    return glu_backward_op(args, DL_ACT_SILU);
}

static PyObject *op_geglu_backward(PyObject *mod, PyObject *args) {
    (void)mod;
    return glu_backward_op(args, DL_ACT_GELU_TANH);
}

static PyObject *op_attention_backward(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *qo, *oo, *go;
    long long nh, nkv, hd, window = 0;
    int causal, threads;
    double scale = 0.0;
    if (!PyArg_ParseTuple(args, "OOOLLLpi|dL", &qo, &oo, &go, &nh, &nkv, &hd, &causal, &threads,
                          &scale, &window))
        return NULL;
    PyArrayObject *qkv = as_f32(qo, 2);
    PyArrayObject *off = qkv ? (PyArrayObject *)PyArray_FROMANY(oo, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    PyArrayObject *g = off ? as_f32(go, 2) : NULL;
    PyObject *dqkv = NULL;
    if (!g) goto done;
    const int64_t N = PyArray_DIM(qkv, 0), n_seq = PyArray_DIM(off, 0) - 1;
    const int64_t *o = PyArray_DATA(off);
    const int64_t width = qkv_width(nh, nkv, hd);
    if (width < 0 || check_threads(threads) < 0) goto done;
    if (PyArray_DIM(qkv, 1) != width || PyArray_DIM(g, 0) != N || PyArray_DIM(g, 1) != nh * hd ||
        n_seq < 0 || o[0] != 0 || o[n_seq] != N) {
        PyErr_SetString(PyExc_ValueError, "attention_backward: inconsistent shapes");
        goto done;
    }
    dl_attn_spec spec;
    if (attn_spec(&spec, hd, causal, scale, window) < 0) goto done;
    for (int64_t s = 0; s < n_seq; s++)
        if (o[s + 1] < o[s]) {
            PyErr_SetString(PyExc_ValueError, "attention_backward: offsets decrease");
            goto done;
        }
    if (!(dqkv = new_f32(2, PyArray_DIMS(qkv)))) goto done;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = dl_attention_backward(PyArray_DATA((PyArrayObject *)dqkv), PyArray_DATA(g),
                                PyArray_DATA(qkv), (nh + 2 * nkv) * hd, o, n_seq, nh, nkv, hd,
                                spec, threads);
    Py_END_ALLOW_THREADS
    if (err) {
        Py_CLEAR(dqkv);
        PyErr_NoMemory();
    }
done:
    Py_XDECREF(qkv);
    Py_XDECREF(off);
    Py_XDECREF(g);
    return dqkv;
}

static PyMethodDef module_methods[] = {
    {"rmsnorm", op_rmsnorm, METH_VARARGS, "rmsnorm(x[n, d], w[d], eps) -> [n, d]"},
    {"rope", op_rope, METH_VARARGS,
     "rope(x[n, heads, hd], pos int32[n], inv_freq[hd/2], style) -> rotated copy; style 0 "
     "interleaved pairs, 1 rotate-half"},
    {"attention", op_attention, METH_VARARGS,
     "attention(qkv[N, (nh+2nkv) hd], seq_offsets int64[n+1], nh, nkv, hd, causal, threads, "
     "scale=1/sqrt(hd), window=0) -> [N, nh hd]"},
    {"swiglu", op_swiglu, METH_VARARGS, "swiglu(gu[n, 2f]) -> silu(g) * u, [n, f]"},
    {"geglu", op_geglu, METH_VARARGS, "geglu(gu[n, 2f]) -> gelu_tanh(g) * u, [n, f]"},
    {"rmsnorm_backward", op_rmsnorm_backward, METH_VARARGS,
     "rmsnorm_backward(x[n, d], w[d], eps, dout[n, d]) -> dx"},
    {"rope_backward", op_rope_backward, METH_VARARGS,
     "rope_backward(dx[n, heads, hd], pos, inv_freq, style) -> the gradient before the rotation"},
    {"attention_backward", op_attention_backward, METH_VARARGS,
     "attention_backward(qkv, seq_offsets, dout[N, nh hd], nh, nkv, hd, causal, threads, "
     "scale=1/sqrt(hd), window=0) -> dqkv"},
    {"swiglu_backward", op_swiglu_backward, METH_VARARGS,
     "swiglu_backward(gu[n, 2f], dout[n, f]) -> dgu[n, 2f]"},
    {"geglu_backward", op_geglu_backward, METH_VARARGS,
     "geglu_backward(gu[n, 2f], dout[n, f]) -> dgu[n, 2f]"},
    {"linear", op_linear, METH_VARARGS,
     "linear(x[n, in], w[out, in], threads=1, isa=\"auto\") -> x w^T (float32 GEMM, dl_sgemm)"},
    {"dequantize", op_dequantize, METH_VARARGS, "dequantize(type, bytes, n) -> float32[n]"},
    {"qlinear", op_qlinear, METH_VARARGS,
     "qlinear(x[n, cols], type, w_bytes, rows, cols, isa='auto', threads=1) -> [n, rows]: the "
     "int8 GEMM of x with a GGUF-encoded weight"},
    {"qweight", op_qweight, METH_VARARGS,
     "qweight(type, w_bytes, rows, cols) -> [rows, cols]: the weights as the int8 path packs them"},
    {"quantize_rows", op_quantize_rows, METH_VARARGS,
     "quantize_rows(x[n, cols], isa='auto') -> (q int8[n, 32 nb], d[n, nb], s[n, nb])"},
    {"memory_estimate", (PyCFunction)(void (*)(void))op_memory_estimate,
     METH_VARARGS | METH_KEYWORDS,
     "memory_estimate(config, precision, n_tokens, max_len, threads=1, lora_rank=0, qkv_bias=False)"
     " -> {'weights': bytes, 'forward': bytes}"},
    {"isa_info", op_isa_info, METH_NOARGS, "isa_info() -> {'best': name, 'supported': [names], 'features': {name: 'cpu,features'}}"},
    {"peak_gops", op_peak_gops, METH_VARARGS,
     "peak_gops(kind='int8'|'fp32'|'int8_avx2'|'fp32_avx2', threads=1, iters=1e8) -> "
     "measured peak G ops/s"},
    {"type_info", op_type_info, METH_VARARGS,
     "type_info(type) -> (name, block_elems, block_bytes), or None if unsupported"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "deelm._core", "deelm's C core.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    if (dl_fork_safety_install() != DL_OK) {
        PyErr_SetString(PyExc_RuntimeError, "could not register deelm's fork handler");
        return NULL;
    }
    if (PyType_Ready(&ModelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&ModelType);
    PyObject *ops = Py_BuildValue("(sssssssss)", "qkv", "attn_output", "gate_up", "down",
                                  "attention", "rmsnorm", "rope", "glu", "embed_pool");
    if (PyModule_AddIntConstant(m, "MAX_THREADS", DL_MAX_THREADS) < 0 || !ops ||
        PyModule_AddObject(m, "OP_NAMES", ops) < 0) {
        Py_XDECREF(ops);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
