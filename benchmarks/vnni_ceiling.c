/* How much of the int8 peak a GEMM can keep once each 32-column block's
 * integer dot products must be turned into floats.
 *
 * On Cascade Lake, 512-bit vpdpbusd issues on ports 0 and 5, and so do the
 * 512-bit converts, multiplies and fmas that scale each block's int32 sums.
 * Every float instruction per block therefore takes the slot of a vpdpbusd.
 * With 32-column blocks an output vector gets 8 vpdpbusd per block, so the
 * scaling work per block sets a ceiling of 8 / (8 + float ops) on the
 * fraction of the peak a kernel can reach, before loads, activation
 * quantization or outliers. This loop measures that ceiling with every operand
 * in registers and the scales loaded as the kernel loads them: 8 output
 * vectors (a 4-row x 2-panel tile) per block, each with its 8 vpdpbusd in two
 * chains of 4 (one chain of 8 stalls on latency), then one of these epilogues:
 *
 *   none      the int32 sums accumulate across blocks (the peak itself)
 *   3 ops     add the two chains, cvt, fma by one scale: the least any format
 *             with a scale per 32-column block of the activations needs
 *   5 ops     add, cvt, mul (weight scale x activation scale), fma, and the
 *             fma of the block's offset m times the activation sum: exact
 *             Q4_1, as deelm's kernel (csrc/quant/qgemm.c) does it
 *
 *   make -C benchmarks build/vnni_ceiling      (benchmarks/Makefile)
 *   benchmarks/build/vnni_ceiling [repeats=7]
 *
 * Prints the median G int8 ops/s of each loop and its share of the first.
 * Needs AVX-512 VNNI. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define KEEP(v) __asm__ volatile("" : "+v"(v))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni"), noinline))
#define BLOCKS 2000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Each loop does BLOCKS x OUTS x 8 vpdpbusd and returns a sum of its
 * results, so nothing is dead. Named variables, not arrays: GCC keeps
 * arrays on the stack across the block loop. */
#define DOT(acc) acc = _mm512_dpbusd_epi32(acc, u, s); KEEP(acc);
#define EACH8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)

VNNI static float loop_none(void) {
    const __m512i u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(1);
#define DECL(o) __m512i a##o = _mm512_setzero_si512(), b##o = _mm512_setzero_si512();
    EACH8(DECL)
#undef DECL
#define STEP(o) DOT(a##o) DOT(b##o)
    for (long b = 0; b < BLOCKS; b++)
        for (int g = 0; g < 4; g++) { EACH8(STEP) }
#undef STEP
    __m512i t = _mm512_setzero_si512();
#define SUM(o) t = _mm512_add_epi32(t, _mm512_add_epi32(a##o, b##o));
    EACH8(SUM)
#undef SUM
    return (float)_mm512_reduce_add_epi32(t);
}

/* EPI(o) is the epilogue of output o, on f##o; the scales are loaded from
 * memory, a different one per block, as in the kernel. */
#define EPILOGUE_LOOP(name, EPI)                                                       \
    VNNI static float name(const float *wd, const float *wm, const float *xd, const float *xs) { \
        const __m512i u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(1);                \
        (void)wd; (void)wm; (void)xs; /* the 3-op epilogue reads xd only */         \
        EACH8(DECL_F)                                                                 \
        for (long b = 0; b < BLOCKS; b++) {                                           \
            const long at = (b & 63) * 16;                                            \
            EACH8(DECL_I)                                                             \
            for (int g = 0; g < 4; g++) { EACH8(DOT_A) EACH8(DOT_B) }                  \
            EACH8(EPI)                                                                \
        }                                                                             \
        __m512 t = _mm512_setzero_ps();                                               \
        EACH8(SUM_F)                                                                  \
        return _mm512_reduce_add_ps(t);                                               \
    }
#define DECL_F(o) __m512 f##o = _mm512_setzero_ps();
#define DECL_I(o) __m512i a##o = _mm512_setzero_si512(), b##o = _mm512_setzero_si512(); KEEP(a##o); KEEP(b##o);
#define DOT_A(o) DOT(a##o)
#define DOT_B(o) DOT(b##o)
#define SUM_F(o) t = _mm512_add_ps(t, f##o);
/* output o is row o / 2 of the tile, panel o % 2 */
#define DOTF(o) _mm512_cvtepi32_ps(_mm512_add_epi32(a##o, b##o))
#define EPI3(o) f##o = _mm512_fmadd_ps(DOTF(o), _mm512_set1_ps(xd[at + o / 2]), f##o); KEEP(f##o);
#define EPI5(o)                                                                                   \
    f##o = _mm512_fmadd_ps(DOTF(o), _mm512_mul_ps(_mm512_loadu_ps(wd + at + (o % 2) * 16 * 64),      \
                                                  _mm512_set1_ps(xd[at + o / 2])), f##o);          \
    f##o = _mm512_fmadd_ps(_mm512_loadu_ps(wm + at + (o % 2) * 16 * 64), _mm512_set1_ps(xs[at + o / 2]), f##o); \
    KEEP(f##o);

EPILOGUE_LOOP(loop_3ops, EPI3)
EPILOGUE_LOOP(loop_5ops, EPI5)

static int by_value(const void *pa, const void *pb) {
    const double a = *(const double *)pa, b = *(const double *)pb;
    return (a > b) - (a < b);
}

int main(int argc, char **argv) {
    const int repeats = argc > 1 ? atoi(argv[1]) : 7;
    if (repeats < 1 || repeats > 99) {
        fprintf(stderr, "repeats: 1 to 99\n");
        return 2;
    }
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512vnni")) {
        fprintf(stderr, "this CPU has no AVX-512 VNNI\n");
        return 1;
    }
    /* scales: 64 blocks x 16 lanes per panel, two panels */
    static float wd[2 * 64 * 16], wm[2 * 64 * 16], xd[64 * 16], xs[64 * 16];
    for (int i = 0; i < 2 * 64 * 16; i++) wd[i] = 1e-3f, wm[i] = -1e-3f;
    for (int i = 0; i < 64 * 16; i++) xd[i] = 0.5f, xs[i] = 0.25f;
    const char *names[3] = {"no epilogue (peak)", "3 ops: add, cvt, fma", "5 ops: exact Q4_1 (deelm)"};
    const int n_ops[3] = {0, 3, 5};
    double gops[3][99], sink = 0;
    const double ops = (double)BLOCKS * 8 * 8 * 64 * 2;
    sink += loop_none(); /* warm-up: brings the core to its vector frequency */
    for (int r = 0; r < repeats; r++) /* interleaved, so drifts hit every loop alike */
        for (int i = 0; i < 3; i++) {
            const double t0 = now();
            sink += i == 0 ? loop_none() : i == 1 ? loop_3ops(wd, wm, xd, xs) : loop_5ops(wd, wm, xd, xs);
            gops[i][r] = ops / (now() - t0) / 1e9;
        }
    for (int i = 0; i < 3; i++) {
        qsort(gops[i], (size_t)repeats, sizeof(double), by_value);
        const double med = gops[i][repeats / 2], peak = gops[0][repeats / 2];
        printf("%-28s %6.0f G ops/s  %5.1f %% of the peak  (ports: 8 / (8 + %d) = %5.1f %%)\n", names[i], med,
               100.0 * med / peak, n_ops[i], 100.0 * 8 / (8 + n_ops[i]));
    }
    return sink == 12345.0f; /* never true; keeps the results live */
}
