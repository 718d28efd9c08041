/* GGML tensor encodings: sizes and decoding to float32.
 *
 * Block layouts (little-endian, as GGUF stores them):
 *   Q8_0: fp16 d; int8 q[32]               x = d * q
 *   Q4_0: fp16 d; uint8 q[16]              x[j] = d * (lo(q[j]) - 8), x[j+16] = d * (hi(q[j]) - 8)
 *   Q4_1: fp16 d; fp16 m; uint8 q[16]      x[j] = d * lo(q[j]) + m,   x[j+16] = d * hi(q[j]) + m
 */
#include <math.h>
#include <string.h>

#include "deelm.h"

#define QK 32

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

int dl_type_supported(int type) { return dl_type_block_bytes(type) > 0; }

const char *dl_type_name(int type) {
    switch (type) {
    case DL_TYPE_F32: return "F32";
    case DL_TYPE_F16: return "F16";
    case DL_TYPE_BF16: return "BF16";
    case DL_TYPE_Q8_0: return "Q8_0";
    case DL_TYPE_Q4_0: return "Q4_0";
    case DL_TYPE_Q4_1: return "Q4_1";
    default: return "unknown";
    }
}

int64_t dl_type_block_elems(int type) {
    switch (type) {
    case DL_TYPE_F32: case DL_TYPE_F16: case DL_TYPE_BF16: return 1;
    case DL_TYPE_Q8_0: case DL_TYPE_Q4_0: case DL_TYPE_Q4_1: return QK;
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
    case DL_TYPE_Q8_0:
        for (int64_t b = 0; b < n / QK; b++) {
            const uint8_t *blk = src + b * (2 + QK);
            float d = dl_fp16_to_fp32(read_u16(blk));
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int j = 0; j < QK; j++) dst[b * QK + j] = d * (float)q[j];
        }
        break;
    case DL_TYPE_Q4_0:
        for (int64_t b = 0; b < n / QK; b++) {
            const uint8_t *blk = src + b * (2 + QK / 2);
            float d = dl_fp16_to_fp32(read_u16(blk));
            const uint8_t *q = blk + 2;
            for (int j = 0; j < QK / 2; j++) {
                dst[b * QK + j] = d * (float)((int)(q[j] & 0x0f) - 8);
                dst[b * QK + j + QK / 2] = d * (float)((int)(q[j] >> 4) - 8);
            }
        }
        break;
    case DL_TYPE_Q4_1:
        for (int64_t b = 0; b < n / QK; b++) {
            const uint8_t *blk = src + b * (4 + QK / 2);
            float d = dl_fp16_to_fp32(read_u16(blk));
            float m = dl_fp16_to_fp32(read_u16(blk + 2));
            const uint8_t *q = blk + 4;
            for (int j = 0; j < QK / 2; j++) {
                dst[b * QK + j] = d * (float)(q[j] & 0x0f) + m;
                dst[b * QK + j + QK / 2] = d * (float)(q[j] >> 4) + m;
            }
        }
        break;
    default:
        return n; /* callers check dl_type_supported first */
    }
    for (int64_t i = 0; i < n; i++) bad += !isfinite(dst[i]);
    return bad;
}
