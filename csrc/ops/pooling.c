/* Pooling of token states into one vector per sentence, after the final norm.
 * "last" pooling is the one-token range [len-1, len). */
#include "deelm.h"

void dl_pool_forward(float *out, const float *x, const int64_t *seq_off,
                     const int64_t *pool, int64_t n_seq, const float *norm_w,
                     int64_t d, float eps, float *scratch) {
    for (int64_t s = 0; s < n_seq; s++) {
        float *o = out + s * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        const int64_t a = pool[2 * s], b = pool[2 * s + 1];
        for (int64_t t = a; t < b; t++) {
            dl_rmsnorm_forward(scratch, x + (seq_off[s] + t) * d, norm_w, 1, d, eps);
            for (int64_t i = 0; i < d; i++) o[i] += scratch[i];
        }
        const float inv = 1.0f / (float)(b - a);
        for (int64_t i = 0; i < d; i++) o[i] *= inv;
    }
}

void dl_pool_backward(float *dx, const float *dout, const float *x, const int64_t *seq_off,
                      const int64_t *pool, int64_t n_seq, const float *norm_w, int64_t d,
                      float eps, int n_threads) {
    /* each pooled token gets dout / count through its own final norm */
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t s = 0; s < n_seq; s++) {
        const int64_t a = pool[2 * s], b = pool[2 * s + 1];
        const float inv = 1.0f / (float)(b - a);
        for (int64_t t = a; t < b; t++) {
            const int64_t row = seq_off[s] + t;
            dl_rmsnorm_backward_row(dx + row * d, dout + s * d, inv, x + row * d, norm_w, d, eps);
        }
    }
}
