/* Rotary position embedding. The angle of pair j at position p is
 * p * inv_freq[j]; which two dimensions form pair j depends on how the
 * weight file laid out the q/k projection rows (see DL_ROPE_*). */
#include <math.h>

#include "deelm.h"

void dl_rope_table(float *cs, int64_t n_pos, int64_t half, const float *inv_freq) {
    for (int64_t p = 0; p < n_pos; p++)
        for (int64_t j = 0; j < half; j++) {
            /* the angle in float like the reference (position * inv_freq),
             * its cos/sin in double */
            float angle = (float)p * inv_freq[j];
            cs[(p * half + j) * 2] = (float)cos((double)angle);
            cs[(p * half + j) * 2 + 1] = (float)sin((double)angle);
        }
}

/* Rotates each pair by its angle, or by minus its angle when `inverse`. */
static void rotate(float *x, int64_t n, int64_t stride, int64_t n_heads, int64_t head_dim,
                   const int32_t *pos, const float *cs, int style, int inverse) {
    const int64_t half = head_dim / 2;
    const float sign = inverse ? -1.0f : 1.0f;
    for (int64_t t = 0; t < n; t++) {
        float *row = x + t * stride;
        const float *cst = cs + (int64_t)pos[t] * half * 2;
        for (int64_t h = 0; h < n_heads; h++) {
            float *v = row + h * head_dim;
            for (int64_t j = 0; j < half; j++) {
                const float c = cst[2 * j], s = sign * cst[2 * j + 1];
                const int64_t i0 = style == DL_ROPE_HALF ? j : 2 * j;
                const int64_t i1 = style == DL_ROPE_HALF ? j + half : 2 * j + 1;
                const float a = v[i0], b = v[i1];
                v[i0] = a * c - b * s;
                v[i1] = a * s + b * c;
            }
        }
    }
}

void dl_rope_forward(float *x, int64_t n, int64_t stride, int64_t n_heads,
                     int64_t head_dim, const int32_t *pos, const float *cs, int style) {
    rotate(x, n, stride, n_heads, head_dim, pos, cs, style, 0);
}

void dl_rope_backward(float *dx, int64_t n, int64_t stride, int64_t n_heads,
                      int64_t head_dim, const int32_t *pos, const float *cs, int style) {
    rotate(dx, n, stride, n_heads, head_dim, pos, cs, style, 1);
}
