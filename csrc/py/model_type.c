/* The Model type: binds a model's weights once (Model(config, tensors)) and
 * runs packed batches with the GIL released (forward). Its LoRA and training
 * methods are in training.c. */
#include "py/py.h" /* first: Python.h sets the feature macros */

#include <stdlib.h>
#include <string.h>

void dl_py_lock_alone(ModelObject *self) {
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&self->lock);
    Py_END_ALLOW_THREADS
}

void dl_py_unlock(ModelObject *self) { pthread_rwlock_unlock(&self->lock); }

void dl_py_lora_clear(ModelObject *self) {
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
    dl_py_lora_clear(self);
    dl_dense_weights_free(&self->dense);
    dl_model_free(self->model);
    if (self->has_embd_view) PyBuffer_Release(&self->embd_view);
    if (self->lock_ready) pthread_rwlock_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "tensors", "precision", "isa", NULL};
    PyObject *cfg, *tensors, *precision_o = NULL, *isa_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!|OO", kwlist, &PyDict_Type, &cfg, &PyDict_Type,
                                     &tensors, &precision_o, &isa_o))
        return -1;
    int precision = DL_PRECISION_INT8, isa = dl_isa_best();
    if (precision_o && !dl_py_precision(precision_o, &precision)) return -1;
    if (isa_o && !dl_py_isa(isa_o, &isa)) return -1;
    if (self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Model is already initialised");
        return -1;
    }
    dl_config c;
    memset(&c, 0, sizeof c);
    dl_py_config_arrays arr = {NULL, NULL, NULL};
    int qkv_bias;
    if (dl_py_parse_config(cfg, &c, &arr) < 0 || dl_py_check_all_shapes(tensors, &c, &qkv_bias) < 0) {
        dl_py_config_arrays_clear(&arr);
        return -1;
    }
    dl_model *m = dl_model_alloc(&c, precision, isa, qkv_bias);
    if (!m) {
        dl_py_config_arrays_clear(&arr);
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
    dl_py_config_arrays_clear(&arr);
    if (dl_py_bind_weights(m, tensors, qkv_bias, &self->embd_view, &self->has_embd_view) < 0) {
        dl_model_free(m);
        if (self->has_embd_view) {
            PyBuffer_Release(&self->embd_view);
            self->has_embd_view = 0;
        }
        return -1;
    }
    self->model = m;
    return 0;
}

int dl_py_run_forward(ModelObject *self, const dl_forward_args *a) {
    int err;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&self->lock);
    err = a->n_seq > 0 ? dl_model_forward(self->model, a) : DL_OK;
    pthread_rwlock_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    return err ? dl_py_raise(err, "forward pass") : 0;
}

int dl_py_check_ready(ModelObject *self) {
    if (!self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Model is not initialised");
        return -1;
    }
    return 0;
}

/* Validates a packed batch: offsets start at 0, strictly increase (no empty
 * sentence) and end at N; token ids are in the vocabulary; pool ranges are
 * non-empty and inside their sentence. */
