/* Float32 GEMM: y = x W^T with W packed in panels of 16 output rows.
 *
 * Every output is one chain of fused multiply-adds over k in increasing
 * order, started from zero:
 *     acc = 0;  for k: acc = fma(x[t, k], W[r, k], acc);  y[t, r] (=, +=) acc
 * The vector paths put 16 (AVX-512) or 8 (AVX2) such chains side by side in
 * one register and the scalar path runs them one by one with fmaf; an fma is
 * exactly rounded, so all paths give the same bits, and an output does not
 * depend on the rows beside it, the batch size or the thread count. That is
 * the guarantee OpenBLAS's sgemm cannot give: its kernels and its blocking
 * of k change with the CPU, the number of rows and the threads.
 *
 * Speed comes from the register tile, not from splitting the sum: MR token
 * rows x NP panels of accumulators, each weight vector loaded once per k
 * and used MR times, each activation broadcast once and used NP times.
 * Work split: chunks of ROW_CHUNK rows x groups of panels; a thread takes a
 * run of (group, chunk) items, group-major, so a weight panel stays in L2
 * while the activations stream past it. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "deelm.h"
#include "isa.h"

#define ROW_CHUNK 48   /* token rows per work item: a multiple of every tile height */
#define MAX_MR 8       /* the tallest tile (rows) */
#define MAX_NP 2       /* the widest tile (panels) */
#define TILE_W (MAX_NP * DL_FPANEL)

/* ---- the packed matrix ---------------------------------------------------- */

static int64_t n_panels(int64_t rows) { return (rows + DL_FPANEL - 1) / DL_FPANEL; }

int64_t dl_fmat_bytes(int64_t rows, int64_t cols) {
    if (rows < 0 || cols < 0) return -1;
    const int64_t np = n_panels(rows);
    if (np > 0 && cols > INT64_MAX / (int64_t)sizeof(float) / DL_FPANEL / np) return -1;
    return np * cols * DL_FPANEL * (int64_t)sizeof(float);
}

int dl_fmat_alloc(dl_fmat *w, int64_t rows, int64_t cols) {
    memset(w, 0, sizeof *w);
    const int64_t bytes = dl_fmat_bytes(rows, cols);
    if (bytes < 0) return DL_ERR_VALUE;
    w->rows = rows;
    w->cols = cols;
    w->n_panels = n_panels(rows);
    w->p = (float *)calloc(bytes > 0 ? (size_t)bytes : 1, 1);
    return w->p ? DL_OK : DL_ERR_NOMEM;
}

void dl_fmat_free(dl_fmat *w) {
    free(w->p);
    memset(w, 0, sizeof *w);
}

/* The address of element (r, k). */
static float *at(const dl_fmat *w, int64_t r, int64_t k) {
    return w->p + ((r / DL_FPANEL) * w->cols + k) * DL_FPANEL + r % DL_FPANEL;
}

void dl_fmat_set_rows(dl_fmat *w, int64_t row0, const float *src, int64_t n_rows) {
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t k = 0; k < w->cols; k++) *at(w, row0 + r, k) = src[r * w->cols + k];
}

void dl_fmat_set_col(dl_fmat *w, int64_t k, const float *src) {
    for (int64_t r = 0; r < w->rows; r++) *at(w, r, k) = src[r];
}

void dl_fmat_row(const dl_fmat *w, int64_t r, float *out) {
    for (int64_t k = 0; k < w->cols; k++) out[k] = *at(w, r, k);
}

/* ---- tiles ------------------------------------------------------------------
 * A tile computes acc[i][j] for mr rows of x (row stride ldx) and np panels
 * starting at panel p, over all k, into out[i * TILE_W + j]. */

typedef struct {
    float *y;
    int64_t ldy;
    const float *x;
    const dl_fmat *w;
    int accumulate;
} sgemm_job;

static void tile_scalar(const float *x, int64_t ldx, const dl_fmat *w, int64_t p, int mr, int np,
                        float *out) {
    const int64_t K = w->cols;
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < np * DL_FPANEL; j++) {
            const float *b = w->p + (p + j / DL_FPANEL) * K * DL_FPANEL + j % DL_FPANEL;
            const float *a = x + i * ldx;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc = fmaf(a[k], b[k * DL_FPANEL], acc);
            out[i * TILE_W + j] = acc;
        }
}

#ifdef DL_X86
#define AVX512 DL_AVX512
#define AVX2 DL_AVX2

/* The rows of a short tile repeat its last row and a one-panel tile reads its
 * panel twice: the spare accumulators compute copies that are not stored, so
 * one fully unrolled kernel, all accumulators in registers, serves every
 * shape. */
static void row_ptrs(const float *x, int64_t ldx, int mr, int n, const float **a) {
    for (int i = 0; i < n; i++) a[i] = x + (i < mr ? i : mr - 1) * ldx;
}

/* 8 rows x 2 panels: 16 accumulators of 16 floats. */
AVX512 static void tile_avx512(const float *x, int64_t ldx, const dl_fmat *w, int64_t p, int mr,
                               int np, float *out) {
    const int64_t K = w->cols;
    const float *b0 = w->p + p * K * DL_FPANEL, *b1 = np > 1 ? b0 + K * DL_FPANEL : b0;
    const float *a[8];
    row_ptrs(x, ldx, mr, 8, a);
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5],
                *a6 = a[6], *a7 = a[7];
