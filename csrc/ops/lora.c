/* LoRA adapters on the linear layers: y += scale * (drop(x) A^T) B^T.
 *
 * A rank-r adapter adds 2 r (in + out) multiply-adds per token to a layer of
 * in * out, so plain loops over rows do: each row's result is then computed
 * alike whatever the batch (sgemm would take other paths for few rows), and
 * the parameter gradients are sums over rows in row order, whatever the
 * thread count. */
#include <stdlib.h>
#include <string.h>

#include "deelm.h"
#include "dot.h"

/* columns of dA one thread owns in the backward */
#define COL_BLOCK 64

/* splitmix64: a counter-based generator, so element (row, col) of entry e's
 * mask is recomputed, not stored. */
static inline uint64_t mix(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The mask of row `row` of entry e's input starts from this key; element k
 * is kept when the top 24 bits of mix(key + k), as a fraction, are >= p. */
static inline uint64_t row_key(dl_dropout dr, int64_t e, int64_t row) {
    return mix(dr.seed ^ mix((uint64_t)e << 40 ^ (uint64_t)row));
}

/* 1 / (1 - p) where element k is kept, else 0. */
static inline float mask_at(dl_dropout dr, uint64_t key, int64_t k) {
    const uint32_t threshold = (uint32_t)(dr.p * 16777216.0f);
    const uint32_t u = (uint32_t)(mix(key + (uint64_t)k) >> 40);
    return u >= threshold ? 1.0f / (1.0f - dr.p) : 0.0f;
}

/* xd = drop(x) for one row of entry e. */
DL_CLONES static void drop_row(float *xd, const float *x, int64_t in, dl_dropout dr, int64_t e, int64_t row) {
    const uint64_t key = row_key(dr, e, row);
    for (int64_t k = 0; k < in; k++) xd[k] = x[k] * mask_at(dr, key, k);
}

/* The row of LoRA input entry e sees: x itself, or its dropped copy in buf. */
static const float *input_row(const float *x, int64_t in, dl_dropout dr, int64_t e, int64_t t,
                              float *buf) {
    if (dr.p <= 0.0f) return x + t * in;
    drop_row(buf, x + t * in, in, dr, e, t);
    return buf;
}

/* Entries of (layer, fused), as a range [*first, *last) of lo->entries
 * (sorted by layer then module, and a fused layer's modules are adjacent). */
static void entry_range(const dl_lora *lo, int64_t layer, int fused, int64_t *first,
                        int64_t *last) {
    *first = *last = 0;
    if (!lo) return;
    int64_t lo_i = -1, hi_i = -1;
    for (int mod = 0; mod < DL_N_MODULES; mod++) {
        if (dl_module_fused(mod) != fused) continue;
        const int32_t e = lo->slot[layer * DL_N_MODULES + mod];
        if (e < 0) continue;
        if (lo_i < 0) lo_i = e;
        hi_i = e + 1;
    }
    if (lo_i >= 0) {
        *first = lo_i;
        *last = hi_i;
    }
}

int64_t dl_lora_scratch_floats(const dl_config *c, int64_t n, int64_t widest, int64_t max_rank) {
    int64_t max_out = dl_qkv_dim(c);
    if (2 * c->hidden_dim > max_out) max_out = 2 * c->hidden_dim;
    if (c->dim > max_out) max_out = c->dim;
    const int64_t row = widest > max_rank ? widest : max_rank;
    return n * row + max_rank * max_out;
}

int64_t dl_lora_save_size(const dl_lora *lo, int64_t layer, int fused, int64_t n) {
    int64_t first, last, size = 0;
    entry_range(lo, layer, fused, &first, &last);
    for (int64_t e = first; e < last; e++) size += n * lo->entries[e].rank;
    return size;
}

#define LORA_TILE 8 /* token rows that share each pass over B^T */

/* t[i * r + j] = A[j] . x_i for rows i < NT_ and ranks j0 <= j < j0 + NJ_
 * (A: [r, in]): each x chunk is loaded once for NJ_ ranks and each A chunk
 * once for NT_ rows. Every sum runs over one 16-wide vector then the tail in
 * order, so it does not depend on the rows or ranks beside it. NT_ and NJ_
 * are constants at every call, so the accumulators stay in registers. */
#define DOWN_ROWS 2
#define DOWN_RANKS 4
static inline __attribute__((always_inline)) void
lora_down_block(float *t, int64_t r, const float *A, int64_t in, const float *const *xr, int64_t j0,
                const int NT_, const int NJ_) {
    dl_v16 acc[DOWN_ROWS][DOWN_RANKS];
    for (int i = 0; i < NT_; i++)
        for (int j = 0; j < NJ_; j++) acc[i][j] = (dl_v16){0};
    int64_t k = 0;
    for (; k + 16 <= in; k += 16) {
        dl_v16 xv[DOWN_ROWS];
        for (int i = 0; i < NT_; i++) xv[i] = dl_load16(xr[i] + k);
        for (int j = 0; j < NJ_; j++) {
            const dl_v16 a = dl_load16(A + (j0 + j) * in + k);
            for (int i = 0; i < NT_; i++) acc[i][j] += a * xv[i];
        }
    }
    for (int i = 0; i < NT_; i++)
        for (int j = 0; j < NJ_; j++) {
            float s = dl_hsum16(acc[i][j]);
            for (int64_t kk = k; kk < in; kk++) s += A[(j0 + j) * in + kk] * xr[i][kk];
            t[i * r + j0 + j] = s;
        }
}

/* t[i * r + j] = A[j] . x_i for the nt <= LORA_TILE rows of a tile. */
DL_CLONES static void lora_down_tile(float *t, const float *A, int64_t r, int64_t in,
                                     const float *const *xr, int64_t nt) {
    for (int64_t i = 0; i < nt; i += DOWN_ROWS)
        for (int64_t j0 = 0; j0 < r; j0 += DOWN_RANKS) {
            const int rows = nt - i >= DOWN_ROWS ? DOWN_ROWS : 1;
            const int64_t nj = r - j0 < DOWN_RANKS ? r - j0 : DOWN_RANKS;
#define DOWN(NJ) \
    case NJ: \
        if (rows == DOWN_ROWS) lora_down_block(t + i * r, r, A, in, xr + i, j0, DOWN_ROWS, NJ); \
        else lora_down_block(t + i * r, r, A, in, xr + i, j0, 1, NJ); \
        break;
            switch (nj) { DOWN(1) DOWN(2) DOWN(3) default: DOWN(DOWN_RANKS) }
#undef DOWN
        }
}

/* y[i, o] += sum_j s[i, j] B^T[j, o] for rows i < nt and 16 outputs from o:
 * each output's sum runs over j in order and is added to y once. nt is a
 * constant at both calls, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
lora_up16(float *y, int64_t ldy, const float s[][DL_LORA_MAX_RANK], const int64_t nt, int64_t r,
          const float *bt, int64_t out, int64_t o) {
    dl_v16 acc[LORA_TILE] = {{0}};
    for (int64_t j = 0; j < r; j++) {
        const dl_v16 b = dl_load16(bt + j * out + o);
        for (int64_t i = 0; i < nt; i++) acc[i] += s[i][j] * b;
    }
    for (int64_t i = 0; i < nt; i++) dl_store16(y + i * ldy + o, dl_load16(y + i * ldy + o) + acc[i]);
}

/* The same sums for the outputs past the last multiple of 16, one at a time. */
static void lora_up_tail(float *y, int64_t ldy, const float s[][DL_LORA_MAX_RANK], int64_t nt,
                         int64_t r, const float *bt, int64_t out, int64_t o0) {
    for (int64_t i = 0; i < nt; i++)
        for (int64_t o = o0; o < out; o++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < r; j++) acc += s[i][j] * bt[j * out + o];
            y[i * ldy + o] += acc;
        }
}

