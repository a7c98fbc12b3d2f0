/* y = x @ W.T with W kept in GGUF's 32-value blocks: the float32 products of a decode step, reading 4.5-8.5 bits
 * per weight instead of 32. Built and loaded by gguf_blocks.py (plain C, no Python or torch headers); the PyTorch
 * reference it is tested against is `gguf_blocks.reference_matmul`.
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

#if defined(__AVX512F__)
#include <immintrin.h>
/* 16 lanes: a block is two vectors, values 0-15 and 16-31. */
static inline __attribute__((always_inline))
void row_q4(const uint8_t *codes, const float *d, const float *m, const float *x, int64_t k, int n_x,
            float *out, int64_t out_stride)
{
    __m512 acc[MAX_X][2];
    for (int r = 0; r < n_x; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi32(15);
    for (int64_t b = 0; b < k / QK; b++) {
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + b * (QK / 2))));
        __m512 db = _mm512_set1_ps(d[b]), mb = _mm512_set1_ps(m[b]);
        __m512 w0 = _mm512_fmadd_ps(db, _mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), mb);
        __m512 w1 = _mm512_fmadd_ps(db, _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), mb);
        for (int r = 0; r < n_x; r++) {
            const float *xb = x + r * k + b * QK;
            acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[r][1]);
        }
    }
    for (int r = 0; r < n_x; r++) out[r * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

static inline __attribute__((always_inline))
void row_q8(const int8_t *codes, const float *d, const float *x, int64_t k, int n_x, float *out, int64_t out_stride)
{
    __m512 acc[MAX_X][2];
    for (int r = 0; r < n_x; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / QK; b++) {
        const int8_t *q = codes + b * QK;
        __m512 db = _mm512_set1_ps(d[b]);
        __m512 w0 = _mm512_mul_ps(db, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))));
        __m512 w1 = _mm512_mul_ps(db, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i *)(q + 16)))));
        for (int r = 0; r < n_x; r++) {
            const float *xb = x + r * k + b * QK;
            acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[r][1]);
        }
    }
    for (int r = 0; r < n_x; r++) out[r * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 8 lanes: a block is four vectors, values 0-7, 8-15, 16-23, 24-31. */
static inline __attribute__((always_inline)) float sum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __attribute__((always_inline))
void row_q4(const uint8_t *codes, const float *d, const float *m, const float *x, int64_t k, int n_x,
            float *out, int64_t out_stride)
{
    __m256 acc[MAX_X][4];
    for (int r = 0; r < n_x; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *q = codes + b * (QK / 2);
        __m256i qa = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));         /* bytes 0-7 */
        __m256i qb = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));   /* bytes 8-15 */
        __m256 db = _mm256_set1_ps(d[b]), mb = _mm256_set1_ps(m[b]);
        __m256 w[4] = {
            _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_and_si256(qa, low4)), mb),
            _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_and_si256(qb, low4)), mb),
            _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_srli_epi32(qa, 4)), mb),
            _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_srli_epi32(qb, 4)), mb),
        };
        for (int r = 0; r < n_x; r++)
            for (int v = 0; v < 4; v++)
                acc[r][v] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x + r * k + b * QK + 8 * v), acc[r][v]);
    }
    for (int r = 0; r < n_x; r++)
        out[r * out_stride] = sum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]),
                                                 _mm256_add_ps(acc[r][2], acc[r][3])));
}

