/* mnistlab's native kernels, on channels-last (NHWC) tensors of bf16 (passed as uint16) or fp32.
   Built by kernels.py with the machine's C compiler and OpenMP (the runtime torch already loaded),
   called through ctypes.

   1. 2x2 max pooling with stride 2, optionally followed by a ReLU. ATen's max_pool2d costs three passes where this costs two: its forward keeps 64-bit indices, and
   its backward zeroes the whole input gradient before scattering into it. Here the forward keeps
   which of the four positions won as one byte (4: the ReLU zeroed the output), and the backward
   writes every input gradient element exactly once. Same results bit for bit: the first maximum
   wins, a NaN wins as in ATen, and the ReLU passes NaN and zeroes everything <= 0. Rows and columns
   left over by an odd size get a zero gradient. */
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
static inline uint16_t bf16_round(float f) {  /* to nearest, ties to even, as torch rounds; NaN stays NaN */
    union { uint32_t u; float f; } x;
    x.f = f;
    if (f != f) return 0x7FC0;
    return (uint16_t)((x.u + 0x7FFF + ((x.u >> 16) & 1)) >> 16);
}
static inline float f32_round(float f) { return f; }

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

/* 2. A valid, stride-1 convolution of a one-channel image with c filters of k x k (padding is done
   by the caller), the first layer of nearly every MNIST net. oneDNN runs it far below the speed of
   the convolutions after it: with one input channel its kernels have no depth to work along. Here
   each output pixel is c accumulators (vectors of 16 channels in registers) fed k * k broadcast
   input values, in fp32, rounded once to the output type. */
typedef float vec16 __attribute__((vector_size(64)));
static inline vec16 load16(const float *p) { vec16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, vec16 v) { memcpy(p, &v, sizeof v); }

typedef uint32_t bits16 __attribute__((vector_size(64)));
typedef uint16_t half16 __attribute__((vector_size(32)));
static inline void put16_f32(float *p, vec16 v) { store16(p, v); }
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
static inline void put16_bf16(uint16_t *p, vec16 v) {  /* the CPU's own rounding: to nearest even */
    __m256bh r = _mm512_cvtneps_pbh((__m512)v);
    memcpy(p, &r, sizeof r);
}
#else
static inline void put16_bf16(uint16_t *p, vec16 v) {  /* bf16_round on 16 lanes */
    bits16 u;
    memcpy(&u, &v, sizeof u);
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
    bits16 nan = (bits16)(v != v);  /* all ones where NaN */
    u = (u & ~nan) | (0x7FC0 & nan);
    half16 r = __builtin_convertvector(u, half16);
    memcpy(p, &r, sizeof r);
}
#endif

/* x [n, h, w], weight [c, k, k], bias [c] or NULL -> y [n, h-k+1, w-k+1, c]. Per row of output
   and block of 16 channels, the block's k * k weight vectors stay in registers along the row. */
#define CONV_FORWARD(NAME, T, VALUE, ROUND, PUT16)                                                   \
void NAME(const T *x, const T *weight, const T *bias, T *y, long n, long h, long w, long c, long k) {\
    long ho = h - k + 1, wo = w - k + 1, kk = k * k;                                                 \
    float *wt = malloc(sizeof(float) * (kk + 1) * c);  /* [tap, channel], then the bias */           \
    for (long ch = 0; ch < c; ch++) {                                                                \
        for (long t = 0; t < kk; t++) wt[t * c + ch] = VALUE(weight[ch * kk + t]);                   \
        wt[kk * c + ch] = bias ? VALUE(bias[ch]) : 0;                                                \
    }                                                                                                \
    _Pragma("omp parallel for")                                                                      \
    for (long row = 0; row < n * ho; row++) {                                                        \
        long b = row / ho, i = row % ho;                                                             \
        const T *top = x + (b * h + i) * w;                                                          \
        T *out = y + row * wo * c;                                                                   \
        long c0 = 0;                                                                                 \
        for (; c0 + 16 <= c; c0 += 16) {                                                             \
            vec16 bias16 = load16(wt + kk * c + c0);                                                 \
            long j = 0;                                                                              \
            for (; j + 4 <= wo; j += 4) {  /* four pixels share each weight vector */                \
                vec16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                        \
                for (long di = 0; di < k; di++)                                                      \
                    for (long dj = 0; dj < k; dj++) {                                                \
                        const T *p = top + di * w + j + dj;                                          \
                        vec16 wv = load16(wt + (di * k + dj) * c + c0);                              \
                        a0 += VALUE(p[0]) * wv; a1 += VALUE(p[1]) * wv;                              \
                        a2 += VALUE(p[2]) * wv; a3 += VALUE(p[3]) * wv;                              \
                    }                                                                                \
                PUT16(out + j * c + c0, a0 + bias16); PUT16(out + (j + 1) * c + c0, a1 + bias16);    \
                PUT16(out + (j + 2) * c + c0, a2 + bias16); PUT16(out + (j + 3) * c + c0, a3 + bias16);\
            }                                                                                        \
            for (; j < wo; j++) {                                                                    \
                vec16 acc = {0};                                                                     \
                for (long di = 0; di < k; di++)                                                      \
                    for (long dj = 0; dj < k; dj++)                                                  \
                        acc += VALUE(top[di * w + j + dj]) * load16(wt + (di * k + dj) * c + c0);    \
                PUT16(out + j * c + c0, acc + bias16);                                               \
            }                                                                                        \
        }                                                                                            \
        for (; c0 < c; c0++)  /* channels left over from the blocks of 16 */                         \
            for (long j = 0; j < wo; j++) {                                                          \
                float acc = 0;                                                                       \
                for (long di = 0; di < k; di++)                                                      \
                    for (long dj = 0; dj < k; dj++)                                                  \
                        acc += VALUE(top[di * w + j + dj]) * wt[(di * k + dj) * c + c0];             \
                out[j * c + c0] = ROUND(acc + wt[kk * c + c0]);                                      \
            }                                                                                        \
    }                                                                                                \
    free(wt);                                                                                        \
}

