/* Float dot products and 8-wide vectors in a fixed order of operations.
 *
 * GCC's vector extension types are used rather than loops the compiler may
 * or may not vectorize: an 8-float vector is one AVX register, or two SSE
 * registers in the baseline build, and each lane's arithmetic is the same
 * either way, so every build and every DL_CLONES clone gives the same bits
 * (ISO C mode contracts nothing into an fma). */
#ifndef DEELM_DOT_H
#define DEELM_DOT_H

#include <stdint.h>
#include <string.h>

typedef float dl_v8 __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) dl_v8 dl_load8(const float *p) {
    dl_v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void dl_store8(float *p, dl_v8 v) {
    memcpy(p, &v, sizeof v);
}

/* 16 floats: one AVX-512 register, two AVX ones, four SSE ones. */
typedef float dl_v16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) dl_v16 dl_load16(const float *p) {
    dl_v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void dl_store16(float *p, dl_v16 v) {
    memcpy(p, &v, sizeof v);
}

/* Lanes summed as ((0 + 4) + (1 + 5)) + ((2 + 6) + (3 + 7)). */
static inline __attribute__((always_inline)) float dl_hsum8(dl_v8 s) {
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* Lanes i and i + 8 added, then summed as dl_hsum8. */
static inline __attribute__((always_inline)) float dl_hsum16(dl_v16 s) {
    dl_v8 h;
    for (int i = 0; i < 8; i++) h[i] = s[i] + s[i + 8];
    return dl_hsum8(h);
}

/* sum_i a[i] b[i]: four running vectors (32 partial sums) so the adds do
 * not wait on each other, then the tail of fewer than 8 in order. */
static inline __attribute__((always_inline)) float dl_dot(const float *a, const float *b, int64_t n) {
    dl_v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 += dl_load8(a + i) * dl_load8(b + i);
        s1 += dl_load8(a + i + 8) * dl_load8(b + i + 8);
        s2 += dl_load8(a + i + 16) * dl_load8(b + i + 16);
        s3 += dl_load8(a + i + 24) * dl_load8(b + i + 24);
    }
    for (; i + 8 <= n; i += 8) s0 += dl_load8(a + i) * dl_load8(b + i);
    float s = dl_hsum8((s0 + s1) + (s2 + s3));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#endif
