/* Integer GEMM: y = x W^T with int8 activations and packed 4/8-bit weights.
 *
 * Per 32-column block b, every output gets an exact int32 dot product of its
 * weight bytes and activation bytes; the float part is then, always in this
 * order,   f = fma((float)dot_b, w.d * x.d, f);  f = fma(w.m, x.s, f).
 * The three ISA paths differ only in how they get the exact integer dot, so
 * their results are bitwise equal, and a row's result does not depend on the
 * rows beside it or on how the work is split between threads.
 *
 * Work split: tiles of MR token rows x 2 panels (32 outputs). The rows go in
 * super-chunks whose int8 activations fit in L2 (256 KB); within one, a
 * thread takes a run of (panel pair, row chunk) items, panel-major, so the
 * weight panel stays in L1/L2 while the activations stream past it. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "deelm.h"
#include "isa.h"

#define ROW_CHUNK 96 /* token rows per work item: a multiple of the tile height */

typedef struct {
    float *y;
    int64_t ldy;
    const dl_qact *x;
    const dl_qmat *w;
    int accumulate;
} gemm_job;

static int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ---- scalar ------------------------------------------------------------- */

static void tile_scalar(const gemm_job *J, int64_t t0, int64_t nt, int64_t p0, int np) {
    const dl_qmat *w = J->w;
    const dl_qact *x = J->x;
    const int64_t nb = w->n_blocks;
    for (int64_t t = t0; t < t0 + nt; t++)
        for (int64_t p = p0; p < p0 + np; p++)
            for (int rr = 0; rr < DL_QPANEL; rr++) {
                const int64_t r = p * DL_QPANEL + rr;
                if (r >= w->rows) break;
                float f = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t *wq = w->q + (p * nb + b) * DL_QPANEL * DL_QBLOCK + rr * 4;
                    const int8_t *xq = x->q + (t * nb + b) * DL_QBLOCK;
                    int32_t dot = 0;
                    for (int g = 0; g < 8; g++)
                        for (int j = 0; j < 4; j++) dot += (int32_t)wq[g * 64 + j] * xq[g * 4 + j];
                    const int64_t ws = (p * nb + b) * DL_QPANEL + rr, xs = t * nb + b;
                    f = fmaf((float)dot, w->d[ws] * x->d[xs], f);
                    f = fmaf(w->m[ws], x->s[xs], f);
                }
                float *yp = J->y + t * J->ldy + r;
                *yp = J->accumulate ? *yp + f : f;
            }
}

#ifdef DL_X86
/* ---- AVX2: vpmaddubsw ------------------------------------------------------- */
/* vpmaddubsw adds two u8*s8 products into a saturating int16: exact while
 * q <= 15 (2 * 15 * 127 = 3,810), and so are the sums of a block's 8 groups
 * (8 * 3,810 = 30,480 < 32,767), which therefore stay in int16 and meet
 * vpmaddwd once per block. Bytes above 15 are split into nibbles, each summed
 * exactly, and recombined as 16 * hi + lo. */

#define AVX2 DL_AVX2
/* Pins a value to a register at this point of the program. */
#define KEEP(v) __asm__ volatile("" : "+x"(v))
#define MR2 4 /* the most token rows per AVX2 tile: each weight load serves them all */

/* MR_ rows x one panel (two 8-row halves); MR_ and WIDE constant at every
 * call site, so the loops unroll and the sums stay in registers. */
