/* Scaled dot-product attention, one sentence at a time.
 *
 * Attention is computed per (sentence, head) so a token never sees another
 * sentence and there is no padding to mask: measured on this class of CPU,
 * packing many sentences into one attention matrix is slower than this.
 * Queries go in tiles of 8: their scores against 32 keys at a time (K is
 * transposed once per head so a score tile reads contiguous key lanes), the
 * softmax of each query's own keys, then the weighted sum of the values.
 * Key tiles wholly outside every query's range are skipped, so a causal
 * layer does about half the work of a bidirectional one.
 *
 * Every score is fma(q[d], k[d], s) over d in order, times the scale; every
 * output lane fma(p_j, v_j, o) over the keys in order, p_j = 0 for keys
 * outside the query's range (adding an exact zero). So a query's result does
 * not depend on the queries or keys beside it in a tile, on the sentence's
 * length or on the vector width (the clones below use the fma instruction,
 * the baseline build fmaf, both exactly rounded; fmaf is a slow library call
 * only on x86 CPUs without FMA, older than 2013): a sentence gets the same
 * bits in any batch, and the last query of a sentence the same bits whether
 * its layer is causal or bidirectional.
 * Grouped-query: query head h reads key/value head h / (nh / nkv).
 * A query's keys (causal or not, sliding window or not, dl_attn_spec) are
 * always one contiguous range of its sentence. */
#include <stdlib.h>

#include "deelm.h"
#include "dot.h"
#include "fastexp.h"

#define QT 8 /* queries per tile */
#define KT 32 /* keys per score tile */
#define VT 32 /* value columns per output tile */

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

/* row[0, n) = softmax(row[0, n)), row[n, n_total) = 0; exp by dl_expf or,
 * with BY_FMA, dl_expf_fma. */
