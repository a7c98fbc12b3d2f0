/* y = x @ W.T with W kept in GGUF's 32-value blocks: the float32 products of a decode step, reading 6 bits per
 * weight (4-bit codes and two float32 numbers a block) or 9 (8-bit codes and one) instead of 32; and W itself,
 * dequantised into a caller's buffer, for the products of many rows. Built and loaded by gguf_blocks.py (plain C,
 * no Python or torch headers); the PyTorch references it is tested against are `gguf_blocks.reference_matmul`
 * and `gguf_blocks.dequantize`.
 *
 * Layout (gguf_blocks.py packs it from the file's blocks; block b of row n holds W[n, 32b .. 32b+31]):
 *   4-bit (Q4_0, Q4_1)  codes uint8 [N, K/2]: byte j of a block holds value j (low nibble) and j+16 (high nibble),
 *                       as in ggml; W = d * code + m  (Q4_1 stores m; Q4_0 has m = -8 d)
 *   8-bit (Q8_0)        codes int8 [N, K]:   W = d * code
 *   d, m                float32 [N, K/32]    (the file's fp16 scales, widened once)
 *
 * Each weight is rebuilt in float32 exactly as the dequantiser does (d * code + m: the product is exact, so the
 * one rounding is the same), then multiplied and summed in float32: 32 running sums per x row, one per position
 * in the block, which the compiler keeps in SIMD registers; only the order of the additions differs from a GEMM.
 * Rows of W are independent: OpenMP splits them among `n_threads`. PyTorch's Linux wheels bundle libgomp.so.1, the
 * soname a gcc build links to, so the loader hands this library the runtime PyTorch already runs (one thread pool);
 * a PyTorch on another OpenMP runtime (Intel's, LLVM's) would leave two pools side by side.
 */
#include <stdint.h>

#define QK 32      /* values per block */
#define MAX_X 8    /* x rows per call: a decode step has 1, a speculative step a few */

/* Per instruction set: a vector type `vec` of QK / NV lanes, its load / store / multiply-add / sum, and how one
 * block's 32 weights are rebuilt into NV vectors (values in order: vector v holds values v*QK/NV ..
 * (v+1)*QK/NV - 1). */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vec;
#define NV 2
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUM(v) _mm512_reduce_add_ps(v)

static inline __attribute__((always_inline)) void block_q4(const uint8_t *q, float d, float m, vec w[NV])
{
    __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));   /* byte j in lane j */
    __m512 db = _mm512_set1_ps(d), mb = _mm512_set1_ps(m);
    w[0] = _mm512_fmadd_ps(db, _mm512_cvtepi32_ps(_mm512_and_si512(codes, _mm512_set1_epi32(15))), mb);
    w[1] = _mm512_fmadd_ps(db, _mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 4)), mb);
}

static inline __attribute__((always_inline)) void block_q8(const int8_t *q, float d, vec w[NV])
{
    for (int v = 0; v < NV; v++)
        w[v] = _mm512_mul_ps(_mm512_set1_ps(d),
                             _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * v)))));
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 vec;
#define NV 4
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)

static inline __attribute__((always_inline)) float VSUM(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __attribute__((always_inline)) void block_q4(const uint8_t *q, float d, float m, vec w[NV])
{
    __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));          /* bytes 0-7 */
    __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));    /* bytes 8-15 */
    __m256i low4 = _mm256_set1_epi32(15);
    __m256 db = _mm256_set1_ps(d), mb = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_and_si256(lo, low4)), mb);    /* values 0-7 */
    w[1] = _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_and_si256(hi, low4)), mb);    /* 8-15 */
    w[2] = _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)), mb);      /* 16-23 */
    w[3] = _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)), mb);      /* 24-31 */
}

static inline __attribute__((always_inline)) void block_q8(const int8_t *q, float d, vec w[NV])
{
    for (int v = 0; v < NV; v++)
        w[v] = _mm256_mul_ps(_mm256_set1_ps(d),
                             _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * v)))));
}

#else
/* Any other CPU: one float a "vector", 32 of them a block; the compiler vectorises the loops as it can. */
typedef float vec;
#define NV QK
#define VZERO() 0.0f
#define VLOAD(p) (*(p))
#define VSTORE(p, v) (*(p) = (v))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VADD(a, b) ((a) + (b))
#define VSUM(v) (v)

static inline __attribute__((always_inline)) void block_q4(const uint8_t *q, float d, float m, vec w[NV])
{
    for (int j = 0; j < QK / 2; j++) {
        w[j] = d * (float)(q[j] & 15) + m;
        w[j + QK / 2] = d * (float)(q[j] >> 4) + m;
    }
}

static inline __attribute__((always_inline)) void block_q8(const int8_t *q, float d, vec w[NV])
{
    for (int j = 0; j < QK; j++) w[j] = d * (float)q[j];
}
#endif

/* The rest is the same for every instruction set: NV running sums per x row (acc[r][v] += w[v] * x[r, block, v]),
 * added up at the end of the row. */
