/* Activations quantized to int8 per block of 32, right before each integer
 * GEMM. A scale of its own per 32 columns keeps one outlier channel (LLM
 * residual streams have a few "massive activations", thousands of times the
 * typical value) from flattening the rest of its row to zero; taking the
 * outlier itself out of its block, into float, keeps it from flattening the
 * other 31 values of its block (on SmolLM2-135M this cut the int8 path's
 * distance to float32 to about a quarter: median pooled cosine 0.9987 -> 0.9996).
 *
 * Per block, in this order, on every path (so all paths give the same bytes):
 *   amax = max |x|; top = its first index; amax2 = max |x| over the others;
 *   if amax > DL_OUTLIER_RATIO * amax2: x[top] becomes an outlier, then 0;
 *   s = tree sum: 16 pairs (j, j+16), then 8 (j, j+8), 4, 2, 1;
 *   d = amax / 127; q = round-half-even(x * (1 / d)), clamped to +-127. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deelm.h"
#include "isa.h"

int64_t dl_qact_bytes(int64_t rows, int64_t max_cols) {
    const int64_t r = rows > 0 ? rows : 1, blocks = r * ((max_cols + DL_QBLOCK - 1) / DL_QBLOCK);
    /* q, then d, s, out_k, out_v per block, n_out per row */
    return blocks * (DL_QBLOCK + 4 * 4) + r * 4;
}

int dl_qact_alloc(dl_qact *a, int64_t rows, int64_t max_cols) {
    memset(a, 0, sizeof *a);
    a->rows = rows;
    a->n_blocks = (max_cols + DL_QBLOCK - 1) / DL_QBLOCK;
    const size_t blocks = (size_t)(rows > 0 ? rows : 1) * (size_t)a->n_blocks;
    a->q = (int8_t *)malloc(blocks * DL_QBLOCK);
    a->d = (float *)malloc(blocks * sizeof(float));
    a->s = (float *)malloc(blocks * sizeof(float));
    a->n_out = (int32_t *)malloc((size_t)(rows > 0 ? rows : 1) * sizeof(int32_t));
    a->out_k = (int32_t *)malloc(blocks * sizeof(int32_t));
    a->out_v = (float *)malloc(blocks * sizeof(float));
    if (!a->q || !a->d || !a->s || !a->n_out || !a->out_k || !a->out_v) {
        dl_qact_free(a);
        return DL_ERR_NOMEM;
    }
    return DL_OK;
}

void dl_qact_free(dl_qact *a) {
    free(a->q);
    free(a->d);
    free(a->s);
    free(a->n_out);
    free(a->out_k);
    free(a->out_v);
    a->q = NULL;
    a->d = a->s = a->out_v = NULL;
    a->n_out = a->out_k = NULL;
}

/* One block of 32 values. Returns the outlier's index in the block, or -1. */
static int quantize_block_scalar(const float *xb, int8_t *q, float *d_out, float *s_out) {
    float x[DL_QBLOCK], amax = 0.0f, amax2 = 0.0f;
    int top = 0;
    for (int j = 0; j < DL_QBLOCK; j++)
        if (fabsf(xb[j]) > amax) {
            amax = fabsf(xb[j]);
            top = j;
        }
    for (int j = 0; j < DL_QBLOCK; j++)
        if (j != top && fabsf(xb[j]) > amax2) amax2 = fabsf(xb[j]);
    memcpy(x, xb, sizeof x);
    int outlier = -1;
    if (amax > DL_OUTLIER_RATIO * amax2) {
        outlier = top;
        x[top] = 0.0f;
        amax = amax2;
    }
    float t[16];
    for (int j = 0; j < 16; j++) t[j] = x[j] + x[j + 16];
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) t[j] = t[j] + t[j + w];
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < DL_QBLOCK; j++) {
        float v = nearbyintf(x[j] * inv);
        q[j] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
    }
    *d_out = d;
    *s_out = t[0];
    return outlier;
}

