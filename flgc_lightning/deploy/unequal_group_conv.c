/* y[r, out] = act(bias + sum over the filter's group of x[r, in] * w [+ res[r, out]]), for unequal groups
   of a 1x1 conv; act is ReLU6 (clamp to [0, 6]) when relu6 is set, else the identity.
   x: rows x xs floats (channels_last: a row is one pixel), y: rows x ys floats, res (optional, may be NULL):
   rows x rs floats, e.g. the residual branch of a MobileNetV2 block, added in the same pass over y.
   Work unit: 8 rows x one task (up to 8 filters: of one group, or of several small groups, with zero
   weights in the other groups' lanes), accumulated in eight 8-float vectors, so each input value is
   loaded once per task and each weight vector once per 8 rows.
   Built by flgc_lightning/deploy/native.py; GCC/Clang vector extensions, so it compiles to AVX,
   AVX-512 or NEON with -march=native and still to plain SSE/scalar code without it. */
#include <stdint.h>

/* aligned(4): loads need not be 32-byte aligned */
typedef float v8 __attribute__((vector_size(32), aligned(4)));

/* task (up to 8 filters): first segment, segment count, bias offset (8 floats), filter count, offset of
   their output channels in oidx. segment (a run of contiguous input channels of one group): first channel,
   length, weight offset (floats; [length][8]). */
enum { T_S, T_NS, T_B, T_OC, T_OI, T_LEN };
enum { S_IN, S_N, S_W, S_LEN };

#define ROWS 8
#define BLOCK_ROWS 64 /* rows per OpenMP work item */
/* Prefetch (into L2) the rows 64 ahead: the hardware prefetcher misses the 8-row, column-block access
   pattern, and this halves the time on a 32x32 CIFAR layer (benchmarks/README.md). */
#define PREFETCH_ROWS 64

static inline float finish(float v, const float *res, int64_t at, int relu6) {
    if (res) v += res[at];
    if (relu6) v = v < 0.0f ? 0.0f : (v > 6.0f ? 6.0f : v);
    return v;
}

static inline void block8(const float *x, int64_t xs, float *y, int64_t ys, const float *res, int64_t rs,
                          int relu6, const float *w, const float *b, const int64_t *t, const int64_t *segs,
                          const int64_t *oidx) {
    v8 bias = *(const v8 *)(b + t[T_B]);
    v8 a0 = bias, a1 = bias, a2 = bias, a3 = bias, a4 = bias, a5 = bias, a6 = bias, a7 = bias;
    for (int64_t s = t[T_S]; s < t[T_S] + t[T_NS]; s++) {
        const int64_t *seg = segs + s * S_LEN;
        const float *xp = x + seg[S_IN];
        const float *wp = w + seg[S_W];
        for (int64_t i = 0; i < seg[S_N]; i++) {
            v8 wv = *(const v8 *)(wp + 8 * i);
            a0 += xp[i] * wv;
            a1 += xp[xs + i] * wv;
            a2 += xp[2 * xs + i] * wv;
            a3 += xp[3 * xs + i] * wv;
            a4 += xp[4 * xs + i] * wv;
            a5 += xp[5 * xs + i] * wv;
            a6 += xp[6 * xs + i] * wv;
            a7 += xp[7 * xs + i] * wv;
        }
    }
    const int64_t *o = oidx + t[T_OI];
    if (!res && !relu6) {
        for (int64_t j = 0; j < t[T_OC]; j++) {
            int64_t c = o[j];
            y[c] = a0[j];
            y[ys + c] = a1[j];
            y[2 * ys + c] = a2[j];
            y[3 * ys + c] = a3[j];
            y[4 * ys + c] = a4[j];
            y[5 * ys + c] = a5[j];
            y[6 * ys + c] = a6[j];
            y[7 * ys + c] = a7[j];
        }
        return;
    }
    for (int64_t j = 0; j < t[T_OC]; j++) {
        int64_t c = o[j];
        y[c] = finish(a0[j], res, c, relu6);
        y[ys + c] = finish(a1[j], res, rs + c, relu6);
        y[2 * ys + c] = finish(a2[j], res, 2 * rs + c, relu6);
        y[3 * ys + c] = finish(a3[j], res, 3 * rs + c, relu6);
        y[4 * ys + c] = finish(a4[j], res, 4 * rs + c, relu6);
        y[5 * ys + c] = finish(a5[j], res, 5 * rs + c, relu6);
        y[6 * ys + c] = finish(a6[j], res, 6 * rs + c, relu6);
        y[7 * ys + c] = finish(a7[j], res, 7 * rs + c, relu6);
    }
}

static inline void block1(const float *x, float *y, const float *res, int relu6, const float *w, const float *b,
                          const int64_t *t, const int64_t *segs, const int64_t *oidx) {
    v8 a0 = *(const v8 *)(b + t[T_B]);
    for (int64_t s = t[T_S]; s < t[T_S] + t[T_NS]; s++) {
        const int64_t *seg = segs + s * S_LEN;
        const float *xp = x + seg[S_IN];
        const float *wp = w + seg[S_W];
        for (int64_t i = 0; i < seg[S_N]; i++) a0 += xp[i] * *(const v8 *)(wp + 8 * i);
    }
    const int64_t *o = oidx + t[T_OI];
    for (int64_t j = 0; j < t[T_OC]; j++) y[o[j]] = finish(a0[j], res, o[j], relu6);
}

void unequal_group_conv1x1(const float *x, int64_t rows, int64_t xs, float *y, int64_t ys, const float *res,
                           int64_t rs, int relu6, const float *w, const float *b, const int64_t *tasks,
                           int64_t ntasks, const int64_t *segs, const int64_t *oidx, int nthreads) {
    int64_t nblocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        int64_t r = blk * BLOCK_ROWS, end = r + BLOCK_ROWS < rows ? r + BLOCK_ROWS : rows;
        for (; r + ROWS <= end; r += ROWS) {  /* 8 rows at a time, all tasks: the rows stay in L1 */
            if (r + PREFETCH_ROWS + ROWS <= rows) {
                const char *ahead = (const char *)(x + (r + PREFETCH_ROWS) * xs);
                for (int64_t off = 0; off < ROWS * xs * (int64_t)sizeof(float); off += 64)
                    __builtin_prefetch(ahead + off, 0, 2);
            }
            for (int64_t k = 0; k < ntasks; k++)
                block8(x + r * xs, xs, y + r * ys, ys, res ? res + r * rs : 0, rs, relu6, w, b, tasks + k * T_LEN,
                       segs, oidx);
        }
        for (; r < end; r++)
            for (int64_t k = 0; k < ntasks; k++)
                block1(x + r * xs, y + r * ys, res ? res + r * rs : 0, relu6, w, b, tasks + k * T_LEN, segs, oidx);
    }
}
