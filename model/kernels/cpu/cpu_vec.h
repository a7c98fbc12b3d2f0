/* Shared by our CPU C kernels (attention.c, swiglu.c, cross_entropy.c, dropout.c, nf4.c): float32 <-> bf16
 * and exp, one float at a time and, on AVX-512, 16 at a time with masked loads and stores for a row's tail.
 * Included, not compiled on its own (build.py keys a library on the headers beside its source too). bf16 is the
 * top half of a float32, rounded to nearest even (NaN -> 0x7fc0), as PyTorch rounds.
 */
#ifndef MINICURIE_CPU_VEC_H
#define MINICURIE_CPU_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 (every argument here is a score minus its row's maximum or log-sum): 2^n e^f with
 * f = x - n ln 2 in [-ln2/2, ln2/2] and e^f from its Taylor series to f^8 (truncation < 1e-9, below float32's
 * resolution); arithmetic only, so the loops vectorise. Arguments below -87 give 0 (the AVX-512 version below: the
 * float32 denormals down to about -103, then 0), and NaN gives NaN, so that a NaN score or logit shows in the
 * result. */
static inline float exp_nonpositive(float x)
{
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
    if (x != x || x > 88.0f)   /* NaN stays NaN; above 88 (no caller's argument) overflows to inf */
        return x != x ? x : INFINITY;
    float xc = x < -87.0f ? -87.0f : x;
    float n = floorf(xc * log2e + 0.5f);
    float f = (xc - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 40320;
    p = p * f + 1.0f / 5040;
    p = p * f + 1.0f / 720;
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &e, 4);
    return x < -87.0f ? 0.0f : p * two_n;
}

/* Per instruction set, the three row operations the passes below need, 16 floats at a time on AVX-512 (masked
 * loads and stores for a row's tail), one float at a time elsewhere (the compiler vectorises what it can). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define VW 16
typedef __m512 vec;
typedef __mmask16 lanes;
static inline lanes tail(int64_t left) { return left >= VW ? (lanes)0xffff : (lanes)((1u << left) - 1u); }
static inline vec load(const float *p, lanes m) { return _mm512_maskz_loadu_ps(m, p); }
static inline vec splat(float x) { return _mm512_set1_ps(x); }
static inline vec load_bf16(const uint16_t *p, lanes m)
{
    __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline vec vexp(vec x)      /* exp_nonpositive, 16 lanes: vscalefps does the 2^n (0 far below -87) */
{
    x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);   /* vmaxps returns its second operand for a NaN: kept */
    vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
    vec p = _mm512_set1_ps(1.0f / 40320);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 5040));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
static inline void store_bf16(uint16_t *p, vec x, lanes m)   /* round to nearest even; NaN -> 0x7fc0 */
{
    __m512i u = _mm512_castps_si512(x);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#define VMAX(a, b) _mm512_max_ps(a, b)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUB(a, b) _mm512_sub_ps(a, b)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define HMAX(v) _mm512_reduce_max_ps(v)
#define HSUM(v) _mm512_reduce_add_ps(v)
#define STORE(p, x, m) _mm512_mask_storeu_ps(p, m, x)
#define MASKED_MAX(acc, x, m) _mm512_mask_max_ps(acc, m, acc, x)
#define MASKED(x, m) _mm512_maskz_mov_ps(m, x)
#else
#define VW 1
typedef float vec;
typedef int lanes;
static inline lanes tail(int64_t left) { (void)left; return 1; }
static inline vec load(const float *p, lanes m) { (void)m; return *p; }
static inline vec splat(float x) { return x; }
static inline vec load_bf16(const uint16_t *p, lanes m) { (void)m; return from_bf16(*p); }
static inline vec vexp(vec x) { return exp_nonpositive(x); }
static inline void store_bf16(uint16_t *p, vec x, lanes m) { (void)m; *p = to_bf16(x); }
#define VMAX(a, b) ((a) > (b) ? (a) : (b))
#define VADD(a, b) ((a) + (b))
#define VSUB(a, b) ((a) - (b))
#define VMUL(a, b) ((a) * (b))
#define HMAX(v) (v)
#define HSUM(v) (v)
#define STORE(p, x, m) (*(p) = (x))
#define MASKED_MAX(acc, x, m) VMAX(acc, x)
#define MASKED(x, m) (x)
#endif

#endif
