/* The instruction sets behind deelm's ISA paths (DL_ISA_*), in one place:
 * the target attribute each path's kernels are compiled with, and the CPU
 * features dl_isa_supported checks before it lets that path run. A kernel
 * compiled with an instruction its path does not check would fault on a CPU
 * that lacks it, so every x86 kernel of an ISA path takes its attribute
 * from here (tests/core/test_isa.py holds the sources to that). */
#ifndef DEELM_ISA_H
#define DEELM_ISA_H

#if defined(__x86_64__) || defined(__i386__)
#define DL_X86 1
#include <immintrin.h>
#endif

/* Keep in step with the __builtin_cpu_supports checks in cpu.c. */
#define DL_TARGET_AVX2 "avx2,fma"
#define DL_TARGET_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"

#define DL_AVX2 __attribute__((target(DL_TARGET_AVX2)))
#define DL_AVX512 __attribute__((target(DL_TARGET_AVX512)))

#endif
