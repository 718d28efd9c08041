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

/* h = silu(g) u: dg = dh u silu'(g), du = dh silu(g), with
 * silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))). */
DL_VECTOR_MATH void dl_swiglu_backward(float *dgu, const float *dout, const float *gu, int64_t n,
                                       int64_t f, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const float *g = gu + t * 2 * f, *u = g + f, *dh = dout + t * f;
        float *dg = dgu + t * 2 * f, *du = dg + f;
        for (int64_t j = 0; j < f; j++) {
            const float sg = 1.0f / (1.0f + dl_expf(-g[j]));
            du[j] = dh[j] * g[j] * sg;
            dg[j] = dh[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
        }
    }
}
