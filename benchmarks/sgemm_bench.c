/* The float32 GEMM alone (dl_sgemm) at the default model's four linear-layer
 * shapes, with random weights, on a forced ISA path. Best of 20 calls each.
 *
 *   make -C benchmarks build/sgemm_bench       (benchmarks/Makefile)
 *   benchmarks/build/sgemm_bench [rows=420] [threads=1] [isa=best]
 *
 * 420 rows is a batch of 32 STS-B sentences. The peak printed is 512-bit FMA
 * for the avx512vnni path, 256-bit FMA for avx2. */
#include <stdio.h>
#include <stdlib.h>

#include "bench_clock.h"
#include "deelm.h"

int main(int argc, char **argv) {
    const int64_t n = argc > 1 ? atoll(argv[1]) : 420;
    const int threads = argc > 2 ? atoi(argv[2]) : 1;
    const int isa = argc > 3 ? dl_isa_from_name(argv[3]) : dl_isa_best();
    if (isa < 0 || !dl_isa_supported(isa)) {
        fprintf(stderr, "unknown or unsupported isa\n");
        return 1;
    }
    const int64_t shapes[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
    const char *names[4] = {"qkv", "attn_output", "gate_up", "down"};
    const double peak = dl_peak_gops(isa == DL_ISA_AVX512VNNI ? DL_PEAK_FP32 : DL_PEAK_FP32_AVX2,
                                     threads, 50000000);
    double all_ops = 0, all_s = 0;
    srand(1);
    for (int s = 0; s < 4; s++) {
        const int64_t rows = shapes[s][0], cols = shapes[s][1];
        dl_fmat w;
        float *x = malloc((size_t)(n * cols) * sizeof(float)), *y = malloc((size_t)(n * rows) * sizeof(float));
        float *wr = malloc((size_t)(rows * cols) * sizeof(float));
        if (dl_fmat_alloc(&w, rows, cols) || !x || !y || !wr) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        for (int64_t i = 0; i < rows * cols; i++) wr[i] = (float)rand() / (float)RAND_MAX - 0.5f;
        dl_fmat_set_rows(&w, 0, wr, rows);
        for (int64_t i = 0; i < n * cols; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
        double best = 1e9;
        for (int r = 0; r < 20; r++) {
            const double t0 = now();
            dl_sgemm(y, rows, x, n, &w, 0, isa, threads);
            const double t1 = now();
            if (t1 - t0 < best) best = t1 - t0;
        }
        const double ops = 2.0 * (double)n * (double)rows * (double)cols;
        printf("%-12s %5lld x %-5lld  %7.3f ms  %5.1f GFLOP/s (%4.1f %% of peak)\n", names[s],
               (long long)rows, (long long)cols, best * 1e3, ops / best / 1e9, 100.0 * ops / best / 1e9 / peak);
        all_ops += ops;
        all_s += best;
        dl_fmat_free(&w);
        free(x);
        free(y);
        free(wr);
    }
    printf("all four (%s, %d threads): %.1f GFLOP/s, %.1f %% of the measured FMA peak %.0f\n",
           dl_isa_name(isa), threads, all_ops / all_s / 1e9, 100.0 * all_ops / all_s / 1e9 / peak, peak);
    return 0;
}
