/* mnistlab's native kernels, built by kernels.py with the machine's C compiler and OpenMP (the
   runtime torch already loaded), called through ctypes.

   1. 2x2 max pooling with stride 2, optionally followed by a ReLU, on channels-last (NHWC) tensors
   of bf16 (passed as uint16) or fp32. ATen's max_pool2d costs three passes where this costs two:
   its forward keeps 64-bit indices, and its backward zeroes the whole input gradient before
   scattering into it. Here the forward keeps which of the four positions won as one byte (4: the
   ReLU zeroed the output), and the backward writes every input gradient element exactly once.
   Same results bit for bit: the first maximum wins, a NaN wins as in ATen, and the ReLU passes NaN
   and zeroes everything <= 0. Rows and columns left over by an odd size get a zero gradient. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_value(uint16_t v) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)v << 16;
    return x.f;
}
static inline float f32_value(float v) { return v; }

/* x [n, h, w, c] -> y [n, h/2, w/2, c], won [n, h/2, w/2, c] */
#define FORWARD(NAME, T, VALUE)                                                                    \
void NAME(const T *x, T *y, uint8_t *won, long n, long h, long w, long c, int relu) {              \
    long ho = h / 2, wo = w / 2;                                                                   \
    _Pragma("omp parallel for")                                                                    \
    for (long row = 0; row < n * ho; row++) {                                                      \
        long b = row / ho, i = row % ho;                                                           \
        for (long j = 0; j < wo; j++) {                                                            \
            const T *p0 = x + ((b * h + 2 * i) * w + 2 * j) * c, *p1 = p0 + c;                     \
            const T *p2 = p0 + w * c, *p3 = p2 + c;                                                \
            T *out = y + (row * wo + j) * c;                                                       \
            uint8_t *k = won + (row * wo + j) * c;                                                 \
            for (long ch = 0; ch < c; ch++) {                                                      \
                float m = VALUE(p0[ch]), v;                                                        \
                T best = p0[ch];                                                                   \
                uint8_t at = 0;                                                                    \
                v = VALUE(p1[ch]); if (v > m || v != v) { m = v; best = p1[ch]; at = 1; }          \
                v = VALUE(p2[ch]); if (v > m || v != v) { m = v; best = p2[ch]; at = 2; }          \
                v = VALUE(p3[ch]); if (v > m || v != v) { m = v; best = p3[ch]; at = 3; }          \
                if (relu && m <= 0) { best = 0; at = 4; }                                          \
                out[ch] = best;                                                                    \
                k[ch] = at;                                                                        \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

/* grad_y [n, h/2, w/2, c], won -> grad_x [n, h, w, c], every element written once */
#define BACKWARD(NAME, T)                                                                          \
void NAME(const T *grad_y, const uint8_t *won, T *grad_x, long n, long h, long w, long c) {        \
    long ho = h / 2, wo = w / 2;                                                                   \
    _Pragma("omp parallel for")                                                                    \
    for (long row = 0; row < n * h; row++) {                                                       \
        long b = row / h, i = row % h;                                                             \
        T *g = grad_x + row * w * c;                                                               \
        if (i >= 2 * ho) { memset(g, 0, w * c * sizeof(T)); continue; }                            \
        const T *gy = grad_y + (b * ho + i / 2) * wo * c;                                          \
        const uint8_t *k = won + (b * ho + i / 2) * wo * c;                                        \
        for (long j = 0; j < 2 * wo; j++) {                                                        \
            uint8_t here = (uint8_t)((i & 1) * 2 + (j & 1));                                       \
            const T *gj = gy + (j / 2) * c;                                                        \
            const uint8_t *kj = k + (j / 2) * c;                                                   \
            T *out = g + j * c;                                                                    \
            for (long ch = 0; ch < c; ch++) out[ch] = kj[ch] == here ? gj[ch] : 0;                 \
        }                                                                                          \
        if (w > 2 * wo) memset(g + 2 * wo * c, 0, c * sizeof(T));                                  \
    }                                                                                              \
}

FORWARD(pool_forward_bf16, uint16_t, bf16_value)
FORWARD(pool_forward_f32, float, f32_value)
BACKWARD(pool_backward_bf16, uint16_t)
BACKWARD(pool_backward_f32, float)

/* 2. One RMSprop step (no momentum, not centered, no weight decay) over all of a model's fp32
   tensors in one parallel pass. torch's foreach RMSprop makes six passes, each one thread-pool
   dispatch per tensor, which for the small nets of the zoo costs more than the arithmetic. The
   same operations as torch's vectorised kernels, rounded where they round (their addcmul is one
   fused multiply-add), except the square root: sqrtf is correctly rounded, while torch's vectorised
   sqrt misses by one unit in the last place for about one value in six (measured with AVX-512).
       square = fma((1 - alpha) * grad, grad, square * alpha)       (the same bits as torch's)
       param  = param + (-lr * grad) / (sqrt(square) + eps)         (within a rounding of torch's) */
void rmsprop_step(float *const *params, const float *const *grads, float *const *squares,
                  const long *sizes, long count, float lr, float alpha, float one_minus_alpha, float eps) {
    _Pragma("omp parallel")
    for (long t = 0; t < count; t++) {
        float *p = params[t], *v = squares[t];
        const float *g = grads[t];
        _Pragma("omp for schedule(static) nowait")
        for (long i = 0; i < sizes[t]; i++) {
            float square = fmaf(one_minus_alpha * g[i], g[i], v[i] * alpha);
            v[i] = square;
            p[i] = p[i] + (-lr * g[i]) / (sqrtf(square) + eps);
        }
    }
}

/* 3. The first layer of seed003 and seed004 in one pass each way: a valid, stride-1 k x k convolution
   of one-channel fp32 images with c filters (c a multiple of 16), then 2x2 max pooling with stride 2,
   then optionally a ReLU. oneDNN has no depth to work along with one input channel; its output
   (four times the pooled one) went to memory and came back for the pooling, and the pooling's
   gradient went to memory and came back for the weight gradient. Here nothing but the pooled output
   is written. Arithmetic in fp32 (input and weights as given, not rounded to bf16 first, so the
   same or closer to fp32 than autocast's), the pooled output rounded once to bf16 or kept fp32.
   Which of the four positions won is kept as in section 1 (4: the ReLU zeroed it); the same rules
   (first maximum wins, NaN wins, the ReLU passes NaN). LANES channels (16 or 8) to a vector register: for each
   pooled position, four accumulators (one per position of the window) fed k * k weight vectors. */
#if defined(__AVX512F__)
#define LANES 16  /* one zmm register */
#else
#define LANES 8   /* one ymm: AVX2 has 16 of them, and 16 lanes (two each) spilled the weight vectors to memory */
#endif
typedef float vecf __attribute__((vector_size(4 * LANES)));
typedef int32_t veci __attribute__((vector_size(4 * LANES)));
typedef uint32_t vecu __attribute__((vector_size(4 * LANES)));
typedef uint8_t vecb __attribute__((vector_size(LANES)));
typedef uint16_t vech __attribute__((vector_size(2 * LANES)));
static inline vecf loadv(const float *p) { vecf v; memcpy(&v, p, sizeof v); return v; }
static inline void storev(float *p, vecf v) { memcpy(p, &v, sizeof v); }
static inline vecf pick(veci mask, vecf yes, vecf no) { return (vecf)((mask & (veci)yes) | (~mask & (veci)no)); }
static inline vecf bf16_loadv(const uint16_t *p) {
    vech h;
    memcpy(&h, p, sizeof h);
    return (vecf)(__builtin_convertvector(h, veci) << 16);
}
static inline void bf16_storev(uint16_t *p, vecf v) {  /* to nearest, ties to even, as torch rounds; NaN stays NaN */
    veci u = (veci)v, nan = v != v;
    u = (veci)(((vecu)u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    u = (u & ~nan) | (0x7FC0 & nan);
    vech h = __builtin_convertvector(u, vech);
    memcpy(p, &h, sizeof h);
}

/* Which window position won, LANES int32 lanes <-> LANES bytes: one or a few instructions where the
   compiler's generic conversion went lane by lane (a third of the first layer's forward). */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
typedef int32_t vec8i __attribute__((vector_size(32)));
static inline void store_won8(uint8_t *p, vec8i at) {
#if defined(__AVX2__)
    const __m256i first_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i t = _mm256_shuffle_epi8((__m256i)at, first_bytes);
    __m128i b = _mm_unpacklo_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    memcpy(p, &b, 8);
#else
    uint8_t at8[8];
    for (int l = 0; l < 8; l++) at8[l] = (uint8_t)at[l];
    memcpy(p, at8, 8);
#endif
}
static inline void store_won(uint8_t *p, veci at) {
#if defined(__AVX512F__)
    __m128i b = _mm512_cvtepi32_epi8((__m512i)at);
    memcpy(p, &b, 16);
#else
    store_won8(p, (vec8i)at);
#endif
}
static inline veci load_won(const uint8_t *p) {
#if defined(__AVX512F__)
    __m128i b;
    memcpy(&b, p, 16);
    return (veci)_mm512_cvtepu8_epi32(b);
#elif defined(__AVX2__)
    long long bytes;
    memcpy(&bytes, p, 8);
    return (veci)_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
#else
    vecb at8;
    memcpy(&at8, p, sizeof at8);
    return __builtin_convertvector(at8, veci);
#endif
}

/* *p in every lane, straight from memory (a load, no shuffle) */
#if defined(__AVX512F__)
static inline vecf bcastv(const float *p) { return (vecf)_mm512_set1_ps(*p); }
#elif defined(__AVX2__)
static inline vecf bcastv(const float *p) { return (vecf)_mm256_broadcast_ss(p); }
#else
static inline vecf bcastv(const float *p) { return (vecf){0} + *p; }
#endif

/* a * b + c with one rounding: -std=c11 does not fuse them itself, and apart they take two instructions */
#if defined(__AVX512F__)
static inline vecf fmav(vecf a, vecf b, vecf c) { return (vecf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#elif defined(__AVX2__) && defined(__FMA__)
static inline vecf fmav(vecf a, vecf b, vecf c) { return (vecf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline vecf fmav(vecf a, vecf b, vecf c) { return a * b + c; }
#endif

/* x [n, h, w] fp32, weight [c, K, K], bias [c] or NULL -> y [n, ho, wo, c] (ho = ((h-K)/S+1)/2), won [n, ho, wo, c].
   The convolution's stride S is 1, or 2 for a space-to-depth input layer (fast's: a 3x3 convolution of 2x2
   blocks of pixels is a 6x6 one with stride 2). V vectors of channels at a time: for each tap, V weight
   vectors and 4 pixels feed 4 * V accumulators. For the pooled rows [lo, hi) of the batch (counted over
   all images; conv_pool_forward gives each thread a range), the weights of V vectors of channels loaded
   once for all of them. */
#define CONV_POOL_FORWARD(K, S, V)                                                                   \
static void conv_pool_rows_##K##_##S##_##V(const float *x, const float *weight, const float *bias,   \
                                  void *y, uint8_t *won, long lo, long hi, long h, long w, long c,   \
                                  int relu, int bf16) {                                              \
    long ho = ((h - K) / S + 1) / 2, wo = ((w - K) / S + 1) / 2;                                     \
    for (long c0 = 0; c0 < c; c0 += LANES * V) {                                                    \
        vecf wv[K * K][V], bv[V];                                                                   \
        for (int t = 0; t < K * K; t++)                                                             \
            for (int v = 0; v < V; v++)                                                             \
                for (int l = 0; l < LANES; l++) wv[t][v][l] = weight[(c0 + v * LANES + l) * K * K + t]; \
        for (int v = 0; v < V; v++) bv[v] = bias ? loadv(bias + c0 + v * LANES) : (vecf){0};        \
        for (long row = lo; row < hi; row++) {                                                      \
            long b = row / ho, i = row % ho;                                                        \
            const float *top = x + (b * h + 2 * S * i) * w;                                         \
            for (long j = 0; j < wo; j++) {                                                         \
                vecf acc[4][V];                                                                     \
                for (int q = 0; q < 4; q++)                                                         \
                    for (int v = 0; v < V; v++) acc[q][v] = bv[v];                                  \
                for (int di = 0; di < K; di++)                                                      \
                    for (int dj = 0; dj < K; dj++)                                                  \
                        for (int q = 0; q < 4; q++) {                                               \
                            vecf p = bcastv(top + ((q >> 1) * S + di) * w + 2 * S * j + (q & 1) * S + dj); \
                            for (int v = 0; v < V; v++) acc[q][v] = fmav(p, wv[di * K + dj][v], acc[q][v]); \
                        }                                                                           \
                for (int v = 0; v < V; v++) {                                                       \
                    vecf m = acc[0][v];                                                             \
                    veci at = {0};                                                                  \
                    for (int q = 1; q < 4; q++) {                                                   \
                        veci better = (acc[q][v] > m) | (acc[q][v] != acc[q][v]);                   \
                        m = pick(better, acc[q][v], m);                                             \
                        if (won) at = (better & q) | (~better & at);                                \
                    }                                                                               \
                    if (relu) {                                                                     \
                        veci off = m <= 0;                                                          \
                        m = pick(off, (vecf){0}, m);                                                \
                        if (won) at = (off & 4) | (~off & at);                                      \
                    }                                                                               \
                    long o = (row * wo + j) * c + c0 + v * LANES;                                   \
                    if (bf16) bf16_storev((uint16_t *)y + o, m); else storev((float *)y + o, m);    \
                    if (won) store_won(won + o, at);                                                \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}

/* x [n, h, w] -> blocks [n, h/2, w/2, 4]: each 2x2 block of pixels as 4 channels, in PixelUnshuffle's order
   (top left, top right, bottom left, bottom right), channels-last: the input of the blocks' weight gradient. */
void space_to_depth2(const float *x, float *blocks, long n, long h, long w) {
    _Pragma("omp parallel for")
    for (long row = 0; row < n * (h / 2); row++) {
        const float *top = x + (row / (h / 2) * h + 2 * (row % (h / 2))) * w;
        float *out = blocks + row * (w / 2) * 4;
        for (long j = 0; j < w / 2; j++) {
            out[4 * j] = top[2 * j];
            out[4 * j + 1] = top[2 * j + 1];
            out[4 * j + 2] = top[w + 2 * j];
            out[4 * j + 3] = top[w + 2 * j + 1];
        }
    }
}

/* Leaves the sum of parts [lo, hi) (each `size` floats) in part lo: the two halves summed first, then
   added. So the sum over a batch is, bit for bit, the sum of the sums over its halves, as a job of two
   processes computes it (each sums its half; the halves are then averaged, an exact scaling by 1/2). */
static void halves_sum(float *parts, long lo, long hi, long size) {
    if (hi - lo < 2) return;
    long mid = lo + (hi - lo) / 2;
    halves_sum(parts, lo, mid, size);
    halves_sum(parts, mid, hi, size);
    float *a = parts + lo * size, *b = parts + mid * size;
    for (long e = 0; e < size; e++) a[e] += b[e];
}

/* x, grad_y [n, ho, wo, c] (bf16 or fp32), won -> grad_weight [c, k, k], grad_bias [c] (or NULL), fp32.
   Only the window position that won gets the gradient: for each pooled position, the four positions'
   gradients are grad_y masked by won, each fed to k * k accumulators (LANES channels each, in registers).
   Each image is summed alone, in parallel; the images' sums are then added by halves_sum: the same
   bits whatever the number of threads, and the same as two processes that split the batch. */
#define CONV_POOL_BACKWARD(K)                                                                        \
static int conv_pool_backward_##K(const float *x, const void *grad_y, const uint8_t *won,            \
                                  float *grad_weight, float *grad_bias, long n, long h, long w,      \
                                  long c, int bf16) {                                                \
    long ho = (h - K + 1) / 2, wo = (w - K + 1) / 2, size = (K * K + 1) * c;                         \
    float *sums = malloc((size_t)n * size * sizeof(float));  /* per image: [tap, ch], then [ch] */   \
    if (!sums) return -1;                                                                            \
    _Pragma("omp parallel for collapse(2)")                                                          \
    for (long b = 0; b < n; b++)                                                                     \
        for (long c0 = 0; c0 < c; c0 += LANES) {                                                     \
            vecf acc[K * K], accb = {0};                                                             \
            for (int t = 0; t < K * K; t++) acc[t] = (vecf){0};                                      \
            for (long i = 0; i < ho; i++) {                                                          \
                const float *top = x + (b * h + 2 * i) * w;                                          \
                for (long j = 0; j < wo; j++) {                                                      \
                    long o = ((b * ho + i) * wo + j) * c + c0;                                       \
                    vecf g = bf16 ? bf16_loadv((const uint16_t *)grad_y + o) : loadv((const float *)grad_y + o);\
                    veci at = load_won(won + o);                                                     \
                    accb += pick(at < 4, g, (vecf){0});                                              \
                    for (int q = 0; q < 4; q++) {                                                    \
                        vecf gq = pick(at == q, g, (vecf){0});                                       \
                        const float *p = top + (q >> 1) * w + 2 * j + (q & 1);                       \
                        for (int di = 0; di < K; di++)                                               \
                            for (int dj = 0; dj < K; dj++)                                           \
                                acc[di * K + dj] = fmav(bcastv(p + di * w + dj), gq, acc[di * K + dj]);\
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
            float *mine = sums + b * size;                                                           \
            for (int t = 0; t < K * K; t++) storev(mine + t * c + c0, acc[t]);                       \
            storev(mine + K * K * c + c0, accb);                                                     \
        }                                                                                            \
    halves_sum(sums, 0, n, size);                                                                    \
    for (long ch = 0; ch < c; ch++) {                                                                \
        for (int t = 0; t < K * K; t++) grad_weight[ch * K * K + t] = sums[t * c + ch];              \
        if (grad_bias) grad_bias[ch] = sums[K * K * c + ch];                                         \
    }                                                                                                \
    free(sums);                                                                                      \
    return 0;                                                                                        \
}

CONV_POOL_FORWARD(3, 1, 1)
CONV_POOL_FORWARD(3, 1, 2)
CONV_POOL_FORWARD(5, 1, 1)
CONV_POOL_FORWARD(5, 1, 2)
CONV_POOL_FORWARD(6, 2, 1)
CONV_POOL_FORWARD(6, 2, 2)
CONV_POOL_BACKWARD(3)
CONV_POOL_BACKWARD(5)

/* The rows' function for k x k with stride s: 3x3 or 5x5 with stride 1, 6x6 with stride 2; NULL otherwise */
typedef void conv_pool_rows(const float *, const float *, const float *, void *, uint8_t *, long, long, long, long,
                            long, int, int);
static conv_pool_rows *conv_pool_rows_of(long k, long s, long c) {
    int pairs = c % (2 * LANES) == 0;
    if (k == 3 && s == 1) return pairs ? conv_pool_rows_3_1_2 : conv_pool_rows_3_1_1;
    if (k == 5 && s == 1) return pairs ? conv_pool_rows_5_1_2 : conv_pool_rows_5_1_1;
    if (k == 6 && s == 2) return pairs ? conv_pool_rows_6_2_2 : conv_pool_rows_6_2_1;
    return NULL;
}

/* -1 (nothing written) for sizes conv_pool_rows_of does not take */
int conv_pool_forward(const float *x, const float *weight, const float *bias, void *y, uint8_t *won,
                      long n, long h, long w, long c, long k, long s, int relu, int bf16) {
    conv_pool_rows *rows = conv_pool_rows_of(k, s, c);
    if (!rows) return -1;
    long ho = ((h - k) / s + 1) / 2;
    _Pragma("omp parallel")
    {
        long threads = omp_get_num_threads(), me = omp_get_thread_num();
        rows(x, weight, bias, y, won, n * ho * me / threads, n * ho * (me + 1) / threads, h, w, c, relu, bf16);
    }
    return 0;
}

/* -1 (nothing written) for other sizes, or where the images' sums cannot be allocated */
int conv_pool_backward(const float *x, const void *grad_y, const uint8_t *won, float *grad_weight,
                       float *grad_bias, long n, long h, long w, long c, long k, int bf16) {
    if (k == 3) return conv_pool_backward_3(x, grad_y, won, grad_weight, grad_bias, n, h, w, c, bf16);
    if (k == 5) return conv_pool_backward_5(x, grad_y, won, grad_weight, grad_bias, n, h, w, c, bf16);
    return -1;
}

/* 4. The weight gradient of a valid, stride-1 3x3 convolution, fp32, channels-last: for each tap
   (di, dj), input channel i and output channel o, the sum over every output position of
   x[n, y + di, x + dj, i] * grad_y[n, y, x, o]. oneDNN's ran at 60-95 GFLOP/s on two AVX2 cores for
   the zoo's larger ones, well under its forward's 140; this one is 1.1-2.2x faster (benchmarks/
   probes.py wgrad). Each work item (OV vectors of output channels, Q input channels, one row of taps
   di) keeps 12 accumulators in registers: per position, OV vector loads of grad_y and 3 * Q
   broadcasts of x feed 12 FMAs; AVX2's sixteen registers hold them all. Positions are taken a block
   of output rows at a time, and every item visits the block while it is in cache. Each item belongs
   to one thread and sums its positions in one order, a block's sum at a time: the same bits whatever
   the number of threads. */
typedef float vec8 __attribute__((vector_size(32)));  /* 8 lanes always, not section 3's LANES: the tile is sized for them */
static inline vec8 load8(const float *p) { vec8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }
static inline vec8 splat8(float f) { return (vec8){f, f, f, f, f, f, f, f}; }
#if defined(__FMA__)  /* one rounding, as oneDNN's sums take: -std=c11 would not fuse a * b + c by itself */
static inline vec8 fma8(vec8 a, vec8 b, vec8 c) { return (vec8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline vec8 fma8(vec8 a, vec8 b, vec8 c) { return a * b + c; }
#endif

/* x [n, h, w, ci], grad_y [n, h-2, w-2, co] -> sums [3, 3, ci, co], from each image's first hv rows and wv
   columns of grad_y (the rest zero: a pooling dropped them); blocks of rows as if all were read */
#define CONV3_WEIGHT_GRAD(OV, Q)                                                                     \
static void conv3_weight_grad_##OV##_##Q(const float *x, const float *grad_y, float *sums, long n,   \
                                         long h, long w, long ci, long co, long hv, long wv) {       \
    long ho = h - 2, wo = w - 2, rows = n * ho, block = (128 + wo - 1) / wo;                         \
    long o_blocks = co / (8 * OV), items = o_blocks * (ci / Q) * 3;                                  \
    memset(sums, 0, sizeof(float) * 9 * ci * co);                                                    \
    _Pragma("omp parallel")                                                                          \
    {                                                                                                \
        long threads = omp_get_num_threads(), me = omp_get_thread_num();                             \
        long lo = items * me / threads, hi = items * (me + 1) / threads;                             \
        long start[128];  /* each row's first input element: worked out once a block, not per item */   \
        for (long r0 = 0; r0 < rows; r0 += block) {                                                  \
            long r1 = r0 + block < rows ? r0 + block : rows;                                         \
            for (long r = r0; r < r1; r++) start[r - r0] = (r / ho * h + r % ho) * w * ci;            \
            for (long item = lo; item < hi; item++) {                                                \
                long o0 = item % o_blocks * 8 * OV, i0 = item / o_blocks % (ci / Q) * Q;             \
                long di = item / o_blocks / (ci / Q);                                                \
                vec8 acc[3][Q][OV];                                                                  \
                memset(acc, 0, sizeof acc);                                                          \
                for (long r = r0; r < r1; r++) {                                                     \
                    if (r % ho >= hv) continue;                                                      \
                    const float *xr = x + start[r - r0] + di * w * ci + i0;                          \
                    const float *gr = grad_y + r * wo * co + o0;                                     \
                    for (long j = 0; j < wv; j++) {                                                  \
                        vec8 g[OV];                                                                  \
                        for (int v = 0; v < OV; v++) g[v] = load8(gr + j * co + 8 * v);              \
                        for (int dj = 0; dj < 3; dj++)                                               \
                            for (int q = 0; q < Q; q++) {                                            \
                                vec8 s = splat8(xr[(j + dj) * ci + q]);                              \
                                for (int v = 0; v < OV; v++) acc[dj][q][v] = fma8(s, g[v], acc[dj][q][v]);\
                            }                                                                        \
                    }                                                                                \
                }                                                                                    \
                for (int dj = 0; dj < 3; dj++)                                                       \
                    for (int q = 0; q < Q; q++)                                                      \
                        for (int v = 0; v < OV; v++) {                                               \
                            float *s = sums + ((di * 3 + dj) * ci + i0 + q) * co + o0 + 8 * v;       \
                            store8(s, load8(s) + acc[dj][q][v]);                                     \
                        }                                                                            \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
}

CONV3_WEIGHT_GRAD(2, 2)  /* 16 output channels x 2 input channels: ci even, co a multiple of 16 */
CONV3_WEIGHT_GRAD(4, 1)  /* 32 output channels x 1 input channel: any ci (a first layer's 1), co a multiple of 32 */

/* x [n, h, w, ci], grad_y [n, h-2, w-2, co] (fp32, channels-last) -> grad_weight [co, 3, 3, ci] (the
   weight's channels-last layout), summed over each image's first hv rows and wv columns of grad_y (h-2
   and w-2: all; fewer where the rest is zero: the terms skipped would add zeros). -1 (nothing written)
   for channel counts neither tile covers. */
int conv3_weight_grad(const float *x, const float *grad_y, float *grad_weight, long n, long h, long w,
                      long ci, long co, long hv, long wv) {
    int pairs = ci % 2 == 0 && co % 16 == 0;
    if ((!pairs && co % 32) || hv > h - 2 || wv > w - 2) return -1;
    float *sums = malloc(sizeof(float) * 9 * ci * co);
    if (!sums) return -1;
    if (pairs) conv3_weight_grad_2_2(x, grad_y, sums, n, h, w, ci, co, hv, wv);
    else conv3_weight_grad_4_1(x, grad_y, sums, n, h, w, ci, co, hv, wv);
    for (long o = 0; o < co; o++)
        for (long t = 0; t < 9; t++)
            for (long i = 0; i < ci; i++) grad_weight[(o * 9 + t) * ci + i] = sums[(t * ci + i) * co + o];
    free(sums);
    return 0;
}

/* 5. The second half of a valid, stride-1 k x k convolution's input gradient, fp32, channels-last. Its
   first half is one matrix product (torch's): every output position's gradient times the weights gives
   that position's share of each of its k * k input positions, `cols`. Here each input position sums the
   shares of the output positions that read it, taps in order: each element written once, the same bits
   whatever the number of threads. oneDNN's input gradient ran at 22-67 GFLOP/s for the zoo's small
   outputs on two AVX2 cores, the matmul and this at 71-83 (benchmarks/probes.py igrad). */
/* cols [n, h-k+1, w-k+1, k, k, c] -> grad_x [n, h, w, c] */
void col2im(const float *cols, float *grad_x, long n, long h, long w, long c, long k) {
    long ho = h - k + 1, wo = w - k + 1;
    _Pragma("omp parallel for")
    for (long row = 0; row < n * h; row++) {
        long b = row / h, y = row % h;
        long di0 = y - ho + 1 > 0 ? y - ho + 1 : 0, di1 = y < k - 1 ? y : k - 1;
        for (long x = 0; x < w; x++) {
            long dj0 = x - wo + 1 > 0 ? x - wo + 1 : 0, dj1 = x < k - 1 ? x : k - 1;
            float *out = grad_x + (row * w + x) * c;
            memset(out, 0, c * sizeof(float));
            for (long di = di0; di <= di1; di++)
                for (long dj = dj0; dj <= dj1; dj++) {
                    const float *src = cols + ((((b * ho + y - di) * wo + x - dj) * k + di) * k + dj) * c;
                    for (long i = 0; i < c; i++) out[i] += src[i];
                }
        }
    }
}

/* 6. Training-mode batch normalisation with a ReLU after it (fast's and best's Conv, BatchNorm, ReLU) or
   before it (seed000's Conv, ReLU, BatchNorm), fp32, channels-last: x [m, c], m = n * h * w positions.
   torch makes a pass for the statistics, one for the output and one for the ReLU, each way, plus a
   dispatch per operation; here two passes each way. The statistics: each chunk of BN_CHUNK positions
   summed in fp32 as x - k, k the first position's value (so the sum of squares does not cancel), the
   chunks then added in order in double: the same bits whatever the number of threads. The variance is
   the biased one for normalising, the unbiased one for the running average, as torch's; the output is
   x * scale + shift per channel (scale = gamma / sqrt(var + eps)), as torch computes it. A NaN passes
   the ReLUs. */
#define BN_CHUNK 64  /* positions a chunk */

static inline float relu_of(float v) { return v <= 0 ? 0 : v; }  /* NaN passes, as torch's relu */

/* Sums over rows [lo, hi) of v = x' - k (x' = relu(x) if relu_first) and of v * v, into s and t [c]. */
static void moments(const float *restrict x, const float *restrict k, float *restrict s, float *restrict t,
                    long lo, long hi, long c, int relu_first) {
    for (long row = lo; row < hi; row++) {
        const float *xr = x + row * c;
        if (relu_first)
            for (long ch = 0; ch < c; ch++) { float v = relu_of(xr[ch]) - k[ch]; s[ch] += v; t[ch] += v * v; }
        else
            for (long ch = 0; ch < c; ch++) { float v = xr[ch] - k[ch]; s[ch] += v; t[ch] += v * v; }
    }
}

/* Sums over rows [lo, hi) of g (grad_y where the ReLU after passed it) and of g * (x' - mean), into s and t [c]. */
static void grad_moments(const float *restrict grad_y, const float *restrict x, const float *restrict y,
                         const float *restrict mean, float *restrict s, float *restrict t, long lo, long hi,
                         long c, int relu_first) {
    for (long row = lo; row < hi; row++) {
        const float *gr = grad_y + row * c, *xr = x + row * c, *yr = y + row * c;
        if (relu_first)
            for (long ch = 0; ch < c; ch++) { s[ch] += gr[ch]; t[ch] += gr[ch] * (relu_of(xr[ch]) - mean[ch]); }
        else
            for (long ch = 0; ch < c; ch++) {
                float g = yr[ch] > 0 ? gr[ch] : 0;
                s[ch] += g;
                t[ch] += g * (xr[ch] - mean[ch]);
            }
    }
}

/* Both sums of moments() (or grad_moments(), if grad_y) over all m rows, chunk by chunk, added in order in
   double: out [2c]. -1 where the chunks' sums cannot be allocated. */
static int chunked_moments(const float *x, const float *k, const float *grad_y, const float *y, double *out,
                           long m, long c, int relu_first) {
    long chunks = (m + BN_CHUNK - 1) / BN_CHUNK;
    float *part = calloc((size_t)chunks * 2 * c, sizeof(float));
    if (!part) return -1;
    _Pragma("omp parallel for schedule(static)")
    for (long i = 0; i < chunks; i++) {
        float *s = part + i * 2 * c, *t = s + c;
        long lo = i * BN_CHUNK, hi = lo + BN_CHUNK < m ? lo + BN_CHUNK : m;
        if (grad_y) grad_moments(grad_y, x, y, k, s, t, lo, hi, c, relu_first);
        else moments(x, k, s, t, lo, hi, c, relu_first);
    }
    for (long e = 0; e < 2 * c; e++) out[e] = 0;
    for (long i = 0; i < chunks; i++)
        for (long e = 0; e < 2 * c; e++) out[e] += part[i * 2 * c + e];
    free(part);
    return 0;
}

/* -> y [m, c]; mean, invstd [c] (saved for the backward); running_mean, running_var updated with momentum */
int batchnorm_relu_forward(const float *x, const float *gamma, const float *beta, float *y, float *mean,
                           float *invstd, float *running_mean, float *running_var, long m, long c,
                           float eps, float momentum, int relu_first) {
    double *sums = malloc(sizeof(double) * 2 * c);
    float *scale = malloc(sizeof(float) * 3 * c), *shift = scale + c, *k = shift + c;
    if (!sums || !scale) { free(sums); free(scale); return -1; }
    for (long ch = 0; ch < c; ch++) k[ch] = relu_first ? relu_of(x[ch]) : x[ch];
    if (chunked_moments(x, k, NULL, NULL, sums, m, c, relu_first)) { free(sums); free(scale); return -1; }
    for (long ch = 0; ch < c; ch++) {
        double d = sums[ch] / m, var = sums[c + ch] / m - d * d, mu = k[ch] + d;
        if (var < 0) var = 0;
        mean[ch] = (float)mu;
        invstd[ch] = (float)(1 / sqrt(var + eps));
        scale[ch] = invstd[ch] * gamma[ch];
        shift[ch] = beta[ch] - mean[ch] * scale[ch];
        running_mean[ch] = (1 - momentum) * running_mean[ch] + momentum * (float)mu;
        running_var[ch] = (1 - momentum) * running_var[ch] + momentum * (float)(var * m / (m - 1));
    }
    _Pragma("omp parallel for schedule(static)")
    for (long row = 0; row < m; row++) {
        const float *xr = x + row * c;
        float *yr = y + row * c;
        if (relu_first)
            for (long ch = 0; ch < c; ch++) yr[ch] = relu_of(xr[ch]) * scale[ch] + shift[ch];
        else
            for (long ch = 0; ch < c; ch++) yr[ch] = relu_of(xr[ch] * scale[ch] + shift[ch]);
    }
    free(sums);
    free(scale);
    return 0;
}

/* grad_y, x, y [m, c], mean, invstd, gamma [c] -> grad_x [m, c] (or NULL), grad_gamma, grad_beta [c].
   With the ReLU after: g = grad_y where y > 0; before: g = grad_y, and grad_x is zero where x <= 0.
   grad_beta = sum g, grad_gamma = sum g * xhat, grad_x = gamma * invstd * (g - grad_beta / m - xhat * grad_gamma / m). */
int batchnorm_relu_backward(const float *grad_y, const float *x, const float *y, const float *mean,
                            const float *invstd, const float *gamma, float *grad_x, float *grad_gamma,
                            float *grad_beta, long m, long c, int relu_first) {
    double *sums = malloc(sizeof(double) * 2 * c);
    float *a = malloc(sizeof(float) * 3 * c), *b = a + c, *d = b + c;
    if (!sums || !a || chunked_moments(x, mean, grad_y, y, sums, m, c, relu_first)) { free(sums); free(a); return -1; }
    for (long ch = 0; ch < c; ch++) {  /* grad_x = a * g - b - (x' - mean) * d */
        grad_beta[ch] = (float)sums[ch];
        grad_gamma[ch] = (float)(sums[c + ch] * invstd[ch]);
        a[ch] = gamma[ch] * invstd[ch];
        b[ch] = (float)(a[ch] * sums[ch] / m);
        d[ch] = (float)(a[ch] * sums[c + ch] / m * invstd[ch] * invstd[ch]);
    }
    if (grad_x) {
        _Pragma("omp parallel for schedule(static)")
        for (long row = 0; row < m; row++) {
            const float *gr = grad_y + row * c, *xr = x + row * c, *yr = y + row * c;
            float *out = grad_x + row * c;
            if (relu_first)
                for (long ch = 0; ch < c; ch++) {  /* computed, then chosen: a branch would not vectorize */
                    float v = a[ch] * gr[ch] - b[ch] - (xr[ch] - mean[ch]) * d[ch];
                    out[ch] = xr[ch] > 0 ? v : 0;
                }
            else
                for (long ch = 0; ch < c; ch++)
                    out[ch] = a[ch] * (yr[ch] > 0 ? gr[ch] : 0) - b[ch] - (xr[ch] - mean[ch]) * d[ch];
        }
    }
    free(sums);
    free(a);
    return 0;
}

/* 7. A 3x3, stride-1 convolution by Winograd's F(2x2, 3x3), fp32, channels-last: each 2x2 block of
   outputs (a tile) comes from a 4x4 block of inputs, d, as A' [(G g G') * (B' d B)] A, where * is
   elementwise over the 16 positions. Per tile that is 16 products a channel pair where direct
   convolution takes 36: per position the tiles' transformed inputs times the transformed weights
   (u = G g G', worked out by winograd_weights) is one small matrix product. The input gradient
   takes the same tiles backwards (winograd3_input_grad). Tiles are taken CHUNK at a time, so that a
   chunk's transformed inputs, its products and u stay in the core's caches; each tile's sums run in
   one order, so the bits do not depend on the number of threads. A NaN or infinity in a tile's input
   block reaches all its outputs (a direct convolution: those whose window holds it). The forward can
   also take 3x3 tiles, F(3x3, 3x3): 25 products for 9 outputs, with dearer transforms and 2-4x oneDNN's
   rounding error; and, pooled, 4x4 tiles where they fit, F(4x4, 3x3) (36 products for 16 outputs), with
   4x2, 2x4 and 2x2 ones at the edges; kernels.py chooses. Every transform is separable: the 1D one
   along each column, then along each row. */
#define CHUNK 24  /* tiles a chunk: four of the product's 6-tile blocks */
#define SIDE 6    /* a tile's input side at most: F(4, 3)'s */
#define INLINE static inline __attribute__((always_inline))

/* m's 6 rows [6, co] = v's 6 rows [6, ci] times u [ci, co], for output channels [o, o + 16) */
static inline void winograd_block(const float *v, const float *u, float *m, long ci, long co, long o) {
    vec8 acc[6][2];
    memset(acc, 0, sizeof acc);
    for (long k = 0; k < ci; k++) {
        vec8 u0 = load8(u + k * co + o), u1 = load8(u + k * co + o + 8);
        for (int r = 0; r < 6; r++) {
            vec8 s = splat8(v[r * ci + k]);
            acc[r][0] = fma8(s, u0, acc[r][0]);
            acc[r][1] = fma8(s, u1, acc[r][1]);
        }
    }
    for (int r = 0; r < 6; r++) {
        store8(m + r * co + o, acc[r][0]);
        store8(m + r * co + o + 8, acc[r][1]);
    }
}

/* The 1D transforms of F(r, 3) for r outputs from r + 2 inputs. F(2, 3): points 0, 1, -1 and infinity.
   F(3, 3): 0, 1, -1, 2, infinity; B' = [2 -1 -2 1 0; 0 2 1 -1 0; 0 -2 3 -1 0; 0 -1 0 1 0; 0 2 -1 -2 1],
   A' = [1 1 1 1 0; 0 1 -1 2 0; 0 1 1 4 1], G = [1/2 0 0; 1/2 1/2 1/2; 1/6 -1/6 1/6; 1/6 1/3 2/3; 0 0 1].
   F(4, 3): 0, 1, -1, 2, -2, infinity; B' = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0;
   0 2 -1 -2 1 0; 0 4 0 -5 0 1], A' = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1],
   G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]. B' d: */
INLINE void winograd_in_1d(int r, const vec8 *d, vec8 *o) {
    if (r == 2) {
        o[0] = d[0] - d[2], o[1] = d[1] + d[2], o[2] = d[2] - d[1], o[3] = d[1] - d[3];
    } else if (r == 3) {
        o[0] = (d[0] - d[2]) + (d[0] - d[2]) + (d[3] - d[1]), o[1] = (d[1] + d[1]) + (d[2] - d[3]);
        o[2] = (d[2] - d[1]) + (d[2] - d[1]) + (d[2] - d[3]), o[3] = d[3] - d[1];
        o[4] = (d[1] - d[3]) + (d[1] - d[3]) + (d[4] - d[2]);
    } else {
        vec8 a = fma8(splat8(-4), d[2], d[4]), b = fma8(splat8(-4), d[1], d[3]), c = d[4] - d[2], e = d[1] - d[3];
        o[0] = fma8(splat8(4), d[0], fma8(splat8(-5), d[2], d[4])), o[1] = a + b, o[2] = a - b;
        o[3] = c - (e + e), o[4] = c + (e + e), o[5] = fma8(splat8(4), d[1], fma8(splat8(-5), d[3], d[5]));
    }
}

/* A' m: r outputs from r + 2 products */
INLINE void winograd_out_1d(int r, const vec8 *m, vec8 *y) {
    if (r == 2) {
        y[0] = m[0] + m[1] + m[2], y[1] = m[1] - m[2] - m[3];
    } else if (r == 3) {
        y[0] = m[0] + m[1] + m[2] + m[3], y[1] = m[1] - m[2] + (m[3] + m[3]);
        y[2] = m[1] + m[2] + (m[3] + m[3]) + (m[3] + m[3]) + m[4];
    } else {
        vec8 s = m[1] + m[2], d = m[1] - m[2], p = m[3] + m[4], q = m[3] - m[4];
        y[0] = m[0] + s + p, y[1] = fma8(splat8(2), q, d), y[2] = fma8(splat8(4), p, s);
        y[3] = fma8(splat8(8), q, d) + m[5];
    }
}

/* G g: r + 2 values from a column (or row) of 3 weights (8 pairs of channels at once) */
INLINE void winograd_g_1d(int r, vec8 g0, vec8 g1, vec8 g2, vec8 *o) {
    if (r == 2) {
        o[0] = g0, o[1] = 0.5f * (g0 + g1 + g2), o[2] = 0.5f * (g0 - g1 + g2), o[3] = g2;
    } else if (r == 3) {
        o[0] = 0.5f * g0, o[1] = 0.5f * (g0 + g1 + g2), o[2] = (g0 - g1 + g2) / 6;
        o[3] = (g0 + 2 * g1 + 4 * g2) / 6, o[4] = g2;
    } else {
        o[0] = 0.25f * g0, o[1] = (g0 + g1 + g2) / -6, o[2] = (g0 - g1 + g2) / -6;
        o[3] = (g0 + 2 * g1 + 4 * g2) / 24, o[4] = (g0 - 2 * g1 + 4 * g2) / 24, o[5] = g2;
    }
}

/* An rh x rw tile's input block d (rows of c channels) -> out[p * CHUNK * c + channel] = (B' d B)[p] */
INLINE void winograd_input(const float *d[SIDE][SIDE], float *out, long c, int rh, int rw) {
    for (long k = 0; k < c; k += 8) {
        vec8 r[SIDE][SIDE];
        for (int e = 0; e < rw + 2; e++) {
            vec8 col[SIDE], t[SIDE];
            for (int a = 0; a < rh + 2; a++) col[a] = load8(d[a][e] + k);
            winograd_in_1d(rh, col, t);
            for (int a = 0; a < rh + 2; a++) r[a][e] = t[a];
        }
        for (int a = 0; a < rh + 2; a++) {
            vec8 t[SIDE];
            winograd_in_1d(rw, r[a], t);
            for (int e = 0; e < rw + 2; e++) store8(out + (a * (rw + 2) + e) * CHUNK * c + k, t[e]);
        }
    }
}

/* The rh x rw outputs of a tile's channels [o, o + 8), y = A' m A (the bias not yet added), from m's positions
   (`stride` apart) */
INLINE void winograd_output(const float *m, long stride, int rh, int rw, vec8 y[4][4]) {
    vec8 s[4][SIDE];
    for (int e = 0; e < rw + 2; e++) {
        vec8 col[SIDE], t[4];
        for (int a = 0; a < rh + 2; a++) col[a] = load8(m + (a * (rw + 2) + e) * stride);
        winograd_out_1d(rh, col, t);
        for (int a = 0; a < rh; a++) s[a][e] = t[a];
    }
    for (int a = 0; a < rh; a++) {
        vec8 t[4];
        winograd_out_1d(rw, s[a], t);
        for (int b = 0; b < rw; b++) y[a][b] = t[b];
    }
}

/* The two above for the tile shapes used, each compiled with its sizes known */
static void winograd_input_any(const float *d[SIDE][SIDE], float *out, long c, int rh, int rw) {
    if (rh == 2 && rw == 2) winograd_input(d, out, c, 2, 2);
    else if (rh == 3) winograd_input(d, out, c, 3, 3);
    else if (rh == 4 && rw == 4) winograd_input(d, out, c, 4, 4);
    else if (rh == 4) winograd_input(d, out, c, 4, 2);
    else winograd_input(d, out, c, 2, 4);
}
static void winograd_output_any(const float *m, long stride, int rh, int rw, vec8 y[4][4]) {
    if (rh == 2 && rw == 2) winograd_output(m, stride, 2, 2, y);
    else if (rh == 3) winograd_output(m, stride, 3, 3, y);
    else if (rh == 4 && rw == 4) winograd_output(m, stride, 4, 4, y);
    else if (rh == 4) winograd_output(m, stride, 4, 2, y);
    else winograd_output(m, stride, 2, 4, y);
}

/* A tile's 2x2 output gradient g (rows of c channels) -> out[p * CHUNK * c + channel] = (A g A')[p] */
static inline void winograd_grad_tile(const float *g[2][2], float *out, long c) {
    for (long k = 0; k < c; k += 8) {
        vec8 r[4][2];
        for (int e = 0; e < 2; e++) {
            vec8 g0 = load8(g[0][e] + k), g1 = load8(g[1][e] + k);
            r[0][e] = g0, r[1][e] = g0 + g1, r[2][e] = g0 - g1, r[3][e] = -g1;
        }
        for (int a = 0; a < 4; a++) {
            float *o = out + a * 4 * CHUNK * c + k;
            store8(o, r[a][0]);
            store8(o + CHUNK * c, r[a][0] + r[a][1]);
            store8(o + 2 * CHUNK * c, r[a][0] - r[a][1]);
            store8(o + 3 * CHUNK * c, -r[a][1]);
        }
    }
}

/* m [P, CHUNK, co] = v [P, CHUNK, ci] u [P, ci, co], position by position, for the chunk's first `rows` tiles */
static void winograd_products(const float *v, const float *u, float *m, long rows, long ci, long co, int positions) {
    for (int p = 0; p < positions; p++)
        for (long t = 0; t < rows; t += 6)
            for (long o = 0; o < co; o += 16)
                winograd_block(v + (p * CHUNK + t) * ci, u + p * ci * co, m + (p * CHUNK + t) * co, ci, co, o);
}

/* The 3x3 weights of 8 x 8 channel pairs from w [co, 3, 3, ci] (channels-last): g[tap][o * 8 + i] */
static void weights_block(const float *w, float g[9][64], long ci, long o0, long i0) {
    for (int tap = 0; tap < 9; tap++)
        for (int o = 0; o < 8; o++) memcpy(g[tap] + 8 * o, w + ((o0 + o) * 9 + tap) * ci + i0, 8 * sizeof(float));
}

/* The tile shapes of a forward: `tile` 2 or 3, one; 4 (pooled), F(4x4) tiles where they fit, with 4x2,
   2x4 and 2x2 ones along the pooled region's last 2 rows or columns when its side is not a multiple of 4.
   Each with its place in u (in positions of P = (rh + 2)(rw + 2)): 4x4 at 0, 4x2 at 36, 2x4 at 60, 2x2 at 84. */
typedef struct { int rh, rw; long th, tw, i0, j0, at; } tiles_of;
static int tile_shapes(int tile, long ho, long wo, int pool, tiles_of *out) {
    if (tile != 4) {
        long th = pool ? ho / 2 : (ho + tile - 1) / tile, tw = pool ? wo / 2 : (wo + tile - 1) / tile;
        out[0] = (tiles_of){tile, tile, th, tw, 0, 0, 0};
        return 1;
    }
    long ph = ho / 2 * 2, pw = wo / 2 * 2, count = 0;
    long rows[2][3] = {{4, ph / 4, 0}, {2, ph % 4 / 2, ph / 4 * 4}};  /* side, count, first */
    long cols[2][3] = {{4, pw / 4, 0}, {2, pw % 4 / 2, pw / 4 * 4}};
    const long at[2][2] = {{0, 36}, {60, 84}};
    for (int a = 0; a < 2; a++)
        for (int e = 0; e < 2; e++)
            if (rows[a][1] && cols[e][1])
                out[count++] = (tiles_of){rows[a][0], cols[e][0], rows[a][1], cols[e][1], rows[a][2], cols[e][2],
                                          at[a][e]};
    return count;
}

/* The weights' transform: u = G g G' for each pair of channels, g the pair's 3x3 weights, from w [co, 3,
   3, ci] (channels-last) to u [P, ci, co] (tile 2: P 16, 3: 25, 4: the 100 of tile_shapes' four), or
   (transposed, tile 2, for the input gradient) [16, co, ci]. Taken 8 x 8 pairs at a time, read and
   written in runs of 8: u's rows lie a multiple of 4 KiB apart, which pair by pair would evict each other
   from the cache. ci and co multiples of 8. */
void winograd_weights(const float *w, float *u, long ci, long co, int tile, int transposed) {
    tiles_of shapes[4];
    int kinds = tile_shapes(tile, 6, 6, tile == 4, shapes);  /* a 6x6 output pools from 6x6: all four shapes */
    for (int s = 0; s < kinds; s++) {
        int rh = shapes[s].rh, rw = shapes[s].rw, positions = (rh + 2) * (rw + 2);
        float *us = u + shapes[s].at * ci * co;
        _Pragma("omp parallel for")
        for (long o0 = 0; o0 < co; o0 += 8)
            for (long i0 = 0; i0 < ci; i0 += 8) {
                float g[9][64], q[SIDE * SIDE][64];  /* [tap or position][o * 8 + i] */
                weights_block(w, g, ci, o0, i0);
                for (int k = 0; k < 64; k += 8) {
                    vec8 t[SIDE][3], row[SIDE];
                    for (int c = 0; c < 3; c++) {  /* t = G g */
                        winograd_g_1d(rh, load8(g[c] + k), load8(g[3 + c] + k), load8(g[6 + c] + k), row);
                        for (int a = 0; a < rh + 2; a++) t[a][c] = row[a];
                    }
                    for (int a = 0; a < rh + 2; a++) {  /* u = t G' */
                        winograd_g_1d(rw, t[a][0], t[a][1], t[a][2], row);
                        for (int b = 0; b < rw + 2; b++) store8(q[a * (rw + 2) + b] + k, row[b]);
                    }
                }
                for (int p = 0; p < positions; p++)
                    for (int r = 0; r < 8; r++) {
                        float *out = transposed ? us + (p * co + o0 + r) * ci + i0 : us + (p * ci + i0 + r) * co + o0;
                        for (int e = 0; e < 8; e++) out[e] = transposed ? q[p][8 * r + e] : q[p][8 * e + r];
                    }
            }
    }
}

static inline vec8 pick8(vec8i mask, vec8 yes, vec8 no) { return (vec8)((mask & (vec8i)yes) | (~mask & (vec8i)no)); }

/* A tile's 2x2 outputs r[a..a+1][b..b+1] plus the bias `add`, pooled by section 1's rules (the first maximum
   wins, a NaN wins; with `relu`, <= 0 gives 0 and won 4): 8 channels of y, and of won unless it is NULL (no
   gradient to come: then the bias is added once, to the maximum, the same value as rounding is monotonic) */
static inline void winograd_pool(vec8 r[4][4], int a, int b, vec8 add, int relu, float *y, uint8_t *won) {
    vec8 best = won ? r[a][b] + add : r[a][b];
    vec8i at = {0}, beats;
    for (int p = 1; p < 4; p++) {
        vec8 v = won ? r[a + p / 2][b + p % 2] + add : r[a + p / 2][b + p % 2];
        beats = (v > best) | (v != v);
        best = pick8(beats, v, best);
        if (won) at = (beats & p) | (~beats & at);
    }
    if (!won)
        best = best + add;
    if (relu) {
        beats = best <= splat8(0);
        best = pick8(beats, splat8(0), best);
        if (won) at = (beats & 4) | (~beats & at);
    }
    store8(y, best);
    if (won) store_won8(won, at);
}

/* One Winograd forward's layer: its weights' transform, sizes, tile shapes and buffers' needs */
typedef struct {
    const float *u, *bias;
    long h, w, ci, co, ho, wo, hp, wp, most, each;  /* most: positions of the largest shape */
    int pool, relu, kinds;
    tiles_of shapes[4];
} winograd_layer;

/* -1 for sizes winograd3 does not take */
static int winograd_layer_of(winograd_layer *l, const float *u, const float *bias, long h, long w, long ci,
                             long co, int mode, int tile) {
    int pool = mode & 1;
    if (co % 16 || ci % 8 || ci < 8 || h < 3 || w < 3 || (pool && (h < 4 || w < 4 || tile == 3))) return -1;
    if (tile != 2 && tile != 3 && !(tile == 4 && pool)) return -1;
    *l = (winograd_layer){.u = u, .bias = bias, .h = h, .w = w, .ci = ci, .co = co, .ho = h - 2, .wo = w - 2,
                          .hp = (h - 2) / 2, .wp = (w - 2) / 2, .pool = pool, .relu = mode >> 1 & 1};
    l->kinds = tile_shapes(tile, l->ho, l->wo, pool, l->shapes);
    for (int s = 0; s < l->kinds; s++)
        if ((l->shapes[s].rh + 2) * (l->shapes[s].rw + 2) > l->most) l->most = (l->shapes[s].rh + 2) * (l->shapes[s].rw + 2);
    l->each = l->most * CHUNK * (ci + co) + ci + co;  /* a thread's buffer (winograd_zeros) */
    return 0;
}

/* A thread's buffer for a layer: v [most, CHUNK, ci], m [most, CHUNK, co], zeros [ci] (read past x's
   end), spare [co] (written past y's); the zeros set by winograd_zeros before the layer's first chunk */
static float *winograd_zeros(const winograd_layer *l, float *buffer) {
    float *zeros = buffer + l->most * CHUNK * (l->ci + l->co);
    memset(zeros, 0, sizeof(float) * l->ci);
    return zeros;
}

/* One chunk of shape s's tiles, `count` (at most CHUNK) from tile t0 (counted from x's first image) */
static void winograd_chunk(const winograd_layer *l, int s, const float *x, float *y, uint8_t *won, long t0,
                           long count, float *buffer) {
    const tiles_of *sh = &l->shapes[s];
    long h = l->h, w = l->w, ci = l->ci, co = l->co, ho = l->ho, wo = l->wo, hp = l->hp, wp = l->wp;
    int rh = sh->rh, rw = sh->rw, positions = (rh + 2) * (rw + 2), pool = l->pool, relu = l->relu;
    long th = sh->th, tw = sh->tw, rows = (count + 5) / 6 * 6;
    float *v = buffer, *m = v + l->most * CHUNK * ci, *zeros = m + l->most * CHUNK * co, *spare = zeros + ci;  /* as winograd_zeros */
    for (long t = 0; t < rows; t++) {  /* v [P, CHUNK, ci] = B' d B */
        const float *d[SIDE][SIDE];
        long b = (t0 + t) / (th * tw), i = sh->i0 + (t0 + t) / tw % th * rh, j = sh->j0 + (t0 + t) % tw * rw;
        for (int a = 0; a < rh + 2; a++)
            for (int e = 0; e < rw + 2; e++)
                d[a][e] = t < count && i + a < h && j + e < w ? x + ((b * h + i + a) * w + j + e) * ci : zeros;
        winograd_input_any(d, v + t * ci, ci, rh, rw);
    }
    winograd_products(v, l->u + sh->at * ci * co, m, rows, ci, co, positions);
    for (long t = 0; t < count; t++) {  /* y = A' m A (+ bias), pooled with `pool` */
        long b = (t0 + t) / (th * tw), i = sh->i0 + (t0 + t) / tw % th * rh, j = sh->j0 + (t0 + t) % tw * rw;
        float *out[4][4];
        for (int a = 0; a < rh && !pool; a++)
            for (int e = 0; e < rw; e++)
                out[a][e] = i + a < ho && j + e < wo ? y + ((b * ho + i + a) * wo + j + e) * co : spare;
        for (long o = 0; o < co; o += 8) {
            vec8 add = l->bias ? load8(l->bias + o) : splat8(0), r[4][4];
            winograd_output_any(m + t * co + o, CHUNK * co, rh, rw, r);
            for (int a = 0; a < rh && pool; a += 2)
                for (int e = 0; e < rw; e += 2) {
                    long at = ((b * hp + (i + a) / 2) * wp + (j + e) / 2) * co + o;
                    winograd_pool(r, a, e, add, relu, y + at, won ? won + at : NULL);
                }
            for (int a = 0; a < rh && !pool; a++)
                for (int e = 0; e < rw; e++) {
                    vec8 v = r[a][e] + add;
                    store8(out[a][e] + o, relu ? pick8(v <= splat8(0), splat8(0), v) : v);
                }
        }
    }
}

/* Every chunk of every shape for x's first n images */
static void winograd_images(const winograd_layer *l, const float *x, float *y, uint8_t *won, long n, float *buffer) {
    for (int s = 0; s < l->kinds; s++) {
        long tiles = n * l->shapes[s].th * l->shapes[s].tw;
        for (long t0 = 0; t0 < tiles; t0 += CHUNK)
            winograd_chunk(l, s, x, y, won, t0, tiles - t0 < CHUNK ? tiles - t0 : CHUNK, buffer);
    }
}

/* x [n, h, w, ci], u (winograd_weights'), bias [co] or NULL -> y [n, h-2, w-2, co]; ci a multiple of 8, co
   of 16. `mode` 2 adds a ReLU (a NaN passes). With `mode` 1 (or 3: then the ReLU), the 2x2 max pooling
   (stride 2, floor) is done on each tile's outputs, whose 2x2 blocks are pooling windows: y [n, (h-2)/2,
   (w-2)/2, co] and (unless it is NULL) won as section 1's pooling keeps it; with `tile` 2, the same bits as
   that pooling of the plain output. The tiles the pooling drops (an odd last row or column) are never
   computed. `tile` 2: F(2x2, 3x3); 3: F(3x3, 3x3), not pooled; 4: F(4x4, 3x3) and its edges (tile_shapes),
   pooled only. -1 (nothing written) for other sizes or where the buffers cannot be allocated. */
int winograd3(const float *x, const float *u, const float *bias, float *y, uint8_t *won, long n, long h,
              long w, long ci, long co, int mode, int tile) {
    /* With several shapes, blocks of 12 images take each shape's tiles in turn, so that a block's inputs
       are read from memory once, not once a shape (seed003's pooled pass 1.05-1.10x faster at batch 1000) */
    winograd_layer l;
    if (winograd_layer_of(&l, u, bias, h, w, ci, co, mode, tile)) return -1;
    long block = l.kinds > 1 ? 12 : n, blocks = (n + block - 1) / block, chunks[4], per_block = 0;
    for (int s = 0; s < l.kinds; s++) per_block += chunks[s] = (block * l.shapes[s].th * l.shapes[s].tw + CHUNK - 1) / CHUNK;
    long grab = l.kinds > 1 ? per_block : 1;  /* taken as threads come free (one on a busy core lags): 1.02-1.06x */
    float *buffers = malloc(sizeof(float) * l.each * omp_get_max_threads());
    if (!buffers) return -1;
    _Pragma("omp parallel")
    {
        float *buffer = buffers + l.each * omp_get_thread_num();
        winograd_zeros(&l, buffer);
        _Pragma("omp for schedule(dynamic, grab)")
        for (long item = 0; item < blocks * per_block; item++) {  /* a chunk of one shape's tiles in a block */
            long block_at = item / per_block, chunk = item % per_block;
            int s = 0;
            while (chunk >= chunks[s]) chunk -= chunks[s++];
            long th = l.shapes[s].th, tw = l.shapes[s].tw, last = (block_at + 1) * block < n ? (block_at + 1) * block : n;
            long t0 = block_at * block * th * tw + chunk * CHUNK, tiles = last * th * tw;  /* to the block's end */
            if (t0 >= tiles) continue;
            winograd_chunk(&l, s, x, y, won, t0, tiles - t0 < CHUNK ? tiles - t0 : CHUNK, buffer);
        }
    }
    free(buffers);
    return 0;
}

/* 8. Evaluation through a first layer (section 3's: one input channel, k x k, stride 1, fp32) and the
   Winograd forwards after it (winograd3's, `layers` of them: their u, bias, output channels, mode and
   tile), block by block: a thread takes BLOCK images through every layer, so that their activations stay
   in its core's caches instead of going to memory and coming back (seed003's first three layers
   1.22-1.26x at batch 1000, scratch A/B). The same bits as the layers one by one. x [n, h, w] -> y, the last
   layer's output [n, ., ., co]. -1 (nothing written) for sizes the layers do not take (or whose channels
   do not follow on), or where the buffers cannot be allocated. */
#define BLOCK 12
int chain_forward(const float *x, const float *weight, const float *bias, long k, long c, int relu,
                  const float *const *us, const float *const *biases, const long *cos, const int *modes,
                  const int *tiles, int layers, float *y, long n, long h, long w) {
    conv_pool_rows *first = conv_pool_rows_of(k, 1, c);
    long hh = (h - k + 1) / 2, ww = (w - k + 1) / 2, ci = c, act = BLOCK * hh * ww * c, each = 0;
    winograd_layer l[8];
    if (!first || hh < 1 || ww < 1 || layers < 1 || layers > 8) return -1;
    for (int i = 0; i < layers; i++) {  /* each layer's sizes, from the one before */
        if (winograd_layer_of(&l[i], us[i], biases[i], hh, ww, ci, cos[i], modes[i], tiles[i])) return -1;
        hh = l[i].pool ? l[i].hp : l[i].ho, ww = l[i].pool ? l[i].wp : l[i].wo, ci = cos[i];
        if (i < layers - 1 && BLOCK * hh * ww * ci > act) act = BLOCK * hh * ww * ci;
        if (l[i].each > each) each = l[i].each;
    }
    long out = hh * ww * ci, blocks = (n + BLOCK - 1) / BLOCK, per = each + 2 * act;  /* a thread's buffers */
    float *buffers = malloc(sizeof(float) * per * omp_get_max_threads());
    if (!buffers) return -1;
    _Pragma("omp parallel")
    {
        float *buffer = buffers + per * omp_get_thread_num();
        _Pragma("omp for schedule(dynamic, 1)")
        for (long at = 0; at < blocks; at++) {
            long count = (at + 1) * BLOCK < n ? BLOCK : n - at * BLOCK;
            float *a = buffer + each, *b = a + act;  /* a layer's input and output */
            first(x + at * BLOCK * h * w, weight, bias, a, NULL, 0, count * ((h - k + 1) / 2), h, w, c, relu, 0);
            for (int i = 0; i < layers; i++) {
                float *to = i == layers - 1 ? y + at * BLOCK * out : b;
                winograd_zeros(&l[i], buffer);
                winograd_images(&l[i], a, to, NULL, count, buffer);
                b = a, a = to;
            }
        }
    }
    free(buffers);
    return 0;
}

/* The input gradient of winograd3's valid (pad 0) convolution, by the same tiles taken backwards: each
   tile's 2x2 output gradient g gives A g A' at the 16 positions; times the transposed weights (ut
   [16, co, ci], summed over co) and then B . B', the gradient of the tile's 4x4 input block, added into
   grad_x. Blocks overlap, so a thread takes whole images and adds each image's tiles in order: the
   same bits whatever the number of threads. grad_y [n, h-2, w-2, co], ut -> grad_x [n, h, w, ci], from
   the tiles over each image's first hv rows and wv columns of grad_y (h-2 and w-2: all; fewer where the
   rest is zero: the tiles left out would add zeros); co a multiple of 8, ci of 16. -1 (nothing written)
   otherwise, or where the buffers cannot be allocated. */
int winograd3_input_grad(const float *grad_y, const float *ut, float *grad_x, long n, long h, long w,
                         long ci, long co, long hv, long wv) {
    if (ci % 16 || co % 8 || co < 8 || h < 3 || w < 3 || hv > h - 2 || wv > w - 2) return -1;
    long ho = h - 2, wo = w - 2, th = (hv + 1) / 2, tw = (wv + 1) / 2, tiles = th * tw;
    long threads = omp_get_max_threads(), each = 16 * CHUNK * (ci + co) + co;
    float *buffers = malloc(sizeof(float) * each * threads);
    if (!buffers) return -1;
    _Pragma("omp parallel")
    {
        float *v = buffers + each * omp_get_thread_num(), *m = v + 16 * CHUNK * co, *zeros = m + 16 * CHUNK * ci;
        memset(zeros, 0, sizeof(float) * co);
        _Pragma("omp for schedule(static)")
        for (long b = 0; b < n; b++) {
            float *image = grad_x + b * h * w * ci;
            memset(image, 0, sizeof(float) * h * w * ci);
            for (long t0 = 0; t0 < tiles; t0 += CHUNK) {
                long count = tiles - t0 < CHUNK ? tiles - t0 : CHUNK, rows = (count + 5) / 6 * 6;
                for (long t = 0; t < rows; t++) {  /* v [16, CHUNK, co] = A g A' */
                    long i = (t0 + t) / tw * 2, j = (t0 + t) % tw * 2;
                    const float *g[2][2];
                    for (int a = 0; a < 2; a++)
                        for (int e = 0; e < 2; e++)
                            g[a][e] = t < count && i + a < hv && j + e < wv
                                      ? grad_y + ((b * ho + i + a) * wo + j + e) * co : zeros;
                    winograd_grad_tile(g, v + t * co, co);
                }
                winograd_products(v, ut, m, rows, co, ci, 16);
                for (long t = 0; t < count; t++) {  /* grad_x's 4x4 block += B m B' */
                    long i = (t0 + t) / tw * 2, j = (t0 + t) % tw * 2;
                    const float *in = m + t * ci;
                    for (long c = 0; c < ci; c += 8) {
                        vec8 r[4][4];
                        for (int e = 0; e < 4; e++) {
                            vec8 m0 = load8(in + e * CHUNK * ci + c), m1 = load8(in + (4 + e) * CHUNK * ci + c);
                            vec8 m2 = load8(in + (8 + e) * CHUNK * ci + c), m3 = load8(in + (12 + e) * CHUNK * ci + c);
                            r[0][e] = m0, r[1][e] = m1 - m2 + m3, r[2][e] = m1 + m2 - m0, r[3][e] = -m3;
                        }
                        for (int a = 0; a < 4 && i + a < h; a++) {
                            vec8 d[4] = {r[a][0], r[a][1] - r[a][2] + r[a][3], r[a][1] + r[a][2] - r[a][0], -r[a][3]};
                            for (int e = 0; e < 4 && j + e < w; e++) {
                                float *x = image + ((i + a) * w + j + e) * ci + c;
                                store8(x, load8(x) + d[e]);
                            }
                        }
                    }
                }
            }
        }
    }
    free(buffers);
    return 0;
}
