/* Linear layers, in either precision.
 *
 * float32: the weight is packed (dl_fmat) and sgemm.c multiplies; all tokens
 * of a batch go through one GEMM.
 * int8: the activations are quantized, then qgemm.c multiplies. */
#include <stdlib.h>

#include "deelm.h"

void dl_linear_forward(const dl_linear *w, float *y, const float *x, int64_t n, int accumulate,
                       dl_qact *qx, int isa, int n_threads) {
    if (w->f.p) {
        dl_sgemm(y, w->out, x, n, &w->f, accumulate, isa, n_threads);
        return;
    }
    dl_quantize_rows(qx, x, n, w->in, isa, n_threads);
    dl_qgemm(y, w->out, qx, n, &w->q, accumulate, isa, n_threads);
}

void dl_linear_backward(float *dx, const float *dy, const dl_fmat *wt, int64_t n, int isa,
                        int n_threads) {
    dl_sgemm(dx, wt->rows, dy, n, wt, 0, isa, n_threads);
}

void dl_linear_row(const dl_linear *w, int64_t r, float *out) {
    if (w->f.p)
        dl_fmat_row(&w->f, r, out);
    else
        dl_qmat_row(&w->q, r, out);
}
