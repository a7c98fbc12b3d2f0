/* NF4 dequantisation on the CPU (model/nf4.py): weight i of block b (64 weights) is
 *
 *     NF4[code i] * (DYNAMIC[scale_codes[b]] * scale_absmax[b / 256] + scale_offset)
 *
 * in float32, the block scale rounded after the multiply and again after the add (as the reference and
 * bitsandbytes compute it: no fused multiply-add, hence fp-contract off), then one rounding to the output type.
 * A packed byte holds two codes, the first in its high nibble. Written into the caller's buffer, so that a weight
 * dequantised at every forward and backward reuses one allocation instead of faulting in fresh pages each time.
 */
#pragma GCC optimize("fp-contract=off")
#include "cpu_vec.h"

enum { BLOCK = 64, GROUP = 256 };

/* n: weights, a multiple of 64. kind: 0 float32 out, 1 bf16 out. -> 0, or 1 for an unknown kind. */
int nf4_dequantize(const uint8_t *packed, const uint8_t *scale_codes, const float *scale_absmax, float scale_offset,
                   const float *nf4, const float *dynamic, int64_t n, void *out, int kind, int threads)
{
    if (kind != 0 && kind != 1)
        return 1;
    const int64_t n_blocks = n / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < n_blocks; b++) {
        volatile float product = dynamic[scale_codes[b]] * scale_absmax[b / GROUP];  /* rounded before the add */
        const float scale = product + scale_offset;
        float table[16];
        for (int k = 0; k < 16; k++)
            table[k] = nf4[k] * scale;
        const uint8_t *p = packed + b * (BLOCK / 2);
        if (kind == 0) {
            float *o = (float *)out + b * BLOCK;
            for (int i = 0; i < BLOCK / 2; i++) {
                o[2 * i] = table[p[i] >> 4];
                o[2 * i + 1] = table[p[i] & 0xF];
            }
        } else {
            uint16_t t16[16];
            for (int k = 0; k < 16; k++)
                t16[k] = to_bf16(table[k]);
            uint16_t *o = (uint16_t *)out + b * BLOCK;
            for (int i = 0; i < BLOCK / 2; i++) {
                o[2 * i] = t16[p[i] >> 4];
                o[2 * i + 1] = t16[p[i] & 0xF];
            }
        }
    }
    return 0;
}

/* The first level of quantisation (model/nf4.quantize), for n weights (a multiple of 64) in float32 (kind 0) or bf16
 * (kind 1): absmax[b] = max |w| over block b (NaN if the block holds one, so the caller's finiteness check sees
 * it), then each weight's code = the number of NF4 midpoints below w * (1 / max(absmax, 1e-38)) clamped to [-1, 1]
 * (nearest value, a tie to the lower one: torch.bucketize's rule), two codes per byte, the first high.
 * -> 0, or 1 for an unknown kind. */
int nf4_quantize_blocks(const void *weight, int kind, int64_t n, const float *midpoints, float *absmax,
                        uint8_t *packed, int threads)
{
    if (kind != 0 && kind != 1)
        return 1;
    const int64_t n_blocks = n / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < n_blocks; b++) {
        float w[BLOCK];
        for (int i = 0; i < BLOCK; i++)
            w[i] = kind == 0 ? ((const float *)weight)[b * BLOCK + i]
                             : from_bf16(((const uint16_t *)weight)[b * BLOCK + i]);
        float m = 0.0f;
        for (int i = 0; i < BLOCK; i++) {
            const float a = fabsf(w[i]);
            m = (a > m || a != a) ? a : m;
            if (m != m)
                break;
        }
        absmax[b] = m;
        const float inv = 1.0f / (m > 1e-38f ? m : 1e-38f);
        /* The code of each weight as a count over the 15 midpoints, the weights in the inner loop: it vectorises. */
        int32_t code[BLOCK];
        for (int i = 0; i < BLOCK; i++) {
            float x = w[i] * inv;
            w[i] = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
            code[i] = 0;
        }
        for (int j = 0; j < 15; j++) {
            const float mid = midpoints[j];
            for (int i = 0; i < BLOCK; i++)
                code[i] += mid < w[i];
        }
        uint8_t *p = packed + b * (BLOCK / 2);
        for (int i = 0; i < BLOCK / 2; i++)
            p[i] = (uint8_t)(code[2 * i] << 4 | code[2 * i + 1]);
    }
    return 0;
}
