/* GGML tensor encodings: sizes and decoding to float32.
 *
 * Block layouts (little-endian, as GGUF stores them; lo/hi = low/high nibble):
 *   Q8_0: fp16 d; int8 q[32]                    x = d * q
 *   Q4_0: fp16 d; uint8 q[16]                   x[j] = d * (lo(q[j]) - 8), x[j+16] = d * (hi(q[j]) - 8)
 *   Q4_1: fp16 d; fp16 m; uint8 q[16]           x[j] = d * lo(q[j]) + m,   x[j+16] = d * hi(q[j]) + m
 *   Q5_0: fp16 d; uint32 h; uint8 q[16]         as Q4_0 with bit j of h as 5th bit of x[j], offset 16
 *   Q5_1: fp16 d; fp16 m; uint32 h; uint8 q[16] as Q4_1 with bit j of h as 5th bit of x[j]
 * K-quants: super-blocks of 256 values.
 *   Q4_K: fp16 d; fp16 dmin; uint8 s[12]; uint8 q[128]
 *         eight sub-blocks of 32, each with a 6-bit scale sc and min mn packed
 *         in s. Sub-block j < 4: sc = low 6 bits of s[j], mn = low 6 bits of
 *         s[j+4]. Sub-block j >= 4: sc = low nibble of s[j+4] | top 2 bits of
 *         s[j-4] << 4, mn = high nibble of s[j+4] | top 2 bits of s[j] << 4.
 *         Sub-blocks 2i and 2i+1 share q[32i..32i+31]: low and high nibbles.
 *         x = (d * sc) * q - (dmin * mn)
 *   Q5_K: as Q4_K with uint8 h[32] between s and q: bit i of h[j] is the 5th
 *         bit of value j of sub-block i.
 *   Q6_K: uint8 ql[128]; uint8 qh[64]; int8 sc[16]; fp16 d
 *         Each half of 128 values has 64 ql and 32 qh bytes of its own: value
 *         e (0..127) of a half takes nibble e / 64 of ql[e % 64] (low, then
 *         high) and, above it, the two bits at 2 (e / 32) of qh[e % 32],
 *         giving q in 0..63.
 *         x = (d * sc[e / 16]) * (q - 32), one scale per 16 values.
 * Every product and difference is evaluated in float32 in the same order as
 * the gguf package's NumPy decoders, which these match bitwise (a K-quant's
 * (d sc) q - (dmin mn) is computed as (d sc) q + -(dmin mn): IEEE defines
 * subtraction as exactly that).
 */
#include <math.h>
#include <string.h>

#include "deelm.h"

#define QK 32
#define QK_K 256       /* values per K-quant super-block */
#define K_SCALE_BYTES 12 /* packed 6-bit scales and mins of Q4_K/Q5_K */

