/* Linear layers, in either precision.
 *
 * float32: through OpenBLAS. All tokens of a batch go through one GEMM:
 * OpenBLAS re-packs the weight on every call, so few large calls beat many
 * small ones. Called outside any OpenMP region of ours (OpenBLAS is built on
 * the same OpenMP runtime and runs its own team).
 * int8: the activations are quantized, then qgemm.c multiplies. */
#include <cblas.h>
#include <stdlib.h>

#include "deelm.h"

void dl_sgemm_forward(float *y, const float *x, const float *w, int64_t n,
                      int64_t in, int64_t out, float beta, int n_threads) {
    if (n == 0) return;
    openblas_set_num_threads(n_threads);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)out, (blasint)in,
                1.0f, x, (blasint)in, w, (blasint)in, beta, y, (blasint)out);
}

void dl_linear_forward(const dl_linear *w, float *y, const float *x, int64_t n, int accumulate,
                       dl_qact *qx, int isa, int n_threads) {
    if (w->f32) {
        dl_sgemm_forward(y, x, w->f32, n, w->in, w->out, accumulate ? 1.0f : 0.0f, n_threads);
        return;
    }
    dl_quantize_rows(qx, x, n, w->in, isa, n_threads);
    dl_qgemm(y, w->out, qx, n, &w->q, accumulate, isa, n_threads);
}

void dl_linear_backward(float *dx, const float *dy, const float *w, int64_t n, int64_t in,
                        int64_t out, int accumulate, int n_threads) {
    if (n == 0) return;
    openblas_set_num_threads(n_threads);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)n, (blasint)in, (blasint)out,
                1.0f, dy, (blasint)out, w, (blasint)in, accumulate ? 1.0f : 0.0f, dx, (blasint)in);
}

const float *dl_linear_dense(const dl_linear *w, float **owned) {
    *owned = NULL;
    if (w->f32) return w->f32;
    float *dense = (float *)malloc((size_t)(w->out * w->in) * sizeof(float));
    if (!dense) return NULL;
    for (int64_t r = 0; r < w->out; r++) dl_qmat_row(&w->q, r, dense + r * w->in);
    *owned = dense;
    return dense;
}
