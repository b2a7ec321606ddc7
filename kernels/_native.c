/* Native CPU kernel of sparse_conv2d / block_conv2d (kernels/_native.py builds and loads this file).
 *
 * Gather-GEMM-scatter in PyTorch writes a patch matrix kh*kw times the size of the active input and
 * then streams it through the GEMM; on a 2-core machine that data movement costs about as much as
 * the arithmetic. The kernel here computes each active output directly from the input instead.
 * Functions take contiguous buffers and int64 sizes; nothing here allocates tensor memory or holds
 * state between calls.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

#if !defined(_OPENMP)
typedef struct {
    range_fn fn;
    void *ctx;
    int64_t begin, end;
} job_t;

static void *run_job(void *arg) {
    job_t *job = (job_t *)arg;
    job->fn(job->ctx, job->begin, job->end);
    return NULL;
}
#endif

/* fn over [0, total) split into `threads` contiguous ranges; runs inline when threads <= 1. Built with
 * OpenMP, the ranges run on the process's OpenMP pool: torch's own libgomp (already loaded, same
 * soname), whose workers are awake right after a torch op; starting POSIX threads instead costs
 * ~30 us per call and competes with those spinning workers for the cores. */
static void parallel_range(range_fn fn, void *ctx, int64_t total, int threads) {
    if (threads > total) threads = (int)total;
    if (threads <= 1) {
        fn(ctx, 0, total);
        return;
    }
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
        fn(ctx, total * t / count, total * (t + 1) / count);
    }
#else
    if (threads > 16) threads = 16;
    pthread_t tid[16];
    job_t jobs[16];
    int started[16] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t].fn = fn;
        jobs[t].ctx = ctx;
        jobs[t].begin = total * t / threads;
        jobs[t].end = total * (t + 1) / threads;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else run_job(&jobs[t]); /* no thread available: do that share here */
    }
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Fused sparse conv (float32, AVX-512): for every active output pixel, the direct convolution over the
 * NCHW input, written straight into the NCHW output. A register tile holds 6 pixels x
 * 16*NV output channels; the weight is pre-packed in column blocks of 16*TILE_VECTORS output channels
 * (the last block narrower), each block (Cin*kh*kw, width) contiguous, Cout padded to a multiple of
 * 16 with zero columns (pack_conv in _native.py); each input value is a broadcast load, so no patch
 * matrix is ever written. Returns 0 (and does nothing) when compiled without AVX-512. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES 24576
#endif
#ifndef TILE_GROUP
#define TILE_GROUP 16
#endif
#ifndef TILE_PIXELS
#define TILE_PIXELS 6
#endif
#ifndef TILE_VECTORS
#define TILE_VECTORS 4
#endif

/* One weight applied at n outputs: output j reads xpad + base[j] + c * plane + taps[i] for its nt taps,
 * multiplied with the weight rows of taps tw[i] (T taps per input channel in the packed weight), and
 * writes out + dest[j] + co * hwo. */
typedef struct {
    const float *xpad, *wt, *bias;
    const int64_t *base, *dest, *taps, *tw;
    int64_t n, nt, C, T, plane, Co, co16, hwo; /* plane: input channel stride; hwo: output channel stride */
    float *out;
    int64_t acc; /* 1: add the result to out's values instead of storing it */
} conv_ctx_t;

#if defined(__AVX512F__)
/* One register tile: TILE_PIXELS pixels x 16*NV output channels from cb, input channels [c0, c1).
 * first: start from the bias (else from acc_buf); last: write the result into the NCHW output (else
 * back into acc_buf). Splitting the input channels keeps the tile's weight slice in L1. */
