/* Inverted dropout from a counter-based random stream: out[i] = in[i] * (keep(i) ? scale : 0), keep(i) a pure
 * function of (seed, i). Built and loaded by dropout.py (plain C, no Python or torch headers), whose PyTorch
 * reference computes the same stream with int64 tensor arithmetic.
 *
 * Why a counter-based stream: the mask never needs storing. The backward of a LoRA adapter's dropout rebuilds it
 * from the seed, and one pass reads x, draws, scales and writes the product's input in its dtype, where PyTorch
 * needs five (draw floats, compare, multiply, cast, scale) and keeps a byte per element until the backward.
 *
 *   draw(i) = mix(mix(lo32(i) ^ k0) ^ hi32(i) ^ k1)          k0, k1: the seed's low and high 32 bits
 *   mix(x)  = x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15   (all mod 2^32)
 *   keep(i) = (draw(i) >> 8) < keep_below                    keep_below = round((1 - p) 2^24)
 *
 * `mix` is a 32-bit integer hash with full avalanche (Wellons' "lowbias32" family); applied twice, keyed by a fresh
 * 64-bit seed per call (drawn from PyTorch's generator), its outputs pass the rate and independence checks in
 * tests/test_dropout.py. bf16 is stored as the top half of a float32, rounded to nearest even (NaN -> 0x7fc0), as
 * PyTorch rounds; the product in[i] * scale is a float32 product in both.
 */
#include "cpu_vec.h"   /* from_bf16, to_bf16 */

static inline uint32_t mix(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

static inline float factor(int64_t i, uint32_t k0, uint32_t k1, uint32_t keep_below, float scale)
{
    uint32_t h = mix(mix((uint32_t)i ^ k0) ^ (uint32_t)((uint64_t)i >> 32) ^ k1);
    return (h >> 8) < keep_below ? scale : 0.0f;
}

#define CHUNK 4096   /* elements per OpenMP work item: a few pages, long enough for the vector loop */

/* One loop per (input, output) type pair, so that the compiler sees plain loads and stores and vectorises them. */
#define DROPOUT_LOOP(IN_T, LOAD, OUT_T, STORE)                                                               \
    {                                                                                                        \
        const IN_T *src = (const IN_T *)in;                                                                  \
        OUT_T *dst = (OUT_T *)out;                                                                           \
        _Pragma("omp parallel for schedule(static) num_threads(n_threads)")                                  \
        for (int64_t c = 0; c < n; c += CHUNK) {                                                             \
            int64_t end = c + CHUNK < n ? c + CHUNK : n;                                                     \
            for (int64_t i = c; i < end; i++)                                                                \
                dst[i] = STORE(LOAD(src[i]) * factor(first + i, k0, k1, keep_below, scale));                 \
        }                                                                                                    \
    }

#define F32(x) (x)

/* in, out: n elements, float32 (kind 0) or bf16 (kind 1); they may be the same buffer. in[0] is element `first` of
 * the stream (dropout.py passes 0; a test reads the stream past 2^32 without 2^32 elements). Returns 0, or 1 for an
 * unknown kind. */
int dropout_apply(const void *in, int in_kind, void *out, int out_kind, int64_t n, int64_t first, uint64_t seed,
                  uint32_t keep_below, float scale, int n_threads)
{
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    if (in_kind == 0 && out_kind == 0)
        DROPOUT_LOOP(float, F32, float, F32)
    else if (in_kind == 0 && out_kind == 1)
        DROPOUT_LOOP(float, F32, uint16_t, to_bf16)
    else if (in_kind == 1 && out_kind == 0)
        DROPOUT_LOOP(uint16_t, from_bf16, float, F32)
    else if (in_kind == 1 && out_kind == 1)
        DROPOUT_LOOP(uint16_t, from_bf16, uint16_t, to_bf16)
    else
        return 1;
    return 0;
}
