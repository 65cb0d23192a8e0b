/* y[r, out] = act(bias + sum over the filter's group of x[r, in] * w [+ res[r, out]]), for unequal groups
   of a 1x1 conv; act is ReLU6 (clamp to [0, 6]) when relu6 is set, else the identity.
   x: rows x xs floats (channels_last: a row is one pixel), y: rows x ys floats, res (optional, may be NULL):
   rows x rs floats, e.g. the residual branch of a MobileNetV2 block, added in the same pass over y.
   Work unit: 8 rows x one task (up to 8 filters: of one group, or of several small groups, with zero
   weights in the other groups' lanes), accumulated in eight 8-float vectors, so each input value is
   loaded once per task and each weight vector once per 8 rows.
   Built by flgc_lightning/deploy/native.py for the instruction set it picks at run time (-mavx512f ...,
   -mavx2 -mfma, or none); GCC/Clang vector extensions, so it compiles to AVX-512, AVX2 or NEON code and still to
   plain SSE/scalar code without them. */
#include <stdint.h>

/* aligned(4): loads need not be 32-byte aligned */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

static inline v8 lane_select(v8i mask, v8 yes, v8 no) { /* lane-wise mask ? yes : no (mask lanes are 0 or -1) */
    return (v8)(((v8i)yes & mask) | ((v8i)no & ~mask));
}

/* ReLU6 of 8 lanes: two instructions (vmaxps, vminps) where AVX is on, compare-and-select elsewhere */
static inline v8 clamp6(v8 a) {
    const v8 lo = {0, 0, 0, 0, 0, 0, 0, 0}, hi = {6, 6, 6, 6, 6, 6, 6, 6};
#if defined(__AVX__)
    return __builtin_ia32_minps256(__builtin_ia32_maxps256(a, lo), hi);
#else
    a = lane_select(a < lo, lo, a);
    return lane_select(a > hi, hi, a);
#endif
}

/* one row's 8 consecutive outputs: + residual, ReLU6, one vector store */
static inline void store8(float *y, v8 a, const float *res, int relu6) {
    if (res) a += *(const v8 *)res;
    if (relu6) a = clamp6(a);
    *(v8 *)y = a;
}

/* task (up to 8 filters, or 16 in a wide task): first segment, segment count, bias offset (8 or 16 floats), filter
   count, offset of their output channels in oidx, and flags: T_CONSECUTIVE if those are 8 (16) consecutive channels
   (stored as one vector), T_WIDE for a 16-lane task (one 16-float vector: AVX-512 runs it at the cost of an 8-lane
   one). segment (a run of contiguous input channels of one group): first channel, length, weight offset (floats;
   [length][8] or [length][16]). */
enum { T_S, T_NS, T_B, T_OC, T_OI, T_FLAGS, T_LEN };
enum { S_IN, S_N, S_W, S_LEN };
enum { T_CONSECUTIVE = 1, T_WIDE = 2 };

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

/* the widest task worth packing here: 16 lanes with AVX-512 (a 16-float FMA costs what an 8-float one does) and with
   AVX2 (block4_wide: a third fewer loads per FMA than 8-lane tasks), else 8 (wide tasks still run, as two or four
   narrower vectors). pack() asks. */
int preferred_lanes(void) {
#if defined(__AVX512F__) || defined(__AVX2__)
    return 16;
#else
    return 8;
#endif
}

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

/* a0..a7 (rows 0..7) += the task's inputs times their weight vectors (type V), segment by segment; L: the task's
   lanes (floats per weight row), OFF: the first lane V covers */
#define ACCUMULATE8(V, L, OFF, a0, a1, a2, a3, a4, a5, a6, a7)                                                        \
    for (int64_t s = t[T_S]; s < t[T_S] + t[T_NS]; s++) {                                                              \
        const int64_t *seg = segs + s * S_LEN;                                                                         \
        const float *xp = x + seg[S_IN], *wp = w + seg[S_W] + (OFF);                                                   \
        for (int64_t i = 0; i < seg[S_N]; i++) {                                                                       \
            V wv = *(const V *)(wp + L * i);                                                                           \
            a0 += xp[i] * wv, a1 += xp[xs + i] * wv, a2 += xp[2 * xs + i] * wv, a3 += xp[3 * xs + i] * wv;             \
            a4 += xp[4 * xs + i] * wv, a5 += xp[5 * xs + i] * wv, a6 += xp[6 * xs + i] * wv, a7 += xp[7 * xs + i] * wv; \
        }                                                                                                              \
    }

/* 8 rows x lanes OFF .. OFF + 7 of a task of L lanes (8, or 16 as two halves where a 16-float vector is not one
   register): the filters o[OFF] .. o[OFF + count - 1] of the task's output channels o */
