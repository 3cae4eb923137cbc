/* RMSNorm on CPU in one pass per row, the same arithmetic as engine.model.RMSNorm (and
 * transformers' LlamaRMSNorm) op for op: x in float32, mean of squares, rsqrt(mean + eps) as
 * 1 / sqrt, x * that, rounded to the model's dtype, times the weight in that dtype. Only the order
 * of the sum of squares differs from torch's (a few units in the last place of the mean, at
 * most). Built by kernels/cpu_build.py, called by kernels/cpu_norm.py; the torch module
 * spends ~14 µs a call in nine ops (61 calls a SmolLM2 step), this ~1 µs plus the call.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_bf16.h"

#define NORM_LANES 16

#define DEFINE_NORM(SUFFIX, T, LOAD, ROUND)                                                          \
    static void rms_norm_##SUFFIX(const T *x, const T *weight, T *out, int rows, int dim, float eps) { \
        for (int r = 0; r < rows; r++) {                                                             \
            const T *row = x + (int64_t)r * dim;                                                     \
            float acc[NORM_LANES] = {0}, sum = 0.0f;                                                 \
            int d = 0;                                                                               \
            for (; d + NORM_LANES <= dim; d += NORM_LANES)                                           \
                for (int l = 0; l < NORM_LANES; l++) {                                               \
                    float v = LOAD(row[d + l]);                                                      \
                    acc[l] += v * v;                                                                 \
                }                                                                                    \
            for (; d < dim; d++) sum += LOAD(row[d]) * LOAD(row[d]);                                 \
            for (int l = 0; l < NORM_LANES; l++) sum += acc[l];                                      \
            float scale = 1.0f / sqrtf(sum / (float)dim + eps);                                      \
            T *o = out + (int64_t)r * dim;                                                           \
            for (d = 0; d < dim; d++) o[d] = ROUND(LOAD(weight[d]) * LOAD(ROUND(LOAD(row[d]) * scale))); \
        }                                                                                            \
    }

#define NORM_LOAD_BF16(x) bf16_to_f32(x)
#define NORM_ROUND_BF16(x) f32_to_bf16(x)
#define NORM_SAME(x) (x)
DEFINE_NORM(bf16, uint16_t, NORM_LOAD_BF16, NORM_ROUND_BF16)
DEFINE_NORM(f32, float, NORM_SAME, NORM_SAME)

/* dtype: 0 float32, 1 bfloat16; x, out (rows, dim) and weight (dim,) contiguous. Returns 0. */
int pdmesh_rms_norm(int dtype, const void *x, const void *weight, void *out, int rows, int dim, float eps) {
    if (dtype == 1)
        rms_norm_bf16(x, weight, out, rows, dim, eps);
    else
        rms_norm_f32(x, weight, out, rows, dim, eps);
    return 0;
}
