/* SwiGLU's gating for bf16 tensors on the CPU, forward and backward, in float32 arithmetic: one pass each where
 * eager PyTorch takes five to eight over [tokens, hidden_dim] bf16 tensors (each converting to float32 and back).
 * For swiglu.py; plain C, no Python or torch headers. The formulas are
 * model/kernels/swiglu_recompute.py's:
 *
 *   s = sigmoid(g),  out = g s u,   d up = dy g s,   d gate = dy u s (1 + g (1 - s))
 *
 * sigmoid from exp of a non-positive argument only, e = exp(-|g|): s = 1 / (1 + e) for g >= 0, e / (1 + e) below.
 * Each result is rounded once to bf16.
 */
#include "cpu_vec.h"

#define CHUNK 4096   /* elements per OpenMP work item */

static inline vec sigmoid(vec g)
{
#if VW == 16
    vec e = vexp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    vec r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    return _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), e, r);
#else
    float e = exp_nonpositive(-fabsf(g));
    float r = 1.0f / (1.0f + e);
    return g < 0 ? e * r : r;
#endif
}

void swiglu_forward(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n, int n_threads)
{
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t end = c + CHUNK < n ? c + CHUNK : n;
        for (int64_t i = c; i < end; i += VW) {
            lanes t = tail(end - i);
            vec g = load_bf16(gate + i, t);
            store_bf16(out + i, VMUL(VMUL(g, sigmoid(g)), load_bf16(up + i, t)), t);
        }
    }
}

void swiglu_backward(const uint16_t *dy, const uint16_t *gate, const uint16_t *up, uint16_t *dgate, uint16_t *dup,
                     int64_t n, int n_threads)
{
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t end = c + CHUNK < n ? c + CHUNK : n;
        for (int64_t i = c; i < end; i += VW) {
            lanes t = tail(end - i);
            vec g = load_bf16(gate + i, t), u = load_bf16(up + i, t), d = load_bf16(dy + i, t);
            vec s = sigmoid(g);
            store_bf16(dup + i, VMUL(VMUL(d, g), s), t);
            vec one = splat(1.0f);
            store_bf16(dgate + i, VMUL(VMUL(VMUL(d, u), s), VADD(one, VMUL(g, VSUB(one, s)))), t);
        }
    }
}
