/* exp for the hot loops (SwiGLU, softmax), where libm's expf is a scalar call
 * per element: the range reduction and polynomial of Cephes' expf, written
 * with plain float operations and no branches so that compilers vectorize
 * it and every build gives the same bits. Within 2 ulp of expf on
 * [-87, 88]; inputs are clamped to that range (beyond it the callers' results
 * are 0 or saturated to float precision anyway). Callers mark their loops
 * DL_VECTOR_MATH so the clamps become min/max instructions. */
#ifndef DEELM_FASTEXP_H
#define DEELM_FASTEXP_H

#include <stdint.h>

/* finite-math-only lets the compiler turn the clamps into min/max (it
 * otherwise keeps branches, for NaN's sake, and the loop stays scalar). */
#define DL_VECTOR_MATH __attribute__((optimize("finite-math-only", "no-signed-zeros")))


/* a * b + c: one exactly rounded fma, or a multiply then an add. */
#define DL_MADD(fused, a, b, c) ((fused) ? __builtin_fmaf((a), (b), (c)) : (a) * (b) + (c))

/* The exp below, its multiply-adds fused or not (FUSED_ is a constant). */
DL_VECTOR_MATH static inline __attribute__((always_inline)) float dl_exp_by(float x, const int FUSED_) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* n = round(x / ln 2): adding 1.5 * 2^23 rounds to an integer in float */
    const float shifter = 12582912.0f;
    const float n = DL_MADD(FUSED_, x, 1.44269504088896341f, shifter) - shifter;
    /* r = x - n ln 2, in two parts so r keeps its low bits */
    float r = DL_MADD(FUSED_, n, -0.693359375f, x);
    r = DL_MADD(FUSED_, n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = DL_MADD(FUSED_, p, r, 1.3981999507e-3f);
    p = DL_MADD(FUSED_, p, r, 8.3334519073e-3f);
    p = DL_MADD(FUSED_, p, r, 4.1665795894e-2f);
    p = DL_MADD(FUSED_, p, r, 1.6666665459e-1f);
    p = DL_MADD(FUSED_, p, r, 5.0000001201e-1f);
    p = DL_MADD(FUSED_, p * r, r, r) + 1.0f;
    union { int32_t i; float f; } scale; /* 2^n from the exponent bits */
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* With plain multiplies and adds: the same bits on every build. */
DL_VECTOR_MATH static inline __attribute__((always_inline)) float dl_expf(float x) {
    return dl_exp_by(x, 0);
}

/* With fmas: about 17 instructions per vector instead of 28, for callers
 * built with DL_FMA_CLONES (the same bits on every clone, fmaf being exactly
 * rounded; not the same bits as dl_expf). */
DL_VECTOR_MATH static inline __attribute__((always_inline)) float dl_expf_fma(float x) {
    return dl_exp_by(x, 1);
}

#endif