static inline __attribute__((always_inline))
void add_block(vec acc[MAX_X][NV], const vec w[NV], const float *x, int64_t k, int64_t b, int n_x)
{
    for (int r = 0; r < n_x; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = VFMA(w[v], VLOAD(x + r * k + b * QK + v * (QK / NV)), acc[r][v]);
}

static inline __attribute__((always_inline))
void store_sums(vec acc[MAX_X][NV], int n_x, float *out, int64_t out_stride)
{
    for (int r = 0; r < n_x; r++) {
        vec s = acc[r][0];
        for (int v = 1; v < NV; v++) s = VADD(s, acc[r][v]);
        out[r * out_stride] = VSUM(s);
    }
}

static inline __attribute__((always_inline))
void row_q4(const uint8_t *codes, const float *d, const float *m, const float *x, int64_t k, int n_x,
            float *out, int64_t out_stride)
{
    vec acc[MAX_X][NV], w[NV];
    for (int r = 0; r < n_x; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = VZERO();
    for (int64_t b = 0; b < k / QK; b++) {
        block_q4(codes + b * (QK / 2), d[b], m[b], w);
        add_block(acc, w, x, k, b, n_x);
    }
    store_sums(acc, n_x, out, out_stride);
}

static inline __attribute__((always_inline))
void row_q8(const int8_t *codes, const float *d, const float *x, int64_t k, int n_x, float *out, int64_t out_stride)
{
    vec acc[MAX_X][NV], w[NV];
    for (int r = 0; r < n_x; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = VZERO();
    for (int64_t b = 0; b < k / QK; b++) {
        block_q8(codes + b * QK, d[b], w);
        add_block(acc, w, x, k, b, n_x);
    }
    store_sums(acc, n_x, out, out_stride);
}

/* One loop per row count, so that the compiler sees a constant n_x and keeps the sums in registers. */
#define ROWS_Q4(R) _Pragma("omp parallel for schedule(static) num_threads(n_threads)") \
    for (int64_t n = 0; n < n_out; n++) \
        row_q4(codes + n * (k / 2), d + n * (k / QK), m + n * (k / QK), x, k, R, y + n, n_out);
#define ROWS_Q8(R) _Pragma("omp parallel for schedule(static) num_threads(n_threads)") \
    for (int64_t n = 0; n < n_out; n++) \
        row_q8(codes + n * k, d + n * (k / QK), x, k, R, y + n, n_out);
#define EACH_ROW_COUNT(ROWS) switch (n_x) { \
    case 1: ROWS(1) return 0;  case 2: ROWS(2) return 0;  case 3: ROWS(3) return 0;  case 4: ROWS(4) return 0; \
    case 5: ROWS(5) return 0;  case 6: ROWS(6) return 0;  case 7: ROWS(7) return 0;  case 8: ROWS(8) return 0; }

/* x float32 [n_x, k] (contiguous), y float32 [n_x, n_out]; returns 0, or -1 for an n_x it does not take. */
int gguf_blocks_matmul_q4(const uint8_t *codes, const float *d, const float *m, const float *x, float *y,
                          int64_t n_out, int64_t k, int n_x, int n_threads)
{
    (void)n_threads;   /* unused in a build without OpenMP */
    EACH_ROW_COUNT(ROWS_Q4)
    return -1;
}

int gguf_blocks_matmul_q8(const int8_t *codes, const float *d, const float *x, float *y,
                          int64_t n_out, int64_t k, int n_x, int n_threads)
{
    (void)n_threads;
    EACH_ROW_COUNT(ROWS_Q8)
    return -1;
}

/* W = the blocks dequantised, float32 [n_out, k] (row-major): what a product of many rows (prefill, scoring,
 * training) multiplies by, written into a buffer the caller reuses. The same float32 arithmetic as the tests'
 * references (d * code + m: the product is exact, so FMA or not, the one rounding is the same). */
int gguf_blocks_dequantize_q4(const uint8_t *codes, const float *d, const float *m, float *w,
                              int64_t n_out, int64_t k, int n_threads)
{
    (void)n_threads;
    if (k % QK) return -1;
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t n = 0; n < n_out; n++)
        for (int64_t b = 0; b < k / QK; b++) {
            vec v[NV];
            block_q4(codes + n * (k / 2) + b * (QK / 2), d[n * (k / QK) + b], m[n * (k / QK) + b], v);
            for (int j = 0; j < NV; j++) VSTORE(w + n * k + b * QK + j * (QK / NV), v[j]);
        }
    return 0;
}

int gguf_blocks_dequantize_q8(const int8_t *codes, const float *d, float *w, int64_t n_out, int64_t k,
                              int n_threads)
{
    (void)n_threads;
    if (k % QK) return -1;
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t n = 0; n < n_out; n++)
        for (int64_t b = 0; b < k / QK; b++) {
            vec v[NV];
            block_q8(codes + n * k + b * QK, d[n * (k / QK) + b], v);
            for (int j = 0; j < NV; j++) VSTORE(w + n * k + b * QK + j * (QK / NV), v[j]);
        }
    return 0;
}
