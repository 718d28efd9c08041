/* deelm._core, the CPython binding: what its files share.
 *
 * csrc/py/ is the only part of the core that knows about Python objects:
 *   module.c      PyInit, the name tables exported to Python, the product's
 *                 module functions (isa_info, memory_estimate, linear, ...)
 *   args.c        argument checks every entry point shares (threads, isa,
 *                 precision, bidirectional_from) and the model config dict
 *   weights.c     binding a file's tensors to a dl_model, as the layer
 *                 schema (csrc/schema.c) places them
 *   model_type.c  the Model type: lifetime, forward, config
 *   training.c    Model's LoRA and training methods
 *   test_ops.c    single kernels for tests and benchmarks (rmsnorm, rope,
 *                 attention, peak_gops, ...): not used by the package
 * Every size coming from Python (and so from a file) is checked here before
 * C uses it. */
#ifndef DEELM_PY_H
#define DEELM_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
/* one NumPy API table for all files of the module; module.c imports it */
#define PY_ARRAY_UNIQUE_SYMBOL deelm_core_ARRAY_API
#ifndef DL_PY_MODULE
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <pthread.h>

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

extern PyTypeObject dl_py_model_type;

/* ---- model_type.c ---- */
void dl_py_lock_alone(ModelObject *self);
void dl_py_unlock(ModelObject *self);
int dl_py_check_ready(ModelObject *self);
/* dl_model_forward under the shared lock with the GIL released; -1 with an
 * exception set on failure. */
int dl_py_run_forward(ModelObject *self, const dl_forward_args *a);
/* Validates a packed batch (tokens int32 [N], offsets int64 [n+1], pool
 * int64 [n, 2]) against config c; *n_seq_out receives n. */
int dl_py_check_batch(const dl_config *c, PyArrayObject *tok, PyArrayObject *off,
                      PyArrayObject *pool, int64_t *n_seq_out);
/* Drops the adapters and any training state (the caller holds the lock alone). */
void dl_py_lora_clear(ModelObject *self);

/* ---- training.c: Model methods ---- */
PyObject *dl_py_set_lora(ModelObject *self, PyObject *args);
PyObject *dl_py_clear_lora(ModelObject *self, PyObject *unused);
PyObject *dl_py_residual(ModelObject *self, PyObject *args, PyObject *kwds);
PyObject *dl_py_train_forward(ModelObject *self, PyObject *args, PyObject *kwds);
PyObject *dl_py_train_backward(ModelObject *self, PyObject *args, PyObject *kwds);

/* ---- weights.c ---- */
/* Checks every tensor the config needs (type, shape, bytes) before anything
 * is allocated from it; *qkv_bias: whether the file has q/k/v biases. */
int dl_py_check_all_shapes(PyObject *tensors, const dl_config *c, int *qkv_bias);
/* Binds the token embedding table (its view kept in *embd_view, *has_view set),
 * the output norm and every layer's weights into m. */
int dl_py_bind_weights(dl_model *m, PyObject *tensors, int qkv_bias, Py_buffer *embd_view,
                       int *has_view);

/* ---- args.c ---- */
/* PyArg_Parse converters ("O&"): an int thread count in [1, DL_MAX_THREADS]
 * (the one place that limit is checked), an ISA path name (str, "auto" = the
 * best this CPU runs; int *out) and a precision name (int *out). */
int dl_py_threads(PyObject *o, void *out);
int dl_py_isa(PyObject *o, void *out);
int dl_py_precision(PyObject *o, void *out);
/* bidirectional_from k for config c: -1 (causal) or a layer index; the one
 * check of it. */
int dl_py_check_k(const dl_config *c, long long k);
/* dict[key] as an integer in [lo, hi]; -1 with an exception naming the key. */
int dl_py_get_i64(PyObject *dict, const char *key, int64_t lo, int64_t hi, int64_t *out);
/* The exception for a DL_ERR_* code; always -1. */
int dl_py_raise(int err, const char *what);
PyObject *dl_py_new_f32(int nd, npy_intp *dims);
PyArrayObject *dl_py_as_f32(PyObject *o, int nd);
/* A float64 [DL_N_OPS] timing array (or None: *out = NULL). */
int dl_py_op_seconds(PyObject *o, double **out);

/* The arrays of a model config, besides its scalars in dl_config. */
typedef struct {
    PyObject *inv_freq;       /* float32 [hd / 2] */
    PyObject *inv_freq_local; /* float32 [hd / 2], or NULL */
    PyObject *window;         /* int64 [L], or NULL (no sliding window anywhere) */
} dl_py_config_arrays;

/* Fills c and arr from a config dict (release arr with
 * dl_py_config_arrays_clear, also on failure). */
int dl_py_parse_config(PyObject *cfg, dl_config *c, dl_py_config_arrays *arr);
void dl_py_config_arrays_clear(dl_py_config_arrays *a);

/* ---- test_ops.c ---- */
extern PyMethodDef dl_py_test_methods[];

#endif