/* y[i] += scale B t[i] for the nt <= LORA_TILE rows of a tile; t: [nt, r],
 * bt = B^T: [r, out]. A row's result does not depend on the rows beside it:
 * a partial tile goes row by row, through the same sums. */
DL_CLONES static void lora_up_tile(float *y, int64_t ldy, const float *t, int64_t nt, int64_t r,
                                   const float *bt, int64_t out, float scale) {
    float s[LORA_TILE][DL_LORA_MAX_RANK];
    for (int64_t i = 0; i < nt; i++)
        for (int64_t j = 0; j < r; j++) s[i][j] = scale * t[i * r + j];
    const int64_t o16 = out / 16 * 16;
    for (int64_t o = 0; o < o16; o += 16) {
        if (nt == LORA_TILE) {
            lora_up16(y, ldy, s, LORA_TILE, r, bt, out, o);
        } else {
            for (int64_t i = 0; i < nt; i++) lora_up16(y + i * ldy, ldy, s + i, 1, r, bt, out, o);
        }
    }
    lora_up_tail(y, ldy, s, nt, r, bt, out, o16);
}

void dl_lora_forward(const dl_lora *lo, const dl_config *c, int64_t layer, int fused, float *y,
                     int64_t ldy, const float *x, int64_t n, float *t_save, dl_dropout drop,
                     float *scratch, int n_threads) {
    int64_t first, last;
    entry_range(lo, layer, fused, &first, &last);
    for (int64_t e = first; e < last; e++) {
        const dl_lora_entry *en = &lo->entries[e];
        const int64_t r = en->rank, in = en->in, out = en->out;
        const float *A = lo->params + en->off_a, *B = lo->params + en->off_b;
        float *yc = y + dl_module_row0(c, (int)en->module);
        /* B^T: a tile of rows then reads it once, 16 contiguous outputs at a
         * time, instead of each row taking `out` dot products of length r */
        float *bt = scratch + n * in;
        for (int64_t o = 0; o < out; o++)
            for (int64_t j = 0; j < r; j++) bt[j * out + o] = B[o * r + j];
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t t0 = 0; t0 < n; t0 += LORA_TILE) {
            const int64_t nt = n - t0 < LORA_TILE ? n - t0 : LORA_TILE;
            float tt[LORA_TILE * DL_LORA_MAX_RANK], *tp = t_save ? t_save + t0 * r : tt;
            const float *xr[LORA_TILE];
            for (int64_t i = 0; i < nt; i++) xr[i] = input_row(x, in, drop, e, t0 + i, scratch + (t0 + i) * in);
            lora_down_tile(tp, A, r, in, xr, nt);
            lora_up_tile(yc + t0 * ldy, ldy, tp, nt, r, bt, out, en->scale);
        }
        if (t_save) t_save += n * r;
    }
}