DL_VECTOR_MATH static inline __attribute__((always_inline)) void
softmax_body(float *row, int64_t n, int64_t n_total, const int BY_FMA) {
    float mx = row[0];
    for (int64_t j = 1; j < n; j++) mx = row[j] > mx ? row[j] : mx;
    for (int64_t j = 0; j < n; j++) row[j] = BY_FMA ? dl_expf_fma(row[j] - mx) : dl_expf(row[j] - mx);
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

/* The backward's softmax (it recomputes each query's probabilities). */
DL_VECTOR_MATH DL_CLONES static void softmax_row(float *row, int64_t n, int64_t n_total) {
    softmax_body(row, n, n_total, 0);
}

/* The forward's: the fma clones run its exp at about 1.6x the speed. */
DL_VECTOR_MATH DL_FMA_CLONES static void softmax_row_fma(float *row, int64_t n, int64_t n_total) {
    softmax_body(row, n, n_total, 1);
}

/* S[i][l] = scale * sum_d q_i[d] kt[d][l] for queries i < NQ_ and key
 * lanes l < KT; kt: [hd, ldk] (a transposed K), q_i = q + i * stride. NQ_ is
 * a constant at every call, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
score_tile(float *S, int64_t lds, const float *q, int64_t stride, const float *kt, int64_t ldk,
           int64_t hd, float scale, const int NQ_) {
    float a[QT][KT];
    for (int i = 0; i < NQ_; i++)
        for (int l = 0; l < KT; l++) a[i][l] = 0.0f;
    for (int64_t d = 0; d < hd; d++) {
        const float *k = kt + d * ldk;
        for (int i = 0; i < NQ_; i++) {
            const float qd = q[i * stride + d];
            for (int l = 0; l < KT; l++) a[i][l] = __builtin_fmaf(qd, k[l], a[i][l]);
        }
    }
    for (int i = 0; i < NQ_; i++)
        for (int l = 0; l < KT; l++) S[i * lds + l] = a[i][l] * scale;
}

/* o_i[c0 + l] = sum_j P[i][j] v_j[c0 + l] over keys j < nk in order, for
 * i < NQ_ and l < NC_; v_j = v + j * stride, o_i = o + i * ldo. */
static inline __attribute__((always_inline)) void
value_tile(float *o, int64_t ldo, const float *P, int64_t ldp, const float *v, int64_t stride,
           int64_t nk, int64_t c0, const int NQ_, const int NC_) {
    float a[QT][VT];
    for (int i = 0; i < NQ_; i++)
        for (int l = 0; l < NC_; l++) a[i][l] = 0.0f;
    for (int64_t j = 0; j < nk; j++) {
        const float *vj = v + j * stride + c0;
        for (int i = 0; i < NQ_; i++) {
            const float p = P[i * ldp + j];
            for (int l = 0; l < NC_; l++) a[i][l] = __builtin_fmaf(p, vj[l], a[i][l]);
        }
    }
    for (int i = 0; i < NQ_; i++)
        for (int l = 0; l < NC_; l++) o[i * ldo + c0 + l] = a[i][l];
}

/* Floats of the scratch each thread allocates: K^T [hd, max_len + KT] and
 * the score rows of one query tile [QT, max_len + KT]. */
static int64_t scratch_floats(int64_t max_len, int64_t hd) {
    return (hd + QT) * (max_len + KT);
}

int64_t dl_attention_bytes(int64_t max_len, int64_t head_dim, int n_threads) {
    return max_len > 0 ? (int64_t)n_threads * scratch_floats(max_len, head_dim) * (int64_t)sizeof(float) : 0;
}

/* Queries [i0, i0 + NQ_) of a len-token sentence (q, o: their first q and
 * output rows): scores over the keys [lo, hi) any of them sees, 32 at a
 * time, into S (row stride ldk); each query's softmax over its own keys
 * [j0[i], j1[i]), zero elsewhere; then the weighted sum of the values. */
static inline __attribute__((always_inline)) void
attend_tile(float *o, int64_t out_stride, const float *q, const float *kt, const float *v0,
            int64_t stride, int64_t ldk, int64_t hd, float scale, const int64_t *j0,
            const int64_t *j1, int64_t lo, int64_t hi, float *S, const int NQ_) {
    for (int64_t j = lo; j < hi; j += KT) score_tile(S + (j - lo), ldk, q, stride, kt + j, ldk, hd, scale, NQ_);
    for (int i = 0; i < NQ_; i++) {
        float *row = S + i * ldk;
        for (int64_t j = lo; j < j0[i]; j++) row[j - lo] = 0.0f;
        softmax_row_fma(row + (j0[i] - lo), j1[i] - j0[i], hi - j0[i]);
    }
    const float *v = v0 + lo * stride;
    int64_t c = 0;
    for (; c + VT <= hd; c += VT) value_tile(o, out_stride, S, ldk, v, stride, hi - lo, c, NQ_, VT);
    for (; c + 8 <= hd; c += 8) value_tile(o, out_stride, S, ldk, v, stride, hi - lo, c, NQ_, 8);
    for (; c < hd; c++) value_tile(o, out_stride, S, ldk, v, stride, hi - lo, c, NQ_, 1);
}

/* kt[d, j] = k0[j, d]: [hd, len + KT], zero past the last key, so that a
 * score tile reads 32 keys' d-th lanes contiguously. */
static void transpose_keys(float *kt, const float *k0, int64_t stride, int64_t len, int64_t hd) {
    const int64_t ldk = len + KT;
    for (int64_t d = 0; d < hd; d++) {
        for (int64_t j = 0; j < len; j++) kt[d * ldk + j] = k0[j * stride + d];
        for (int64_t j = len; j < ldk; j++) kt[d * ldk + j] = 0.0f;
    }
}

/* One (sentence, query head). q0, v0: the sentence's first q and v head rows,
 * row stride `stride`; kt: its keys, transposed; o0: its first output row,
 * stride out_stride; S: [QT, len + KT] scratch. */
DL_FMA_CLONES static void
attend_head(float *o0, int64_t out_stride, const float *q0, const float *kt, const float *v0,
            int64_t stride, int64_t len, int64_t hd, const dl_attn_spec *sp, float *S) {
    const int64_t ldk = len + KT;
    for (int64_t i0 = 0; i0 < len; i0 += QT) {
        const int nq = len - i0 < QT ? (int)(len - i0) : QT;
        int64_t j0[QT], j1[QT], lo = len, hi = 0;
        for (int i = 0; i < nq; i++) {
            key_range(sp, i0 + i, len, &j0[i], &j1[i]);
            lo = j0[i] < lo ? j0[i] : lo;
            hi = j1[i] > hi ? j1[i] : hi;
        }
        const float *q = q0 + i0 * stride;
        float *o = o0 + i0 * out_stride;
#define TILE(NQ) \
    case NQ: attend_tile(o, out_stride, q, kt, v0, stride, ldk, hd, sp->scale, j0, j1, lo, hi, S, NQ); break;
        switch (nq) { TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) default: TILE(QT) }
#undef TILE
    }
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
        float *scratch = (float *)malloc((size_t)scratch_floats(max_len, head_dim) * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
        /* one task per (sentence, key/value head): its keys are transposed
         * once for the query heads of its group */
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t s = 0; s < n_seq; s++) {
            for (int64_t kvh = 0; kvh < n_kv_heads; kvh++) {
                const int64_t base = seq_off[s], len = seq_off[s + 1] - seq_off[s];
                if (!scratch || len == 0) continue;
                float *kt = scratch, *S = scratch + head_dim * (len + KT);
                transpose_keys(kt, qkv + base * qkv_stride + k_col + kvh * head_dim, qkv_stride, len, head_dim);
                const float *v0 = qkv + base * qkv_stride + v_col + kvh * head_dim;
                for (int64_t h = kvh * group; h < (kvh + 1) * group; h++)
                    attend_head(out + base * out_stride + h * head_dim, out_stride,
                                qkv + base * qkv_stride + h * head_dim, kt, v0, qkv_stride, len, head_dim,
                                &spec, S);
            }
        }
        free(scratch);
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