AVX2 static inline __attribute__((always_inline)) void
tile_avx2_fixed(const gemm_job *J, int64_t t0, int64_t p, const int MR_, const int WIDE) {
    const dl_qmat *w = J->w;
    const dl_qact *x = J->x;
    const int64_t nb = w->n_blocks;
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const uint8_t *wp = w->q + p * nb * DL_QPANEL * DL_QBLOCK;
    __m256 f[MR2][2];
    _Pragma("GCC unroll 4")
    for (int i = 0; i < MR_; i++) f[i][0] = f[i][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i lo[MR2][2], hi[MR2][2];
        _Pragma("GCC unroll 4")
        for (int i = 0; i < MR_; i++)
            lo[i][0] = lo[i][1] = hi[i][0] = hi[i][1] = _mm256_setzero_si256();
        const uint8_t *wq = wp + b * DL_QPANEL * DL_QBLOCK;
        _Pragma("GCC unroll 8")
        for (int g = 0; g < 8; g++) {
            __m256i v[2];
            v[0] = _mm256_loadu_si256((const __m256i *)(wq + g * 64));
            v[1] = _mm256_loadu_si256((const __m256i *)(wq + g * 64 + 32));
            __m256i vlo[2], vhi[2];
            if (WIDE)
                for (int h = 0; h < 2; h++) {
                    vlo[h] = _mm256_and_si256(v[h], low4);
                    vhi[h] = _mm256_and_si256(_mm256_srli_epi16(v[h], 4), low4);
                }
            _Pragma("GCC unroll 4")
            for (int i = 0; i < MR_; i++) {
                const __m256i a = _mm256_set1_epi32(load_i32(x->q + ((t0 + i) * nb + b) * DL_QBLOCK + 4 * g));
                _Pragma("GCC unroll 2")
                for (int h = 0; h < 2; h++) {
                    if (WIDE) {
                        lo[i][h] = _mm256_add_epi16(lo[i][h], _mm256_maddubs_epi16(vlo[h], a));
                        hi[i][h] = _mm256_add_epi16(hi[i][h], _mm256_maddubs_epi16(vhi[h], a));
                        KEEP(hi[i][h]);
                    } else {
                        lo[i][h] = _mm256_add_epi16(lo[i][h], _mm256_maddubs_epi16(v[h], a));
                    }
                    /* one running sum per register: left alone, GCC computes all
                     * 16 products of a block first and spills them */
                    KEEP(lo[i][h]);
                }
            }
        }
        const int64_t ws = (p * nb + b) * DL_QPANEL;
        _Pragma("GCC unroll 4")
        for (int i = 0; i < MR_; i++) {
            const int64_t xs = (t0 + i) * nb + b;
            const __m256 xd = _mm256_set1_ps(x->d[xs]), xsum = _mm256_set1_ps(x->s[xs]);
            _Pragma("GCC unroll 2")
            for (int h = 0; h < 2; h++) {
                __m256i dot = _mm256_madd_epi16(lo[i][h], ones);
                if (WIDE) dot = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(hi[i][h], ones), 4), dot);
                const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(w->d + ws + 8 * h), xd);
                f[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, f[i][h]);
                f[i][h] = _mm256_fmadd_ps(_mm256_loadu_ps(w->m + ws + 8 * h), xsum, f[i][h]);
            }
        }
    }
    const int64_t r0 = p * DL_QPANEL;
    _Pragma("GCC unroll 4")
    for (int i = 0; i < MR_; i++) {
        float out[DL_QPANEL];
        _mm256_storeu_ps(out, f[i][0]);
        _mm256_storeu_ps(out + 8, f[i][1]);
        float *yp = J->y + (t0 + i) * J->ldy + r0;
        for (int rr = 0; rr < DL_QPANEL && r0 + rr < w->rows; rr++)
            yp[rr] = J->accumulate ? yp[rr] + out[rr] : out[rr];
    }
}

/* 4-bit weights: 3 rows (6 int16 sums, 6 float sums, 2 weight vectors, the
 * broadcast and the ones: 16 registers); the nibble-split 8-bit weights need
 * twice the sums: 2 rows. */
AVX2 static void tile_avx2(const gemm_job *J, int64_t t0, int64_t nt, int64_t p0, int np) {
    const int wide = J->w->max_q > 15, mr = wide ? 2 : 3;
    for (int64_t p = p0; p < p0 + np; p++)
        for (int64_t t = t0; t < t0 + nt; t += mr) {
            const int64_t left = t0 + nt - t;
            if (wide) {
                if (left >= 2) tile_avx2_fixed(J, t, p, 2, 1); else tile_avx2_fixed(J, t, p, 1, 1);
            } else if (left >= 3) {
                tile_avx2_fixed(J, t, p, 3, 0);
            } else if (left == 2) {
                tile_avx2_fixed(J, t, p, 2, 0);
            } else {
                tile_avx2_fixed(J, t, p, 1, 0);
            }
        }
}

