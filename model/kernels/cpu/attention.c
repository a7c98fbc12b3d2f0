/* The softmax half of causal attention on the CPU, for attention.py, which does the matrix products in oneDNN.
 * Plain C, no Python or torch headers; AVX-512 where the CPU has it, else scalar loops (cpu_vec.h).
 *
 * One call covers a block of query rows against keys [0, n_keys). Row r is query position t0 + r / G (the G query
 * heads that share a key/value head are consecutive rows), and may see key j iff j <= its position (causal).
 * S holds the raw scores q . k (float32); the softmax is taken over scale * S.
 *
 *   forward    lse[r] = log sum_j exp(scale S[r, j]),   P[r, j] = exp(scale S[r, j] - lse[r])          (P in bf16)
 *   backward   P as above from S and the forward's lse,  dS[r, j] = P[r, j] (dP[r, j] - delta[r]) scale   (bf16)
 *              with dP = dO V^T and delta[r] = sum_j P[r, j] dP[r, j]  (the gradient of the softmax)
 *
 * Entries a row may not see are written as 0, so the products that follow can take whole blocks. bf16 is the top
 * half of a float32, rounded to nearest even (NaN -> 0x7fc0), as PyTorch rounds.
 */
#include "cpu_vec.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* This thread's n_keys floats of the caller's scratch (`work`: n_threads * n_keys floats). */
static inline float *scratch(float *work, int64_t n_keys)
{
#ifdef _OPENMP
    return work + (int64_t)omp_get_thread_num() * n_keys;
#else
    (void)n_keys;
    return work;
#endif
}

/* How many keys row r sees: 0 .. its position (t0 + r / G), within the block's n_keys. */
static inline int64_t keys_seen(int64_t r, int64_t G, int64_t t0, int64_t n_keys)
{
    int64_t seen = t0 + r / G + 1;
    return seen < n_keys ? seen : n_keys;
}

/* S, P: [rows, n_keys] with row strides ld_s, ld_p; lse: [rows]. `work`: n_threads * n_keys floats of scratch. */
void attention_softmax_forward(const float *S, int64_t ld_s, uint16_t *P, int64_t ld_p, float *lse, int64_t rows,
                               int64_t n_keys, int64_t G, int64_t t0, float scale, float *work, int n_threads)
{
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t r = 0; r < rows; r++) {
        float *e = scratch(work, n_keys);
        const float *s = S + r * ld_s;
        uint16_t *p = P + r * ld_p;
        int64_t seen = keys_seen(r, G, t0, n_keys);
        vec vm = splat(-INFINITY);
        for (int64_t j = 0; j < seen; j += VW)
            vm = MASKED_MAX(vm, load(s + j, tail(seen - j)), tail(seen - j));
        float m = HMAX(vm) * scale;               /* max(s) * scale = max(s * scale): rounding is monotonic */
        vec vsum = splat(0.0f);
        for (int64_t j = 0; j < seen; j += VW) {
            lanes t = tail(seen - j);
            vec x = vexp(VSUB(VMUL(load(s + j, t), splat(scale)), splat(m)));
            STORE(e + j, x, t);
            vsum = VADD(vsum, load(e + j, t));    /* masked lanes load as 0 */
        }
        float sum = HSUM(vsum);
        vec inv = splat(1.0f / sum);
        for (int64_t j = 0; j < seen; j += VW)
            store_bf16(p + j, VMUL(load(e + j, tail(seen - j)), inv), tail(seen - j));
        memset(p + seen, 0, (size_t)(n_keys - seen) * sizeof(uint16_t));
        lse[r] = m + logf(sum);
    }
}

/* S, dP: [rows, n_keys] (row strides ld_s, ld_dp); P, dS: outputs with row stride ld_out; lse: [rows]; `work`:
 * n_threads * n_keys floats of scratch. delta is sum_j P[r, j] dP[r, j] over the float32 P of this pass: the same
 * as FlashAttention's rowsum(dO * O) in exact arithmetic, but free of the bf16 rounding of the forward's P and O,
 * which for a query that sees few keys is as large as its whole gradient (dP - delta cancels there). */
void attention_softmax_backward(const float *S, int64_t ld_s, const float *dP, int64_t ld_dp, const float *lse,
                                uint16_t *P, uint16_t *dS, int64_t ld_out, int64_t rows, int64_t n_keys, int64_t G,
                                int64_t t0, float scale, float *work, int n_threads)
{
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t r = 0; r < rows; r++) {
        float *e = scratch(work, n_keys);
        const float *s = S + r * ld_s, *dp = dP + r * ld_dp;
        uint16_t *p = P + r * ld_out, *ds = dS + r * ld_out;
        int64_t seen = keys_seen(r, G, t0, n_keys);
        vec l = splat(lse[r]), sc = splat(scale), vd = splat(0.0f);
        for (int64_t j = 0; j < seen; j += VW) {
            lanes t = tail(seen - j);
            vec pj = vexp(VSUB(VMUL(load(s + j, t), sc), l));
            STORE(e + j, pj, t);
            store_bf16(p + j, pj, t);
            vd = VADD(vd, VMUL(load(e + j, t), load(dp + j, t)));   /* masked lanes load as 0 */
        }
        vec d = splat(HSUM(vd));
        for (int64_t j = 0; j < seen; j += VW) {
            lanes t = tail(seen - j);
            store_bf16(ds + j, VMUL(VMUL(load(e + j, t), VSUB(load(dp + j, t), d)), sc), t);
        }
        memset(p + seen, 0, (size_t)(n_keys - seen) * sizeof(uint16_t));
        memset(ds + seen, 0, (size_t)(n_keys - seen) * sizeof(uint16_t));
    }
}
