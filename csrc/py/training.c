/* Model's LoRA and training methods: set_lora / clear_lora (adapters added
 * to every later pass), residual (the frozen layers' output, computed once
 * per batch), train_forward and train_backward (the trained layers, with the
 * state the backward needs kept in the Model until then). */
#include "py/py.h" /* first: Python.h sets the feature macros */

#include <math.h>
#include <stdlib.h>
#include <string.h>

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
        const int64_t want_in = dl_width(c, dl_modules[module].in);
        const int64_t want_out = dl_width(c, dl_modules[module].out);
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

PyObject *dl_py_set_lora(ModelObject *self, PyObject *args) {
    PyObject *to, *so, *po;
    if (!PyArg_ParseTuple(args, "OOO", &to, &so, &po)) return NULL;
    if (dl_py_check_ready(self) < 0) return NULL;
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
    dl_py_lock_alone(self);
    dl_py_lora_clear(self);
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
    dl_py_unlock(self);
    ret = Py_None;
    Py_INCREF(ret);
done:
    Py_XDECREF(tab);
    Py_XDECREF(sc);
    return ret;
}

PyObject *dl_py_clear_lora(ModelObject *self, PyObject *unused) {
    (void)unused;
    dl_py_lock_alone(self);
    dl_py_lora_clear(self);
    dl_py_unlock(self);
    Py_RETURN_NONE;
}

PyObject *dl_py_residual(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "seq_offsets", "layer", "bidirectional_from", "threads",
                             NULL};
    PyObject *tok_o, *off_o;
    long long layer, k = -1;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOL|LO&", kwlist, &tok_o, &off_o, &layer, &k,
                                     dl_py_threads, &threads))
        return NULL;
    if (dl_py_check_ready(self) < 0) return NULL;
    const dl_config *c = &self->model->cfg;
    if (dl_py_check_k(c, k) < 0) return NULL;
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
    if (dl_py_check_batch(c, tok, off, pool, &ns) < 0) goto done;
    npy_intp dims[2] = {PyArray_DIM(tok, 0), (npy_intp)c->dim};
    if (!(res = dl_py_new_f32(2, dims))) goto done;
    dl_forward_args a = {
        .tokens = PyArray_DATA(tok), .seq_off = PyArray_DATA(off), .n_seq = ns,
        .pool = PyArray_DATA(pool), .bidirectional_from = k, .n_threads = threads,
        .stop_at = layer, .residual_out = PyArray_DATA((PyArrayObject *)res),
    };
    if (dl_py_run_forward(self, &a) < 0) goto done;
    ret = res;
    Py_INCREF(ret);
done:
    Py_XDECREF(tok);
    Py_XDECREF(off);
    Py_XDECREF(pool);
    Py_XDECREF(res);
    return ret;
}

PyObject *dl_py_train_forward(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "seq_offsets", "pool", "layer_from", "bidirectional_from",
                             "threads", "dropout", "seed", NULL};
    PyObject *x_o, *off_o, *pool_o;
    long long layer_from, k = -1;
    int threads = 1;
    float dropout = 0.0f;
    PyObject *seed_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOL|LO&fO", kwlist, &x_o, &off_o, &pool_o,
                                     &layer_from, &k, dl_py_threads, &threads, &dropout, &seed_o))
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
    if (dl_py_check_ready(self) < 0) return NULL;
    const dl_config *c = &self->model->cfg;
    if (dl_py_check_k(c, k) < 0) return NULL;
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
    if (dl_py_check_batch(c, tok, off, pool, &n_seq) < 0) goto done;
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
    if (!(pooled = dl_py_new_f32(2, dp))) goto done;
    dl_py_lock_alone(self);
    dl_train_state_free(self->train);
    self->train = NULL;
    if (!self->model->lora) { /* cleared by another thread since the check above */
        dl_py_unlock(self);
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
    dl_py_unlock(self);
    if (err && dl_py_raise(err, "training forward pass") < 0) goto done;
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

PyObject *dl_py_train_backward(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"d_pooled", "grad", "input_grad", NULL};
    PyObject *dp_o, *g_o;
    int want_dx = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|p", kwlist, &dp_o, &g_o, &want_dx))
        return NULL;
    if (dl_py_check_ready(self) < 0) return NULL;
    const dl_config *c = &self->model->cfg;
    PyArrayObject *dp = (PyArrayObject *)PyArray_FROMANY(dp_o, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY);
    if (!dp) return NULL;
    PyObject *dx = NULL, *ret = NULL;
    /* the state belongs to whichever call holds the lock: check it there */
    dl_py_lock_alone(self);
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
    if (want_dx && !(dx = dl_py_new_f32(2, dd))) goto done;
    int err;
    float *grad = PyArray_DATA((PyArrayObject *)g_o);
    Py_BEGIN_ALLOW_THREADS
    err = dl_train_backward(self->model, &self->dense, st, PyArray_DATA(dp), grad,
                            dx ? PyArray_DATA((PyArrayObject *)dx) : NULL);
    Py_END_ALLOW_THREADS
    dl_train_state_free(st);
    self->train = NULL;
    if (err && dl_py_raise(err, "backward pass") < 0) goto done;
    ret = dx ? dx : Py_None;
    Py_INCREF(ret);
done:
    dl_py_unlock(self);
    Py_XDECREF(dp);
    Py_XDECREF(dx);
    return ret;
}
