/* RMSNorm, as LLaMA uses it: no mean subtraction, no bias. */
#include <math.h>

#include "deelm.h"

void dl_rmsnorm_forward(float *out, const float *x, const float *w,
                        int64_t n, int64_t d, float eps) {
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * d;
        float *ot = out + t * d;
        /* double accumulation, as 8 running sums the compiler can vectorize:
         * a float sum of d squares would lose bits */
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int j = 0; j < 8; j++) acc[j] += (double)xt[i + j] * xt[i + j];
        double ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; i < d; i++) ss += (double)xt[i] * xt[i];
        float scale = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
        for (int64_t i = 0; i < d; i++) ot[i] = (xt[i] * scale) * w[i];
    }
}