static inline __attribute__((always_inline))
void row_q8(const int8_t *codes, const float *d, const float *x, int64_t k, int n_x, float *out, int64_t out_stride)
{
    __m256 acc[MAX_X][4];
    for (int r = 0; r < n_x; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / QK; b++) {
        const int8_t *q = codes + b * QK;
        __m256 db = _mm256_set1_ps(d[b]);
        __m256 w[4];
        for (int v = 0; v < 4; v++)
            w[v] = _mm256_mul_ps(db, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * v)))));
        for (int r = 0; r < n_x; r++)
            for (int v = 0; v < 4; v++)
                acc[r][v] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x + r * k + b * QK + 8 * v), acc[r][v]);
    }
    for (int r = 0; r < n_x; r++)
        out[r * out_stride] = sum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]),
                                                 _mm256_add_ps(acc[r][2], acc[r][3])));
}
#else
/* Any other CPU: plain C, which the compiler vectorises as it can. */
static inline __attribute__((always_inline))
void row_q4(const uint8_t *codes, const float *d, const float *m, const float *x, int64_t k, int n_x,
            float *out, int64_t out_stride)
{
    float acc[MAX_X][QK] = {{0}};
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *q = codes + b * (QK / 2);
        float w[QK];
        for (int j = 0; j < QK / 2; j++) {
            w[j] = d[b] * (float)(q[j] & 15) + m[b];
            w[j + QK / 2] = d[b] * (float)(q[j] >> 4) + m[b];
        }
        for (int r = 0; r < n_x; r++)
            for (int j = 0; j < QK; j++)
                acc[r][j] += w[j] * x[r * k + b * QK + j];
    }
    for (int r = 0; r < n_x; r++) {
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += acc[r][j];
        out[r * out_stride] = s;
    }
}

static inline __attribute__((always_inline))
void row_q8(const int8_t *codes, const float *d, const float *x, int64_t k, int n_x, float *out, int64_t out_stride)
{
    float acc[MAX_X][QK] = {{0}};
    for (int64_t b = 0; b < k / QK; b++) {
        const int8_t *q = codes + b * QK;
        float w[QK];
        for (int j = 0; j < QK; j++) w[j] = d[b] * (float)q[j];
        for (int r = 0; r < n_x; r++)
            for (int j = 0; j < QK; j++)
                acc[r][j] += w[j] * x[r * k + b * QK + j];
    }
    for (int r = 0; r < n_x; r++) {
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += acc[r][j];
        out[r * out_stride] = s;
    }
}

#endif

/* One loop per row count, so that the compiler sees a constant n_x and keeps the sums in registers. */
#define ROWS_Q4(R) _Pragma("omp parallel for schedule(static) num_threads(n_threads)") \
    for (int64_t n = 0; n < n_out; n++) \
        row_q4(codes + n * (k / 2), d + n * (k / QK), m + n * (k / QK), x, k, R, y + n, n_out);
#define ROWS_Q8(R) _Pragma("omp parallel for schedule(static) num_threads(n_threads)") \
    for (int64_t n = 0; n < n_out; n++) \
        row_q8(codes + n * k, d + n * (k / QK), x, k, R, y + n, n_out);

/* x float32 [n_x, k] (contiguous), y float32 [n_x, n_out]; returns 0, or -1 for an n_x it does not take. */
int gguf_blocks_matmul_q4(const uint8_t *codes, const float *d, const float *m, const float *x, float *y,
                          int64_t n_out, int64_t k, int n_x, int n_threads)
{
    switch (n_x) {
    case 1: ROWS_Q4(1) return 0;
    case 2: ROWS_Q4(2) return 0;
    case 3: ROWS_Q4(3) return 0;
    case 4: ROWS_Q4(4) return 0;
    case 5: ROWS_Q4(5) return 0;
    case 6: ROWS_Q4(6) return 0;
    case 7: ROWS_Q4(7) return 0;
    case 8: ROWS_Q4(8) return 0;
    }
    return -1;
}

int gguf_blocks_matmul_q8(const int8_t *codes, const float *d, const float *x, float *y,
                          int64_t n_out, int64_t k, int n_x, int n_threads)
{
    switch (n_x) {
    case 1: ROWS_Q8(1) return 0;
    case 2: ROWS_Q8(2) return 0;
    case 3: ROWS_Q8(3) return 0;
    case 4: ROWS_Q8(4) return 0;
    case 5: ROWS_Q8(5) return 0;
    case 6: ROWS_Q8(6) return 0;
    case 7: ROWS_Q8(7) return 0;
    case 8: ROWS_Q8(8) return 0;
    }
    return -1;
}