int dl_py_check_batch(const dl_config *c, PyArrayObject *tok, PyArrayObject *off,
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

static PyObject *Model_forward(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "seq_offsets", "pool", "bidirectional_from", "threads",
                             "layers", "hidden", "token_states", "op_seconds", NULL};
    PyObject *tok_o, *off_o, *pool_o, *prof_o = Py_None;
    long long k = -1;
    int threads = 1, want_layers = 0, want_hidden = 0, want_tokens = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|LO&pppO", kwlist, &tok_o, &off_o, &pool_o,
                                     &k, dl_py_threads, &threads, &want_layers, &want_hidden,
                                     &want_tokens, &prof_o))
        return NULL;
    double *op_seconds;
    if (dl_py_op_seconds(prof_o, &op_seconds) < 0 || dl_py_check_ready(self) < 0) return NULL;
    const dl_config *c = &self->model->cfg;
    if (dl_py_check_k(c, k) < 0) return NULL;
    PyArrayObject *tok = NULL, *off = NULL, *pool = NULL;
    PyObject *pooled = NULL, *layers = NULL, *hidden = NULL, *tstates = NULL, *ret = NULL;
    tok = (PyArrayObject *)PyArray_FROMANY(tok_o, NPY_INT32, 1, 1, NPY_ARRAY_CARRAY);
    off = tok ? (PyArrayObject *)PyArray_FROMANY(off_o, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    pool = off ? (PyArrayObject *)PyArray_FROMANY(pool_o, NPY_INT64, 2, 2, NPY_ARRAY_CARRAY) : NULL;
    if (!pool) goto done;
    int64_t n_seq;
    if (dl_py_check_batch(c, tok, off, pool, &n_seq) < 0) goto done;
    const int64_t N = PyArray_DIM(tok, 0), L = c->n_layers, d = c->dim;

    npy_intp dp[2] = {(npy_intp)n_seq, (npy_intp)d};
    npy_intp dl[3] = {(npy_intp)(L + 1), (npy_intp)n_seq, (npy_intp)d};
    npy_intp dh[3] = {(npy_intp)(L + 1), (npy_intp)N, (npy_intp)d};
    npy_intp dt[2] = {(npy_intp)N, (npy_intp)d};
    pooled = dl_py_new_f32(2, dp);
    if (!pooled) goto done;
    if (want_layers && !(layers = dl_py_new_f32(3, dl))) goto done;
    if (want_hidden && !(hidden = dl_py_new_f32(3, dh))) goto done;
    if (want_tokens && !(tstates = dl_py_new_f32(2, dt))) goto done;

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
    if (dl_py_run_forward(self, &a) < 0) goto done;
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

static PyObject *Model_get_config(ModelObject *self, void *closure) {
    (void)closure;
    if (dl_py_check_ready(self) < 0) return NULL;
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
        dl_precision_names[m->precision], "isa",
        dl_isa_name(m->isa), "embed_scale",
        (double)c->embed_scale, "attn_scale", (double)c->attn_scale, "ffn_act",
        c->ffn_act == DL_ACT_GELU_TANH ? "gelu_tanh" : "silu", "qk_norm", c->qk_norm,
        "post_norms", c->post_norms, "rope_local", c->rope_local, "sliding_window", window);
}

static PyObject *Model_get_weight_bytes(ModelObject *self, void *closure) {
    (void)closure;
    if (dl_py_check_ready(self) < 0) return NULL;
    return PyLong_FromLongLong((long long)self->model->owned_bytes);
}

static PyMethodDef Model_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Model_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(tokens, seq_offsets, pool, bidirectional_from=-1, threads=1, layers=False, "
     "hidden=False, token_states=False) -> (pooled, layer_pooled, hidden, token_states)\n\n"
     "Runs one packed batch. tokens: int32 [N]; seq_offsets: int64 [n+1]; pool: int64 [n, 2] "
     "token range pooled in each sentence. Outputs not asked for are None. op_seconds: "
     "optional float64 array of len(OP_NAMES) to which the wall time of each kind of op is "
     "added."},
    {"set_lora", (PyCFunction)dl_py_set_lora, METH_VARARGS,
     "set_lora(table int64[n, 7], scales float32[n], params float32[size]): adapters "
     "(layer, module, rank, in, out, off_A, off_B) added to every later pass; params is used in "
     "place, so updating it updates the model"},
    {"clear_lora", (PyCFunction)dl_py_clear_lora, METH_NOARGS, "clear_lora(): drop the adapters"},
    {"residual", (PyCFunction)(void (*)(void))dl_py_residual, METH_VARARGS | METH_KEYWORDS,
     "residual(tokens, seq_offsets, layer, bidirectional_from=-1, threads=1) -> float32 [N, d], "
     "the residual stream entering `layer` (layers below it run, nothing else)"},
    {"train_forward", (PyCFunction)(void (*)(void))dl_py_train_forward,
     METH_VARARGS | METH_KEYWORDS,
     "train_forward(x[N, d], seq_offsets, pool, layer_from, bidirectional_from=-1, threads=1, "
     "dropout=0.0, seed=0) -> pooled [n, d]: layers >= layer_from on x (from residual()), "
     "keeping what train_backward needs"},
    {"train_backward", (PyCFunction)(void (*)(void))dl_py_train_backward,
     METH_VARARGS | METH_KEYWORDS,
     "train_backward(d_pooled[n, d], grad float32[size], input_grad=False) -> dL/dx [N, d] or "
     "None; adds dL/dparams to grad"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Model_getset[] = {
    {"config", (getter)Model_get_config, NULL, "model dimensions as a dict", NULL},
    {"weight_bytes", (getter)Model_get_weight_bytes, NULL,
     "bytes of the arrays the model allocated (memory_estimate's 'weights' counts the same)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject dl_py_model_type = {
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