#define ZERO(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
    ZERO(0) ZERO(1) ZERO(2) ZERO(3) ZERO(4) ZERO(5) ZERO(6) ZERO(7)
#undef ZERO
    for (int64_t k = 0; k < K; k++) {
        const __m512 w0 = _mm512_loadu_ps(b0 + k * DL_FPANEL);
        const __m512 w1 = _mm512_loadu_ps(b1 + k * DL_FPANEL);
#define ROW(i)                                                                                     \
    {                                                                                              \
        const __m512 v = _mm512_set1_ps(a##i[k]);                                                  \
        c##i##0 = _mm512_fmadd_ps(v, w0, c##i##0);                                                 \
        c##i##1 = _mm512_fmadd_ps(v, w1, c##i##1);                                                 \
    }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7)
#undef ROW
    }
#define STORE(i)                                                                                   \
    _mm512_storeu_ps(out + i * TILE_W, c##i##0);                                                   \
    _mm512_storeu_ps(out + i * TILE_W + DL_FPANEL, c##i##1);
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7)
#undef STORE
}

/* 6 rows x 1 panel: 12 accumulators of 8 floats. */
AVX2 static void tile_avx2(const float *x, int64_t ldx, const dl_fmat *w, int64_t p, int mr,
                           int np, float *out) {
    (void)np; /* always one panel */
    const int64_t K = w->cols;
    const float *b0 = w->p + p * K * DL_FPANEL;
    const float *a[6];
    row_ptrs(x, ldx, mr, 6, a);
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
#define ZERO(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
    ZERO(0) ZERO(1) ZERO(2) ZERO(3) ZERO(4) ZERO(5)
#undef ZERO
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(b0 + k * DL_FPANEL);
        const __m256 w1 = _mm256_loadu_ps(b0 + k * DL_FPANEL + 8);
#define ROW(i)                                                                                     \
    {                                                                                              \
        const __m256 v = _mm256_broadcast_ss(a##i + k);                                            \
        c##i##0 = _mm256_fmadd_ps(v, w0, c##i##0);                                                 \
        c##i##1 = _mm256_fmadd_ps(v, w1, c##i##1);                                                 \
    }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
#define STORE(i)                                                                                   \
    _mm256_storeu_ps(out + i * TILE_W, c##i##0);                                                   \
    _mm256_storeu_ps(out + i * TILE_W + 8, c##i##1);
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
}
#endif

typedef void (*tile_fn)(const float *x, int64_t ldx, const dl_fmat *w, int64_t p, int mr, int np,
                        float *out);

typedef struct {
    tile_fn tile;
    int mr, np; /* the tile's largest shape */
} tile_kind;

static tile_kind tile_for(int isa) {
#ifdef DL_X86
    if (isa == DL_ISA_AVX512VNNI) return (tile_kind){tile_avx512, 8, 2};
    if (isa == DL_ISA_AVX2) return (tile_kind){tile_avx2, 6, 1};
#endif
    (void)isa;
    return (tile_kind){tile_scalar, 4, 1};
}

/* Rows [t0, t0 + nt) x panels [p0, p0 + np) of y. */
static void block(const sgemm_job *J, tile_kind tk, int64_t t0, int64_t nt, int64_t p0, int np) {
    float out[MAX_MR * TILE_W];
    const int64_t rows = J->w->rows;
    for (int64_t t = t0; t < t0 + nt; t += tk.mr) {
        const int mr = (int)(t0 + nt - t < tk.mr ? t0 + nt - t : tk.mr);
        tk.tile(J->x + t * J->w->cols, J->w->cols, J->w, p0, mr, np, out);
        const int64_t r0 = p0 * DL_FPANEL;
        const int64_t nr = rows - r0 < np * DL_FPANEL ? rows - r0 : np * DL_FPANEL;
        for (int i = 0; i < mr; i++) {
            float *yp = J->y + (t + i) * J->ldy + r0;
            const float *o = out + i * TILE_W;
            if (J->accumulate)
                for (int64_t j = 0; j < nr; j++) yp[j] += o[j];
            else
                memcpy(yp, o, (size_t)nr * sizeof(float));
        }
    }
}

void dl_sgemm(float *y, int64_t ldy, const float *x, int64_t n, const dl_fmat *w, int accumulate,
              int isa, int n_threads) {
    if (n <= 0 || w->rows == 0) return;
    const sgemm_job J = {y, ldy, x, w, accumulate};
    const tile_kind tk = tile_for(isa);
    const int64_t n_groups = (w->n_panels + tk.np - 1) / tk.np;
    const int64_t n_chunks = (n + ROW_CHUNK - 1) / ROW_CHUNK;
    const int64_t items = n_groups * n_chunks;
    const int nt = (int64_t)n_threads > items ? (int)items : n_threads;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t it = 0; it < items; it++) {
        const int64_t g = it / n_chunks, c = it % n_chunks;
        const int64_t p0 = g * tk.np, t0 = c * ROW_CHUNK;
        const int np = (int)(w->n_panels - p0 < tk.np ? w->n_panels - p0 : tk.np);
        block(&J, tk, t0, n - t0 < ROW_CHUNK ? n - t0 : ROW_CHUNK, p0, np);
    }
}