/* dB[o, j] += scale sum_t dy[t, o] ts[t, j] for the no <= 16 outputs from o0:
 * dy's rows are read 16 outputs at a time; each sum still runs over t in
 * order from 0, so the result is the one a loop per output gives. */
DL_CLONES static void lora_grad_b(float *dB, const float *dy, int64_t ldy, const float *ts,
                                  int64_t n, int64_t r, int64_t o0, int64_t no, float scale) {
    float acc[DL_LORA_MAX_RANK][16];
    for (int64_t j = 0; j < r; j++)
        for (int64_t oo = 0; oo < 16; oo++) acc[j][oo] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        const float *g = dy + t * ldy + o0, *tt = ts + t * r;
        for (int64_t j = 0; j < r; j++) {
            const float s = tt[j];
            for (int64_t oo = 0; oo < no; oo++) acc[j][oo] += g[oo] * s;
        }
    }
    for (int64_t oo = 0; oo < no; oo++)
        for (int64_t j = 0; j < r; j++) dB[(o0 + oo) * r + j] += scale * acc[j][oo];
}

/* dt[t, j] = scale sum_o dy[t, o] B[o, j] for the nt <= 4 rows from t0, the
 * sum over o in order; rows are taken together only so each B row is loaded
 * once for all of them (independent sums, no change to any one). */
