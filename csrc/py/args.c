/* Argument checks every entry point of deelm._core shares, and the model
 * config dict. */
#include "py/py.h" /* first: Python.h sets the feature macros */

#include <math.h>
#include <stdio.h>
#include <string.h>

int dl_py_get_i64(PyObject *dict, const char *key, int64_t lo, int64_t hi, int64_t *out) {
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


/* "'a', 'b' or 'c'" from a table of n names, for messages. */
static const char *choices(const char *const *names, int n, char *buf, size_t size) {
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(buf + len, size - len, "%s'%s'", i == 0 ? "" : i == n - 1 ? " or " : ", ",
                                names[i]);
    return buf;
}

/* DL_PRECISION_* named by Python; -1 with an exception set if unknown. */
static int parse_precision(const char *name) {
    const int p = dl_precision_from_name(name);
    char buf[128];
    if (p < 0)
        PyErr_Format(PyExc_ValueError, "precision must be %s, got '%s'",
                     choices(dl_precision_names, DL_N_PRECISIONS, buf, sizeof buf), name);
    return p;
}

/* The ISA path named by Python ("auto" = the best this CPU runs); -1 with an
 * exception set if unknown or not runnable here. */
static int parse_isa(const char *name) {
    int isa = strcmp(name, "auto") == 0 ? dl_isa_best() : dl_isa_from_name(name);
    if (isa < 0) {
        char buf[128];
        PyErr_Format(PyExc_ValueError, "isa must be 'auto' or one of %s, got '%s'",
                     choices(dl_isa_names, DL_N_ISAS, buf, sizeof buf), name);
        return -1;
    }
    if (!dl_isa_supported(isa)) {
        PyErr_Format(PyExc_ValueError, "this CPU cannot run the isa '%s' path", name);
        return -1;
    }
    return isa;
}

int dl_py_raise(int err, const char *what) {
    if (err == DL_ERR_NOMEM) PyErr_NoMemory();
    else if (err == DL_ERR_NONFINITE)
        PyErr_Format(PyExc_FloatingPointError, "%s produced non-finite values: a layer's "
                     "activations overflowed to inf or NaN (weights or adapter values out of "
                     "range)", what);
    else PyErr_Format(PyExc_RuntimeError, "%s failed (code %d)", what, err);
    return -1;
}


static const char *str_arg(PyObject *o, const char *what) {
    const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (!s && !PyErr_Occurred())
        PyErr_Format(PyExc_TypeError, "%s must be a str, not %.100s", what, Py_TYPE(o)->tp_name);
    return s;
}

int dl_py_threads(PyObject *o, void *out) {
    const long t = PyLong_AsLong(o);
    if (t == -1 && PyErr_Occurred()) return 0;
    if (t < 1 || t > DL_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be in [1, %d], got %ld", DL_MAX_THREADS, t);
        return 0;
    }
    *(int *)out = (int)t;
    return 1;
}

int dl_py_isa(PyObject *o, void *out) {
    const char *name = str_arg(o, "isa");
    return name && (*(int *)out = parse_isa(name)) >= 0;
}

int dl_py_precision(PyObject *o, void *out) {
    const char *name = str_arg(o, "precision");
    return name && (*(int *)out = parse_precision(name)) >= 0;
}

int dl_py_check_k(const dl_config *c, long long k) {
    if (k < -1 || k >= c->n_layers) {
        PyErr_Format(PyExc_ValueError, "bidirectional_from must be -1 (causal) or a layer index "
                     "in [0, %lld), got %lld", (long long)c->n_layers, k);
        return -1;
    }
    return 0;
}

PyObject *dl_py_new_f32(int nd, npy_intp *dims) { return PyArray_SimpleNew(nd, dims, NPY_FLOAT32); }

PyArrayObject *dl_py_as_f32(PyObject *o, int nd) {
    return (PyArrayObject *)PyArray_FROMANY(o, NPY_FLOAT32, nd, nd, NPY_ARRAY_CARRAY);
}

int dl_py_op_seconds(PyObject *o, double **out) {
    *out = NULL;
    if (o == Py_None) return 0;
    /* a float64 array the pass adds its per-op wall times to, in place */
    if (!PyArray_Check(o) || PyArray_TYPE((PyArrayObject *)o) != NPY_FLOAT64 ||
        PyArray_NDIM((PyArrayObject *)o) != 1 || PyArray_DIM((PyArrayObject *)o, 0) != DL_N_OPS ||
        !PyArray_ISCARRAY((PyArrayObject *)o)) {
        PyErr_Format(PyExc_ValueError, "op_seconds must be a writable float64 array of %d", DL_N_OPS);
        return -1;
    }
    *out = (double *)PyArray_DATA((PyArrayObject *)o);
    return 0;
}

/* ---- the model config dict ---- */

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

void dl_py_config_arrays_clear(dl_py_config_arrays *a) {
    Py_CLEAR(a->inv_freq);
    Py_CLEAR(a->inv_freq_local);
    Py_CLEAR(a->window);
}

static int has_key(PyObject *dict, const char *key) { return PyDict_GetItemString(dict, key) != NULL; }

/* The block features beyond LLaMA's (dl_config); each key is optional and
 * defaults to LLaMA's block. */
static int parse_features(PyObject *cfg, dl_config *c, dl_py_config_arrays *arr) {
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
        if (dl_py_get_i64(cfg, "qk_norm", 0, 1, &flag) < 0) return -1;
        c->qk_norm = (int)flag;
    }
    if (has_key(cfg, "post_norms")) {
        if (dl_py_get_i64(cfg, "post_norms", 0, 1, &flag) < 0) return -1;
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

int dl_py_parse_config(PyObject *cfg, dl_config *c, dl_py_config_arrays *arr) {
    int64_t rope_style;
    if (dl_py_get_i64(cfg, "n_layers", 1, 4096, &c->n_layers) < 0 ||
        dl_py_get_i64(cfg, "dim", 1, DIM_LIMIT, &c->dim) < 0 ||
        dl_py_get_i64(cfg, "hidden_dim", 1, DIM_LIMIT, &c->hidden_dim) < 0 ||
        dl_py_get_i64(cfg, "n_heads", 1, 4096, &c->n_heads) < 0 ||
        dl_py_get_i64(cfg, "n_kv_heads", 1, 4096, &c->n_kv_heads) < 0 ||
        dl_py_get_i64(cfg, "head_dim", 2, 4096, &c->head_dim) < 0 ||
        dl_py_get_i64(cfg, "vocab_size", 1, INT32_MAX, &c->vocab_size) < 0 ||
        dl_py_get_i64(cfg, "rope_style", 0, 1, &rope_style) < 0 || get_f32(cfg, "rms_eps", &c->rms_eps) < 0)
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