/* ---- AVX-512 VNNI: vpdpbusd ----------------------------------------------- */

#define AVX512 DL_AVX512
/* Token rows per tile: 4 rows x 2 panels x 2 = 16 independent vpdpbusd
 * chains; with 8 float accumulators, 2 weight vectors and a broadcast, 27 of
 * the 32 zmm (more and the compiler runs short and adds moves). */
#define MR 4

/* A zeroed register by the xor idiom, which the core resolves at rename. Left
 * to itself the compiler zeroes one register and copies it into each
 * accumulator: one move per accumulator and block, on the two ports that
 * run vpdpbusd. */
AVX512 static inline __m512i zero_by_xor(void) {
    __m512i z;
    __asm__ volatile("vpxord %0, %0, %0" : "=v"(z)); /* volatile: one per accumulator, never merged */
    return z;
}

/* MR_ and NP_ are constants at every call site, so the loops unroll fully. */
AVX512 static inline __attribute__((always_inline)) void
tile_vnni_fixed(const gemm_job *J, int64_t t0, int64_t p0, const int MR_, const int NP_) {
    const dl_qmat *w = J->w;
    const dl_qact *x = J->x;
    const int64_t nb = w->n_blocks;
    __m512 f[MR][2];
    _Pragma("GCC unroll 8")
    for (int i = 0; i < MR_; i++)
        _Pragma("GCC unroll 8")
        for (int p = 0; p < NP_; p++) f[i][p] = _mm512_setzero_ps();
    const uint8_t *wq[2];
    _Pragma("GCC unroll 8")
    for (int p = 0; p < NP_; p++) wq[p] = w->q + (p0 + p) * nb * DL_QPANEL * DL_QBLOCK;
    for (int64_t b = 0; b < nb; b++) {
        /* two accumulators per output vector, for the even and the odd groups:
         * chains of 4 dependent vpdpbusd instead of 8 keep both ports busy
         * (a chain of 8 takes 40 cycles, as long as the whole block's work) */
        __m512i acc[MR][2][2];
        _Pragma("GCC unroll 8")
        for (int i = 0; i < MR_; i++)
            _Pragma("GCC unroll 8")
            for (int p = 0; p < NP_; p++) acc[i][p][0] = zero_by_xor(), acc[i][p][1] = zero_by_xor();
        _Pragma("GCC unroll 8")
        for (int g = 0; g < 8; g++) {
            __m512i v[2];
            _Pragma("GCC unroll 8")
            for (int p = 0; p < NP_; p++) v[p] = _mm512_loadu_si512(wq[p] + (b * 8 + g) * 64);
            _Pragma("GCC unroll 8")
            for (int i = 0; i < MR_; i++) {
                const __m512i a =
                    _mm512_set1_epi32(load_i32(x->q + ((t0 + i) * nb + b) * DL_QBLOCK + 4 * g));
                _Pragma("GCC unroll 8")
                for (int p = 0; p < NP_; p++)
                    acc[i][p][g & 1] = _mm512_dpbusd_epi32(acc[i][p][g & 1], v[p], a);
            }
        }
        _Pragma("GCC unroll 8")
        for (int p = 0; p < NP_; p++) {
            const int64_t ws = ((p0 + p) * nb + b) * DL_QPANEL;
            const __m512 wd = _mm512_loadu_ps(w->d + ws), wm = _mm512_loadu_ps(w->m + ws);
            _Pragma("GCC unroll 8")
            for (int i = 0; i < MR_; i++) {
                const int64_t xs = (t0 + i) * nb + b;
                const __m512i dot = _mm512_add_epi32(acc[i][p][0], acc[i][p][1]);
                const __m512 s = _mm512_mul_ps(wd, _mm512_set1_ps(x->d[xs]));
                f[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, f[i][p]);
                f[i][p] = _mm512_fmadd_ps(wm, _mm512_set1_ps(x->s[xs]), f[i][p]);
            }
        }
    }
    _Pragma("GCC unroll 8")
    for (int p = 0; p < NP_; p++) {
        const int64_t r0 = (p0 + p) * DL_QPANEL;
        const int64_t left = w->rows - r0;
        const __mmask16 mask = left >= DL_QPANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        _Pragma("GCC unroll 8")
        for (int i = 0; i < MR_; i++) {
            float *yp = J->y + (t0 + i) * J->ldy + r0;
            __m512 out = f[i][p];
            if (J->accumulate) out = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, yp), out);
            _mm512_mask_storeu_ps(yp, mask, out);
        }
    }
}

