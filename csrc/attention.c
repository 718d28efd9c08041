/* Scaled dot-product attention, one sentence at a time.
 *
 * Attention is computed per (sentence, head) so a token never sees another
 * sentence and there is no padding to mask: measured on this class of CPU,
 * packing many sentences into one attention matrix is slower than this, and
 * attention is 1-2 % of the FLOPs at sentence lengths anyway.
 * Grouped-query: query head h reads key/value head h / (nh / nkv). */
#include <math.h>
#include <stdlib.h>

#include "deelm.h"

/* Eight running sums in a fixed order: the compiler vectorizes this (it may
 * not reorder a single running sum), and the result does not depend on it. */
static float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

int dl_attention_forward(float *out, const float *qkv, int64_t qkv_stride,
                         const int64_t *seq_off, int64_t n_seq,
                         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                         int causal, int n_threads) {
    int64_t max_len = 0;
    for (int64_t s = 0; s < n_seq; s++)
        if (seq_off[s + 1] - seq_off[s] > max_len) max_len = seq_off[s + 1] - seq_off[s];
    if (max_len == 0) return DL_OK;
    const int64_t group = n_heads / n_kv_heads;
    const int64_t k_col = n_heads * head_dim, v_col = k_col + n_kv_heads * head_dim;
    const int64_t out_stride = n_heads * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    int failed = 0;

#pragma omp parallel num_threads(n_threads)
    {
        float *scores = (float *)malloc((size_t)max_len * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t s = 0; s < n_seq; s++) {
            for (int64_t h = 0; h < n_heads; h++) {
                if (!scores) continue;
                const int64_t base = seq_off[s], len = seq_off[s + 1] - seq_off[s];
                const int64_t kvh = h / group;
                for (int64_t i = 0; i < len; i++) {
                    const float *q = qkv + (base + i) * qkv_stride + h * head_dim;
                    const int64_t n_keys = causal ? i + 1 : len;
                    float mx = -INFINITY;
                    for (int64_t j = 0; j < n_keys; j++) {
                        const float *k = qkv + (base + j) * qkv_stride + k_col + kvh * head_dim;
                        scores[j] = dot(q, k, head_dim) * scale;
                        if (scores[j] > mx) mx = scores[j];
                    }
                    float sum = 0.0f;
                    for (int64_t j = 0; j < n_keys; j++) {
                        scores[j] = expf(scores[j] - mx);
                        sum += scores[j];
                    }
                    const float inv = 1.0f / sum;
                    float *o = out + (base + i) * out_stride + h * head_dim;
                    for (int64_t c = 0; c < head_dim; c++) o[c] = 0.0f;
                    for (int64_t j = 0; j < n_keys; j++) {
                        const float *v = qkv + (base + j) * qkv_stride + v_col + kvh * head_dim;
                        const float p = scores[j] * inv;
                        for (int64_t c = 0; c < head_dim; c++) o[c] += p * v[c];
                    }
                }
            }
        }
        free(scores);
    }
    return failed ? DL_ERR_NOMEM : DL_OK;
}
