/* Scaled dot-product attention, one sentence at a time.
 *
 * Attention is computed per (sentence, head) so a token never sees another
 * sentence and there is no padding to mask: measured on this class of CPU,
 * packing many sentences into one attention matrix is slower than this.
 * Short sentences go through plain loops; from GEMM_MIN_LEN tokens on, the
 * score matrix Q K^T and the output P V are single-threaded sgemm calls (the
 * work grows with the square of the length: 12 % of a 400-token text's FLOPs).
 * Which way a sentence goes depends on its length alone, so a sentence gets
 * the same bits in any batch.
 * Grouped-query: query head h reads key/value head h / (nh / nkv).
 * A query's keys (causal or not, sliding window or not, dl_attn_spec) are
 * always one contiguous range of its sentence. */
#include <cblas.h>
#include <stdlib.h>

#include "deelm.h"
#include "dot.h"
#include "fastexp.h"

#define GEMM_MIN_LEN 32

/* The longest sentence's token count. */
static int64_t longest(const int64_t *seq_off, int64_t n_seq) {
    int64_t m = 0;
    for (int64_t s = 0; s < n_seq; s++)
        if (seq_off[s + 1] - seq_off[s] > m) m = seq_off[s + 1] - seq_off[s];
    return m;
}

/* The keys [*j0, *j1) query i of a len-token sentence sees. */
static inline __attribute__((always_inline)) void key_range(const dl_attn_spec *sp, int64_t i, int64_t len, int64_t *j0, int64_t *j1) {
    const int64_t w = sp->window;
    *j0 = w > 0 && i - w + 1 > 0 ? i - w + 1 : 0;
    *j1 = sp->causal ? i + 1 : (w > 0 && i + w < len ? i + w : len);
}

/* row[0, n) = softmax(row[0, n)), row[n, n_total) = 0. */
DL_VECTOR_MATH DL_CLONES static void softmax_row(float *row, int64_t n, int64_t n_total) {
    float mx = row[0];
    for (int64_t j = 1; j < n; j++) mx = row[j] > mx ? row[j] : mx;
    for (int64_t j = 0; j < n; j++) row[j] = dl_expf(row[j] - mx);
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) acc[k] += row[j + k];
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < n; j++) sum += row[j];
    const float inv = 1.0f / sum;
    for (j = 0; j < n; j++) row[j] *= inv;
    for (j = n; j < n_total; j++) row[j] = 0.0f;
}

/* One (sentence, head) by sgemm: S = scale Q K^T [len, len], softmax over
 * each query's keys (0 elsewhere), O = S V. */
static void head_by_gemm(float *o, int64_t o_stride, const float *q, const float *k, const float *v,
                         int64_t stride, int64_t len, int64_t hd, const dl_attn_spec *sp,
                         float *scores) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)len, (blasint)len, (blasint)hd,
                sp->scale, q, (blasint)stride, k, (blasint)stride, 0.0f, scores, (blasint)len);
    for (int64_t i = 0; i < len; i++) {
        int64_t j0, j1;
        key_range(sp, i, len, &j0, &j1);
        float *row = scores + i * len;
        for (int64_t j = 0; j < j0; j++) row[j] = 0.0f;
        softmax_row(row + j0, j1 - j0, len - j0);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)len, (blasint)hd, (blasint)len,
                1.0f, scores, (blasint)len, v, (blasint)stride, 0.0f, o, (blasint)o_stride);
}

/* Floats of the score buffer each thread allocates: a whole [len, len]
 * matrix for the GEMM path, one row otherwise. */
static int64_t scores_cap(int64_t max_len) {
    return max_len >= GEMM_MIN_LEN ? max_len * max_len : max_len;
}

/* One (sentence, head) by plain loops, for short sentences: per query, the
 * scores of its keys, their softmax and the weighted sum of the values, built
 * per vector width (the same bits on each: nothing is contracted into an fma).
 * q0, k0, v0: the sentence's first q, k, v head rows, row stride `stride`. */
DL_CLONES static void head_by_loops(float *o0, int64_t out_stride, const float *q0, const float *k0,
                                    const float *v0, int64_t stride, int64_t len, int64_t hd,
                                    const dl_attn_spec *sp, float *scores) {
    for (int64_t i = 0; i < len; i++) {
        int64_t j0, j1;
        key_range(sp, i, len, &j0, &j1);
        const int64_t n_keys = j1 - j0;
        for (int64_t j = 0; j < n_keys; j++)
            scores[j] = dl_dot(q0 + i * stride, k0 + (j0 + j) * stride, hd) * sp->scale;
        softmax_row(scores, n_keys, n_keys);
        float *o = o0 + i * out_stride;
        for (int64_t c = 0; c < hd; c++) o[c] = 0.0f;
        for (int64_t j = 0; j < n_keys; j++) {
            const float *v = v0 + (j0 + j) * stride;
            const float p = scores[j];
            for (int64_t c = 0; c < hd; c++) o[c] += p * v[c];
        }
    }
}