AVX512 static void tile_vnni(const gemm_job *J, int64_t t0, int64_t nt, int64_t p0, int np) {
    for (int64_t t = t0; t < t0 + nt; t += MR) {
        const int64_t mr = t0 + nt - t < MR ? t0 + nt - t : MR;
#define TILE(rows) \
    case rows: \
        if (np == 2) tile_vnni_fixed(J, t, p0, rows, 2); \
        else tile_vnni_fixed(J, t, p0, rows, 1); \
        break;
        switch (mr) { TILE(1) TILE(2) TILE(3) default: TILE(4) }
#undef TILE
    }
}
#endif

/* ---- outliers: y[t, :] += v W[:, k] -------------------------------------- */
/* The outliers (k, v) dl_quantize_rows took out of the integer blocks are
 * added column by column. Every path forms W[r, k] = fma(d, q, m) and adds
 * fma(v, W[r, k], y) for a row's outliers in column order, so the paths and
 * the two orders below agree bitwise. Most rows have an outlier or two, in
 * the same few channels (the "massive activations" of LLMs): one weight
 * column decoded serves every row whose outlier sits in it. */
#define OUT_PANELS 16 /* panels of one column decoded at a time: 256 floats */

/* wcol[16 i + rr] = W[16 (p0 + i) + rr, 32 b + kk] for i < np. Column k of the
 * packed matrix is byte k % 4 of every 32-bit lane of one 64-byte group per
 * panel. Rows past w->rows decode as zero weights. */
typedef void (*decode_fn)(float *wcol, const dl_qmat *w, int64_t b, int64_t kk, int64_t p0, int64_t np);
/* y[r] = fma(v, wcol[r], y[r]) for r < n */
typedef void (*axpy_fn)(float *y, const float *wcol, float v, int64_t n);

static void decode_scalar(float *wcol, const dl_qmat *w, int64_t b, int64_t kk, int64_t p0, int64_t np) {
    for (int64_t i = 0; i < np; i++) {
        const int64_t pb = (p0 + i) * w->n_blocks + b;
        const uint8_t *q = w->q + (pb * 8 + kk / 4) * 64 + kk % 4;
        for (int rr = 0; rr < DL_QPANEL; rr++)
            wcol[i * DL_QPANEL + rr] = fmaf(w->d[pb * DL_QPANEL + rr], (float)q[rr * 4], w->m[pb * DL_QPANEL + rr]);
    }
}

static void axpy_scalar(float *y, const float *wcol, float v, int64_t n) {
    for (int64_t r = 0; r < n; r++) y[r] = fmaf(v, wcol[r], y[r]);
}

#ifdef DL_X86
AVX512 static void decode_avx512(float *wcol, const dl_qmat *w, int64_t b, int64_t kk, int64_t p0, int64_t np) {
    const __m512i byte = _mm512_set1_epi32(0xFF);
    const __m128i shift = _mm_cvtsi32_si128((int)(8 * (kk % 4)));
    for (int64_t i = 0; i < np; i++) {
        const int64_t pb = (p0 + i) * w->n_blocks + b;
        const __m512i g = _mm512_loadu_si512(w->q + (pb * 8 + kk / 4) * 64);
        const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(g, shift), byte));
        _mm512_storeu_ps(wcol + i * DL_QPANEL, _mm512_fmadd_ps(_mm512_loadu_ps(w->d + pb * DL_QPANEL), q,
                                                               _mm512_loadu_ps(w->m + pb * DL_QPANEL)));
    }
}