static inline void block8_lanes(const float *x, int64_t xs, float *y, int64_t ys, const float *res, int64_t rs,
                                int relu6, const float *w, const float *b, const int64_t *t, const int64_t *segs,
                                const int64_t *o, int64_t count, const int L, const int OFF) {
    v8 bias = *(const v8 *)(b + t[T_B] + OFF);
    v8 a0 = bias, a1 = bias, a2 = bias, a3 = bias, a4 = bias, a5 = bias, a6 = bias, a7 = bias;
    ACCUMULATE8(v8, L, OFF, a0, a1, a2, a3, a4, a5, a6, a7)
    if (t[T_FLAGS] & T_CONSECUTIVE) {
        int64_t c = o[0] + OFF;
        store8(y + c, a0, res ? res + c : 0, relu6);
        store8(y + ys + c, a1, res ? res + rs + c : 0, relu6);
        store8(y + 2 * ys + c, a2, res ? res + 2 * rs + c : 0, relu6);
        store8(y + 3 * ys + c, a3, res ? res + 3 * rs + c : 0, relu6);
        store8(y + 4 * ys + c, a4, res ? res + 4 * rs + c : 0, relu6);
        store8(y + 5 * ys + c, a5, res ? res + 5 * rs + c : 0, relu6);
        store8(y + 6 * ys + c, a6, res ? res + 6 * rs + c : 0, relu6);
        store8(y + 7 * ys + c, a7, res ? res + 7 * rs + c : 0, relu6);
        return;
    }
    if (!res) {
        if (relu6) {
            a0 = clamp6(a0), a1 = clamp6(a1), a2 = clamp6(a2), a3 = clamp6(a3);
            a4 = clamp6(a4), a5 = clamp6(a5), a6 = clamp6(a6), a7 = clamp6(a7);
        }
        for (int64_t j = 0; j < count; j++) {
            int64_t c = o[OFF + j];
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
    for (int64_t j = 0; j < count; j++) {
        int64_t c = o[OFF + j];
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

static inline v16 clamp16(v16 a) {
    const v16 lo = {0}, hi = {6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6};
    v16i below = a < lo, above = a > hi;
    a = (v16)(((v16i)lo & below) | ((v16i)a & ~below));
    return (v16)(((v16i)hi & above) | ((v16i)a & ~above));
}

static inline void store16(float *y, v16 a, const float *res, int relu6) {
    if (res) a += *(const v16 *)res;
    if (relu6) a = clamp16(a);
    *(v16 *)y = a;
}

static inline void block8(const float *x, int64_t xs, float *y, int64_t ys, const float *res, int64_t rs,
                          int relu6, const float *w, const float *b, const int64_t *t, const int64_t *segs,
                          const int64_t *oidx) {
    block8_lanes(x, xs, y, ys, res, rs, relu6, w, b, t, segs, oidx + t[T_OI], t[T_OC], 8, 0);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
/* one row's outputs of a 16-lane task held as two 8-float vectors (lanes 0-7, 8-15); y, res at the row */
static inline void store_row16(float *y, const float *res, v8 lo, v8 hi, const int64_t *o, int64_t count,
                               int consecutive, int relu6) {
    if (consecutive) {
        store8(y + o[0], lo, res ? res + o[0] : 0, relu6);
        store8(y + o[0] + 8, hi, res ? res + o[0] + 8 : 0, relu6);
        return;
    }
    for (int64_t j = 0; j < count; j++) y[o[j]] = finish(j < 8 ? lo[j] : hi[j - 8], res, o[j], relu6);
}

/* 4 rows x 16 lanes of a wide task in eight 8-float accumulators: per input 2 weight loads and 4 broadcasts feed
   8 FMAs, where 8 rows x 8 lanes (block8_lanes) need 9 loads for 8 */
static inline void block4_wide(const float *x, int64_t xs, float *y, int64_t ys, const float *res, int64_t rs,
                               int relu6, const float *w, const float *b, const int64_t *t, const int64_t *segs,
                               const int64_t *o) {
    v8 blo = *(const v8 *)(b + t[T_B]), bhi = *(const v8 *)(b + t[T_B] + 8);
    v8 a0 = blo, a1 = blo, a2 = blo, a3 = blo, c0 = bhi, c1 = bhi, c2 = bhi, c3 = bhi;
    for (int64_t s = t[T_S]; s < t[T_S] + t[T_NS]; s++) {
        const int64_t *seg = segs + s * S_LEN;
        const float *xp = x + seg[S_IN], *wp = w + seg[S_W];
        for (int64_t i = 0; i < seg[S_N]; i++) {
            v8 lo = *(const v8 *)(wp + 16 * i), hi = *(const v8 *)(wp + 16 * i + 8);
            float x0 = xp[i], x1 = xp[xs + i], x2 = xp[2 * xs + i], x3 = xp[3 * xs + i];
            a0 += x0 * lo, c0 += x0 * hi, a1 += x1 * lo, c1 += x1 * hi;
            a2 += x2 * lo, c2 += x2 * hi, a3 += x3 * lo, c3 += x3 * hi;
        }
    }
    int consecutive = (t[T_FLAGS] & T_CONSECUTIVE) != 0;
    int64_t count = t[T_OC];
    store_row16(y, res, a0, c0, o, count, consecutive, relu6);
    store_row16(y + ys, res ? res + rs : 0, a1, c1, o, count, consecutive, relu6);
    store_row16(y + 2 * ys, res ? res + 2 * rs : 0, a2, c2, o, count, consecutive, relu6);
    store_row16(y + 3 * ys, res ? res + 3 * rs : 0, a3, c3, o, count, consecutive, relu6);
}
#endif

/* block8 for a wide task: 16 filters in one 16-float vector per row with AVX-512; with AVX2, 4 rows at a time in two
   8-float vectors (block4_wide). Elsewhere (16-lane tables of a file exported on an AVX-512 machine) as two 8-lane
   halves of eight registers each: eight 16-float accumulators made of 8-float registers do not fit and spill
   (6.7x slower at batch 64 with AVX2, benchmarks/moved_tables.py) */
static inline void block8_wide(const float *x, int64_t xs, float *y, int64_t ys, const float *res, int64_t rs,
                               int relu6, const float *w, const float *b, const int64_t *t, const int64_t *segs,
                               const int64_t *oidx) {
    const int64_t *o = oidx + t[T_OI];
#if defined(__AVX2__) && !defined(__AVX512F__)
    block4_wide(x, xs, y, ys, res, rs, relu6, w, b, t, segs, o);
    block4_wide(x + 4 * xs, xs, y + 4 * ys, ys, res ? res + 4 * rs : 0, rs, relu6, w, b, t, segs, o);
#elif !defined(__AVX512F__)
    block8_lanes(x, xs, y, ys, res, rs, relu6, w, b, t, segs, o, t[T_OC] < 8 ? t[T_OC] : 8, 16, 0);
    if (t[T_OC] > 8)
        block8_lanes(x, xs, y, ys, res, rs, relu6, w, b, t, segs, o, t[T_OC] - 8, 16, 8);
#else
    v16 bias = *(const v16 *)(b + t[T_B]);
    v16 a[ROWS] = {bias, bias, bias, bias, bias, bias, bias, bias};
    ACCUMULATE8(v16, 16, 0, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])
    if (t[T_FLAGS] & T_CONSECUTIVE) {
        int64_t c = o[0];
        for (int p = 0; p < ROWS; p++) store16(y + p * ys + c, a[p], res ? res + p * rs + c : 0, relu6);
        return;
    }
    for (int p = 0; p < ROWS; p++)
        for (int64_t j = 0; j < t[T_OC]; j++) {
            int64_t c = o[j];
            y[p * ys + c] = finish(a[p][j], res ? res + p * rs : 0, c, relu6);
        }
#endif
}

/* one task over one row (the rows after the last block of 8): vector type V of L lanes */
#define BLOCK1(NAME, V, L)                                                                                             \
    static inline void NAME(const float *x, float *y, const float *res, int relu6, const float *w, const float *b,    \
                            const int64_t *t, const int64_t *segs, const int64_t *oidx) {                              \
        V a0 = *(const V *)(b + t[T_B]);                                                                               \
        for (int64_t s = t[T_S]; s < t[T_S] + t[T_NS]; s++) {                                                          \
            const int64_t *seg = segs + s * S_LEN;                                                                     \
            const float *xp = x + seg[S_IN], *wp = w + seg[S_W];                                                       \
            for (int64_t i = 0; i < seg[S_N]; i++) a0 += xp[i] * *(const V *)(wp + L * i);                             \
        }                                                                                                              \
        const int64_t *o = oidx + t[T_OI];                                                                             \
        for (int64_t j = 0; j < t[T_OC]; j++) y[o[j]] = finish(a0[j], res, o[j], relu6);                              \
    }
BLOCK1(block1, v8, 8)
BLOCK1(block1_wide, v16, 16)

/* one task over 8 rows / one row, 8 or 16 lanes */
static inline void task8(const float *x, int64_t xs, float *y, int64_t ys, const float *res, int64_t rs, int relu6,
                         const float *w, const float *b, const int64_t *t, const int64_t *segs, const int64_t *oidx) {
    if (t[T_FLAGS] & T_WIDE)
        block8_wide(x, xs, y, ys, res, rs, relu6, w, b, t, segs, oidx);
    else
        block8(x, xs, y, ys, res, rs, relu6, w, b, t, segs, oidx);
}

static inline void task1(const float *x, float *y, const float *res, int relu6, const float *w, const float *b,
                         const int64_t *t, const int64_t *segs, const int64_t *oidx) {
    if (t[T_FLAGS] & T_WIDE)
        block1_wide(x, y, res, relu6, w, b, t, segs, oidx);
    else
        block1(x, y, res, relu6, w, b, t, segs, oidx);
}

/* conv1x1 of rows [r, end) of x (all tasks, 8 rows at a time, so the rows stay in L1); rows: how many rows x has
   (the prefetch stays inside them) */
static inline void conv1x1_rows(const float *x, int64_t r, int64_t end, int64_t rows, int64_t xs, float *y, int64_t ys,
                                const float *res, int64_t rs, int relu6, const float *w, const float *b,
                                const int64_t *tasks, int64_t ntasks, const int64_t *segs, const int64_t *oidx) {
    for (; r + ROWS <= end; r += ROWS) {
        if (r + PREFETCH_ROWS + ROWS <= rows) {
            const char *ahead = (const char *)(x + (r + PREFETCH_ROWS) * xs);
            for (int64_t off = 0; off < ROWS * xs * (int64_t)sizeof(float); off += 64)
                __builtin_prefetch(ahead + off, 0, 2);
        }
        for (int64_t k = 0; k < ntasks; k++)
            task8(x + r * xs, xs, y + r * ys, ys, res ? res + r * rs : 0, rs, relu6, w, b, tasks + k * T_LEN, segs,
                  oidx);
    }
    for (; r < end; r++)
        for (int64_t k = 0; k < ntasks; k++)
            task1(x + r * xs, y + r * ys, res ? res + r * rs : 0, relu6, w, b, tasks + k * T_LEN, segs, oidx);
}

static void unequal_group_conv1x1(const float *x, int64_t rows, int64_t xs, float *y, int64_t ys, const float *res,
                                  int64_t rs, int relu6, const float *w, const float *b, const int64_t *tasks,
                                  int64_t ntasks, const int64_t *segs, const int64_t *oidx, int nthreads) {
    int64_t nblocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
    if (nblocks < nthreads && ntasks >= 2 * nthreads) { /* few rows (batch 1, 4x4 maps): threads split the tasks */
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t part = 0; part < nthreads; part++) {
            int64_t k0 = ntasks * part / nthreads, k1 = ntasks * (part + 1) / nthreads;
            conv1x1_rows(x, 0, rows, rows, xs, y, ys, res, rs, relu6, w, b, tasks + k0 * T_LEN, k1 - k0, segs, oidx);
        }
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        int64_t r = blk * BLOCK_ROWS, end = r + BLOCK_ROWS < rows ? r + BLOCK_ROWS : rows;
        conv1x1_rows(x, r, end, rows, xs, y, ys, res, rs, relu6, w, b, tasks, ntasks, segs, oidx);
    }
}

#include <stdlib.h>
#include <string.h>

/* Per-thread scratch that outlives a call: a fresh malloc of a few hundred KB is an mmap plus page faults on every
   call, which costs as much as a small layer at batch 1. Grows, never shrinks; one slot per use. */
static __thread float *scratch_ptr[3];
static __thread size_t scratch_cap[3];

static float *scratch(int slot, size_t floats, int zeroed) {
    if (scratch_cap[slot] < floats) {
        free(scratch_ptr[slot]);
        size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
        scratch_ptr[slot] = aligned_alloc(64, bytes);
        scratch_cap[slot] = scratch_ptr[slot] ? bytes / sizeof(float) : 0;
        if (scratch_ptr[slot] && zeroed) memset(scratch_ptr[slot], 0, bytes);
    }
    return scratch_ptr[slot];
}

/* A thread whose scratch allocation failed says so; the team checks `failed` after a barrier. */
static inline void note_failure(const void *scratch_ptr_or_null, int *failed) {
    if (!scratch_ptr_or_null) {
#pragma omp atomic write
        *failed = 1;
    }
}

/* One pass of dw_row8 over the channel blocks of W channels (vector type V) from cb on; ZERO: a zero V. */
#define DW_SLIDE(V, W, ZERO, CLAMP)  \
    for (; cb + W <= c; cb += W) {                                                                                   \
        V k0 = *(const V *)(dww + cb), k1 = *(const V *)(dww + c + cb), k2 = *(const V *)(dww + 2 * c + cb),         \
           k3 = *(const V *)(dww + 3 * c + cb), k4 = *(const V *)(dww + 4 * c + cb),                                 \
           k5 = *(const V *)(dww + 5 * c + cb), k6 = *(const V *)(dww + 6 * c + cb),                                 \
           k7 = *(const V *)(dww + 7 * c + cb), k8 = *(const V *)(dww + 8 * c + cb), bias = *(const V *)(dwb + cb);  \
        const float *r0p = row[0] + cb, *r1p = row[1] + cb, *r2p = row[2] + cb;                                      \
        int64_t s0 = step[0], s1 = step[1], s2 = step[2];                                                            \
        V a0 = ZERO, a1 = ZERO, a2 = ZERO; /* column ox - 1 (rows dy = 0, 1, 2) */                                   \
        if (left) {                                                                                                  \
            a0 = *(const V *)(r0p + (ox0 - 1) * s0), a1 = *(const V *)(r1p + (ox0 - 1) * s1);                        \
            a2 = *(const V *)(r2p + (ox0 - 1) * s2);                                                                 \
        }                                                                                                            \
        V b0 = *(const V *)(r0p + ox0 * s0), b1 = *(const V *)(r1p + ox0 * s1), b2 = *(const V *)(r2p + ox0 * s2);   \
        for (int64_t p = 0; p < ROWS; p++) {                                                                         \
            int64_t ix = ox0 + p + 1;                                                                                \
            V e0 = ZERO, e1 = ZERO, e2 = ZERO; /* column ox + 1 */                                                   \
            if (p < ROWS - 1 || right) {                                                                             \
                e0 = *(const V *)(r0p + ix * s0), e1 = *(const V *)(r1p + ix * s1);                                  \
                e2 = *(const V *)(r2p + ix * s2);                                                                    \
            }                                                                                                        \
            V acc = bias + a0 * k0 + b0 * k1 + e0 * k2 + a1 * k3 + b1 * k4 + e1 * k5 + a2 * k6 + b2 * k7 + e2 * k8;  \
            *(V *)(d + p * c + cb) = CLAMP(acc);                                                                     \
            a0 = b0, a1 = b1, a2 = b2, b0 = e0, b1 = e1, b2 = e2;                                                    \
        }                                                                                                            \
    }

/* Output pixels [r0, r0 + valid) (valid <= 8) of relu6(depthwise3x3(x) + dwb) fed to the 1x1 tasks. x: images of
   h x w x c (pixel index r0 counts across them, ho * wo per image); the depthwise outputs go to d (8 x c floats,
   stays in L1), never to memory. y and rr (the residual, or NULL) point at output pixel r0. */
/* Stride 1, 8 output pixels of one row: a sliding 3x3 window over the input columns, so each output vector
   loads the 3 vectors of one new input column instead of all 9 taps (the 3x3 conv is otherwise bound by loads).
   A row or column outside the image reads zeros (column step 0 into `zeros`). */
static inline void dw_row8(const float *x, int64_t img, int64_t h, int64_t w, int64_t c, const float *dww,
                           const float *dwb, int64_t oy, int64_t ox0, float *d, const float *zeros) {
    const float *row[3];
    int64_t step[3];
    for (int64_t dy = 0; dy < 3; dy++) {
        int64_t iy = oy - 1 + dy;
        int inside = iy >= 0 && iy < h;
        row[dy] = inside ? x + (img * h + iy) * w * c : zeros;
        step[dy] = inside ? c : 0;
    }
    const int left = ox0 >= 1, right = ox0 + ROWS < w; /* columns ox0 - 1 and ox0 + 8 exist */
    const v8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t cb = 0;
#if defined(__AVX512F__) /* 16 channels per vector where that costs what 8 do */
    const v16 zero16 = {0};
    DW_SLIDE(v16, 16, zero16, clamp16);
#endif
    DW_SLIDE(v8, 8, zero, clamp6);
    for (; cb < c; cb++) /* channel tail */
        for (int64_t p = 0; p < ROWS; p++) {
            float a = dwb[cb];
            for (int64_t k = 0; k < 9; k++) {
                int64_t ix = ox0 + p - 1 + k % 3;
                if (ix >= 0 && ix < w) a += row[k / 3][ix * step[k / 3] + cb] * dww[k * c + cb];
            }
            d[p * c + cb] = a < 0.0f ? 0.0f : (a > 6.0f ? 6.0f : a);
        }
}

/* The 9-tap depthwise conv of 8 output pixels (tap pointers `tap`) over channel blocks of W from cb on. */
#define DW_TAPS(V, W, CLAMP)  \
    for (; cb + W <= c; cb += W) {                                                                                   \
        V k0 = *(const V *)(dww + cb), k1 = *(const V *)(dww + c + cb), k2 = *(const V *)(dww + 2 * c + cb),         \
           k3 = *(const V *)(dww + 3 * c + cb), k4 = *(const V *)(dww + 4 * c + cb),                                 \
           k5 = *(const V *)(dww + 5 * c + cb), k6 = *(const V *)(dww + 6 * c + cb),                                 \
           k7 = *(const V *)(dww + 7 * c + cb), k8 = *(const V *)(dww + 8 * c + cb), bias = *(const V *)(dwb + cb);  \
        for (int64_t p = 0; p < ROWS; p++) {                                                                         \
            const float *const *t = tap[p];                                                                          \
            V a = bias + *(const V *)(t[0] + cb) * k0 + *(const V *)(t[1] + cb) * k1                                 \
                   + *(const V *)(t[2] + cb) * k2 + *(const V *)(t[3] + cb) * k3 + *(const V *)(t[4] + cb) * k4      \
                   + *(const V *)(t[5] + cb) * k5 + *(const V *)(t[6] + cb) * k6 + *(const V *)(t[7] + cb) * k7      \
                   + *(const V *)(t[8] + cb) * k8;                                                                   \
            *(V *)(d + p * c + cb) = CLAMP(a);                                                                       \
        }                                                                                                            \
    }

static void dw_project_chunk(const float *x, int64_t h, int64_t w, int64_t c, const float *dww, const float *dwb,
                             int64_t stride, int64_t ho, int64_t wo, int64_t r0, int64_t valid, float *d,
                             const float *zeros, float *y, int64_t ys, const float *rr, int64_t rs, int relu6,
                             const float *pw, const float *pb, const int64_t *tasks, int64_t ntasks,
                             const int64_t *segs, const int64_t *oidx) {
    if (stride == 1 && valid == ROWS && r0 % wo + ROWS <= wo) { /* 8 pixels of one row */
        dw_row8(x, r0 / (ho * wo), h, w, c, dww, dwb, r0 / wo % ho, r0 % wo, d, zeros);
        for (int64_t k = 0; k < ntasks; k++) task8(d, c, y, ys, rr, rs, relu6, pw, pb, tasks + k * T_LEN, segs, oidx);
        return;
    }
    const float *tap[ROWS][9];
    for (int64_t p = 0; p < ROWS; p++) {
        int64_t q = r0 + (p < valid ? p : 0), img = q / (ho * wo), oy = q / wo % ho, ox = q % wo;
        for (int64_t k = 0; k < 9; k++) {
            int64_t iy = oy * stride - 1 + k / 3, ix = ox * stride - 1 + k % 3;
            tap[p][k] = (iy < 0 || iy >= h || ix < 0 || ix >= w) ? zeros : x + ((img * h + iy) * w + ix) * c;
        }
    }
    int64_t cb = 0;
#if defined(__AVX512F__)
    DW_TAPS(v16, 16, clamp16);
#endif
    DW_TAPS(v8, 8, clamp6);
    for (; cb < c; cb++) /* channel tail */
        for (int64_t p = 0; p < ROWS; p++) {
            float a = dwb[cb];
            for (int64_t k = 0; k < 9; k++) a += tap[p][k][cb] * dww[k * c + cb];
            d[p * c + cb] = a < 0.0f ? 0.0f : (a > 6.0f ? 6.0f : a);
        }
    if (valid == ROWS)
        for (int64_t k = 0; k < ntasks; k++) task8(d, c, y, ys, rr, rs, relu6, pw, pb, tasks + k * T_LEN, segs, oidx);
    else
        for (int64_t p = 0; p < valid; p++)
            for (int64_t k = 0; k < ntasks; k++)
                task1(d + p * c, y + p * ys, rr ? rr + p * rs : 0, relu6, pw, pb, tasks + k * T_LEN, segs, oidx);
}

/* dw_project_chunk over output pixels [r, end), 8 at a time; y and rr (or NULL) point at output pixel 0 of x */
static void dw_project_pixels(const float *x, int64_t h, int64_t w, int64_t c, const float *dww, const float *dwb,
                              int64_t stride, int64_t ho, int64_t wo, int64_t r, int64_t end, float *d,
                              const float *zeros, float *y, int64_t ys, const float *rr, int64_t rs, int relu6,
                              const float *pw, const float *pb, const int64_t *tasks, int64_t ntasks,
                              const int64_t *segs, const int64_t *oidx) {
    for (; r < end; r += ROWS)
        dw_project_chunk(x, h, w, c, dww, dwb, stride, ho, wo, r, end - r < ROWS ? end - r : ROWS, d, zeros,
                         y + r * ys, ys, rr ? rr + r * rs : 0, rs, relu6, pw, pb, tasks, ntasks, segs, oidx);
}

/* A 3x3 depthwise conv (padding 1, stride 1 or 2, bias, ReLU6) feeding the unequal-group 1x1 conv above, in one
   pass: for 8 output pixels at a time the depthwise outputs (all c channels) are computed into a per-thread
   buffer that stays in L1, and the 1x1 tasks read them from there, so the depthwise output never goes to memory.
   x: n x h x w x c (channels_last), dww: [3 * 3][c] (tap-major), dwb: [c]. y, res, w ... oidx as above. */
static int depthwise_unequal_group_conv(const float *x, int64_t n, int64_t h, int64_t w, int64_t c,
                                        const float *dww, const float *dwb, int64_t stride, int64_t ho, int64_t wo,
                                        float *y, int64_t ys, const float *res, int64_t rs, int relu6, const float *pw,
                                        const float *pb, const int64_t *tasks, int64_t ntasks, const int64_t *segs,
                                        const int64_t *oidx, int nthreads) {
    int64_t rows = n * ho * wo, nchunks = (rows + ROWS - 1) / ROWS;
    const float *zeros = scratch(0, (size_t)c + 8, 1); /* what padding taps read; only ever holds zeros */
    int failed = !zeros;
#pragma omp parallel num_threads(nthreads) if (!failed)
    {
        float *d = scratch(1, (size_t)ROWS * c, 0);
        note_failure(d, &failed);
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t chunk = 0; chunk < nchunks; chunk++)
                dw_project_pixels(x, h, w, c, dww, dwb, stride, ho, wo, chunk * ROWS,
                                  chunk * ROWS + ROWS < rows ? chunk * ROWS + ROWS : rows, d, zeros, y, ys, res, rs,
                                  relu6, pw, pb, tasks, ntasks, segs, oidx);
        }
    }
    return failed ? -1 : 0; /* -1: out of memory, y not written */
}

/* A whole MobileNetV2 inverted-residual block in one pass per image: expand 1x1 conv + ReLU6 (dense or unequal
   groups: e* are its tables, as above, over `hidden` outputs), the 3x3 depthwise conv + ReLU6 and the
   unequal-group projection (+ residual). The expanded image (h x w x hidden) goes to a per-thread buffer that
   stays in L2 instead of memory, and the depthwise output to L1 (dw_project_chunk), so of the block's tensors
   only its narrow input and output travel to and from memory. With fewer images than threads, the threads
   share each image (expand rows, then output pixels). */
static int inverted_residual_unequal_group(
    const float *x, int64_t n, int64_t h, int64_t w, int64_t cin, const float *ew, const float *eb,
    const int64_t *etasks, int64_t netasks, const int64_t *esegs, const int64_t *eoidx, int64_t hidden,
    const float *dww, const float *dwb, int64_t stride, int64_t ho, int64_t wo, float *y, int64_t ys,
    const float *res, int64_t rs, int relu6, const float *pw, const float *pb, const int64_t *tasks, int64_t ntasks,
    const int64_t *segs, const int64_t *oidx, int nthreads) {
    int64_t hw = h * w, ohw = ho * wo, ochunks = (ohw + ROWS - 1) / ROWS;
    const float *zeros = scratch(0, (size_t)hidden + 8, 1);
    int failed = !zeros;
    if (n >= nthreads) {
#pragma omp parallel num_threads(nthreads) if (!failed)
        {
            float *buf = scratch(2, (size_t)hw * hidden, 0), *d = scratch(1, (size_t)ROWS * hidden, 0);
            note_failure(buf, &failed);
            note_failure(d, &failed);
#pragma omp barrier
            if (!failed) {
#pragma omp for schedule(static)
                for (int64_t img = 0; img < n; img++) {
                    conv1x1_rows(x + img * hw * cin, 0, hw, hw, cin, buf, hidden, 0, 0, 1, ew, eb, etasks, netasks,
                                 esegs, eoidx);
                    dw_project_pixels(buf, h, w, hidden, dww, dwb, stride, ho, wo, 0, ohw, d, zeros,
                                      y + img * ohw * ys, ys, res ? res + img * ohw * rs : 0, rs, relu6, pw, pb,
                                      tasks, ntasks, segs, oidx);
                }
            }
        }
        return failed ? -1 : 0;
    }
    float *buf = scratch(2, (size_t)hw * hidden, 0); /* the calling thread's; shared by the team */
    failed = failed || !buf;
    int64_t eblocks = (hw + ROWS - 1) / ROWS;
    for (int64_t img = 0; img < n && !failed; img++) {
#pragma omp parallel num_threads(nthreads)
        {
            float *d = scratch(1, (size_t)ROWS * hidden, 0);
            note_failure(d, &failed);
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < eblocks; blk++) {
                int64_t r = blk * ROWS;
                conv1x1_rows(x + img * hw * cin, r, r + ROWS < hw ? r + ROWS : hw, hw, cin, buf, hidden, 0, 0, 1, ew,
                             eb, etasks, netasks, esegs, eoidx);
            } /* implicit barrier: the whole expanded image is there, and every thread's d is known */
            if (!failed) {
#pragma omp for schedule(static)
                for (int64_t chunk = 0; chunk < ochunks; chunk++)
                    dw_project_pixels(buf, h, w, hidden, dww, dwb, stride, ho, wo, chunk * ROWS,
                                      chunk * ROWS + ROWS < ohw ? chunk * ROWS + ROWS : ohw, d, zeros,
                                      y + img * ohw * ys, ys, res ? res + img * ohw * rs : 0, rs, relu6, pw, pb,
                                      tasks, ntasks, segs, oidx);
            }
        }
    }
    return failed ? -1 : 0; /* -1: out of memory, y not (fully) written */
}

