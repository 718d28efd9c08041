/* Linear layers through OpenBLAS. All tokens of a batch go through one GEMM:
 * OpenBLAS re-packs the weight on every call, so few large calls beat many
 * small ones. Called outside any OpenMP region of ours (OpenBLAS is built on
 * the same OpenMP runtime and runs its own team). */
#include <cblas.h>

#include "deelm.h"

void dl_linear_forward(float *y, const float *x, const float *w, int64_t n,
                       int64_t in, int64_t out, float beta, int n_threads) {
    if (n == 0) return;
    openblas_set_num_threads(n_threads);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)out, (blasint)in,
                1.0f, x, (blasint)in, w, (blasint)in, beta, y, (blasint)out);
}