#ifdef DL_X86
DL_AVX512
static int quantize_block_avx512(const float *xb, int8_t *q, float *d_out, float *s_out) {
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    const __m512 vmax = _mm512_set1_ps(amax);
    /* amax > R * (the largest of the others), R = DL_OUTLIER_RATIO >= 1,
     * exactly when the maximum is the only value with R |x| >= amax (R |x|
     * rounds monotonically in |x|, so the others' largest product is the
     * rounded R * amax2 the scalar path compares), so the second reduction is
     * needed only for blocks that have an outlier. */
    const __m512 four = _mm512_set1_ps(DL_OUTLIER_RATIO);
    const uint32_t near_max =
        (uint32_t)_mm512_cmp_ps_mask(_mm512_mul_ps(a0, four), vmax, _CMP_GE_OQ) |
        ((uint32_t)_mm512_cmp_ps_mask(_mm512_mul_ps(a1, four), vmax, _CMP_GE_OQ) << 16);
    int outlier = -1;
    if (__builtin_popcount(near_max) == 1) {
        const uint32_t at_max = (uint32_t)_mm512_cmp_ps_mask(a0, vmax, _CMP_EQ_OQ) |
                                ((uint32_t)_mm512_cmp_ps_mask(a1, vmax, _CMP_EQ_OQ) << 16);
        const int top = __builtin_ctz(at_max);
        const __mmask16 k0 = top < 16 ? (__mmask16)(1u << top) : 0;
        const __mmask16 k1 = top >= 16 ? (__mmask16)(1u << (top - 16)) : 0;
        outlier = top;
        v0 = _mm512_maskz_mov_ps((__mmask16)~k0, v0);
        v1 = _mm512_maskz_mov_ps((__mmask16)~k1, v1);
        amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    }
    /* the tree of quantize_block_scalar: (j, j+16), (j, j+8), (j, j+4), ... */
    const __m512 t16 = _mm512_add_ps(v0, v1);
    const __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(t16), _mm512_extractf32x8_ps(t16, 1));
    const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    const __m128 t1 = _mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1));
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    /* cvtps rounds half to even (the default MXCSR mode), as nearbyintf does */
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vinv));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vinv));
    q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo), hi);
    q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
    *d_out = d;
    *s_out = _mm_cvtss_f32(t1);
    return outlier;
}

/* The same block on 8-wide vectors: v0..v3 hold columns 0-7, 8-15, 16-23,
 * 24-31; every step mirrors the AVX-512 one above. */
DL_AVX2 static int quantize_block_avx2(const float *xb, int8_t *q, float *d_out, float *s_out) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4], a[4];
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        a[i] = _mm256_and_ps(v[i], absmask);
    }
    __m256 m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    float amax = _mm_cvtss_f32(m4);
    const __m256 vmax = _mm256_set1_ps(amax), ratio = _mm256_set1_ps(DL_OUTLIER_RATIO);
    uint32_t near_max = 0;
    for (int i = 0; i < 4; i++)
        near_max |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_mul_ps(a[i], ratio), vmax, _CMP_GE_OQ))
                    << (8 * i);
    int outlier = -1;
    if (__builtin_popcount(near_max) == 1) {
        uint32_t at_max = 0;
        for (int i = 0; i < 4; i++)
            at_max |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a[i], vmax, _CMP_EQ_OQ)) << (8 * i);
        const int top = __builtin_ctz(at_max);
        outlier = top;
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (int i = 0; i < 4; i++) {
            const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(top - 8 * i)));
            v[i] = _mm256_andnot_ps(hit, v[i]);
            a[i] = _mm256_and_ps(v[i], absmask);
        }
        m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        amax = _mm_cvtss_f32(m4);
    }
    /* the tree of quantize_block_scalar: (j, j+16), (j, j+8), (j, j+4), ... */
    const __m256 t8 = _mm256_add_ps(_mm256_add_ps(v[0], v[2]), _mm256_add_ps(v[1], v[3]));
    const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    const __m128 t1 = _mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1));
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    __m256i qi[4];
    for (int i = 0; i < 4; i++) /* cvtps rounds half to even, as nearbyintf does */
        qi[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv)), lo), hi);
    /* packs work per 128-bit lane: put the 64-bit quarters back in order */
    const __m256i q16a = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[0], qi[1]), 0xD8);
    const __m256i q16b = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[2], qi[3]), 0xD8);
    _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(_mm256_packs_epi16(q16a, q16b), 0xD8));
    *d_out = d;
    *s_out = _mm_cvtss_f32(t1);
    return outlier;
}
#endif

void dl_quantize_rows(dl_qact *a, const float *x, int64_t n, int64_t cols, int isa, int n_threads) {
    /* the row stride of a.q follows the matrix being multiplied, not the
     * buffer's capacity: callers pass cols of that matrix */
    const int64_t nb = (cols + DL_QBLOCK - 1) / DL_QBLOCK;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * cols;
        int32_t n_out = 0;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k0 = b * DL_QBLOCK;
            int8_t *q = a->q + (t * nb + b) * DL_QBLOCK;
            float *d = a->d + t * nb + b, *s = a->s + t * nb + b;
            int top;
            if (cols - k0 < DL_QBLOCK) { /* a partial last block, zero-padded */
                float pad[DL_QBLOCK] = {0};
                memcpy(pad, xt + k0, (size_t)(cols - k0) * sizeof(float));
                top = quantize_block_scalar(pad, q, d, s);
            }
#ifdef DL_X86
            else if (isa == DL_ISA_AVX512VNNI)
                top = quantize_block_avx512(xt + k0, q, d, s);
            else if (isa == DL_ISA_AVX2)
                top = quantize_block_avx2(xt + k0, q, d, s);
#endif
            else
                top = quantize_block_scalar(xt + k0, q, d, s);
            if (top >= 0) {
                a->out_k[t * nb + n_out] = (int32_t)(k0 + top);
                a->out_v[t * nb + n_out] = xt[k0 + top];
                n_out++;
            }
        }
        a->n_out[t] = n_out;
    }
}