/* The library's one entry point (with preferred_lanes): steps, each one of the three kernels above, in one call
   (a single op call is a chain of one; the ONNX Runtime session runs all consecutive custom nodes this way, since
   at batch 1 a Python call per kernel costs as much as the kernel). steps: nsteps records of P_LEN int64 (pointers
   as integers), built by tables.Step.record from a step checked by tables.checked_step, never from a file
   directly; buffers: data pointers of channels_last tensors, named by slot in the records (a step reads slots
   written before it). Returns 0, or -1 if a kernel ran out of memory. */
enum { P_KIND, P_IN, P_RES, P_OUT, P_CIN, P_H, P_W, P_STRIDE, P_HO, P_WO, P_RELU6, P_COUT, P_HIDDEN, P_EW, P_EB,
       P_ET, P_NET, P_ES, P_EO, P_DWW, P_DWB, P_PW, P_PB, P_T, P_NT, P_S, P_O, P_LEN };
enum { K_CONV1X1, K_DEPTHWISE, K_BLOCK };
#define AS(type, v) ((type)(intptr_t)(v))

int run_chain(const int64_t *steps, int64_t nsteps, const int64_t *buffers, int64_t n, int nthreads) {
    for (int64_t k = 0; k < nsteps; k++) {
        const int64_t *s = steps + k * P_LEN;
        if (n * s[P_H] * s[P_W] == 0) continue; /* an empty image: nothing to write (and no scratch to size) */
        const float *x = AS(const float *, buffers[s[P_IN]]);
        const float *res = s[P_RES] < 0 ? 0 : AS(const float *, buffers[s[P_RES]]);
        float *y = AS(float *, buffers[s[P_OUT]]);
        const float *pw = AS(const float *, s[P_PW]), *pb = AS(const float *, s[P_PB]);
        const int64_t *t = AS(const int64_t *, s[P_T]), *sg = AS(const int64_t *, s[P_S]);
        const int64_t *o = AS(const int64_t *, s[P_O]);
        int relu6 = (int)s[P_RELU6], status = 0;
        if (s[P_KIND] == K_CONV1X1)
            unequal_group_conv1x1(x, n * s[P_H] * s[P_W], s[P_CIN], y, s[P_COUT], res, s[P_COUT], relu6, pw, pb, t,
                                  s[P_NT], sg, o, nthreads);
        else if (s[P_KIND] == K_DEPTHWISE)
            status = depthwise_unequal_group_conv(x, n, s[P_H], s[P_W], s[P_CIN], AS(const float *, s[P_DWW]),
                                                  AS(const float *, s[P_DWB]), s[P_STRIDE], s[P_HO], s[P_WO], y,
                                                  s[P_COUT], res, s[P_COUT], relu6, pw, pb, t, s[P_NT], sg, o,
                                                  nthreads);
        else
            status = inverted_residual_unequal_group(
                x, n, s[P_H], s[P_W], s[P_CIN], AS(const float *, s[P_EW]), AS(const float *, s[P_EB]),
                AS(const int64_t *, s[P_ET]), s[P_NET], AS(const int64_t *, s[P_ES]), AS(const int64_t *, s[P_EO]),
                s[P_HIDDEN], AS(const float *, s[P_DWW]), AS(const float *, s[P_DWB]), s[P_STRIDE], s[P_HO], s[P_WO],
                y, s[P_COUT], res, s[P_COUT], relu6, pw, pb, t, s[P_NT], sg, o, nthreads);
        if (status) return status;
    }
    return 0;
}
