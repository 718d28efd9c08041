/* The gated unit of the feed-forward block, on the fused [gate | up]
 * projection output: h = act(gate) * up.
 *   SwiGLU (LLaMA): act = silu(g) = g sigmoid(g)
 *   GeGLU (Gemma):  act = gelu_tanh(g) = g/2 (1 + tanh(u)), u = c (g + a g^3),
 *                   c = sqrt(2/pi), a = 0.044715 (PyTorch's approximate="tanh").
 * Since (1 + tanh(u)) / 2 = sigmoid(2u), both are act(g) = g sigmoid(z(g)),
 * z = g or 2u: one loop for both, with the vectorizable dl_expf. */
#include "deelm.h"
#include "fastexp.h"

#define GELU_C 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_A 0.044715f

/* z(g) and dz/dg of the activation (gelu: tanh GELU, else silu). */
static inline __attribute__((always_inline)) float act_z(int gelu, float g) {
    return gelu ? 2.0f * GELU_C * (g + GELU_A * g * g * g) : g;
}
static inline __attribute__((always_inline)) float act_dz(int gelu, float g) {
    return gelu ? 2.0f * GELU_C * (1.0f + 3.0f * GELU_A * g * g) : 1.0f;
}

/* One row, compiled for each vector width; in ISO C mode nothing is
 * contracted into an fma, so every clone gives the same bits. */
DL_VECTOR_MATH DL_CLONES static void glu_row(int gelu, float *o, const float *g, const float *u,
                                             int64_t f) {
    for (int64_t j = 0; j < f; j++) o[j] = g[j] / (1.0f + dl_expf(-act_z(gelu, g[j]))) * u[j];
}

void dl_glu_forward(int act, float *out, const float *gu, int64_t n, int64_t f, int n_threads) {
    const int gelu = act == DL_ACT_GELU_TANH;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n; t++) glu_row(gelu, out + t * f, gu + t * 2 * f, gu + t * 2 * f + f, f);
}

/* h = g s u with s = sigmoid(z(g)): du = dh g s, dg = dh u act'(g),
 * act'(g) = s (1 + g (1 - s) z'(g)). */
DL_VECTOR_MATH void dl_glu_backward(int act, float *dgu, const float *dout, const float *gu,
                                    int64_t n, int64_t f, int n_threads) {
    const int gelu = act == DL_ACT_GELU_TANH;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const float *g = gu + t * 2 * f, *u = g + f, *dh = dout + t * f;
        float *dg = dgu + t * 2 * f, *du = dg + f;
        for (int64_t j = 0; j < f; j++) {
            const float s = 1.0f / (1.0f + dl_expf(-act_z(gelu, g[j])));
            du[j] = dh[j] * g[j] * s;
            dg[j] = dh[j] * u[j] * s * (1.0f + g[j] * (1.0f - s) * act_dz(gelu, g[j]));
        }
    }
}
