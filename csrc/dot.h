/* A float dot product as eight running sums in a fixed order: the compiler
 * vectorizes it (it may not reorder a single running sum), and the result
 * does not depend on how it does. */
#ifndef DEELM_DOT_H
#define DEELM_DOT_H

#include <stdint.h>

static inline float dl_dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#endif
