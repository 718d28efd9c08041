/* Which vector instructions this CPU runs, and what they can peak at.
 *
 * deelm is built once for plain x86-64 and picks its GEMM path at run time;
 * the fast paths are compiled with per-function target attributes, so the
 * module still loads (and runs the scalar path) on a CPU without AVX2.
 * The peak measurements are what the benchmarks divide achieved FLOP/s by:
 * a register-only loop of independent multiply-adds, long enough for the
 * core to settle into its AVX-512 frequency. */
#include <string.h>
#include <time.h>

#include "deelm.h"
#include "isa.h"

/* The features of DL_TARGET_AVX2 and DL_TARGET_AVX512 (isa.h). */
int dl_isa_supported(int isa) {
    switch (isa) {
    case DL_ISA_SCALAR: return 1;
#ifdef DL_X86
    case DL_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case DL_ISA_AVX512VNNI:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    default: return 0;
    }
}

int dl_isa_best(void) {
    if (dl_isa_supported(DL_ISA_AVX512VNNI)) return DL_ISA_AVX512VNNI;
    if (dl_isa_supported(DL_ISA_AVX2)) return DL_ISA_AVX2;
    return DL_ISA_SCALAR;
}

const char *const dl_isa_names[DL_N_ISAS] = {
    [DL_ISA_SCALAR] = "scalar", [DL_ISA_AVX2] = "avx2", [DL_ISA_AVX512VNNI] = "avx512vnni",
};
static const char *const isa_targets[] = {"", DL_TARGET_AVX2, DL_TARGET_AVX512};

const char *dl_isa_features(int isa) {
    return isa >= 0 && isa < (int)(sizeof isa_targets / sizeof *isa_targets) ? isa_targets[isa] : "";
}

const char *dl_isa_name(int isa) {
    return isa >= 0 && isa < DL_N_ISAS ? dl_isa_names[isa] : "unknown";
}

int dl_isa_from_name(const char *name) {
    for (int i = 0; i < DL_N_ISAS; i++)
        if (strcmp(name, dl_isa_names[i]) == 0) return i;
    return -1;
}

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#ifdef DL_X86
/* Keeps a register live and opaque so the loop cannot be folded away. */
#define KEEP(v) __asm__ volatile("" : "+v"(v))

/* 10 independent accumulators hide the instruction latency (4-5 cycles) on
 * two ports. Returns operations done (2 per multiply-add). */
DL_AVX512
static double int8_dot_loop(int64_t iters) {
    __m512i a0, a1, a2, a3, a4, a5, a6, a7, a8, a9;
    const __m512i u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(1);
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = _mm512_setzero_si512();
#define DP(r) r = _mm512_dpbusd_epi32(r, u, s); KEEP(r);
    for (int64_t i = 0; i < iters; i++) { DP(a0) DP(a1) DP(a2) DP(a3) DP(a4) DP(a5) DP(a6) DP(a7) DP(a8) DP(a9) }
#undef DP
    return (double)iters * 10 * 64 * 2;
}

__attribute__((target("avx512f")))
static double fp32_fma_loop(int64_t iters) {
    __m512 a0, a1, a2, a3, a4, a5, a6, a7, a8, a9;
    const __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(0.0f);
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = _mm512_setzero_ps();
#define FM(r) r = _mm512_fmadd_ps(r, x, y); KEEP(r);
    for (int64_t i = 0; i < iters; i++) { FM(a0) FM(a1) FM(a2) FM(a3) FM(a4) FM(a5) FM(a6) FM(a7) FM(a8) FM(a9) }
#undef FM
    return (double)iters * 10 * 16 * 2;
}

/* The AVX2 int8 dot product: vpmaddubsw multiplies 32 byte pairs and adds
 * adjacent products into int16; each chain feeds its result back in as the
 * unsigned operand so nothing can be hoisted out of the loop. */
DL_AVX2 static double int8_dot_loop_avx2(int64_t iters) {
    __m256i a0, a1, a2, a3, a4, a5, a6, a7, a8, a9;
    const __m256i s = _mm256_set1_epi8(1);
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = _mm256_set1_epi8(1);
#define DP(r) r = _mm256_maddubs_epi16(r, s); KEEP(r);
    for (int64_t i = 0; i < iters; i++) { DP(a0) DP(a1) DP(a2) DP(a3) DP(a4) DP(a5) DP(a6) DP(a7) DP(a8) DP(a9) }
#undef DP
    return (double)iters * 10 * 32 * 2;
}

DL_AVX2 static double fp32_fma_loop_avx2(int64_t iters) {
    __m256 a0, a1, a2, a3, a4, a5, a6, a7, a8, a9;
    const __m256 x = _mm256_set1_ps(1.0f), y = _mm256_set1_ps(0.0f);
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = _mm256_setzero_ps();
#define FM(r) r = _mm256_fmadd_ps(r, x, y); KEEP(r);
    for (int64_t i = 0; i < iters; i++) { FM(a0) FM(a1) FM(a2) FM(a3) FM(a4) FM(a5) FM(a6) FM(a7) FM(a8) FM(a9) }
#undef FM
    return (double)iters * 10 * 8 * 2;
}

static double peak_loop(int kind, int64_t iters) {
    switch (kind) {
    case DL_PEAK_INT8: return int8_dot_loop(iters);
    case DL_PEAK_FP32: return fp32_fma_loop(iters);
    case DL_PEAK_INT8_AVX2: return int8_dot_loop_avx2(iters);
    default: return fp32_fma_loop_avx2(iters);
    }
}
#endif

double dl_peak_gops(int kind, int n_threads, int64_t iters) {
#ifdef DL_X86
    __builtin_cpu_init();
    if (kind == DL_PEAK_INT8 && !dl_isa_supported(DL_ISA_AVX512VNNI)) return 0.0;
    if (kind == DL_PEAK_FP32 && !__builtin_cpu_supports("avx512f")) return 0.0;
    if ((kind == DL_PEAK_INT8_AVX2 || kind == DL_PEAK_FP32_AVX2) && !dl_isa_supported(DL_ISA_AVX2))
        return 0.0;
    double ops = 0.0, t0 = 0.0, t1 = 0.0;
#pragma omp parallel num_threads(n_threads) reduction(+ : ops)
    {
        /* one untimed pass brings every core up to its vector frequency */
        peak_loop(kind, iters / 4);
#pragma omp barrier
#pragma omp single
        t0 = seconds_now();
        ops += peak_loop(kind, iters);
#pragma omp barrier
#pragma omp single
        t1 = seconds_now();
    }
    return ops / (t1 - t0) / 1e9;
#else
    (void)kind; (void)n_threads; (void)iters;
    return 0.0;
#endif
}