/* One row's share of the weight gradient for 16 channels: sum[tap] += x (k rows, fp32) * grad (fp32),
   the k * k accumulators in registers (the kernel sizes of the zoo, 3 and 5, are compiled apart). */
#define WGRAD_BLOCK(NAME, K)                                                                         \
static inline void NAME(float *sum, const float *xr, long w, const float *g, long c, long wo) {      \
    vec16 acc[K * K];                                                                                \
    for (int t = 0; t < K * K; t++) acc[t] = (vec16){0};                                             \
    for (long j = 0; j < wo; j++) {                                                                  \
        vec16 gv = load16(g + j * c);                                                                \
        for (int di = 0; di < K; di++)                                                               \
            for (int dj = 0; dj < K; dj++) acc[di * K + dj] += xr[di * w + j + dj] * gv;             \
    }                                                                                                \
    for (int t = 0; t < K * K; t++) store16(sum + t * c, load16(sum + t * c) + acc[t]);              \
}
WGRAD_BLOCK(wgrad_block3, 3)
WGRAD_BLOCK(wgrad_block5, 5)

/* x [n, h, w], grad_y [n, ho, wo, c] -> grad_weight [c, k, k], grad_bias [c] (or NULL). Each thread
   sums its own rows (a fixed share: schedule static); the threads' sums are added in thread order,
   so the same thread count gives the same bits every time. */
#define CONV_BACKWARD(NAME, T, VALUE, ROUND)                                                         \
void NAME(const T *x, const T *grad_y, T *grad_weight, T *grad_bias, long n, long h, long w, long c,\
          long k) {                                                                                  \
    long ho = h - k + 1, wo = w - k + 1, kk = k * k, size = kk * c + c;                              \
    int threads = omp_get_max_threads();                                                             \
    float *sums = calloc((size_t)threads * size, sizeof(float));  /* per thread: [tap, ch], [ch] */  \
    _Pragma("omp parallel")                                                                          \
    {                                                                                                \
        float *mine = sums + (long)omp_get_thread_num() * size, *gbias = mine + kk * c;              \
        float *g = malloc(sizeof(float) * (wo * c + k * w));  /* one row of grad_y, k of x, in fp32 */\
        float *xr = g + wo * c;                                                                      \
        _Pragma("omp for schedule(static)")                                                          \
        for (long row = 0; row < n * ho; row++) {                                                    \
            long b = row / ho, i = row % ho;                                                         \
            for (long e = 0; e < wo * c; e++) g[e] = VALUE(grad_y[row * wo * c + e]);                \
            for (long e = 0; e < k * w; e++) xr[e] = VALUE(x[(b * h + i) * w + e]);                  \
            for (long j = 0; j < wo; j++)                                                            \
                for (long ch = 0; ch < c; ch++) gbias[ch] += g[j * c + ch];                          \
            long c0 = 0;                                                                             \
            for (; c0 + 16 <= c && (k == 3 || k == 5); c0 += 16)                                     \
                (k == 3 ? wgrad_block3 : wgrad_block5)(mine + c0, xr, w, g + c0, c, wo);             \
            for (; c0 < c; c0++)  /* other kernel sizes, and channels left over from the blocks */   \
                for (long t = 0; t < kk; t++)                                                        \
                    for (long j = 0; j < wo; j++) mine[t * c + c0] += xr[(t / k) * w + j + t % k] * g[j * c + c0];\
        }                                                                                            \
        free(g);                                                                                     \
    }                                                                                                \
    for (long ch = 0; ch < c; ch++) {                                                                \
        for (long t = 0; t < kk; t++) {                                                              \
            float total = 0;                                                                         \
            for (int r = 0; r < threads; r++) total += sums[r * size + t * c + ch];                  \
            grad_weight[ch * kk + t] = ROUND(total);                                                 \
        }                                                                                            \
        if (grad_bias) {                                                                             \
            float total = 0;                                                                         \
            for (int r = 0; r < threads; r++) total += sums[r * size + kk * c + ch];                 \
            grad_bias[ch] = ROUND(total);                                                            \
        }                                                                                            \
    }                                                                                                \
    free(sums);                                                                                      \
}

CONV_FORWARD(conv1_forward_bf16, uint16_t, bf16_value, bf16_round, put16_bf16)
CONV_FORWARD(conv1_forward_f32, float, f32_value, f32_round, put16_f32)
CONV_BACKWARD(conv1_backward_bf16, uint16_t, bf16_value, bf16_round)
CONV_BACKWARD(conv1_backward_f32, float, f32_value, f32_round)
