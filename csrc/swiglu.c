/* SwiGLU gate: silu(gate) * up, on the fused [gate | up] projection output. */
#include "deelm.h"
#include "fastexp.h"

/* One row, compiled for each vector width; in ISO C mode nothing is
 * contracted into an fma, so every clone gives the same bits. */
DL_VECTOR_MATH DL_CLONES static void swiglu_row(float *o, const float *g, const float *u, int64_t f) {
    for (int64_t j = 0; j < f; j++) o[j] = g[j] / (1.0f + dl_expf(-g[j])) * u[j];
}

void dl_swiglu_forward(float *out, const float *gu, int64_t n, int64_t f, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n; t++) swiglu_row(out + t * f, gu + t * 2 * f, gu + t * 2 * f + f, f);
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
