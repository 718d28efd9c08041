/* deelm._core's module: PyInit, the tables of names exported to Python, and
 * the module functions the package uses (isa_info, memory_estimate,
 * type_info, dequantize, linear). Single-kernel functions for tests and
 * benchmarks are in test_ops.c. */
#define DL_PY_MODULE /* this file imports NumPy's API table for the others */
#include "py/py.h" /* first: Python.h sets the feature macros */

#include <string.h>

static PyObject *op_linear(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo, *wo;
    int threads = 1, isa = dl_isa_best();
    if (!PyArg_ParseTuple(args, "OO|O&O&", &xo, &wo, dl_py_threads, &threads, dl_py_isa, &isa))
        return NULL;
    PyArrayObject *x = dl_py_as_f32(xo, 2), *w = x ? dl_py_as_f32(wo, 2) : NULL;
    PyObject *out = NULL;
    dl_fmat f;
    memset(&f, 0, sizeof f);
    if (w && PyArray_DIM(w, 1) != PyArray_DIM(x, 1)) {
        PyErr_SetString(PyExc_ValueError, "linear: x is [n, in], w is [out, in]");
    } else if (w) {
        npy_intp dims[2] = {PyArray_DIM(x, 0), PyArray_DIM(w, 0)};
        if (dl_fmat_alloc(&f, dims[1], PyArray_DIM(w, 1))) {
            PyErr_NoMemory();
        } else if ((out = dl_py_new_f32(2, dims))) {
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
    long long n_tokens, max_len;
    long long lora_rank = 0;
    int precision, threads = 1, qkv_bias = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O&LL|O&Lp", kwlist, &PyDict_Type, &cfg,
                                     dl_py_precision, &precision, &n_tokens, &max_len,
                                     dl_py_threads, &threads, &lora_rank, &qkv_bias))
        return NULL;
    if (n_tokens < 0 || n_tokens > INT32_MAX || max_len < 0 || max_len > n_tokens ||
        lora_rank < 0 || lora_rank > DL_LORA_MAX_RANK) {
        PyErr_SetString(PyExc_ValueError, "memory_estimate needs 0 <= max_len <= n_tokens <= 2^31 "
                        "and 0 <= lora_rank <= 256");
        return NULL;
    }
    dl_config c;
    memset(&c, 0, sizeof c);
    dl_py_config_arrays arr = {NULL, NULL, NULL};
    const int bad = dl_py_parse_config(cfg, &c, &arr) < 0;
    dl_py_config_arrays_clear(&arr);
    if (bad) return NULL;
    return Py_BuildValue("{s:L,s:L}", "weights", (long long)dl_model_bytes(&c, precision, qkv_bias),
                         "forward", (long long)dl_forward_bytes(&c, precision, lora_rank, n_tokens,
                                                                max_len, threads));
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
        if ((out = dl_py_new_f32(1, dims)))
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

static const char *const feature_names[] = {
    [DL_FEAT_BASE] = "base", [DL_FEAT_QK_NORM] = "qk_norm", [DL_FEAT_POST_NORMS] = "post_norms",
    [DL_FEAT_QKV_BIAS] = "qkv_bias",
};

/* A shape entry: the width's size for config c, or its name without one. */
static PyObject *width(const dl_config *c, int w) {
    return c ? PyLong_FromLongLong((long long)dl_width(c, w)) : PyUnicode_FromString(dl_width_name(w));
}

/* One schema entry as a dict: name, feature, shape ([out, in] or [n], as
 * Hugging Face orders it), module (PEFT name or None). */
static PyObject *tensor_entry(const dl_config *c, const dl_tensor_spec *t) {
    const int lin = t->module >= 0 && t->feature == DL_FEAT_BASE;
    const int first = t->module >= 0 ? dl_modules[t->module].out : t->width;
    PyObject *shape = lin ? Py_BuildValue("(NN)", width(c, first), width(c, dl_modules[t->module].in))
                          : Py_BuildValue("(N)", width(c, first));
    if (!shape) return NULL;
    return Py_BuildValue("{s:s,s:s,s:N,s:s}", "name", dl_tensor_name(t), "feature",
                         feature_names[t->feature], "shape", shape, "module",
                         lin ? dl_modules[t->module].peft : NULL);
}

/* layer_schema(config=None): the layer's tensors from csrc/schema.c. */
static PyObject *op_layer_schema(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *cfg = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &cfg)) return NULL;
    dl_config c;
    memset(&c, 0, sizeof c);
    if (cfg != Py_None) {
        if (!PyDict_Check(cfg)) {
            PyErr_SetString(PyExc_TypeError, "layer_schema(config): config must be a dict or None");
            return NULL;
        }
        /* only the widths: the sizes, not the arrays, of a config */
        const char *keys[] = {"dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size"};
        int64_t *dst[] = {&c.dim, &c.hidden_dim, &c.n_heads, &c.n_kv_heads, &c.head_dim, &c.vocab_size};
        for (int i = 0; i < 6; i++)
            if (dl_py_get_i64(cfg, keys[i], 0, INT32_MAX, dst[i]) < 0) return NULL;
    }
    PyObject *out = PyTuple_New(DL_N_LAYER_TENSORS);
    for (int i = 0; out && i < DL_N_LAYER_TENSORS; i++) {
        PyObject *e = tensor_entry(cfg != Py_None ? &c : NULL, &dl_layer_tensors[i]);
        if (!e) Py_CLEAR(out);
        else PyTuple_SET_ITEM(out, i, e);
    }
    return out;
}

