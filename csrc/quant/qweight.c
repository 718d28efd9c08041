/* Linear weights packed once at load into the layout the integer GEMM reads.
 *
 * GGUF's 4-, 5- and 8-bit blocks (K-quant sub-blocks of Q4_K and Q5_K too)
 * already have the form d * q + m over 32 columns, so they are repacked
 * without changing a single weight; only the nibbles and high bits are spread
 * out to one byte each, because unpacking them in the inner loop would cost
 * as many instructions as the dot products themselves. Float weights and
 * Q6_K, whose 16-column sub-blocks have scales of their own, are rounded to
 * 8 bits per 32 columns. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deelm.h"

static int64_t panels(int64_t rows) { return (rows + DL_QPANEL - 1) / DL_QPANEL; }
static int64_t col_blocks(int64_t cols) { return (cols + DL_QBLOCK - 1) / DL_QBLOCK; }

int64_t dl_qmat_bytes(int64_t rows, int64_t cols) {
    /* q: a byte per weight, d and m: a float each per 32 columns of a row */
    return panels(rows) * col_blocks(cols) * DL_QPANEL * (DL_QBLOCK + 2 * (int64_t)sizeof(float));
}

int dl_qmat_alloc(dl_qmat *w, int64_t rows, int64_t cols) {
    memset(w, 0, sizeof *w);
    w->rows = rows;
    w->cols = cols;
    w->n_panels = panels(rows);
    w->n_blocks = col_blocks(cols);
    const size_t blocks = (size_t)w->n_panels * (size_t)w->n_blocks;
    w->q = (uint8_t *)calloc(blocks * DL_QPANEL * DL_QBLOCK, 1);
    w->d = (float *)calloc(blocks * DL_QPANEL, sizeof(float));
    w->m = (float *)calloc(blocks * DL_QPANEL, sizeof(float));
    if (!w->q || !w->d || !w->m) {
        dl_qmat_free(w);
        return DL_ERR_NOMEM;
    }
    return DL_OK;
}

void dl_qmat_free(dl_qmat *w) {
    free(w->q);
    free(w->d);
    free(w->m);
    w->q = NULL;
    w->d = w->m = NULL;
}

static size_t q_index(const dl_qmat *w, int64_t r, int64_t k) {
    const int64_t p = r / DL_QPANEL, rr = r % DL_QPANEL, b = k / DL_QBLOCK, kk = k % DL_QBLOCK;
    return (size_t)(((p * w->n_blocks + b) * 8 + kk / 4) * 64 + rr * 4 + kk % 4);
}

static size_t scale_index(const dl_qmat *w, int64_t r, int64_t b) {
    return (size_t)(((r / DL_QPANEL) * w->n_blocks + b) * DL_QPANEL + r % DL_QPANEL);
}

/* Float weights: 8-bit asymmetric rounding over the block's range. */
static void block_from_floats(const float *x, int64_t n, uint8_t q[DL_QBLOCK], float *d, float *m) {
    float lo = x[0], hi = x[0];
    for (int64_t j = 1; j < n; j++) {
        if (x[j] < lo) lo = x[j];
        if (x[j] > hi) hi = x[j];
    }
    *m = lo;
    *d = (hi - lo) / 255.0f;
    const float inv = *d > 0.0f ? 1.0f / *d : 0.0f;
    memset(q, 0, DL_QBLOCK);
    for (int64_t j = 0; j < n; j++) {
        float v = nearbyintf((x[j] - lo) * inv);
        q[j] = (uint8_t)(v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v);
    }
}

int64_t dl_qmat_pack_rows(dl_qmat *w, int64_t row0, int type, const void *src, int64_t n_rows,
                          float *scratch) {
    const int64_t row_bytes = dl_row_bytes(type, w->cols);
    if (row_bytes < 0 || row0 < 0 || n_rows < 0 || row0 + n_rows > w->rows) return DL_ERR_VALUE;
    int64_t bad = 0;
    uint8_t q[DL_QBLOCK];
    for (int64_t i = 0; i < n_rows; i++) {
        const uint8_t *row = (const uint8_t *)src + i * row_bytes;
        const int64_t r = row0 + i;
        bad += dl_dequantize(type, row, scratch, w->cols);
        for (int64_t b = 0; b < w->n_blocks; b++) {
            const int64_t k0 = b * DL_QBLOCK;
            const int64_t n = w->cols - k0 < DL_QBLOCK ? w->cols - k0 : DL_QBLOCK;
            float d, m;
            const int zero = dl_block32(type, row, b, q, &d, &m);
            if (zero > 0)
                m = -(float)zero * d; /* exact: d times a power of two */
            else if (zero < 0)
                block_from_floats(scratch + k0, n, q, &d, &m);
            for (int64_t j = 0; j < n; j++) {
                w->q[q_index(w, r, k0 + j)] = q[j];
                if (q[j] > w->max_q) w->max_q = q[j];
            }
            w->d[scale_index(w, r, b)] = d;
            w->m[scale_index(w, r, b)] = m;
        }
    }
    return bad;
}

void dl_qmat_row(const dl_qmat *w, int64_t r, float *out) {
    for (int64_t k = 0; k < w->cols; k++) {
        const size_t s = scale_index(w, r, k / DL_QBLOCK);
        out[k] = w->d[s] * (float)w->q[q_index(w, r, k)] + w->m[s];
    }
}
