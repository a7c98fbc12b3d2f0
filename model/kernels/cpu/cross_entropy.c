/* The per-chunk step of the fused head + cross-entropy (chunked_loss.py) for bf16 logits on the CPU: per row, the
 * loss and, in place, the gradient of the summed loss with respect to the logits, in float32 arithmetic. Three
 * passes over a row (max, sum of exponentials, gradient) that stay in the core's cache, where eager PyTorch makes a
 * float32 copy of the [chunk, vocab] logits and walks it six times. Plain C, no Python or torch headers.
 *
 *   lse    = m + log sum_j exp(z_j - m),   m = max_j z_j
 *   loss   = (1 - eps) (lse - z[target]) + eps (lse - mean_j z_j)                 (eps: label smoothing)
 *   grad_j = exp(z_j - lse) - (1 - eps) [j == target] - eps / V                  (rounded once to bf16)
 * A row whose target is ignore_index gets loss 0 and a zero gradient.
 */
#include "cpu_vec.h"

void cross_entropy_chunk_bf16(uint16_t *logits, int64_t rows, int64_t V, const int64_t *targets,
                              int64_t ignore_index, float eps, float *loss, int write_grad, int n_threads)
{
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *z = logits + r * V;
        int64_t target = targets[r];
        int kept = target != ignore_index && target >= 0 && target < V;
        vec vm = splat(-INFINITY), vz = splat(0.0f);
        for (int64_t j = 0; j < V; j += VW) {
            lanes t = tail(V - j);
            vec x = load_bf16(z + j, t);
            vm = MASKED_MAX(vm, x, t);
            vz = VADD(vz, x);                          /* masked lanes load as 0 */
        }
        float m = HMAX(vm);
        vec vs = splat(0.0f);
        for (int64_t j = 0; j < V; j += VW) {
            lanes t = tail(V - j);
            vec e = vexp(VSUB(load_bf16(z + j, t), splat(m)));
            vs = VADD(vs, MASKED(e, t));
        }
        float lse = m + logf(HSUM(vs));
        float zt = kept ? from_bf16(z[target]) : 0.0f;
        float nll = lse - zt;   /* the smoothing term only when asked for: 0 * inf (a -inf logit) would be NaN */
        loss[r] = !kept ? 0.0f : eps == 0.0f ? nll : (1.0f - eps) * nll + eps * (lse - HSUM(vz) / (float)V);
        if (!write_grad)
            continue;
        if (!kept) {
            memset(z, 0, (size_t)V * sizeof(uint16_t));
            continue;
        }
        vec shift = splat(eps / (float)V);
        for (int64_t j = 0; j < V; j += VW) {
            lanes t = tail(V - j);
            store_bf16(z + j, VSUB(vexp(VSUB(load_bf16(z + j, t), splat(lse))), shift), t);
        }
        /* The target's entry, from its value before the pass above overwrote it. */
        z[target] = to_bf16(exp_nonpositive(zt - lse) - (1.0f - eps) - eps / (float)V);
    }
}