AVX512 static void axpy_avx512(float *y, const float *wcol, float v, int64_t n) {
    const __m512 vv = _mm512_set1_ps(v);
    for (int64_t r = 0; r < n; r += 16) {
        const __mmask16 m = n - r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - r)) - 1);
        _mm512_mask_storeu_ps(y + r, m, _mm512_fmadd_ps(vv, _mm512_maskz_loadu_ps(m, wcol + r),
                                                        _mm512_maskz_loadu_ps(m, y + r)));
    }
}

AVX2 static void decode_avx2(float *wcol, const dl_qmat *w, int64_t b, int64_t kk, int64_t p0, int64_t np) {
    const __m256i byte = _mm256_set1_epi32(0xFF);
    const __m128i shift = _mm_cvtsi32_si128((int)(8 * (kk % 4)));
    for (int64_t i = 0; i < 2 * np; i++) { /* half panels of 8 rows */
        const int64_t pb = (p0 + i / 2) * w->n_blocks + b, h = 8 * (i % 2);
        const __m256i g = _mm256_loadu_si256((const __m256i *)(w->q + (pb * 8 + kk / 4) * 64 + 4 * h));
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(g, shift), byte));
        _mm256_storeu_ps(wcol + 8 * i, _mm256_fmadd_ps(_mm256_loadu_ps(w->d + pb * DL_QPANEL + h), q,
                                                       _mm256_loadu_ps(w->m + pb * DL_QPANEL + h)));
    }
}

AVX2 static void axpy_avx2(float *y, const float *wcol, float v, int64_t n) {
    const __m256 vv = _mm256_set1_ps(v);
    int64_t r = 0;
    for (; r + 8 <= n; r += 8)
        _mm256_storeu_ps(y + r, _mm256_fmadd_ps(vv, _mm256_loadu_ps(wcol + r), _mm256_loadu_ps(y + r)));
    for (; r < n; r++) y[r] = fmaf(v, wcol[r], y[r]);
}
#endif

typedef struct {
    int32_t k, t;
    float v;
} outlier;

static int by_column_then_row(const void *pa, const void *pb) {
    const outlier *a = (const outlier *)pa, *b = (const outlier *)pb;
    if (a->k != b->k) return a->k < b->k ? -1 : 1;
    return (a->t > b->t) - (a->t < b->t);
}

/* The outliers of rows [t0, t1), each distinct column decoded once per panel
 * chunk. Without memory for the list, row by row (the same bits). */
static void add_outliers(const gemm_job *J, int64_t t0, int64_t t1, decode_fn decode, axpy_fn axpy) {
    const dl_qmat *w = J->w;
    const dl_qact *x = J->x;
    const int64_t nb = w->n_blocks;
    float wcol[OUT_PANELS * DL_QPANEL];
    int64_t count = 0;
    for (int64_t t = t0; t < t1; t++) count += x->n_out[t];
    if (!count) return;
    outlier *list = (outlier *)malloc((size_t)count * sizeof(outlier));
    if (list) {
        int64_t i = 0;
        for (int64_t t = t0; t < t1; t++)
            for (int32_t j = 0; j < x->n_out[t]; j++)
                list[i++] = (outlier){x->out_k[t * nb + j], (int32_t)t, x->out_v[t * nb + j]};
        qsort(list, (size_t)count, sizeof(outlier), by_column_then_row);
    }
    for (int64_t p0 = 0; p0 < w->n_panels; p0 += OUT_PANELS) {
        const int64_t np = w->n_panels - p0 < OUT_PANELS ? w->n_panels - p0 : OUT_PANELS;
        const int64_t r0 = p0 * DL_QPANEL, nr = w->rows - r0 < np * DL_QPANEL ? w->rows - r0 : np * DL_QPANEL;
        if (list) {
            for (int64_t i = 0; i < count; i++) {
                if (i == 0 || list[i].k != list[i - 1].k)
                    decode(wcol, w, list[i].k / DL_QBLOCK, list[i].k % DL_QBLOCK, p0, np);
                axpy(J->y + list[i].t * J->ldy + r0, wcol, list[i].v, nr);
            }
        } else {
            for (int64_t t = t0; t < t1; t++)
                for (int32_t j = 0; j < x->n_out[t]; j++) {
                    const int64_t k = x->out_k[t * nb + j];
                    decode(wcol, w, k / DL_QBLOCK, k % DL_QBLOCK, p0, np);
                    axpy(J->y + t * J->ldy + r0, wcol, x->out_v[t * nb + j], nr);
                }
        }
    }
    free(list);
}