/* A tuple of n C strings. */
static PyObject *names(const char *const *table, int n) {
    PyObject *t = PyTuple_New(n);
    for (int i = 0; t && i < n; i++) {
        PyObject *s = PyUnicode_FromString(table[i]);
        if (!s) Py_CLEAR(t);
        else PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

/* The name tables the package reads instead of restating them. */
static int add_names(PyObject *m) {
    const char *modules[DL_N_MODULES];
    for (int i = 0; i < DL_N_MODULES; i++) modules[i] = dl_modules[i].peft;
    struct { const char *attr; PyObject *value; } t[] = {
        {"OP_NAMES", names(dl_op_names, DL_N_OPS)},
        {"ISA_NAMES", names(dl_isa_names, DL_N_ISAS)},
        {"PRECISION_NAMES", names(dl_precision_names, DL_N_PRECISIONS)},
        {"LORA_MODULES", names(modules, DL_N_MODULES)},
    };
    int err = 0;
    for (size_t i = 0; i < sizeof t / sizeof *t; i++) {
        if (!err && t[i].value && PyModule_AddObject(m, t[i].attr, t[i].value) == 0) continue;
        err = 1; /* AddObject steals the reference only when it succeeds */
        Py_XDECREF(t[i].value);
    }
    return err ? -1 : 0;
}

static PyMethodDef module_methods[] = {
    {"linear", op_linear, METH_VARARGS,
     "linear(x[n, in], w[out, in], threads=1, isa=\"auto\") -> x w^T (float32 GEMM, dl_sgemm)"},
    {"dequantize", op_dequantize, METH_VARARGS, "dequantize(type, bytes, n) -> float32[n]"},
    {"memory_estimate", (PyCFunction)(void (*)(void))op_memory_estimate,
     METH_VARARGS | METH_KEYWORDS,
     "memory_estimate(config, precision, n_tokens, max_len, threads=1, lora_rank=0, qkv_bias=False)"
     " -> {'weights': bytes, 'forward': bytes}"},
    {"isa_info", op_isa_info, METH_NOARGS, "isa_info() -> {'best': name, 'supported': [names], 'features': {name: 'cpu,features'}}"},
    {"layer_schema", op_layer_schema, METH_VARARGS,
     "layer_schema(config=None) -> ({'name', 'feature', 'shape', 'module'}, ...): a layer's "
     "tensors (csrc/schema.c); shapes as [out, in] or [n], in sizes for a config dict or in "
     "width names ('d', 'dq', ...) without one; module: the PEFT name of a projection"},
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
    if (PyType_Ready(&dl_py_model_type) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddFunctions(m, dl_py_test_methods) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_THREADS", DL_MAX_THREADS) < 0 || add_names(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&dl_py_model_type);
    if (PyModule_AddObject(m, "Model", (PyObject *)&dl_py_model_type) < 0) {
        Py_DECREF(&dl_py_model_type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
