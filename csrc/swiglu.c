/* SwiGLU gate: silu(gate) * up, on the fused [gate | up] projection output. */
#include "deelm.h"
#include "fastexp.h"

DL_VECTOR_MATH void dl_swiglu_forward(float *out, const float *gu, int64_t n, int64_t f,
                                      int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const float *g = gu + t * 2 * f, *u = g + f;
        float *o = out + t * f;
        for (int64_t j = 0; j < f; j++) o[j] = g[j] / (1.0f + dl_expf(-g[j])) * u[j];
    }
}
