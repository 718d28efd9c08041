/* Single kernels of the core as module functions, for tests (each compared
 * with a NumPy or torch reference) and benchmarks (attention alone, the
 * measured instruction peak). The package itself does not call them. */
#include "py/py.h" /* first: Python.h sets the feature macros */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A module function calling fn(args, arg): one wrapper serves a pair of ops
 * (rope and its inverse, SwiGLU and GeGLU). */
#define BOUND_OP(name, fn, arg)                                                                   \
    static PyObject *name(PyObject *mod, PyObject *args) {                                       \
        (void)mod;                                                                                \
        return fn(args, arg);                                                                     \
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

static PyObject *op_rmsnorm(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo, *wo;
    float eps;
    if (!PyArg_ParseTuple(args, "OOf", &xo, &wo, &eps)) return NULL;
    PyArrayObject *x = dl_py_as_f32(xo, 2), *w = x ? dl_py_as_f32(wo, 1) : NULL;
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
    PyArrayObject *fr = pos ? dl_py_as_f32(fo, 1) : NULL;
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

BOUND_OP(op_rope, rope_op, 0)
BOUND_OP(op_rope_backward, rope_op, 1)

/* What attention and attention_backward both take: qkv [N, (nh + 2 nkv) hd],
 * seq_offsets int64 [n + 1] (from 0 to N, never decreasing), the head sizes,
 * the mask and scale (0: 1/sqrt(hd)), threads. */
typedef struct {
    PyArrayObject *qkv, *off;
    long long nh, nkv, hd, window;
    int causal, threads;
    double scale;
    int64_t N, n_seq, width;
    dl_attn_spec spec;
} attn_args;

#define ATTN_FORMAT "LLLpO&|dL"
#define ATTN_FIELDS(a) &(a).nh, &(a).nkv, &(a).hd, &(a).causal, dl_py_threads, &(a).threads, \
                       &(a).scale, &(a).window

static void attn_args_clear(attn_args *a) {
    Py_CLEAR(a->qkv);
    Py_CLEAR(a->off);
}

/* Converts and checks qkv and the offsets (the numbers were parsed with
 * ATTN_FORMAT); what names the op in messages. dout, when not NULL, must be
 * [N, nh hd]. -1 with an exception set (and a cleared) on bad input. */
static int attn_args_check(attn_args *a, PyObject *qo, PyObject *oo, PyArrayObject **dout,
                           PyObject *go, const char *what) {
    a->qkv = dl_py_as_f32(qo, 2);
    a->off = a->qkv ? (PyArrayObject *)PyArray_FROMANY(oo, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY) : NULL;
    if (dout) *dout = a->off ? dl_py_as_f32(go, 2) : NULL;
    if (!a->off || (dout && !*dout)) goto fail;
    a->N = PyArray_DIM(a->qkv, 0);
    a->n_seq = PyArray_DIM(a->off, 0) - 1;
    const int64_t *o = PyArray_DATA(a->off);
    if ((a->width = qkv_width(a->nh, a->nkv, a->hd)) < 0) goto fail;
    if (PyArray_DIM(a->qkv, 1) != a->width || a->n_seq < 0 || o[0] != 0 || o[a->n_seq] != a->N ||
        (dout && (PyArray_DIM(*dout, 0) != a->N || PyArray_DIM(*dout, 1) != a->nh * a->hd))) {
        PyErr_Format(PyExc_ValueError, "%s: inconsistent shapes", what);
        goto fail;
    }
    if (!dout) { /* softmax turns an inf or NaN key into finite garbage: refuse it */
        const float *q = PyArray_DATA(a->qkv);
        for (int64_t i = 0; i < a->N * a->width; i++)
            if (!isfinite(q[i])) {
                PyErr_Format(PyExc_ValueError, "%s: qkv holds inf or NaN", what);
                goto fail;
            }
    }
    if (!(a->scale >= 0.0 && isfinite(a->scale)) || a->window < 0 || a->window > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "attention: scale must be >= 0 (0: 1/sqrt(hd)) and "
                        "window in [0, 2^31)");
        goto fail;
    }
    a->spec.scale = a->scale > 0.0 ? (float)a->scale : 1.0f / sqrtf((float)a->hd);
    a->spec.causal = a->causal;
    a->spec.window = a->window;
    for (int64_t s = 0; s < a->n_seq; s++)
        if (o[s + 1] < o[s]) {
            PyErr_Format(PyExc_ValueError, "%s: offsets decrease", what);
            goto fail;
        }
    return 0;
fail:
    attn_args_clear(a);
    if (dout) Py_CLEAR(*dout);
    return -1;
}

static PyObject *op_attention(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *qo, *oo;
    attn_args a = {.threads = 1};
    if (!PyArg_ParseTuple(args, "OO" ATTN_FORMAT, &qo, &oo, ATTN_FIELDS(a)) ||
        attn_args_check(&a, qo, oo, NULL, NULL, "attention") < 0)
        return NULL;
    npy_intp dims[2] = {(npy_intp)a.N, (npy_intp)(a.nh * a.hd)};
    PyObject *out = dl_py_new_f32(2, dims);
    int err = 0;
    if (out) {
        Py_BEGIN_ALLOW_THREADS
        err = dl_attention_forward(PyArray_DATA((PyArrayObject *)out), PyArray_DATA(a.qkv),
                                   a.width, PyArray_DATA(a.off), a.n_seq, a.nh, a.nkv, a.hd,
                                   a.spec, a.threads);
        Py_END_ALLOW_THREADS
    }
    if (err) {
        Py_CLEAR(out);
        PyErr_NoMemory();
    }
    attn_args_clear(&a);
    return out;
}

static PyObject *op_attention_backward(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *qo, *oo, *go;
    attn_args a = {.threads = 1};
    PyArrayObject *g;
    if (!PyArg_ParseTuple(args, "OOO" ATTN_FORMAT, &qo, &oo, &go, ATTN_FIELDS(a)) ||
        attn_args_check(&a, qo, oo, &g, go, "attention_backward") < 0)
        return NULL;
    PyObject *dqkv = dl_py_new_f32(2, PyArray_DIMS(a.qkv));
    int err = 0;
    if (dqkv) {
        Py_BEGIN_ALLOW_THREADS
        err = dl_attention_backward(PyArray_DATA((PyArrayObject *)dqkv), PyArray_DATA(g),
                                    PyArray_DATA(a.qkv), a.width, PyArray_DATA(a.off), a.n_seq,
                                    a.nh, a.nkv, a.hd, a.spec, a.threads);
        Py_END_ALLOW_THREADS
    }
    if (err) {
        Py_CLEAR(dqkv);
        PyErr_NoMemory();
    }
    attn_args_clear(&a);
    Py_DECREF(g);
    return dqkv;
}

/* swiglu(gu) and geglu(gu): the gated unit with the activation `act`. */
static PyObject *glu_op(PyObject *args, int act) {
    PyObject *go;
    if (!PyArg_ParseTuple(args, "O", &go)) return NULL;
    PyArrayObject *gu = dl_py_as_f32(go, 2);
    if (!gu) return NULL;
    PyObject *out = NULL;
    if (PyArray_DIM(gu, 1) % 2) {
        PyErr_SetString(PyExc_ValueError, "glu: the fused input needs an even width");
    } else {
        npy_intp dims[2] = {PyArray_DIM(gu, 0), PyArray_DIM(gu, 1) / 2};
        if ((out = dl_py_new_f32(2, dims)))
            dl_glu_forward(act, PyArray_DATA((PyArrayObject *)out), PyArray_DATA(gu), dims[0],
                           dims[1], 1);
    }
    Py_DECREF(gu);
    return out;
}

BOUND_OP(op_swiglu, glu_op, DL_ACT_SILU)
BOUND_OP(op_geglu, glu_op, DL_ACT_GELU_TANH)

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
    int type, threads = 1, isa = dl_isa_best();
    Py_buffer buf;
    long long rows, cols;
    if (!PyArg_ParseTuple(args, "Oiy*LL|O&O&", &xo, &type, &buf, &rows, &cols, dl_py_isa, &isa,
                          dl_py_threads, &threads))
        return NULL;
    PyArrayObject *x = NULL;
    PyObject *out = NULL;
    dl_qmat w;
    dl_qact qx;
    int have_w = 0;
    memset(&qx, 0, sizeof qx);
    if (pack_weight(&w, type, &buf, rows, cols) < 0) goto done;
    have_w = 1;
    if (!(x = dl_py_as_f32(xo, 2))) goto done;
    if (PyArray_DIM(x, 1) != cols) {
        PyErr_SetString(PyExc_ValueError, "qlinear: x must be [n, cols]");
        goto done;
    }
    const int64_t n = PyArray_DIM(x, 0);
    npy_intp dims[2] = {(npy_intp)n, (npy_intp)rows};
    if (!(out = dl_py_new_f32(2, dims))) goto done;
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
        if ((out = dl_py_new_f32(2, dims)))
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
    int isa = dl_isa_best();
    if (!PyArg_ParseTuple(args, "O|O&", &xo, dl_py_isa, &isa)) return NULL;
    PyArrayObject *x = dl_py_as_f32(xo, 2);
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
    d = dl_py_new_f32(2, sd);
    s = dl_py_new_f32(2, sd);
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

static PyObject *op_peak_gops(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *kind;
    int threads = 1;
    long long iters = 100000000;
    if (!PyArg_ParseTuple(args, "s|O&L", &kind, dl_py_threads, &threads, &iters)) return NULL;
    int k = strcmp(kind, "int8") == 0 ? DL_PEAK_INT8 : strcmp(kind, "fp32") == 0 ? DL_PEAK_FP32
            : strcmp(kind, "int8_avx2") == 0 ? DL_PEAK_INT8_AVX2
            : strcmp(kind, "fp32_avx2") == 0 ? DL_PEAK_FP32_AVX2 : -1;
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

/* ---- backward ops, for tests ---------------------------------------------- */

/* A C-contiguous float32 array with the same shape as `like`, or NULL with
 * an exception set. */
static PyArrayObject *f32_like(PyObject *o, PyArrayObject *like, const char *name) {
    PyArrayObject *a = dl_py_as_f32(o, PyArray_NDIM(like));
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
    PyArrayObject *x = dl_py_as_f32(xo, 2), *w = x ? dl_py_as_f32(wo, 1) : NULL;
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
    PyArrayObject *gu = dl_py_as_f32(go, 2), *dout = gu ? dl_py_as_f32(do_, 2) : NULL;
    PyObject *dgu = NULL;
    if (dout && (PyArray_DIM(gu, 1) % 2 || PyArray_DIM(dout, 0) != PyArray_DIM(gu, 0) ||
                 2 * PyArray_DIM(dout, 1) != PyArray_DIM(gu, 1)))
        PyErr_SetString(PyExc_ValueError, "glu_backward: gu [n, 2f] and dout [n, f]");
    else if (dout && (dgu = dl_py_new_f32(2, PyArray_DIMS(gu))))
        dl_glu_backward(act, PyArray_DATA((PyArrayObject *)dgu), PyArray_DATA(dout),
                        PyArray_DATA(gu), PyArray_DIM(gu, 0), PyArray_DIM(dout, 1), 1);
    Py_XDECREF(gu);
    Py_XDECREF(dout);
    return dgu;
}

BOUND_OP(op_swiglu_backward, glu_backward_op, DL_ACT_SILU)
BOUND_OP(op_geglu_backward, glu_backward_op, DL_ACT_GELU_TANH)

PyMethodDef dl_py_test_methods[] = {
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
    {"qlinear", op_qlinear, METH_VARARGS,
     "qlinear(x[n, cols], type, w_bytes, rows, cols, isa='auto', threads=1) -> [n, rows]: the "
     "int8 GEMM of x with a GGUF-encoded weight"},
    {"qweight", op_qweight, METH_VARARGS,
     "qweight(type, w_bytes, rows, cols) -> [rows, cols]: the weights as the int8 path packs them"},
    {"quantize_rows", op_quantize_rows, METH_VARARGS,
     "quantize_rows(x[n, cols], isa='auto') -> (q int8[n, 32 nb], d[n, nb], s[n, nb])"},
    {"peak_gops", op_peak_gops, METH_VARARGS,
     "peak_gops(kind='int8'|'fp32'|'int8_avx2'|'fp32_avx2', threads=1, iters=1e8) -> "
     "measured peak G ops/s"},
    {NULL, NULL, 0, NULL},
};
