/* RMSNorm, as LLaMA uses it: no mean subtraction, no bias. */
#include <math.h>

#include "deelm.h"

/* 1 / sqrt(mean(x^2) + eps) of one row x[d]. */
static inline __attribute__((always_inline)) float rms_scale(const float *x, int64_t d, float eps) {
    /* double accumulation, as 8 running sums the compiler can vectorize:
     * a float sum of d squares would lose bits */
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)x[i + j] * x[i + j];
    double ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < d; i++) ss += (double)x[i] * x[i];
    return (float)(1.0 / sqrt(ss / (double)d + (double)eps));
}

DL_CLONES void dl_rmsnorm_forward(float *out, const float *x, const float *w,
                        int64_t n, int64_t d, float eps) {
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * d;
        float *ot = out + t * d;
        const float scale = rms_scale(xt, d, eps);
        for (int64_t i = 0; i < d; i++) ot[i] = (xt[i] * scale) * w[i];
    }
}

/* With r = 1/sqrt(mean(x^2) + eps) and g = c dout * w:
 * dx = r g - x r^3 (g . x) / d. */
void dl_rmsnorm_backward_row(float *dx, const float *dout, float c, const float *x,
                             const float *w, int64_t d, float eps) {
    double ss = 0.0, gx = 0.0;
    for (int64_t i = 0; i < d; i++) {
        ss += (double)x[i] * x[i];
        gx += (double)dout[i] * w[i] * x[i];
    }
    const double r = 1.0 / sqrt(ss / (double)d + (double)eps);
    const float a = (float)r * c, b = (float)(r * r * r * gx * c / (double)d);
    for (int64_t i = 0; i < d; i++) dx[i] += a * dout[i] * w[i] - b * x[i];
}

void dl_rmsnorm_backward(float *dx, const float *dout, const float *x, const float *w,
                         int64_t n, int64_t d, float eps, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n; t++)
        dl_rmsnorm_backward_row(dx + t * d, dout + t * d, 1.0f, x + t * d, w, d, eps);
}

void dl_rmsnorm_add_forward(float *y, const float *x, const float *w, int64_t n, int64_t d,
                            float eps) {
    /* the normed row is formed as dl_rmsnorm_forward forms it, then added,
     * so y gets exactly residual + rmsnorm(x) * w */
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * d;
        float *yt = y + t * d;
        const float scale = rms_scale(xt, d, eps);
        for (int64_t i = 0; i < d; i++) yt[i] += (xt[i] * scale) * w[i];
    }
}
