/* The int8 GEMM alone (dl_quantize_rows + dl_qgemm) at the default model's
 * four linear-layer shapes, with random Q4_1-like weights, to separate the
 * kernel from the rest of the forward pass. Best of 20 calls each.
 *
 *   make -C benchmarks build/qgemm_bench       (benchmarks/Makefile)
 *   benchmarks/build/qgemm_bench [rows=270] [threads=1] [outliers per row=0] [isa=best] [max_q=15]
 *
 * isa: scalar, avx2 or avx512vnni (forced, as DeeLM's isa= does); max_q: the
 * largest weight byte, 15 for 4-bit types (Q4_0, Q4_1), 31 for 5-bit ones,
 * 255 for Q8_0 (the AVX2 path then splits each byte into nibbles).
 *
 * Outliers are put in the same columns of every row, as LLMs' "massive
 * activation" channels are. */
#include <stdio.h>
#include <stdlib.h>

#include "bench_clock.h"
#include "deelm.h"

int main(int argc, char **argv) {
    const int64_t n = argc > 1 ? atoll(argv[1]) : 270;
    const int threads = argc > 2 ? atoi(argv[2]) : 1;
    const int outliers = argc > 3 ? atoi(argv[3]) : 0;
    const int isa = argc > 4 ? dl_isa_from_name(argv[4]) : dl_isa_best();
    const int max_q = argc > 5 ? atoi(argv[5]) : 15;
    if (isa < 0 || !dl_isa_supported(isa) || max_q < 1 || max_q > 255) {
        fprintf(stderr, "unknown or unsupported isa, or max_q outside [1, 255]\n");
        return 1;
    }
    const int64_t shapes[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
    const char *names[4] = {"qkv", "attn_output", "gate_up", "down"};
    const double peak = dl_peak_gops(DL_PEAK_INT8, threads, 50000000);
    double all_ops = 0, all_s = 0;
    srand(1);
    for (int s = 0; s < 4; s++) {
        const int64_t rows = shapes[s][0], cols = shapes[s][1];
        dl_qmat w;
        dl_qact a;
        float *x = malloc((size_t)(n * cols) * sizeof(float)), *y = malloc((size_t)(n * rows) * sizeof(float));
        if (dl_qmat_alloc(&w, rows, cols) || dl_qact_alloc(&a, n, cols) || !x || !y) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        const int64_t nq = w.n_panels * w.n_blocks * DL_QPANEL * DL_QBLOCK, ns = nq / DL_QBLOCK;
        for (int64_t i = 0; i < nq; i++) w.q[i] = (uint8_t)(rand() % (max_q + 1));
        for (int64_t i = 0; i < ns; i++) w.d[i] = 0.01f, w.m[i] = -0.08f;
        w.max_q = max_q;
        for (int64_t i = 0; i < n * cols; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
        for (int64_t t = 0; t < n; t++)
            for (int o = 0; o < outliers; o++) x[t * cols + (o * 97) % cols] = 50.0f;
        double best_q = 1e9, best_g = 1e9;
        for (int r = 0; r < 20; r++) {
            const double t0 = now();
            dl_quantize_rows(&a, x, n, cols, isa, threads);
            const double t1 = now();
            dl_qgemm(y, rows, &a, n, &w, 0, isa, threads);
            const double t2 = now();
            if (t1 - t0 < best_q) best_q = t1 - t0;
            if (t2 - t1 < best_g) best_g = t2 - t1;
        }
        const double ops = 2.0 * (double)n * (double)rows * (double)cols;
        printf("%-12s %5lld x %-5lld  gemm %7.3f ms  %4.0f G ops/s (%4.1f %% of peak)  quantize %6.3f ms\n",
               names[s], (long long)rows, (long long)cols, best_g * 1e3, ops / best_g / 1e9,
               100.0 * ops / best_g / 1e9 / peak, best_q * 1e3);
        all_ops += ops;
        all_s += best_g + best_q;
        dl_qmat_free(&w);
        dl_qact_free(&a);
        free(x);
        free(y);
    }
    printf("all four, quantizing included (%s, max_q %d): %.0f G ops/s, %.1f %% of the measured "
           "int8 peak %.0f\n", dl_isa_name(isa), max_q, all_ops / all_s / 1e9,
           100.0 * all_ops / all_s / 1e9 / peak, peak);
    return 0;
}