float dl_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while ((mant & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) { /* inf / nan */
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint16_t read_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int dl_type_supported(int type) { return dl_type_block_bytes(type) > 0; }

const char *dl_type_name(int type) {
    switch (type) {
    case DL_TYPE_F32: return "F32";
    case DL_TYPE_F16: return "F16";
    case DL_TYPE_BF16: return "BF16";
    case DL_TYPE_Q8_0: return "Q8_0";
    case DL_TYPE_Q4_0: return "Q4_0";
    case DL_TYPE_Q4_1: return "Q4_1";
    case DL_TYPE_Q5_0: return "Q5_0";
    case DL_TYPE_Q5_1: return "Q5_1";
    case DL_TYPE_Q4_K: return "Q4_K";
    case DL_TYPE_Q5_K: return "Q5_K";
    case DL_TYPE_Q6_K: return "Q6_K";
    default: return "unknown";
    }
}

int64_t dl_type_block_elems(int type) {
    switch (type) {
    case DL_TYPE_F32: case DL_TYPE_F16: case DL_TYPE_BF16: return 1;
    case DL_TYPE_Q8_0: case DL_TYPE_Q4_0: case DL_TYPE_Q4_1: case DL_TYPE_Q5_0: case DL_TYPE_Q5_1:
        return QK;
    case DL_TYPE_Q4_K: case DL_TYPE_Q5_K: case DL_TYPE_Q6_K: return QK_K;
    default: return 0;
    }
}

int64_t dl_type_block_bytes(int type) {
    switch (type) {
    case DL_TYPE_F32: return 4;
    case DL_TYPE_F16: case DL_TYPE_BF16: return 2;
    case DL_TYPE_Q8_0: return 2 + QK;
    case DL_TYPE_Q4_0: return 2 + QK / 2;
    case DL_TYPE_Q4_1: return 4 + QK / 2;
    case DL_TYPE_Q5_0: return 2 + 4 + QK / 2;
    case DL_TYPE_Q5_1: return 4 + 4 + QK / 2;
    case DL_TYPE_Q4_K: return 4 + K_SCALE_BYTES + QK_K / 2;
    case DL_TYPE_Q5_K: return 4 + K_SCALE_BYTES + QK_K / 8 + QK_K / 2;
    case DL_TYPE_Q6_K: return QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
    default: return 0;
    }
}

int64_t dl_row_bytes(int type, int64_t n_cols) {
    int64_t be = dl_type_block_elems(type), bb = dl_type_block_bytes(type);
    if (be == 0 || n_cols < 0 || n_cols % be != 0) return -1;
    int64_t blocks = n_cols / be;
    if (blocks > INT64_MAX / bb) return -1;
    return blocks * bb;
}

/* 32 nibbles: the low (high = 0) or high (high = 1) halves of bytes p[0..31]. */
static void nibbles32(const uint8_t *p, int high, uint8_t q[QK]) {
    for (int j = 0; j < QK; j++) q[j] = high ? p[j] >> 4 : p[j] & 15;
}

/* Q4_0/Q5_0/Q4_1/Q5_1 layout: 16 bytes whose low nibbles are values 0..15
 * and high nibbles values 16..31. */
static void split_nibbles16(const uint8_t *p, uint8_t q[QK]) {
    for (int j = 0; j < QK / 2; j++) {
        q[j] = p[j] & 15;
        q[j + QK / 2] = p[j] >> 4;
    }
}

/* The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block. */
static void k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

int dl_block32(int type, const uint8_t *row, int64_t b, uint8_t q[QK], float *d, float *m) {
    const int64_t bb = dl_type_block_bytes(type);
    const uint8_t *blk;
    *m = 0.0f;
    switch (type) {
    case DL_TYPE_Q8_0:
        blk = row + b * bb;
        *d = dl_fp16_to_fp32(read_u16(blk));
        for (int j = 0; j < QK; j++) q[j] = (uint8_t)((int)(int8_t)blk[2 + j] + 128);
        return 128;
    case DL_TYPE_Q4_0:
        blk = row + b * bb;
        *d = dl_fp16_to_fp32(read_u16(blk));
        split_nibbles16(blk + 2, q);
        return 8;
    case DL_TYPE_Q4_1:
        blk = row + b * bb;
        *d = dl_fp16_to_fp32(read_u16(blk));
        *m = dl_fp16_to_fp32(read_u16(blk + 2));
        split_nibbles16(blk + 4, q);
        return 0;
    case DL_TYPE_Q5_0:
    case DL_TYPE_Q5_1: {
        const int off = type == DL_TYPE_Q5_1 ? 2 : 0; /* the m of Q5_1 */
        blk = row + b * bb;
        *d = dl_fp16_to_fp32(read_u16(blk));
        if (off) *m = dl_fp16_to_fp32(read_u16(blk + 2));
        const uint32_t h = read_u32(blk + 2 + off);
        split_nibbles16(blk + 6 + off, q);
        for (int j = 0; j < QK; j++) q[j] |= (uint8_t)(((h >> j) & 1u) << 4);
        return off ? 0 : 16;
    }
    case DL_TYPE_Q4_K:
    case DL_TYPE_Q5_K: {
        const int sub = (int)(b % (QK_K / QK));
        blk = row + b / (QK_K / QK) * bb;
        int sc, mn;
        k_scale_min(blk + 4, sub, &sc, &mn);
        *d = dl_fp16_to_fp32(read_u16(blk)) * (float)sc;
        *m = -(dl_fp16_to_fp32(read_u16(blk + 2)) * (float)mn);
        const uint8_t *h = blk + 4 + K_SCALE_BYTES;
        const uint8_t *qs = type == DL_TYPE_Q5_K ? h + QK_K / 8 : h;
        nibbles32(qs + (sub / 2) * QK, sub % 2, q);
        if (type == DL_TYPE_Q5_K)
            for (int j = 0; j < QK; j++) q[j] |= (uint8_t)(((h[j] >> sub) & 1) << 4);
        return 0;
    }
    default:
        return -1;
    }
}

/* One Q6_K super-block: 256 values. */
static void dequantize_q6_k(const uint8_t *blk, float *dst) {
    const uint8_t *ql = blk, *qh = blk + QK_K / 2;
    const int8_t *sc = (const int8_t *)(blk + QK_K / 2 + QK_K / 4);
    const float d = dl_fp16_to_fp32(read_u16(blk + QK_K / 2 + QK_K / 4 + QK_K / 16));
    for (int half = 0; half < 2; half++) {
        const uint8_t *l = ql + 64 * half, *h = qh + 32 * half;
        for (int e = 0; e < 128; e++) {
            const int lo = (e < 64 ? l[e % 64] : l[e % 64] >> 4) & 15;
            const int hi = (h[e % 32] >> (2 * (e / 32))) & 3;
            const int idx = 128 * half + e;
            dst[idx] = (d * (float)sc[idx / 16]) * (float)((lo | hi << 4) - 32);
        }
    }
}

int64_t dl_dequantize(int type, const void *src_v, float *dst, int64_t n) {
    const uint8_t *src = (const uint8_t *)src_v;
    int64_t bad = 0;
    switch (type) {
    case DL_TYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case DL_TYPE_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = dl_fp16_to_fp32(read_u16(src + 2 * i));
        break;
    case DL_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_fp32(read_u16(src + 2 * i));
        break;
    case DL_TYPE_Q6_K:
        for (int64_t b = 0; b < n / QK_K; b++)
            dequantize_q6_k(src + b * dl_type_block_bytes(type), dst + b * QK_K);
        break;
    default: {
        uint8_t q[QK];
        float d, m;
        if (!dl_type_supported(type)) return n; /* callers check dl_type_supported first */
        for (int64_t b = 0; b < n / QK; b++) {
            float *x = dst + b * QK;
            const int zero = dl_block32(type, src, b, q, &d, &m);
            /* symmetric types: d * (q - zero), as gguf computes them (keeps
             * the sign of zeros and which values an inf scale makes NaN) */
            if (zero)
                for (int j = 0; j < QK; j++) x[j] = d * (float)((int)q[j] - zero);
            else
                for (int j = 0; j < QK; j++) x[j] = d * (float)q[j] + m;
        }
        break;
    }
    }
    for (int64_t i = 0; i < n; i++) bad += !isfinite(dst[i]);
    return bad;
}