DL_CLONES static void lora_grad_t(float *dt, const float *dy, int64_t ldy, const float *B,
                                  int64_t out, int64_t r, int64_t nt, float scale) {
    float acc[4][DL_LORA_MAX_RANK];
    for (int64_t i = 0; i < nt; i++)
        for (int64_t j = 0; j < r; j++) acc[i][j] = 0.0f;
    for (int64_t o = 0; o < out; o++) {
        const float *b = B + o * r;
        for (int64_t i = 0; i < nt; i++) {
            const float g = dy[i * ldy + o];
            for (int64_t j = 0; j < r; j++) acc[i][j] += g * b[j];
        }
    }
    for (int64_t i = 0; i < nt; i++)
        for (int64_t j = 0; j < r; j++) dt[i * r + j] = scale * acc[i][j];
}

/* Columns [k0, k1) of one row t: dx[k] += mask(t, k) sum_j dt[j] A[j, k] and
 * dA[j, k] += dt[j] drop(x)[k]. Each dx sum runs over j in order from 0, and
 * the caller visits the rows in order, so dA's sums run over t in order. */
DL_CLONES static void lora_grad_a_row(float *dA, float *dx, const float *A, const float *x,
                                      const float *dt, int64_t in, int64_t r, int64_t k0,
                                      int64_t k1, dl_dropout drop, int64_t e, int64_t t) {
    float xd[COL_BLOCK], mask[COL_BLOCK], s[COL_BLOCK];
    const int64_t nk = k1 - k0;
    if (drop.p > 0.0f) {
        /* the mask of this row's columns, as the forward drew it */
        const uint64_t key = row_key(drop, e, t);
        for (int64_t k = 0; k < nk; k++) mask[k] = mask_at(drop, key, k0 + k);
    } else {
        for (int64_t k = 0; k < nk; k++) mask[k] = 1.0f;
    }
    for (int64_t k = 0; k < nk; k++) {
        xd[k] = x[k0 + k] * mask[k];
        s[k] = 0.0f;
    }
    for (int64_t j = 0; j < r; j++) {
        const float g = dt[j], *a = A + j * in + k0;
        for (int64_t k = 0; k < nk; k++) s[k] += g * a[k];
    }
    for (int64_t k = 0; k < nk; k++) dx[k0 + k] += mask[k] * s[k];
    for (int64_t j = 0; j < r; j++) {
        const float g = dt[j];
        float *dAj = dA + j * in + k0;
        for (int64_t k = 0; k < nk; k++) dAj[k] += g * xd[k];
    }
}

void dl_lora_backward(const dl_lora *lo, const dl_config *c, int64_t layer, int fused,
                      float *grad, float *dx, const float *dy, int64_t ldy, const float *x,
                      int64_t n, const float *t_save, dl_dropout drop, float *scratch,
                      int n_threads) {
    int64_t first, last;
    entry_range(lo, layer, fused, &first, &last);
    for (int64_t e = first; e < last; e++) {
        const dl_lora_entry *en = &lo->entries[e];
        const int64_t r = en->rank, in = en->in, out = en->out;
        const float *A = lo->params + en->off_a, *B = lo->params + en->off_b;
        float *dA = grad + en->off_a, *dB = grad + en->off_b;
        const float *dyc = dy + dl_module_row0(c, (int)en->module);
        float *dt = scratch; /* [n, r] */
        const int64_t n_ob = (out + 15) / 16;
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t b = 0; b < n_ob; b++) {
            const int64_t o0 = b * 16, no = out - o0 < 16 ? out - o0 : 16;
            lora_grad_b(dB, dyc, ldy, t_save, n, r, o0, no, en->scale);
        }
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t t0 = 0; t0 < n; t0 += 4)
            lora_grad_t(dt + t0 * r, dyc + t0 * ldy, ldy, B, out, r, n - t0 < 4 ? n - t0 : 4,
                        en->scale);
        /* column blocks per thread: each dA element sums its rows in order */
        const int64_t kb = COL_BLOCK, n_kb = (in + kb - 1) / kb;
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t b = 0; b < n_kb; b++) {
            const int64_t k0 = b * kb, k1 = k0 + kb < in ? k0 + kb : in;
            for (int64_t t = 0; t < n; t++)
                lora_grad_a_row(dA, dx + t * in, A, x + t * in, dt + t * r, in, r, k0, k1, drop, e, t);
        }
        t_save += n * r;
    }
}