int64_t dl_attention_bytes(int64_t max_len, int n_threads) {
    return max_len > 0 ? (int64_t)n_threads * scores_cap(max_len) * (int64_t)sizeof(float) : 0;
}

int dl_attention_forward(float *out, const float *qkv, int64_t qkv_stride,
                         const int64_t *seq_off, int64_t n_seq,
                         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                         dl_attn_spec spec, int n_threads) {
    const int64_t max_len = longest(seq_off, n_seq);
    if (max_len == 0) return DL_OK;
    const int64_t group = n_heads / n_kv_heads;
    const int64_t k_col = n_heads * head_dim, v_col = k_col + n_kv_heads * head_dim;
    const int64_t out_stride = n_heads * head_dim;
    int failed = 0;

#pragma omp parallel num_threads(n_threads)
    {
        float *scores = (float *)malloc((size_t)scores_cap(max_len) * sizeof(float));
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
                const float *q0 = qkv + base * qkv_stride + h * head_dim;
                const float *k0 = qkv + base * qkv_stride + k_col + kvh * head_dim;
                const float *v0 = qkv + base * qkv_stride + v_col + kvh * head_dim;
                float *o0 = out + base * out_stride + h * head_dim;
                if (len >= GEMM_MIN_LEN)
                    head_by_gemm(o0, out_stride, q0, k0, v0, qkv_stride, len, head_dim, &spec, scores);
                else
                    head_by_loops(o0, out_stride, q0, k0, v0, qkv_stride, len, head_dim, &spec, scores);
            }
        }
        free(scores);
    }
    return failed ? DL_ERR_NOMEM : DL_OK;
}

/* Backward of one (sentence, key/value head): for each query head h of the
 * group, with P = softmax(scale Q_h K^T) recomputed row by row:
 *   dV += P^T dO_h ; dP = dO_h V^T ; dS = P * (dP - rowsum(P * dP))
 *   dQ_h = scale dS K ; dK += scale dS^T Q_h
 * p, dp: [len] scratch rows. */
static void kv_head_backward(float *dqkv, const float *dout, int64_t out_stride, const float *qkv,
                             int64_t stride, int64_t base, int64_t len, int64_t kvh,
                             int64_t group, int64_t hd, int64_t k_col, int64_t v_col,
                             const dl_attn_spec *sp, float *p, float *dp) {
    const float scale = sp->scale;
    for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int64_t i = 0; i < len; i++) {
            const float *q = qkv + (base + i) * stride + h * hd;
            const float *g = dout + (base + i) * out_stride + h * hd;
            int64_t j0, j1;
            key_range(sp, i, len, &j0, &j1);
            const int64_t n_keys = j1 - j0, b0 = base + j0;
            for (int64_t j = 0; j < n_keys; j++) {
                const float *k = qkv + (b0 + j) * stride + k_col + kvh * hd;
                const float *v = qkv + (b0 + j) * stride + v_col + kvh * hd;
                p[j] = dl_dot(q, k, hd) * scale;
                dp[j] = dl_dot(g, v, hd);
            }
            softmax_row(p, n_keys, n_keys);
            float pdp = 0.0f;
            for (int64_t j = 0; j < n_keys; j++) pdp += p[j] * dp[j];
            float *dq = dqkv + (base + i) * stride + h * hd;
            for (int64_t j = 0; j < n_keys; j++) {
                const float ds = p[j] * (dp[j] - pdp) * scale;
                const float *k = qkv + (b0 + j) * stride + k_col + kvh * hd;
                float *dk = dqkv + (b0 + j) * stride + k_col + kvh * hd;
                float *dv = dqkv + (b0 + j) * stride + v_col + kvh * hd;
                for (int64_t c = 0; c < hd; c++) {
                    dq[c] += ds * k[c];
                    dk[c] += ds * q[c];
                    dv[c] += p[j] * g[c];
                }
            }
        }
    }
}

int dl_attention_backward(float *dqkv, const float *dout, const float *qkv, int64_t qkv_stride,
                          const int64_t *seq_off, int64_t n_seq,
                          int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                          dl_attn_spec spec, int n_threads) {
    const int64_t N = seq_off[n_seq];
    for (int64_t i = 0; i < N * qkv_stride; i++) dqkv[i] = 0.0f;
    const int64_t max_len = longest(seq_off, n_seq);
    if (max_len == 0) return DL_OK;
    const int64_t group = n_heads / n_kv_heads;
    const int64_t k_col = n_heads * head_dim, v_col = k_col + n_kv_heads * head_dim;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *p = (float *)malloc((size_t)(2 * max_len) * sizeof(float));
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t s = 0; s < n_seq; s++)
            for (int64_t kvh = 0; kvh < n_kv_heads; kvh++)
                if (p)
                    kv_head_backward(dqkv, dout, n_heads * head_dim, qkv, qkv_stride, seq_off[s],
                                     seq_off[s + 1] - seq_off[s], kvh, group, head_dim, k_col,
                                     v_col, &spec, p, p + max_len);
        free(p);
    }
    return failed ? DL_ERR_NOMEM : DL_OK;
}
