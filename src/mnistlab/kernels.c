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
#include <stdint.h>
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