/* Rows per super-chunk: as many whole row chunks as fit ACT_BYTES of int8
 * activations. Work goes super-chunk by super-chunk, so the activations a
 * core streams past each weight panel stay in its L2 however many rows there
 * are; a weight matrix is then read once per super-chunk, from L3. */
#define ACT_BYTES (256 * 1024)
static int64_t super_rows(const dl_qmat *w) {
    const int64_t chunks = ACT_BYTES / (w->n_blocks * DL_QBLOCK * ROW_CHUNK);
    return (chunks > 1 ? chunks : 1) * ROW_CHUNK;
}

void dl_qgemm(float *y, int64_t ldy, const dl_qact *x, int64_t n, const dl_qmat *w,
              int accumulate, int isa, int n_threads) {
    if (n <= 0 || w->rows <= 0) return;
    const gemm_job J = {y, ldy, x, w, accumulate};
    const int64_t n_pairs = (w->n_panels + 1) / 2;
    /* as many super-chunks as needed, then evened out to whole row chunks */
    const int64_t most = super_rows(w), n_supers = (n + most - 1) / most;
    const int64_t chunks_per_super = ((n + n_supers - 1) / n_supers + ROW_CHUNK - 1) / ROW_CHUNK;
    const int64_t S = chunks_per_super * ROW_CHUNK;
    const int64_t per_super = n_pairs * chunks_per_super;
#pragma omp parallel num_threads(n_threads)
    for (int64_t sup = 0; sup < n_supers; sup++) {
        const int64_t s0 = sup * S, s1 = s0 + S < n ? s0 + S : n;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < per_super; item++) {
            const int64_t p0 = (item / chunks_per_super) * 2, t0 = s0 + (item % chunks_per_super) * ROW_CHUNK;
            if (t0 >= s1) continue; /* row chunks past the end of the last super-chunk */
            const int np = p0 + 1 < w->n_panels ? 2 : 1;
            const int64_t nt = s1 - t0 < ROW_CHUNK ? s1 - t0 : ROW_CHUNK;
#ifdef DL_X86
            if (isa == DL_ISA_AVX512VNNI) { tile_vnni(&J, t0, nt, p0, np); continue; }
            if (isa == DL_ISA_AVX2) { tile_avx2(&J, t0, nt, p0, np); continue; }
#endif
            tile_scalar(&J, t0, nt, p0, np);
        }
        /* the implicit barrier above: every tile of the super-chunk is written;
         * its outliers are added while its rows of y are still in cache */
        const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t t0 = s0 + (s1 - s0) * tid / nth, t1 = s0 + (s1 - s0) * (tid + 1) / nth;
#ifdef DL_X86
        if (isa == DL_ISA_AVX512VNNI) add_outliers(&J, t0, t1, decode_avx512, axpy_avx512);
        else if (isa == DL_ISA_AVX2) add_outliers(&J, t0, t1, decode_avx2, axpy_avx2);
        else
#endif
            add_outliers(&J, t0, t1, decode_scalar, axpy_scalar);
    }
}
