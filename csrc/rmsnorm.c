/* RMSNorm, as LLaMA uses it: no mean subtraction, no bias. */
#include <math.h>

#include "deelm.h"

void dl_rmsnorm_forward(float *out, const float *x, const float *w,
                        int64_t n, int64_t d, float eps) {
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * d;
        float *ot = out + t * d;
        /* double accumulation: the sum of d squares loses bits in float */
        double ss = 0.0;
        for (int64_t i = 0; i < d; i++) ss += (double)xt[i] * xt[i];
        float scale = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
        for (int64_t i = 0; i < d; i++) ot[i] = (xt[i] * scale) * w[i];
    }
}