#define DEFINE_TILE(NV)                                                                                        \
    static void conv_tile_##NV(const conv_ctx_t *k, const int64_t *base, const int64_t *dest, int count,      \
                               int64_t cb, int64_t c0, int64_t c1, float *acc_buf, int first, int last) {     \
        __m512 acc[NV][TILE_PIXELS];                                                                          \
        for (int v = 0; v < NV; v++) {                                                                        \
            const __m512 b0 = k->bias ? _mm512_loadu_ps(k->bias + cb + 16 * v) : _mm512_setzero_ps();         \
            for (int p = 0; p < TILE_PIXELS; p++)                                                             \
                acc[v][p] = first ? b0 : _mm512_loadu_ps(acc_buf + (p * NV + v) * 16);                        \
        }                                                                                                     \
        const float *src[TILE_PIXELS];                                                                        \
        for (int p = 0; p < TILE_PIXELS; p++) src[p] = k->xpad + base[p < count ? p : count - 1];             \
        const float *wb = k->wt + cb * k->C * k->T; /* the block of 16*NV columns */                         \
        for (int64_t c = c0; c < c1; c++) {                                                                   \
            const float *wc = wb + c * k->T * 16 * NV;                                                        \
            for (int64_t i = 0; i < k->nt; i++) {                                                             \
                const int64_t off = c * k->plane + k->taps[i];                                                \
                const float *w = wc + k->tw[i] * 16 * NV;                                                     \
                __m512 wv[NV];                                                                                \
                for (int v = 0; v < NV; v++) wv[v] = _mm512_loadu_ps(w + 16 * v);                             \
                for (int p = 0; p < TILE_PIXELS; p++) {                                                       \
                    const __m512 xv = _mm512_set1_ps(src[p][off]);                                            \
                    for (int v = 0; v < NV; v++) acc[v][p] = _mm512_fmadd_ps(wv[v], xv, acc[v][p]);           \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        if (!last) {                                                                                          \
            for (int p = 0; p < TILE_PIXELS; p++)                                                             \
                for (int v = 0; v < NV; v++) _mm512_storeu_ps(acc_buf + (p * NV + v) * 16, acc[v][p]);        \
            return;                                                                                           \
        }                                                                                                     \
        float lanes[16];                                                                                      \
        for (int p = 0; p < count; p++)                                                                       \
            for (int v = 0; v < NV; v++) {                                                                    \
                _mm512_storeu_ps(lanes, acc[v][p]);                                                           \
                const int64_t co0 = cb + 16 * v;                                                              \
                const int64_t lim = k->Co - co0 < 16 ? k->Co - co0 : 16;                                      \
                float *o = k->out + dest[p] + co0 * k->hwo;                                                   \
                if (k->hwo == 1 && lim == 16) { /* row-major output (NHWC, routed_linear): one vector */      \
                    _mm512_storeu_ps(o, k->acc ? _mm512_add_ps(_mm512_loadu_ps(o), acc[v][p]) : acc[v][p]);   \
                    continue;                                                                                 \
                }                                                                                             \
                if (k->acc)                                                                                   \
                    for (int64_t l = 0; l < lim; l++) o[l * k->hwo] += lanes[l];                              \
                else                                                                                          \
                    for (int64_t l = 0; l < lim; l++) o[l * k->hwo] = lanes[l];                               \
            }                                                                                                 \
    }
DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)

/* Input channels per pass: the weight slice of a pass (chunk x taps x 16*TILE_VECTORS floats) stays
 * within ~24 KB of L1. */
static int64_t channel_chunk(int64_t T) {
    int64_t chunk = CHUNK_BYTES / (T * 16 * TILE_VECTORS * 4);
    return chunk < 1 ? 1 : chunk;
}

/* Tiles [ia, ib) of one weight, output columns [cb, cb + 16*nv): input channels in passes of `chunk`
 * (partial sums in acc_buf, one tile_floats slot per tile), so each pass's weight slice stays in L1
 * while it serves every tile of the range. */
static void run_segment(const conv_ctx_t *k, int64_t ia, int64_t ib, int64_t cb, float *acc_buf) {
    const int64_t tile_floats = TILE_PIXELS * 16 * TILE_VECTORS, nv = (k->co16 - cb) / 16 < TILE_VECTORS
                                                                          ? (k->co16 - cb) / 16 : TILE_VECTORS;
    const int64_t step = acc_buf ? channel_chunk(k->T) : k->C; /* no scratch: one pass over all channels */
    for (int64_t c0 = 0; c0 < k->C; c0 += step) {
        const int64_t c1 = c0 + step < k->C ? c0 + step : k->C;
        const int first = c0 == 0, last = c1 == k->C;
        for (int64_t i = ia; i < ib; i++) {
            const int64_t j0 = i * TILE_PIXELS;
            const int count = (int)(k->n - j0 < TILE_PIXELS ? k->n - j0 : TILE_PIXELS);
            float *buf = acc_buf ? acc_buf + (i - ia) * tile_floats : NULL;
            if (nv == 4) conv_tile_4(k, k->base + j0, k->dest + j0, count, cb, c0, c1, buf, first, last);
            else if (nv == 3) conv_tile_3(k, k->base + j0, k->dest + j0, count, cb, c0, c1, buf, first, last);
            else if (nv == 2) conv_tile_2(k, k->base + j0, k->dest + j0, count, cb, c0, c1, buf, first, last);
            else conv_tile_1(k, k->base + j0, k->dest + j0, count, cb, c0, c1, buf, first, last);
        }
    }
}

/* Scratch for the partial sums of TILE_GROUP tiles; NULL when one pass covers every input channel (or
 * out of memory: run_segment then makes one pass). */
static float *tile_scratch(const conv_ctx_t *k) {
    if (channel_chunk(k->T) >= k->C) return NULL;
    return (float *)malloc(sizeof(float) * TILE_PIXELS * 16 * TILE_VECTORS * TILE_GROUP);
}

/* Work items [u0, u1) of one weight. Item u is one tile and one column block; items run group-major
 * (groups of TILE_GROUP tiles, whose inputs and partial sums stay in L2), then column block, then
 * tile, so a thread's share is a run of (group, column block) segments. Splitting items rather than
 * tiles lets the threads share the column blocks when a layer has only a few active outputs (a late,
 * small feature map), where the weight, not the pixels, is the work: each thread then reads its part of
 * the weight once instead of every thread reading all of it. */
static void run_items(const conv_ctx_t *k, int64_t u0, int64_t u1) {
    const int64_t tiles = (k->n + TILE_PIXELS - 1) / TILE_PIXELS, cbs = (k->co16 + 16 * TILE_VECTORS - 1) /
                                                                         (16 * TILE_VECTORS);
    float *acc_buf = tile_scratch(k);
    for (int64_t u = u0; u < u1;) {
        const int64_t g0 = u / (TILE_GROUP * cbs) * TILE_GROUP;
        const int64_t size = tiles - g0 < TILE_GROUP ? tiles - g0 : TILE_GROUP;
        const int64_t r = u - g0 * cbs, cbi = r / size, ia = g0 + r % size;
        const int64_t end = g0 * cbs + (cbi + 1) * size < u1 ? g0 * cbs + (cbi + 1) * size : u1;
        run_segment(k, ia, ia + (end - u), cbi * 16 * TILE_VECTORS, acc_buf);
        u = end;
    }
    free(acc_buf);
}

/* Items of one weight: tiles x column blocks. */
static int64_t item_count(const conv_ctx_t *k) {
    return (k->n + TILE_PIXELS - 1) / TILE_PIXELS * ((k->co16 + 16 * TILE_VECTORS - 1) / (16 * TILE_VECTORS));
}

/* Tiles [i0, i1) of one weight, every column block (routed_linear: a share of one expert's rows). */
static void run_tiles(const conv_ctx_t *k, int64_t i0, int64_t i1) {
    float *acc_buf = tile_scratch(k);
    for (int64_t g0 = i0; g0 < i1; g0 += TILE_GROUP) {
        const int64_t g1 = g0 + TILE_GROUP < i1 ? g0 + TILE_GROUP : i1;
        for (int64_t cb = 0; cb < k->co16; cb += 16 * TILE_VECTORS) run_segment(k, g0, g1, cb, acc_buf);
    }
    free(acc_buf);
}

/* routed_linear: one conv_ctx_t per expert (1x1 "conv" over its rows); tiles numbered globally, the
 * tiles of one expert consecutive. */
typedef struct {
    const conv_ctx_t *experts;
    const int64_t *tile_expert, *tile_local;
} routed_ctx_t;

static void routed_range(void *arg, int64_t i0, int64_t i1) {
    const routed_ctx_t *r = (const routed_ctx_t *)arg;
    for (int64_t i = i0; i < i1;) {
        int64_t j = i;
        while (j < i1 && r->tile_expert[j] == r->tile_expert[i]) j++;
        run_tiles(&r->experts[r->tile_expert[i]], r->tile_local[i], r->tile_local[i] + (j - i));
        i = j;
    }
}
#endif

/* 1 when this build has the fused kernel (compiled for a CPU with AVX-512), else 0. */
int has_sparse_conv(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
/* Receptive fields of the outputs that cross the image border, copied with their zero padding into
 * patches (C, kh, kw) per output, so they run through the same register tiles as the others. */
typedef struct {
    const float *x;
    const int64_t *border; /* flat output indices img*Ho*Wo + p */
    int64_t C, H, W, Wo, hwo, kh, kw, sh, sw, ph, pw, dh, dw;
    int64_t pix, cstride; /* element strides of a pixel and of a channel in x (NCHW: 1, H*W; NHWC: C, 1) */
    float *patches;
} patch_ctx_t;

/* The patch of border output i: C x kh x kw values, zero where a tap falls outside the image. */
static void copy_patch(const patch_ctx_t *q, int64_t i) {
    const int64_t T = q->kh * q->kw;
    const int64_t img = q->border[i] / q->hwo, p = q->border[i] % q->hwo;
    const int64_t iy0 = (p / q->Wo) * q->sh - q->ph, ix0 = (p % q->Wo) * q->sw - q->pw;
    const float *src = q->x + img * q->C * q->H * q->W;
    float *dst = q->patches + i * q->C * T;
    /* Taps kx in [lo, hi) fall inside the image's columns (the same for every row and channel). */
    int64_t lo = 0, hi = q->kw;
    while (lo < hi && ix0 + lo * q->dw < 0) lo++;
    while (hi > lo && ix0 + (hi - 1) * q->dw >= q->W) hi--;
    for (int64_t c = 0; c < q->C; c++, src += q->cstride)
        for (int64_t ky = 0; ky < q->kh; ky++, dst += q->kw) {
            const int64_t iy = iy0 + ky * q->dh;
            if (iy < 0 || iy >= q->H) {
                for (int64_t kx = 0; kx < q->kw; kx++) dst[kx] = 0.0f;
                continue;
            }
            const float *row = src + (iy * q->W + ix0) * q->pix;
            for (int64_t kx = 0; kx < lo; kx++) dst[kx] = 0.0f;
            for (int64_t kx = lo; kx < hi; kx++) dst[kx] = row[kx * q->dw * q->pix];
            for (int64_t kx = hi; kx < q->kw; kx++) dst[kx] = 0.0f;
        }
}

static void patch_range(void *arg, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) copy_patch((const patch_ctx_t *)arg, i);
}

typedef struct {
    float *out;
    int64_t plane;
} zero_ctx_t;

static void zero_range(void *arg, int64_t i0, int64_t i1) {
    const zero_ctx_t *z = (const zero_ctx_t *)arg;
    memset(z->out + i0 * z->plane, 0, sizeof(float) * (size_t)((i1 - i0) * z->plane));
}
#endif

/* A per-thread scratch buffer of at least `bytes`, kept between calls (grown, never shrunk): the patch
 * buffer is large enough that malloc would take it from fresh pages (page faults on every call) and
 * free would give them back. NULL when out of memory. */
static void *reuse_scratch(size_t bytes) {
    static __thread void *buf = NULL;
    static __thread size_t cap = 0;
    if (bytes > cap) {
        void *grown = malloc(bytes + bytes / 4);
        if (grown == NULL) return NULL;
        free(buf);
        buf = grown;
        cap = bytes + bytes / 4;
    }
    return buf;
}

#if defined(__AVX512F__)
/* Taps [lo, hi) of a kernel axis (k taps, dilation d) that fall inside [0, size) from input start i0. */
static void tap_range(int64_t i0, int64_t k, int64_t d, int64_t size, int64_t *lo, int64_t *hi) {
    int64_t a = 0, b = k;
    while (a < b && i0 + a * d < 0) a++;
    while (b > a && i0 + (b - 1) * d >= size) b--;
    *lo = a;
    *hi = b;
}

/* The valid taps [yl, yh) x [xl, xh) encoded in a window key ((yl (kh+1) + yh) (kw+1)^2 + xl (kw+1) + xh). */
static void tap_window(int64_t key, int64_t kh, int64_t kw, int64_t *yl, int64_t *yh, int64_t *xl, int64_t *xh) {
    *xh = key % (kw + 1);
    *xl = key / (kw + 1) % (kw + 1);
    *yh = key / ((kw + 1) * (kw + 1)) % (kh + 1);
    *yl = key / ((kw + 1) * (kw + 1) * (kh + 1));
}

/* The work items of several weight applications (contexts) as one range: items of context i are
 * [first[i], first[i + 1]). */
typedef struct {
    const conv_ctx_t *ctx;
    const int64_t *first;
    int64_t count;
} multi_ctx_t;

static void multi_range(void *arg, int64_t u0, int64_t u1) {
    const multi_ctx_t *m = (const multi_ctx_t *)arg;
    for (int64_t i = 0; i < m->count; i++) {
        const int64_t a = m->first[i] > u0 ? m->first[i] : u0, b = m->first[i + 1] < u1 ? m->first[i + 1] : u1;
        if (a < b) run_items(&m->ctx[i], a - m->first[i], b - m->first[i]);
    }
}
#endif

/* A border output's patch copy costs about this many times a weight value streamed by the tiles. */
#ifndef PATCH_COST
#define PATCH_COST 8
#endif

/* The conv of x (N, C, H, W) with the packed weight at the outputs where mask (N, Ho, Wo) is nonzero,
 * 0 elsewhere, into out (N, Co, Ho, Wo); x and out both NCHW, or both NHWC (channels_last) when nhwc.
 * With bs > 0 the mask is a block mask (N, ceil(Ho / bs), ceil(Wo / bs)): an output is active when its
 * bs x bs block is (block_conv2d, without expanding the mask to pixels first). With accumulate, out holds
 * a residual on entry: the conv is added to it at the active outputs and the rest is left as it is.
 * Outputs run in register tiles that read x in place. An output whose receptive field crosses the image
 * border (zero padding) has fewer valid taps; outputs are grouped by their valid tap window (the
 * interior, the top row, a corner, ...), and each group runs only its valid taps, again reading x in
 * place. A group of few outputs with a large weight instead copies its receptive fields into zero-padded
 * patches (C x kh x kw each; all such outputs share one pass over the weight): streaming a weight's tap
 * rows once per group would cost more than the copies. No padded copy of x and no list of active outputs
 * is made outside this call. Returns 1 when done, 0 without AVX-512 or memory. */
int sparse_conv_f32(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, const uint8_t *mask, int64_t Ho,
                    int64_t Wo, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                    int64_t dw, const float *wt, int64_t Co, int64_t co16, const float *bias, float *out,
                    int64_t nhwc, int64_t bs, int64_t accumulate, int threads) {
#if defined(__AVX512F__)
    const int64_t hwo = Ho * Wo, T = kh * kw, total = N * hwo;
    const int64_t mh = bs > 0 ? (Ho + bs - 1) / bs : Ho, mw = bs > 0 ? (Wo + bs - 1) / bs : Wo; /* mask shape */
    const int64_t pix = nhwc ? C : 1, cstride = nhwc ? 1 : H * W; /* strides in x */
    const int64_t ostride = nhwc ? 1 : hwo;                       /* output channel stride */
    const int64_t K = (kh + 1) * (kh + 1) * (kw + 1) * (kw + 1);  /* window keys */
    const int64_t full = (kh * (kw + 1)) * (kw + 1) + kw;         /* the key of all taps valid */
    /* Per output row / column: the valid taps [lo, hi) and the row's / column's part of the window key. */
    int64_t *scan = (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * (Ho + Wo) + Wo + 3 * K + 2));
    if (scan == NULL) return 0;
    int64_t *ylo = scan, *yhi = ylo + Ho, *ykey = yhi + Ho, *xlo = ykey + Ho, *xhi = xlo + Wo, *xkey = xhi + Wo;
    int64_t *mcol = xkey + Wo, *count = mcol + Wo, *start = count + K, *ctx_of = start + K + 1;
    for (int64_t oy = 0; oy < Ho; oy++) {
        tap_range(oy * sh - ph, kh, dh, H, &ylo[oy], &yhi[oy]);
        ykey[oy] = (ylo[oy] * (kh + 1) + yhi[oy]) * (kw + 1) * (kw + 1);
    }
    for (int64_t ox = 0; ox < Wo; ox++) {
        tap_range(ox * sw - pw, kw, dw, W, &xlo[ox], &xhi[ox]);
        xkey[ox] = xlo[ox] * (kw + 1) + xhi[ox];
        mcol[ox] = bs > 0 ? ox / bs : ox;
    }
#define MASK_ROW(img, oy) (mask + ((img) * mh + (bs > 0 ? (oy) / bs : (oy))) * mw)
    memset(count, 0, sizeof(int64_t) * (size_t)K);
    int64_t n = 0;
    for (int64_t img = 0; img < N; img++)
        for (int64_t oy = 0; oy < Ho; oy++) {
            const uint8_t *row = MASK_ROW(img, oy);
            for (int64_t ox = 0; ox < Wo; ox++)
                if (row[mcol[ox]]) count[ykey[oy] + xkey[ox]]++;
        }
    for (int64_t key = 0; key < K; key++) n += count[key];
    /* Route per key: a context of its own (ctx_of >= 0), or the patches (-1). With both interior and
     * border outputs, when the interior outputs are fewer than the output channels, every output takes
     * the patch route: copying their receptive fields (n x C x T floats) costs less than passes over the
     * weight (Co x C x T) per window. Outputs that read only zero padding (no valid tap) take patches
     * too, so a context's base always points at an input inside x. */
    const int all_patches = count[full] < n && count[full] < Co;
    int64_t nctx = 0, nb = 0, ntaps = 0;
    for (int64_t key = 0; key < K; key++) {
        ctx_of[key] = -1;
        if (count[key] == 0) continue;
        int64_t yl, yh, xl, xh;
        tap_window(key, kh, kw, &yl, &yh, &xl, &xh);
        const int64_t valid = (yh - yl) * (xh - xl);
        if (!all_patches && valid > 0 && (key == full || count[key] * T * PATCH_COST >= valid * Co)) {
            ctx_of[key] = nctx++;
            ntaps += valid;
        } else {
            nb += count[key];
        }
    }
    const int64_t m = n > 0 ? n : 1, nc = nctx + 1;
    /* base, dest: outputs of the contexts, grouped by key; border, pbase, pdest: the patch outputs. */
    int64_t *base = (int64_t *)malloc(sizeof(int64_t) * (size_t)(5 * m + 2 * (ntaps + T) + nc + 1));
    conv_ctx_t *ctx = (conv_ctx_t *)malloc(sizeof(conv_ctx_t) * (size_t)nc);
    float *patches = nb ? (float *)reuse_scratch((size_t)(nb * C * T) * sizeof(float)) : NULL;
    if (base == NULL || ctx == NULL || (nb && patches == NULL)) {
        free(scan);
        free(base);
        free(ctx);
        return 0;
    }
    int64_t *dest = base + m, *border = dest + m, *pbase = border + m, *pdest = pbase + m;
    int64_t *taps = pdest + m, *tw = taps + ntaps + T, *first = tw + ntaps + T;
    /* Each context's outputs start at start[key]; its taps are the valid window, relative to the window's
     * first valid input (inside the image, so base never points outside x). */
    int64_t at = 0, used = 0;
    for (int64_t key = 0; key < K; key++) {
        if (ctx_of[key] < 0) continue;
        int64_t yl, yh, xl, xh;
        tap_window(key, kh, kw, &yl, &yh, &xl, &xh);
        const conv_ctx_t k = {x, wt, bias, base + at, dest + at, taps + used, tw + used, count[key],
                              (yh - yl) * (xh - xl), C, T, cstride, Co, co16, ostride, out, accumulate};
        for (int64_t ky = yl; ky < yh; ky++)
            for (int64_t kx = xl; kx < xh; kx++, used++) {
                taps[used] = ((ky - yl) * dh * W + (kx - xl) * dw) * pix;
                tw[used] = ky * kw + kx;
            }
        ctx[ctx_of[key]] = k;
        start[key] = at;
        at += count[key];
    }
    for (int64_t t = 0; t < T; t++) taps[used + t] = tw[used + t] = t; /* patch layout (C, T) */
    for (int64_t img = 0, j = 0; img < N; img++)
        for (int64_t oy = 0; oy < Ho; oy++) {
            const uint8_t *row = MASK_ROW(img, oy);
            for (int64_t ox = 0; ox < Wo; ox++) {
                if (!row[mcol[ox]]) continue;
                const int64_t key = ykey[oy] + xkey[ox], p = oy * Wo + ox;
                const int64_t o = nhwc ? (img * hwo + p) * Co : img * Co * hwo + p;
                if (ctx_of[key] >= 0) {
                    const int64_t i = start[key]++;
                    base[i] = img * C * H * W + ((oy * sh - ph + ylo[oy] * dh) * W + ox * sw - pw + xlo[ox] * dw) * pix;
                    dest[i] = o;
                } else {
                    pbase[j] = j * C * T;
                    pdest[j] = o;
                    border[j++] = img * hwo + p;
                }
            }
        }
#undef MASK_ROW
    if (nb) {
        const conv_ctx_t kb = {patches, wt, bias, pbase, pdest, taps + used, tw + used, nb, T, C, T, T, Co, co16,
                               ostride, out, accumulate};
        ctx[nctx] = kb;
    }
    const int64_t count_ctx = nctx + (nb ? 1 : 0);
    first[0] = 0;
    for (int64_t i = 0; i < count_ctx; i++) first[i + 1] = first[i] + item_count(&ctx[i]);
    zero_ctx_t z = {out, hwo};
    if (!accumulate) parallel_range(zero_range, &z, N * Co, total * Co < (1 << 16) ? 1 : threads);
    if (nb) {
        patch_ctx_t q = {x, border, C, H, W, Wo, hwo, kh, kw, sh, sw, ph, pw, dh, dw, pix, cstride, patches};
        parallel_range(patch_range, &q, nb, nb * C * T < (1 << 12) ? 1 : threads);
    }
    multi_ctx_t mc = {ctx, first, count_ctx};
    parallel_range(multi_range, &mc, first[count_ctx], threads);
    free(scan);
    free(base);
    free(ctx);
    return 1;
#else
    (void)x; (void)N; (void)C; (void)H; (void)W; (void)mask; (void)Ho; (void)Wo; (void)kh; (void)kw; (void)sh;
    (void)sw; (void)ph; (void)pw; (void)dh; (void)dw; (void)wt; (void)Co; (void)co16; (void)bias; (void)out;
    (void)nhwc; (void)bs; (void)accumulate; (void)threads;
    return 0;
#endif
}

/* out[t] = x[t] @ W[route[t]] (+ bias[route[t]]): x (T, Cin) rows, wt (E, Cin, co16) the weights
 * transposed with Cout padded to co16, bias (E, co16) or NULL, out (T, Cout). Rows are grouped by
 * expert with a counting sort (no data moves), each expert's rows run through its register tiles and
 * land directly in their output rows. Returns 1 when done, 0 without AVX-512 or memory, -1 when a
 * route value is outside [0, E) (nothing written). */
int routed_linear_f32(const float *x, int64_t T, int64_t Cin, const int64_t *route, int64_t E, const float *wt,
                      const float *bias, int64_t Co, int64_t co16, float *out, int threads) {
#if defined(__AVX512F__)
    for (int64_t t = 0; t < T; t++)
        if (route[t] < 0 || route[t] >= E) return -1;
    int64_t *offsets = (int64_t *)calloc((size_t)(E + 1), sizeof(int64_t));
    int64_t *base = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * T + 1));
    conv_ctx_t *experts = (conv_ctx_t *)malloc(sizeof(conv_ctx_t) * (size_t)E);
    int64_t *tiles = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * (T + E) + 2));
    static const int64_t tap0 = 0;
    int done = 0;
    if (offsets && base && experts && tiles) {
        int64_t *dest = base + T, *fill = tiles; /* fill: per-expert write cursor, reused below */
        for (int64_t t = 0; t < T; t++) offsets[route[t] + 1]++;
        for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
        for (int64_t e = 0; e < E; e++) fill[e] = offsets[e];
        for (int64_t t = 0; t < T; t++) {
            const int64_t j = fill[route[t]]++;
            base[j] = t * Cin;
            dest[j] = t * Co;
        }
        int64_t *tile_expert = tiles, *tile_local = tiles + T + E + 1, nt = 0;
        for (int64_t e = 0; e < E; e++) {
            const int64_t n = offsets[e + 1] - offsets[e];
            const conv_ctx_t k = {x, wt + e * Cin * co16, bias ? bias + e * co16 : NULL, base + offsets[e],
                                  dest + offsets[e], &tap0, &tap0, n, 1, Cin, 1, 1, Co, co16, 1, out, 0};
            experts[e] = k;
            for (int64_t i = 0; i * TILE_PIXELS < n; i++, nt++) {
                tile_expert[nt] = e;
                tile_local[nt] = i;
            }
        }
        routed_ctx_t r = {experts, tile_expert, tile_local};
        parallel_range(routed_range, &r, nt, threads);
        done = 1;
    }
    free(offsets);
    free(base);
    free(experts);
    free(tiles);
    return done;
#else
    (void)x; (void)T; (void)Cin; (void)route; (void)E; (void)wt; (void)bias; (void)Co; (void)co16; (void)out;
    (void)threads;
    return 0;
#endif
}
