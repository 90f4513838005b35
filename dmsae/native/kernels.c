/* C kernels of the CPU training step (dmsae/native/__init__.py builds and loads them). All but the two bfloat16 ones
   do no float arithmetic, or torch's own in torch's order, so they move no bit: each returns exactly what its
   pure-torch reference returns. dmsae_bag_dots_bf16 and dmsae_latent_grads_bf16, for the bf16 step only, sum in an
   order of their own.

   dmsae_above_f32: the candidate search of BatchTopK in one read: the indices of the float32 entries above a
   threshold, in order, the same as (x > thr).nonzero() in torch, and their values (what x[idx] would gather again
   from all over the pre-activations). torch's version writes a [B, width] mask and scans
   it again; this reads the pre-activations once and writes only the few indices.
   dmsae_above_i16: the same search for 16-bit floats (bfloat16, float16) above a positive threshold, on their bit
   patterns read as signed integers: above zero they order as the floats do, a negative float reads negative, and
   the patterns past +inf (the positive NaNs, which compare false) are excluded by an upper bound.
   dmsae_transpose_f32: dst = src.T for a contiguous [rows, cols] float32 matrix, in cache-sized tiles (torch's
   strided copy read one element per cache line of the source).
   dmsae_sorted_entries, dmsae_by_latent: the step's entries sorted by (bag, latent), and grouped by latent for the
   weight gradients, by stable counting sorts (a stable sort's permutation is unique: torch.sort's).
   dmsae_kth_smallest_f32, dmsae_top_f32: BatchTopK's sampled threshold and its exact top-k over the candidates by
   a selection on the floats' bit patterns read as ordered integers (no float arithmetic). The value is the one
   torch.kthvalue gives and the set the one torch.topk gives; when entries tied with the k-th would have to be
   split (which of them torch keeps depends on its algorithm), the top-k declines (-3) or, asked to, keeps the first
   of them (the bf16 step's rule: 16-bit pre-activations tie often).
   dmsae_latent_grads_f32: the float32 step's decoder, encoder and encoder-bias gradients from the entries grouped by
   latent in one pass, each sum the fused multiply-adds in entry order that torch's embedding_bag kernel (fbgemm)
   runs, the encoder's written transposed; only where the build has vector FMA (AVX2 or AVX-512). It can
   also take each entry's value gradient in the same pass, the dot in MKL's order (which the caller checks first).
   dmsae_group_bag_sums: the nested reconstructions' residuals from the entries in bags by (group, token), each
   group's weighted sums (the same fused multiply-adds) added to the group before it in one pass; in the same pass,
   the losses (each group's dot with itself in MKL's order, checked first) and the suffix sums.
   dmsae_suffix_sums_f32: the gradient at each Matryoshka group's output, the residuals' sums from each group to the
   last, in place (torch's adds in torch's order), and for the bf16 step their bfloat16 copy in the same pass.
   dmsae_bag_dots_bf16: the bf16 step's gradient of each entry's value, a dot product of two bfloat16 rows summed in
   float32 (by the CPU's bfloat16 dot instruction where it has one): torch's own 16-bit kernel rounds its output to
   16 bits and ran slower than its float32 one here.
   dmsae_project_rows_f32: the decoder gradient's projection (each row's component along its unit-norm weight row
   removed) in one pass over the rows, its row sums in the order of torch's sum kernel, which the caller checks
   against torch at each shape before it uses the kernel (torch's order is its build's, not a documented one). */
#include <stdint.h>
#include <pthread.h>
#include <stdlib.h>
#include <math.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(_OPENMP)
/* Runs fn on each of n parts (elements of `size` bytes from `parts`) on the OpenMP threads torch's operators use
   (the build links the libgomp torch loaded): threads of our own competed with that team's workers, which spin on
   their cores for milliseconds after each operator, and on two cores a part then waited for a time slice (the
   transpose took 4.5 ms in the step against 0.9 ms alone). */
static void run_parallel(void *(*fn)(void *), void *parts, size_t size, int n) {
#pragma omp parallel for num_threads(n) schedule(static, 1)
    for (int t = 0; t < n; ++t) fn((char *)parts + (size_t)t * size);
}
#else
/* Runs fn on each of n parts (elements of `size` bytes from `parts`): parts 1.. on threads of their own, part 0 on
   the caller's, and any part whose thread could not start on the caller's too: every part always runs once. */
static void run_parallel(void *(*fn)(void *), void *parts, size_t size, int n) {
    pthread_t tid[64];
    int started[64] = {0};
    for (int t = 1; t < n; ++t) started[t] = pthread_create(&tid[t], 0, fn, (char *)parts + (size_t)t * size) == 0;
    fn(parts);
    for (int t = 1; t < n; ++t) {
        if (started[t])
            pthread_join(tid[t], 0);
        else
            fn((char *)parts + (size_t)t * size);
    }
}
#endif

/* Range t of a search over n entries split into `parts`: whole 64-entry blocks, so each range but the last runs the
   vector loop. */
static void search_range(int64_t n, int parts, int t, int64_t *lo, int64_t *hi) {
    *lo = n * t / parts / 64 * 64;
    *hi = t + 1 == parts ? n : n * (t + 1) / parts / 64 * 64;
}

/* a kernel's thread count: at least 1, at most the 64 parts its arrays hold */
static int clamp_parts(int parts) {
    return parts < 1 ? 1 : parts > 64 ? 64 : parts;
}

/* Writes the indices i in [lo, hi) with x[i] > thr to out and x[i] to vals (at most cap of them); returns how many,
   or -1 when they do not fit. NaN compares false, as in torch. */
static int64_t scan(const float *x, int64_t lo, int64_t hi, float thr, int64_t *out, float *vals, int64_t cap) {
    int64_t n = 0, i = lo;
#if defined(__AVX512F__)
    /* 64 entries a block, their flags straight from the compares' mask registers (the same indices): on a Xeon
       with AVX-512, one thread searched 16.7M entries in 4.2 ms where the AVX2 loop's two took 6.3 */
    const __m512 t = _mm512_set1_ps(thr);
    for (; i + 64 <= hi; i += 64) {
        uint64_t mask = (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), t, _CMP_GT_OQ)
            | (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 16), t, _CMP_GT_OQ) << 16
            | (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 32), t, _CMP_GT_OQ) << 32
            | (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 48), t, _CMP_GT_OQ) << 48;
        if (!mask) continue;
        if (n + __builtin_popcountll(mask) > cap) return -1;
        while (mask) {
            int64_t at = i + __builtin_ctzll(mask);
            out[n] = at;
            vals[n++] = x[at];
            mask &= mask - 1;
        }
    }
#elif defined(__AVX2__)
    const __m256 t = _mm256_set1_ps(thr);
    for (; i + 32 <= hi; i += 32) {
        uint32_t mask = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), t, _CMP_GT_OQ))
            | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), t, _CMP_GT_OQ)) << 8
            | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i + 16), t, _CMP_GT_OQ)) << 16
            | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i + 24), t, _CMP_GT_OQ)) << 24;
        if (!mask) continue;
        if (n + __builtin_popcount(mask) > cap) return -1;
        while (mask) {
            int64_t at = i + __builtin_ctz(mask);
            out[n] = at;
            vals[n++] = x[at];
            mask &= mask - 1;
        }
    }
#endif
    for (; i < hi; ++i)
        if (x[i] > thr) {
            if (n >= cap) return -1;
            out[n] = i;
            vals[n++] = x[i];
        }
    return n;
}

typedef struct {
    const float *x;
    int64_t lo, hi, cap, count;
    float thr;
    int64_t *out;
    float *vals;
} part_t;

static void *run_part(void *arg) {
    part_t *p = (part_t *)arg;
    p->count = scan(p->x, p->lo, p->hi, p->thr, p->out, p->vals, p->cap);
    return 0;
}

/* Splits x[0, n) into `parts` ranges (at most 64), one thread each; range t writes its indices at out + t * cap,
   their values at vals + t * cap and its count to counts[t] (-1: more than cap). The caller joins the ranges in
   order. Returns 0. */
int dmsae_above_f32(const float *x, int64_t n, float thr, int64_t *out, float *vals, int64_t cap, int parts,
                    int64_t *counts) {
    part_t p[64];
    parts = clamp_parts(parts);
    for (int t = 0; t < parts; ++t) {
        p[t].x = x;
        search_range(n, parts, t, &p[t].lo, &p[t].hi);
        p[t].thr = thr;
        p[t].out = out + (int64_t)t * cap;
        p[t].vals = vals + (int64_t)t * cap;
        p[t].cap = cap;
    }
    run_parallel(run_part, p, sizeof p[0], parts);
    for (int t = 0; t < parts; ++t) counts[t] = p[t].count;
    return 0;
}

/* Writes the indices i in [lo, hi) with above < x[i] <= top to out and x[i] to vals (at most cap of them); returns
   how many, or -1 when they do not fit. */
static int64_t scan_i16(const int16_t *x, int64_t lo, int64_t hi, int16_t above, int16_t top, int64_t *out,
                        int16_t *vals, int64_t cap) {
    int64_t n = 0, i = lo;
#if defined(__AVX512BW__)
    /* 64 entries a block, one flag bit each from the mask registers (the AVX2 loop below has two per entry) */
    const __m512i a = _mm512_set1_epi16(above), b = _mm512_set1_epi16(top);
    for (; i + 64 <= hi; i += 64) {
        __m512i v0 = _mm512_loadu_si512((const void *)(x + i)), v1 = _mm512_loadu_si512((const void *)(x + i + 32));
        uint64_t m0 = (uint32_t)(_mm512_cmpgt_epi16_mask(v0, a) & ~_mm512_cmpgt_epi16_mask(v0, b));
        uint64_t m1 = (uint32_t)(_mm512_cmpgt_epi16_mask(v1, a) & ~_mm512_cmpgt_epi16_mask(v1, b));
        uint64_t mask = m0 | m1 << 32;
        if (!mask) continue;
        if (n + __builtin_popcountll(mask) > cap) return -1;
        while (mask) {
            int64_t at = i + __builtin_ctzll(mask);
            out[n] = at;
            vals[n++] = x[at];
            mask &= mask - 1;
        }
    }
#elif defined(__AVX2__)
    const __m256i a = _mm256_set1_epi16(above), b = _mm256_set1_epi16(top);
    for (; i + 32 <= hi; i += 32) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(x + i)), v1 = _mm256_loadu_si256((const __m256i *)(x + i + 16));
        /* two flag bytes per entry: x > above and not x > top */
        uint32_t m0 = (uint32_t)_mm256_movemask_epi8(_mm256_andnot_si256(_mm256_cmpgt_epi16(v0, b),
                                                                          _mm256_cmpgt_epi16(v0, a)));
        uint32_t m1 = (uint32_t)_mm256_movemask_epi8(_mm256_andnot_si256(_mm256_cmpgt_epi16(v1, b),
                                                                          _mm256_cmpgt_epi16(v1, a)));
        if (!(m0 | m1)) continue;
        if (n + (__builtin_popcount(m0) + __builtin_popcount(m1)) / 2 > cap) return -1;
        for (int half = 0; half < 2; ++half) {
            uint32_t mask = half ? m1 : m0;
            int64_t base = i + 16 * half;
            while (mask) {
                int64_t at = base + (__builtin_ctz(mask) >> 1);
                out[n] = at;
                vals[n++] = x[at];
                mask &= mask - 1; /* an entry's two flag bits */
                mask &= mask - 1;
            }
        }
    }
#endif
    for (; i < hi; ++i)
        if (x[i] > above && x[i] <= top) {
            if (n >= cap) return -1;
            out[n] = i;
            vals[n++] = x[i];
        }
    return n;
}

typedef struct {
    const int16_t *x;
    int64_t lo, hi, cap, count;
    int16_t above, top;
    int64_t *out;
    int16_t *vals;
} part16_t;

static void *run_part16(void *arg) {
    part16_t *p = (part16_t *)arg;
    p->count = scan_i16(p->x, p->lo, p->hi, p->above, p->top, p->out, p->vals, p->cap);
    return 0;
}

/* dmsae_above_f32's layout for 16-bit entries: the indices i with above < x[i] <= top (signed), their entries. */
int dmsae_above_i16(const int16_t *x, int64_t n, int above, int top, int64_t *out, int16_t *vals, int64_t cap,
                    int parts, int64_t *counts) {
    part16_t p[64];
    parts = clamp_parts(parts);
    for (int t = 0; t < parts; ++t) {
        p[t].x = x;
        search_range(n, parts, t, &p[t].lo, &p[t].hi);
        p[t].above = (int16_t)above;
        p[t].top = (int16_t)top;
        p[t].out = out + (int64_t)t * cap;
        p[t].vals = vals + (int64_t)t * cap;
        p[t].cap = cap;
    }
    run_parallel(run_part16, p, sizeof p[0], parts);
    for (int t = 0; t < parts; ++t) counts[t] = p[t].count;
    return 0;
}

typedef struct {
    const float *src;
    float *dst;
    int64_t rows, cols, lo, hi;
} tpart_t;

enum { TILE = 64 };

/* dst rows [lo, hi) (the source's columns) of dst = src.T, a TILE x TILE tile at a time */
static void *transpose_part(void *arg) {
    tpart_t *p = (tpart_t *)arg;
    for (int64_t j0 = p->lo; j0 < p->hi; j0 += TILE) {
        int64_t j1 = j0 + TILE < p->hi ? j0 + TILE : p->hi;
        for (int64_t i0 = 0; i0 < p->rows; i0 += TILE) {
            int64_t i1 = i0 + TILE < p->rows ? i0 + TILE : p->rows;
            for (int64_t j = j0; j < j1; ++j)
                for (int64_t i = i0; i < i1; ++i) p->dst[j * p->rows + i] = p->src[i * p->cols + j];
        }
    }
    return 0;
}

/* dst [cols, rows] = src [rows, cols].T, split over `parts` threads (at most 64). Returns 0. */
int dmsae_transpose_f32(const float *src, int64_t rows, int64_t cols, float *dst, int parts) {
    tpart_t p[64];
    parts = clamp_parts(parts);
    for (int t = 0; t < parts; ++t) {
        p[t].src = src;
        p[t].dst = dst;
        p[t].rows = rows;
        p[t].cols = cols;
        p[t].lo = cols * t / parts / TILE * TILE;
        p[t].hi = t + 1 == parts ? cols : cols * (t + 1) / parts / TILE * TILE;
    }
    run_parallel(transpose_part, p, sizeof p[0], parts);
    return 0;
}

/* order_out = the items of order_in (0, 1, ..., n - 1 when it is NULL) stably sorted by keys[item], each key in
   [0, n_keys) (checked by the caller); counts[n_keys] = how many of each key. Returns 0, -2 on no memory. */
static int counting_sort(const int64_t *keys, const int64_t *order_in, int64_t n, int64_t n_keys, int64_t *counts,
                         int64_t *order_out) {
    int64_t *next = (int64_t *)malloc((size_t)(n_keys > 0 ? n_keys : 1) * sizeof(int64_t));
    if (!next) return -2;
    for (int64_t k = 0; k < n_keys; ++k) counts[k] = 0;
    for (int64_t i = 0; i < n; ++i) ++counts[keys[i]];
    for (int64_t k = 0, at = 0; k < n_keys; ++k) {
        next[k] = at;
        at += counts[k];
    }
    for (int64_t j = 0; j < n; ++j) {
        int64_t i = order_in ? order_in[j] : j;
        order_out[next[keys[i]]++] = i;
    }
    free(next);
    return 0;
}

/* A float32's bit pattern as an unsigned key in the float order, -0 and +0 one key (NaN is the caller's concern). */
static inline uint32_t order_key(uint32_t bits) {
    if (bits == 0x80000000u) bits = 0;
    return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

static inline uint32_t bits_of(const float *x) {
    union { float f; uint32_t u; } v;
    v.f = *x;
    return v.u;
}

/* The k-th largest key (1 <= k <= n) of x[0], x[stride], ..., x[(n - 1) * stride], with how many keys are greater
   and how many equal. The keys are copied once (with their range); each round counts them in at most 65536
   buckets of equal width over that range and keeps only the bucket holding the k-th: a round narrows the range by
   2^16, so two rounds at most. Returns 0, -1 on a NaN, -2 on a bad k or no memory. */
static int kth_largest_key(const float *x, int64_t n, int64_t stride, int64_t k, uint32_t *key, int64_t *greater,
                           int64_t *equal) {
    enum { BUCKETS = 1 << 16 };
    if (k < 1 || k > n) return -2;
    uint32_t *keys = (uint32_t *)malloc((size_t)n * sizeof(uint32_t));
    uint32_t *hist = (uint32_t *)malloc(BUCKETS * sizeof(uint32_t));
    if (!keys || !hist) {
        free(keys);
        free(hist);
        return -2;
    }
    uint32_t lo = UINT32_MAX, hi = 0;
    int nan = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits = bits_of(x + i * stride), kk = order_key(bits);
        nan |= (bits & 0x7fffffffu) > 0x7f800000u;
        keys[i] = kk;
        lo = kk < lo ? kk : lo;
        hi = kk > hi ? kk : hi;
    }
    int64_t above = 0; /* keys greater than every key still in keys[0, n) */
    int rc = nan ? -1 : 0;
    while (rc == 0) {
        int shift = 0;
        while (((hi - lo) >> shift) >= BUCKETS) ++shift;
        uint32_t top = (hi - lo) >> shift;
        for (uint32_t b = 0; b <= top; ++b) hist[b] = 0;
        for (int64_t i = 0; i < n; ++i) ++hist[(keys[i] - lo) >> shift];
        uint32_t b = top;
        while (hist[b] < k) k -= hist[b], above += hist[b--]; /* stops: the buckets hold at least k keys */
        if (shift == 0) {
            *key = lo + b;
            *greater = above;
            *equal = hist[b];
            break;
        }
        int64_t m = 0; /* keep bucket b's keys, and their range */
        uint32_t nlo = UINT32_MAX, nhi = 0;
        for (int64_t i = 0; i < n; ++i)
            if ((keys[i] - lo) >> shift == b) {
                uint32_t kk = keys[i];
                keys[m++] = kk;
                nlo = kk < nlo ? kk : nlo;
                nhi = kk > nhi ? kk : nhi;
            }
        n = m;
        lo = nlo;
        hi = nhi;
    }
    free(keys);
    free(hist);
    return rc;
}

static float from_key(uint32_t key) {
    union { float f; uint32_t u; } v;
    v.u = (key & 0x80000000u) ? key & 0x7fffffffu : ~key;
    return v.f;
}

/* *value = the k-th smallest (1 <= k <= n) of x[0], x[stride], ..., x[(n - 1) * stride], as torch.kthvalue (a zero
   comes back as +0). Returns 0, -1 when there is a NaN (torch orders it above every number), -2 on a bad k. */
int dmsae_kth_smallest_f32(const float *x, int64_t n, int64_t stride, int64_t k, float *value) {
    uint32_t key;
    int64_t greater, equal;
    int rc = kth_largest_key(x, n, stride, n - k + 1, &key, &greater, &equal);
    if (rc == 0) *value = from_key(key);
    return rc;
}

/* The k largest of x[0, n), as torch.topk's set: their idx[i] to out_idx and values to out_vals, in the order of x.
   Keys equal to the k-th's may be more than the places left for them: then with first_ties the first of them in the
   order of x take those places (a rule of this function, not torch's), and without it the call declines (-3: which
   of them torch keeps depends on its algorithm). Returns 0; -1 on a NaN, -2 on a bad k, -3 as said. */
int dmsae_top_f32(const float *x, const int64_t *idx, int64_t n, int64_t k, int first_ties, int64_t *out_idx,
                  float *out_vals) {
    uint32_t key;
    int64_t greater, equal, j = 0;
    int rc = kth_largest_key(x, n, 1, k, &key, &greater, &equal);
    if (rc != 0) return rc;
    if (greater + equal != k && !first_ties) return -3;
    int64_t ties = k - greater; /* the places for keys equal to the k-th's */
    for (int64_t i = 0; i < n; ++i) {
        uint32_t kk = order_key(bits_of(x + i));
        if (kk > key || (kk == key && ties-- > 0)) {
            out_idx[j] = idx[i];
            out_vals[j++] = x[i];
        }
    }
    return 0;
}

/* f / m for 0 <= f < 2^52 and m > 0 without the CPU's slow integer division: a float64 quotient, corrected by one */
static inline int64_t quotient(int64_t f, int64_t m, double inv_m) {
    int64_t q = (int64_t)((double)f * inv_m);
    if (q * m > f) return q - 1;
    return (q + 1) * m <= f ? q + 1 : q;
}

/* the Matryoshka group of latent c: how many of the n_ends (ascending) group ends are <= c, counted without a
   branch to mispredict */
static inline int64_t group_of(int64_t c, const int64_t *ends, int n_ends) {
    int64_t g = 0;
    for (int e = 0; e < n_ends; ++e) g += ends[e] <= c;
    return g;
}

/* The training step's entries sorted by (bag, latent), from their flat indices token * m + latent into the
   [B, m] non-core pre-activations: rows (token), cols (latent), bag = group * B + token where the group counts the
   n_ends Matryoshka group ends <= latent (torch.bucketize(..., right=True)), and their values, each gathered in that
   order: the one order of the unique keys bag * m + latent. When the flat indices come ascending (the step's
   selection gives them so) that order is the input's, split stably by group: one pass with a counter per group.
   Else two stable counting sorts, by latent then by bag. Returns 0, -1 on an index outside [0, B * m), -2 on no
   memory. */
int dmsae_sorted_entries(const int64_t *flat, const float *vals, int64_t n, int64_t m, int64_t B, const int64_t *ends,
                         int n_ends, int64_t *rows, int64_t *cols, int64_t *bag, float *out_vals) {
    if (B * m >= ((int64_t)1 << 52)) return -1;
    int64_t *at = (int64_t *)calloc((size_t)n_ends + 1, sizeof(int64_t));
    if (!at) return -2;
    int rc = 0, ascending = 1;
    double inv_m = 1.0 / (double)m;
    for (int64_t i = 0, prev = -1; i < n; ++i) { /* checks the indices, counts each group's entries */
        int64_t f = flat[i];
        if (f < 0 || f >= B * m) {
            rc = -1;
            break;
        }
        ascending &= f > prev;
        prev = f;
        ++at[group_of(f - quotient(f, m, inv_m) * m, ends, n_ends)];
    }
    if (rc == 0 && ascending) {
        for (int64_t g = 0, total = 0; g <= n_ends; ++g) {
            int64_t count = at[g];
            at[g] = total;
            total += count;
        }
        for (int64_t i = 0; i < n; ++i) {
            int64_t f = flat[i], r = quotient(f, m, inv_m), c = f - r * m, g = group_of(c, ends, n_ends);
            int64_t j = at[g]++;
            rows[j] = r;
            cols[j] = c;
            bag[j] = g * B + r;
            out_vals[j] = vals[i];
        }
    } else if (rc == 0) {
        int64_t n_bags = (int64_t)(n_ends + 1) * B, size = n > 0 ? n : 1;
        int64_t *col = (int64_t *)malloc((size_t)size * sizeof(int64_t));
        int64_t *bg = (int64_t *)malloc((size_t)size * sizeof(int64_t));
        int64_t *by_col = (int64_t *)malloc((size_t)size * sizeof(int64_t));
        int64_t *order = (int64_t *)malloc((size_t)size * sizeof(int64_t));
        int64_t *counts = (int64_t *)malloc((size_t)(n_bags > m ? n_bags : m) * sizeof(int64_t));
        rc = (col && bg && by_col && order && counts) ? 0 : -2;
        for (int64_t i = 0; rc == 0 && i < n; ++i) {
            int64_t f = flat[i], r = quotient(f, m, inv_m), c = f - r * m, g = group_of(c, ends, n_ends);
            col[i] = c;
            bg[i] = g * B + r;
        }
        if (rc == 0) rc = counting_sort(col, 0, n, m, counts, by_col);
        if (rc == 0) rc = counting_sort(bg, by_col, n, n_bags, counts, order);
        for (int64_t j = 0; rc == 0 && j < n; ++j) {
            int64_t i = order[j];
            rows[j] = bg[i] % B;
            cols[j] = col[i];
            bag[j] = bg[i];
            out_vals[j] = vals[i];
        }
        free(col);
        free(bg);
        free(by_col);
        free(order);
        free(counts);
    }
    free(at);
    return rc;
}

/* The entries grouped by latent for the weight gradients: counts[m] = how many entries each latent has, and bag,
   rows, w_dec and w_enc gathered in the stable order of cols (torch.sort(cols, stable=True)). Returns 0, -1 on a
   latent outside [0, m), -2 on no memory. */
int dmsae_by_latent(const int64_t *cols, int64_t n, int64_t m, const int64_t *bag, const int64_t *rows,
                    const float *w_dec, const float *w_enc, int64_t *counts, int64_t *out_bag, int64_t *out_rows,
                    float *out_w_dec, float *out_w_enc) {
    int64_t *next = (int64_t *)malloc((size_t)(m > 0 ? m : 1) * sizeof(int64_t));
    if (!next) return -2;
    for (int64_t k = 0; k < m; ++k) counts[k] = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (cols[i] < 0 || cols[i] >= m) {
            free(next);
            return -1;
        }
        ++counts[cols[i]];
    }
    for (int64_t k = 0, at = 0; k < m; ++k) {
        next[k] = at;
        at += counts[k];
    }
    for (int64_t i = 0; i < n; ++i) { /* a stable counting sort, each entry moved once */
        int64_t j = next[cols[i]]++;
        out_bag[j] = bag[i];
        out_rows[j] = rows[i];
        out_w_dec[j] = w_dec[i];
        out_w_enc[j] = w_enc[i];
    }
    free(next);
    return 0;
}

#if defined(__AVX512F__)
typedef __m512 vec_t;
#define LANES 16
#define VZERO() _mm512_setzero_ps()
#define VSET1(v) _mm512_set1_ps(v)
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec_t;
#define LANES 8
#define VZERO() _mm256_setzero_ps()
#define VSET1(v) _mm256_set1_ps(v)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#endif

/* float32 -> bfloat16 as torch casts: round to nearest even on the bit pattern, every NaN to 0xffff */
static inline uint16_t to_bf16(float f) {
    uint32_t u = bits_of(&f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_value(uint16_t h) {
    union { float f; uint32_t u; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

#if defined(LANES)
enum { ROW_BLOCK = 12, LATENT_BLOCK = 16 };
#define INLINE static inline __attribute__((always_inline))

/* LANES floats of src from element `at`: float32, or (half) bfloat16 widened exactly */
INLINE vec_t load_at(const void *src, int64_t at, int half) {
#if defined(__AVX512F__)
    if (half)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + at))), 16));
#else
    if (half)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + at))), 16));
#endif
    return VLOAD((const float *)src + at);
}

INLINE float value_at(const void *src, int64_t at, int half) {
    return half ? bf16_value(((const uint16_t *)src)[at]) : ((const float *)src)[at];
}

/* out[0, d) = the sum over entries e in [lo, hi) of w[e] * src[idx[e]] (rows of d float32, or bfloat16 where `half`),
   each column from +0 by one fused multiply-add per entry in entry order: embedding_bag's float32 weighted sum as
   torch's kernel (fbgemm) runs it, the same bits. ROW_BLOCK vectors of the row stay in registers while the entries
   stream past (576 columns: three blocks of 192). Callers pass `half` as a constant: one copy of each. */
INLINE void weighted_row_sum(const void *src, int half, const int64_t *idx, const float *w, int64_t lo, int64_t hi,
                             int64_t d, float *out) {
    int64_t j0 = 0;
    for (; j0 + ROW_BLOCK * LANES <= d; j0 += ROW_BLOCK * LANES) {
        vec_t acc[ROW_BLOCK];
        for (int i = 0; i < ROW_BLOCK; ++i) acc[i] = VZERO();
        for (int64_t e = lo; e < hi; ++e) {
            const int64_t row = idx[e] * d + j0;
            vec_t we = VSET1(w[e]);
            for (int i = 0; i < ROW_BLOCK; ++i) acc[i] = VFMA(we, load_at(src, row + i * LANES, half), acc[i]);
        }
        for (int i = 0; i < ROW_BLOCK; ++i) VSTORE(out + j0 + i * LANES, acc[i]);
    }
    for (; j0 + LANES <= d; j0 += LANES) {
        vec_t acc = VZERO();
        for (int64_t e = lo; e < hi; ++e) acc = VFMA(VSET1(w[e]), load_at(src, idx[e] * d + j0, half), acc);
        VSTORE(out + j0, acc);
    }
    for (; j0 < d; ++j0) {
        float acc = 0;
        for (int64_t e = lo; e < hi; ++e) acc = fmaf(w[e], value_at(src, idx[e] * d + j0, half), acc);
        out[j0] = acc;
    }
}

/* n_block <= LATENT_BLOCK rows of d floats (row stride ld) written as columns of dst, a [d, m] matrix: a block of 16
   in 64-byte pieces */
static void write_columns(const float *block, int64_t ld, int64_t n_block, int64_t d, int64_t m, float *dst) {
    for (int64_t j = 0; j < d; ++j, dst += m) {
#if defined(__AVX512F__)
        if (n_block == 16) {
            const __m512i at = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)ld));
            _mm512_storeu_ps(dst, _mm512_i32gather_ps(at, block + j, 4));
            continue;
        }
#endif
        for (int64_t c = 0; c < n_block; ++c) dst[c] = block[c * ld + j];
    }
}

/* For the weight-gradient kernels: -1 where an entry's bag or row is outside [0, n_table) or [0, n_x); else 0, with
   *parts clamped and bounds[0, *parts] the latents where each part starts (about offsets[m] / parts entries a part,
   whole latent blocks), the last m */
static int latent_parts(const int64_t *offsets, int64_t m, const int64_t *bag, int64_t n_table, const int64_t *rows,
                        int64_t n_x, int *parts, int64_t *bounds) {
    const int64_t n = offsets[m];
    for (int64_t e = 0; e < n; ++e)
        if (bag[e] < 0 || bag[e] >= n_table || rows[e] < 0 || rows[e] >= n_x) return -1;
    *parts = clamp_parts(*parts);
    bounds[0] = 0;
    for (int t = 0; t < *parts; ++t) {
        int64_t end = m;
        if (t + 1 < *parts) {
            const int64_t target = n * (t + 1) / *parts;
            end = bounds[t];
            while (end < m && offsets[end] < target) end += LATENT_BLOCK;
            end = end < m ? end : m;
        }
        bounds[t + 1] = end;
    }
    return 0;
}

typedef struct {
    const float *table, *x, *w_dec, *w_enc, *dec;
    const int64_t *offsets, *bag, *rows;
    float *dec_grad, *enc_grad, *b_grad, *g;
    int64_t d, m, lo, hi;
    int dot_lanes, failed;
} gpart_t;

#if defined(LANES)
/* The dot product of a[0, d) and b[0, d) in the order MKL's sdot runs it (and so torch's float32 dot and
   embedding_bag's value gradient): four accumulators of `lanes` floats, each a fused multiply-add per 4 * lanes
   columns (d a multiple of that), summed as (0 + 1) + (2 + 3), then the lanes folded: with AVX-512 (16 lanes) at
   distances 8, 4, 1, 2, with AVX2 (8 lanes) at 1, 4, 2. MKL documents no order: the caller checks the one it asks
   for against torch before it relies on it. */
#if defined(__AVX512F__)
INLINE float mkl_fold16(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    float v[16], w[8], x[4];
    _mm512_storeu_ps(v, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (int i = 0; i < 8; ++i) w[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; ++i) x[i] = w[i] + w[i + 4];
    return (x[0] + x[1]) + (x[2] + x[3]);
}
#endif

INLINE float mkl_fold8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    float v[8];
    _mm256_storeu_ps(v, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return ((v[0] + v[1]) + (v[4] + v[5])) + ((v[2] + v[3]) + (v[6] + v[7]));
}

/* acc [4 * lanes] (four accumulators) += the products of a[0, d) and b[0, d) in MKL's steps (see mkl_order_dot), or,
   where fold is set, the accumulators' folded sum returned afterwards */
INLINE float mkl_order_sum(float *acc, const float *a, const float *b, int64_t d, int lanes, int fold) {
#if defined(__AVX512F__)
    if (lanes == 16) {
        __m512 r0 = _mm512_loadu_ps(acc), r1 = _mm512_loadu_ps(acc + 16), r2 = _mm512_loadu_ps(acc + 32),
               r3 = _mm512_loadu_ps(acc + 48);
        for (int64_t j = 0; j < d; j += 64) {
            r0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), r0);
            r1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), _mm512_loadu_ps(b + j + 16), r1);
            r2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 32), _mm512_loadu_ps(b + j + 32), r2);
            r3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 48), _mm512_loadu_ps(b + j + 48), r3);
        }
        if (fold) return mkl_fold16(r0, r1, r2, r3);
        _mm512_storeu_ps(acc, r0), _mm512_storeu_ps(acc + 16, r1), _mm512_storeu_ps(acc + 32, r2);
        _mm512_storeu_ps(acc + 48, r3);
        return 0;
    }
#endif
    __m256 r0 = _mm256_loadu_ps(acc), r1 = _mm256_loadu_ps(acc + 8), r2 = _mm256_loadu_ps(acc + 16),
           r3 = _mm256_loadu_ps(acc + 24);
    for (int64_t j = 0; j < d; j += 32) {
        r0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), r0);
        r1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), r1);
        r2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(b + j + 16), r2);
        r3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(b + j + 24), r3);
    }
    if (fold) return mkl_fold8(r0, r1, r2, r3);
    _mm256_storeu_ps(acc, r0), _mm256_storeu_ps(acc + 8, r1), _mm256_storeu_ps(acc + 16, r2);
    _mm256_storeu_ps(acc + 24, r3);
    return 0;
}

INLINE float mkl_order_dot(const float *a, const float *b, int64_t d, int lanes) {
    float acc[64] = {0};
    return mkl_order_sum(acc, a, b, d, lanes, 1);
}
#endif

/* latents [lo, hi) of dmsae_latent_grads_f32, LATENT_BLOCK at a time: their encoder rows are summed into a small
   buffer and written as columns of the [d, m] gradient, a block's 64 bytes to each of its rows */
static void *grads_part(void *arg) {
    gpart_t *p = (gpart_t *)arg;
    const int64_t d = p->d, m = p->m, ld = (d + 15) / 16 * 16;
    float *block = (float *)malloc((size_t)LATENT_BLOCK * ld * sizeof(float));
    if (!block) {
        p->failed = 1;
        return 0;
    }
    for (int64_t c0 = p->lo; c0 < p->hi; c0 += LATENT_BLOCK) {
        int64_t n_block = p->hi - c0 < LATENT_BLOCK ? p->hi - c0 : LATENT_BLOCK;
        for (int64_t c = c0; c < c0 + n_block; ++c) {
            int64_t lo = p->offsets[c], hi = p->offsets[c + 1];
            const float *w_enc = p->w_enc;
            if (p->dec) { /* the value gradients first: the rows they read stay in cache for the decoder's sum */
                for (int64_t e = lo; e < hi; ++e)
                    p->g[e] = mkl_order_dot(p->table + p->bag[e] * d, p->dec + c * d, d, p->dot_lanes) * p->w_enc[e];
                w_enc = p->g;
            }
            weighted_row_sum(p->table, 0, p->bag, p->w_dec, lo, hi, d, p->dec_grad + c * d);
            weighted_row_sum(p->x, 0, p->rows, w_enc, lo, hi, d, block + (c - c0) * ld);
            float sum = 0; /* index_add_'s sum: in entry order from +0 */
            for (int64_t e = lo; e < hi; ++e) sum += w_enc[e];
            p->b_grad[c] = sum;
        }
        write_columns(block, ld, n_block, d, m, p->enc_grad + c0);
    }
    free(block);
    return 0;
}

typedef struct {
    const void *weight; /* float32, or bfloat16 where half */
    const float *vals;
    const int64_t *cols, *starts;
    float *out, *squares, *dots;
    uint16_t *low;
    int64_t n, n_groups, batch, d, suffix_groups, lo, hi;
    int half, dot_lanes, failed;
} bpart_t;

/* the sum of the squares of x[0, d), in float32: LANES sums, then theirs in a fixed order */
static float sum_of_squares(const float *x, int64_t d) {
    vec_t acc = VZERO();
    int64_t j = 0;
    for (; j + LANES <= d; j += LANES) acc = VFMA(VLOAD(x + j), VLOAD(x + j), acc);
    float lanes[LANES], total = 0;
    VSTORE(lanes, acc);
    for (int l = 0; l < LANES; ++l) total += lanes[l];
    for (; j < d; ++j) total = fmaf(x[j], x[j], total);
    return total;
}

/* tokens [lo, hi) of dmsae_group_bag_sums_f32: each group's bag summed into a row in L1, then added to the row
   before it */
static void *bag_sums_part(void *arg) {
    bpart_t *p = (bpart_t *)arg;
    const int64_t d = p->d, n_bags = p->n_groups * p->batch;
    float *sum = (float *)malloc((size_t)(d > 0 ? d : 1) * sizeof(float));
    /* float32 tail: each group's four running accumulators of MKL's dot over this part's rows (64 floats a group) */
    float *acc = p->dots ? (float *)calloc((size_t)p->n_groups * 64, sizeof(float)) : 0;
    if (!sum || (p->dots && !acc)) {
        free(sum), free(acc);
        p->failed = 1;
        return 0;
    }
    for (int64_t t = p->lo; t < p->hi; ++t) {
        for (int64_t g = 0; g < p->n_groups; ++g) {
            const int64_t b = g * p->batch + t, lo = p->starts[b], hi = b + 1 < n_bags ? p->starts[b + 1] : p->n;
            if (p->half)
                weighted_row_sum(p->weight, 1, p->cols, p->vals, lo, hi, d, sum);
            else
                weighted_row_sum(p->weight, 0, p->cols, p->vals, lo, hi, d, sum);
            const float *before = p->out + ((g > 0 ? g - 1 : 0) * p->batch + t) * d;
            float *row = p->out + b * d;
            for (int64_t j = 0; j < d; ++j) row[j] = sum[j] + before[j];
        }
        if (!p->low && !p->dots) continue;
        /* the token's rows are still in cache: their squares (bf16: each row's sum; float32: added to the group's
           accumulators in MKL's order, the rows coming in the order of the group's flattened residuals), then the
           first suffix_groups rows' suffix sums (row g += row g + 1, from the last but one down) and, for bf16,
           every row's 16-bit copy */
        for (int64_t g = 0; g < p->n_groups; ++g) {
            const float *row = p->out + (g * p->batch + t) * d;
            if (p->dots)
                mkl_order_sum(acc + g * 64, row, row, d, p->dot_lanes, 0);
            else
                p->squares[g * p->batch + t] = sum_of_squares(row, d);
        }
        for (int64_t g = p->suffix_groups - 2; g >= 0; --g) {
            float *row = p->out + (g * p->batch + t) * d;
            const float *next = row + p->batch * d;
            for (int64_t j = 0; j < d; ++j) row[j] += next[j];
        }
        for (int64_t g = 0; p->low && g < p->n_groups; ++g) {
            const float *row = p->out + (g * p->batch + t) * d;
            uint16_t *copy = p->low + (g * p->batch + t) * d;
            for (int64_t j = 0; j < d; ++j) copy[j] = to_bf16(row[j]);
        }
    }
    for (int64_t g = 0; p->dots && g < p->n_groups; ++g) /* the part's dot of each group: its accumulators folded */
        p->dots[g] = mkl_order_sum(acc + g * 64, sum, sum, 0, p->dot_lanes, 1);
    free(sum), free(acc);
    return 0;
}
#endif

/* The step's nested reconstructions from its entries, sorted into bags by (group, token) (bag g * batch + t holds
   entries [starts[b], starts[b + 1]), the last ending at n): out [n_groups, batch, d] row (g, t) = the bag's sum of
   vals[e] * weight[cols[e]] (embedding_bag's float32 weighted sum, fused multiply-adds in entry order) plus row
   (g - 1, t), or, for g = 0, plus the row (0, t) the caller wrote there: torch's per-group embedding_bag and adds, the
   same bits, without writing each group's sums and reading them again. With `half`, weight's rows are bfloat16 (the
   bf16 step's copy: half the bytes to gather), each widened exactly, the sums the same float32 ones. Where low is not
   NULL, while each token's rows are in cache: squares [n_groups, batch] = each row's sum of squares (float32, in this
   function's order), then rows (g, t) for g < suffix_groups replaced by their suffix sums (dmsae_suffix_sums_f32's
   adds) and low [n_groups, batch, d] = every row cast to bfloat16 as torch casts: the bf16 step's losses and
   gradient rows without two more passes over out. Where dots is not NULL instead (float32), the same suffix sums
   and dots [n_groups] = each group's residuals' dot with themselves before them, as torch's float32 dot of the
   flattened [batch * d] group computes it with MKL: each part's sum in MKL's order (dot_lanes 16 or 8, as
   mkl_order_dot; d a multiple of 4 * dot_lanes), the parts' sums added in order, which is MKL's when it splits the
   dot between as many threads at the same places (the caller checks that first). Split over `parts` threads by
   token. Returns 0, -1 on a latent outside [0, m), -2 on no memory, -3 where the build has no vector FMA (or, with
   dots and dot_lanes 16, no AVX-512), -4 with dots and another dot_lanes or a d that is not such a multiple. */
int dmsae_group_bag_sums(const void *weight, int half, int64_t m, const int64_t *cols, const float *vals,
                         const int64_t *starts, int64_t n, int64_t n_groups, int64_t batch, int64_t d, float *out,
                         int64_t suffix_groups, uint16_t *low, float *squares, float *dots, int dot_lanes,
                         int parts) {
#if defined(LANES)
#if !defined(__AVX512F__)
    if (dots && dot_lanes == 16) return -3;
#endif
    if (dots && ((dot_lanes != 8 && dot_lanes != 16) || d % (4 * dot_lanes))) return -4;
    for (int64_t e = 0; e < n; ++e)
        if (cols[e] < 0 || cols[e] >= m) return -1;
    bpart_t p[64];
    parts = clamp_parts(parts);
    float *part_dots = dots ? (float *)malloc((size_t)parts * (size_t)n_groups * sizeof(float)) : 0;
    if (dots && !part_dots) return -2;
    for (int t = 0; t < parts; ++t)
        p[t] = (bpart_t){weight, vals, cols, starts, out, squares, dots ? part_dots + t * n_groups : 0, low, n,
                         n_groups, batch, d, suffix_groups, batch * t / parts, batch * (t + 1) / parts, half,
                         dot_lanes, 0};
    run_parallel(bag_sums_part, p, sizeof p[0], parts);
    int failed = 0;
    for (int t = 0; t < parts; ++t) failed |= p[t].failed;
    for (int64_t g = 0; dots && !failed && g < n_groups; ++g) {
        dots[g] = part_dots[g];
        for (int t = 1; t < parts; ++t) dots[g] += part_dots[t * n_groups + g];
    }
    free(part_dots);
    return failed ? -2 : 0;
#else
    (void)weight, (void)half, (void)m, (void)cols, (void)vals, (void)starts, (void)n, (void)n_groups, (void)batch;
    (void)d, (void)out, (void)suffix_groups, (void)low, (void)squares, (void)dots, (void)dot_lanes, (void)parts;
    return -3;
#endif
}

/* The weight gradients of the step's active entries, grouped by latent (offsets [m + 1]: latent c's entries are
   [offsets[c], offsets[c + 1])): dec_grad [m, d] row c = sum of w_dec[e] * table[bag[e]], enc_grad [d, m] column c =
   sum of w_enc[e] * x[rows[e]], b_grad [m] entry c = sum of w_enc[e]. The same bits as torch's embedding_bag (fused
   multiply-adds in entry order), the encoder's written transposed and index_add_ for the bias: one call where
   torch wrote the encoder's [m, d] sums and read them again to transpose them. Where dec [m, d] (the decoder) is not
   NULL, w_enc is a gate and each entry's value gradient is taken in the same pass, from the table row its decoder
   sum reads anyway: g[e] = (table[bag[e]] . dec[c]) * w_enc[e] (the dot in MKL's order, see mkl_order_dot), and g
   stands in w_enc's place above (dot_lanes 16: MKL's AVX-512 order, d a multiple of 64; 8: its AVX2 order, d a
   multiple of 32). Split over `parts` threads by entry count. Returns 0, -1 on an index outside [0, n_table) or
   [0, n_x), -2 on no memory, -3 where the build has no fused multiply-add in vectors (AVX2 or AVX-512; with dec and
   dot_lanes 16, AVX-512), -4 with dec and another dot_lanes or a d that is not such a multiple (the caller then runs
   torch's). */
int dmsae_latent_grads_f32(const float *table, int64_t n_table, const float *x, int64_t n_x, const int64_t *offsets,
                           const int64_t *bag, const int64_t *rows, const float *w_dec, const float *w_enc,
                           const float *dec, float *g, int dot_lanes, int64_t d, int64_t m, float *dec_grad,
                           float *enc_grad, float *b_grad, int parts) {
#if defined(LANES)
#if !defined(__AVX512F__)
    if (dec && dot_lanes == 16) return -3;
#endif
    if (dec && ((dot_lanes != 8 && dot_lanes != 16) || d % (4 * dot_lanes))) return -4;
    int64_t bounds[65];
    if (latent_parts(offsets, m, bag, n_table, rows, n_x, &parts, bounds)) return -1;
    gpart_t p[64];
    for (int t = 0; t < parts; ++t)
        p[t] = (gpart_t){table, x, w_dec, w_enc, dec, offsets, bag, rows, dec_grad, enc_grad, b_grad, g, d, m,
                         bounds[t], bounds[t + 1], dot_lanes, 0};
    run_parallel(grads_part, p, sizeof p[0], parts);
    for (int t = 0; t < parts; ++t)
        if (p[t].failed) return -2;
    return 0;
#else
    (void)table, (void)n_table, (void)x, (void)n_x, (void)offsets, (void)bag, (void)rows, (void)w_dec, (void)w_enc;
    (void)dec, (void)g, (void)dot_lanes, (void)d, (void)m, (void)dec_grad, (void)enc_grad, (void)b_grad, (void)parts;
    return -3;
#endif
}

typedef struct {
    float *x;
    uint16_t *low;
    int64_t groups, low_groups, n, lo, hi;
} spart_t;

enum { CHUNK = 1024 };

/* columns [lo, hi) of the suffix sums, CHUNK at a time so the running sum stays in L1 */
static void *suffix_part(void *arg) {
    spart_t *p = (spart_t *)arg;
    float acc[CHUNK];
    for (int64_t j0 = p->lo; j0 < p->hi; j0 += CHUNK) {
        int64_t w = p->hi - j0 < CHUNK ? p->hi - j0 : CHUNK;
        for (int64_t g = p->groups - 1; g >= 0; --g) {
            float *row = p->x + g * p->n + j0;
            if (g == p->groups - 1)
                for (int64_t j = 0; j < w; ++j) acc[j] = row[j];
            else
                for (int64_t j = 0; j < w; ++j) row[j] = acc[j] = row[j] + acc[j];
            if (p->low) {
                uint16_t *out = p->low + g * p->n + j0;
                for (int64_t j = 0; j < w; ++j) out[j] = to_bf16(acc[j]);
            }
        }
        for (int64_t g = p->groups; p->low && g < p->low_groups; ++g) {
            const float *row = p->x + g * p->n + j0;
            uint16_t *out = p->low + g * p->n + j0;
            for (int64_t j = 0; j < w; ++j) out[j] = to_bf16(row[j]);
        }
    }
    return 0;
}

/* x [low_groups, n] float32: rows [0, groups) replaced by their suffix sums (row g += row g + 1, from the last but
   one down: torch's in-place adds in the same order, the same bits), and, where low is not NULL, low [low_groups, n]
   = x (after the sums) cast to bfloat16 as torch casts, in the same pass. Split over `parts` threads. Returns 0. */
int dmsae_suffix_sums_f32(float *x, int64_t groups, int64_t low_groups, int64_t n, uint16_t *low, int parts) {
    spart_t p[64];
    parts = clamp_parts(parts);
    for (int t = 0; t < parts; ++t) {
        p[t].x = x;
        p[t].low = low;
        p[t].groups = groups;
        p[t].low_groups = low_groups;
        p[t].n = n;
        search_range(n, parts, t, &p[t].lo, &p[t].hi);
    }
    run_parallel(suffix_part, p, sizeof p[0], parts);
    return 0;
}

typedef struct {
    const uint16_t *table, *weight;
    const int64_t *idx, *bag;
    int64_t d, lo, hi;
    float *out;
} dpart_t;

/* entries [lo, hi) of dmsae_bag_dots_bf16 */
static void *dots_part(void *arg) {
    dpart_t *p = (dpart_t *)arg;
    const int64_t d = p->d;
    for (int64_t i = p->lo; i < p->hi; ++i) {
        const uint16_t *a = p->table + p->bag[i] * d, *b = p->weight + p->idx[i] * d;
#if defined(__AVX512BF16__)
        /* pairs of products summed into float32 lanes by the CPU's bfloat16 dot instruction, two chains of them */
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 64 <= d; j += 64) {
            s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(a + j), (__m512bh)_mm512_loadu_si512(b + j));
            s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(a + j + 32),
                                  (__m512bh)_mm512_loadu_si512(b + j + 32));
        }
        for (; j < d; j += 32) {
            __mmask32 k = d - j >= 32 ? 0xffffffffu : (__mmask32)((1u << (d - j)) - 1);
            s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_maskz_loadu_epi16(k, a + j),
                                  (__m512bh)_mm512_maskz_loadu_epi16(k, b + j));
        }
        p->out[i] = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
        float s[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= d; j += 16)
            for (int l = 0; l < 16; ++l) s[l] += bf16_value(a[j + l]) * bf16_value(b[j + l]);
        for (int l = 0; j + l < d; ++l) s[l] += bf16_value(a[j + l]) * bf16_value(b[j + l]);
        float total = 0;
        for (int l = 0; l < 16; ++l) total += s[l];
        p->out[i] = total;
#endif
    }
    return 0;
}

/* out[i] = the dot product of table row bag[i] and weight row idx[i] (d bfloat16 columns each), products and sums in
   float32, for i in [0, n): the gradient of each entry's value in embedding_bag (its per-sample-weight gradient),
   from 16-bit copies. Float arithmetic in an order of this function's, so not torch's bits. Split over `parts`
   threads. Returns 0, -1 on an index outside [0, n_table) or [0, n_weight). */
int dmsae_bag_dots_bf16(const uint16_t *table, int64_t n_table, const uint16_t *weight, int64_t n_weight,
                        const int64_t *idx, const int64_t *bag, int64_t n, int64_t d, float *out, int parts) {
    for (int64_t i = 0; i < n; ++i)
        if (bag[i] < 0 || bag[i] >= n_table || idx[i] < 0 || idx[i] >= n_weight) return -1;
    dpart_t p[64];
    parts = clamp_parts(parts);
    for (int t = 0; t < parts; ++t) {
        p[t].table = table;
        p[t].weight = weight;
        p[t].idx = idx;
        p[t].bag = bag;
        p[t].d = d;
        p[t].out = out;
        p[t].lo = n * t / parts;
        p[t].hi = n * (t + 1) / parts;
    }
    run_parallel(dots_part, p, sizeof p[0], parts);
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* The bf16 step's weight gradients in one pass by latent. Its rows are bfloat16 (32 columns a 64-byte chunk): a chunk
   read as 16 float32 pairs gives the even columns shifted up by 16 bits and the odd ones masked, two exact widenings
   without a shuffle; the accumulators hold even and odd columns apart and are interleaved once when stored. */
enum { CHUNKS = 6 }; /* a block of 6 chunks: 192 columns in 12 accumulators */

typedef struct {
    const uint16_t *table, *x, *dec;
    const float *w_dec, *gate;
    const int64_t *offsets, *bag, *rows;
    float *dec_grad, *enc_grad, *b_grad;
    int64_t d, ld_x, m, lo, hi;
    int failed;
} hpart_t;

INLINE __m512 even_columns(__m512i r) { return _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)); }
INLINE __m512 odd_columns(__m512i r) {
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

/* the first `width` (<= 32) columns of the chunk whose even and odd columns are `even` and `odd`, in order, to out */
INLINE void store_chunk(float *out, __m512 even, __m512 odd, int64_t width) {
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512 a = _mm512_permutex2var_ps(even, first, odd), b = _mm512_permutex2var_ps(even, second, odd);
    if (width >= 32) {
        _mm512_storeu_ps(out, a);
        _mm512_storeu_ps(out + 16, b);
        return;
    }
    _mm512_mask_storeu_ps(out, (__mmask16)(width >= 16 ? 0xffffu : (1u << width) - 1), a);
    if (width > 16) _mm512_mask_storeu_ps(out + 16, (__mmask16)((1u << (width - 16)) - 1), b);
}

INLINE __mmask32 chunk_mask(int64_t width) { return width >= 32 ? 0xffffffffu : (__mmask32)((1u << width) - 1); }

/* columns [j0, j0 + 32 * nch) of latent c's decoder gradient row (the last chunk cut at d), the sum over its entries
   e in [lo, hi) of w_dec[e] * table[bag[e]], and each entry's dot product of its table row with the latent's decoder
   row over those columns added into dots[e - lo] (set where `first`). nch is a constant at each call. */
INLINE void decoder_block(const hpart_t *p, int64_t c, int64_t lo, int64_t hi, int64_t j0, const int nch, __m512 *dots,
                          int first) {
    const int64_t d = p->d;
    const __mmask32 last = chunk_mask(d - j0 - 32 * (nch - 1));
    __m512 even[CHUNKS], odd[CHUNKS];
    __m512i w[CHUNKS];
    for (int i = 0; i < nch; ++i) {
        even[i] = odd[i] = _mm512_setzero_ps();
        w[i] = _mm512_maskz_loadu_epi16(i == nch - 1 ? last : 0xffffffffu, p->dec + c * d + j0 + 32 * i);
    }
    for (int64_t e = lo; e < hi; ++e) {
        const uint16_t *row = p->table + p->bag[e] * d + j0;
        const __m512 we = _mm512_set1_ps(p->w_dec[e]);
        __m512 dot = _mm512_setzero_ps();
        for (int i = 0; i < nch; ++i) {
            const __m512i r = _mm512_maskz_loadu_epi16(i == nch - 1 ? last : 0xffffffffu, row + 32 * i);
            even[i] = _mm512_fmadd_ps(we, even_columns(r), even[i]);
            odd[i] = _mm512_fmadd_ps(we, odd_columns(r), odd[i]);
            dot = _mm512_dpbf16_ps(dot, (__m512bh)r, (__m512bh)w[i]);
        }
        dots[e - lo] = first ? dot : _mm512_add_ps(dots[e - lo], dot);
    }
    for (int i = 0; i < nch; ++i) store_chunk(p->dec_grad + c * d + j0 + 32 * i, even[i], odd[i], d - j0 - 32 * i);
}

/* columns [j0, j0 + 32 * nch) of the sum over entries e in [lo, hi) of g[e - lo] * x[rows[e]], into out */
INLINE void encoder_block(const hpart_t *p, int64_t lo, int64_t hi, int64_t j0, const int nch, const float *g,
                          float *out) {
    const __mmask32 last = chunk_mask(p->d - j0 - 32 * (nch - 1));
    __m512 even[CHUNKS], odd[CHUNKS];
    for (int i = 0; i < nch; ++i) even[i] = odd[i] = _mm512_setzero_ps();
    for (int64_t e = lo; e < hi; ++e) {
        const uint16_t *row = p->x + p->rows[e] * p->ld_x + j0;
        const __m512 we = _mm512_set1_ps(g[e - lo]);
        for (int i = 0; i < nch; ++i) {
            const __m512i r = _mm512_maskz_loadu_epi16(i == nch - 1 ? last : 0xffffffffu, row + 32 * i);
            even[i] = _mm512_fmadd_ps(we, even_columns(r), even[i]);
            odd[i] = _mm512_fmadd_ps(we, odd_columns(r), odd[i]);
        }
    }
    for (int i = 0; i < nch; ++i) store_chunk(out + j0 + 32 * i, even[i], odd[i], p->d - j0 - 32 * i);
}

/* latents [lo, hi) of dmsae_latent_grads_bf16, LATENT_BLOCK at a time (as grads_part) */
static void *half_grads_part(void *arg) {
    hpart_t *p = (hpart_t *)arg;
    const int64_t d = p->d, ld = (d + 15) / 16 * 16;
    int64_t most = 1;
    for (int64_t c = p->lo; c < p->hi; ++c)
        most = p->offsets[c + 1] - p->offsets[c] > most ? p->offsets[c + 1] - p->offsets[c] : most;
    float *block = (float *)malloc((size_t)LATENT_BLOCK * ld * sizeof(float));
    __m512 *dots = (__m512 *)aligned_alloc(64, (size_t)most * sizeof(__m512));
    float *g = (float *)malloc((size_t)most * sizeof(float));
    if (!block || !dots || !g) {
        free(block), free(dots), free(g);
        p->failed = 1;
        return 0;
    }
    for (int64_t c0 = p->lo; c0 < p->hi; c0 += LATENT_BLOCK) {
        const int64_t n_block = p->hi - c0 < LATENT_BLOCK ? p->hi - c0 : LATENT_BLOCK;
        for (int64_t c = c0; c < c0 + n_block; ++c) {
            const int64_t lo = p->offsets[c], hi = p->offsets[c + 1];
            int64_t j0 = 0;
            for (; j0 + 32 * CHUNKS <= d; j0 += 32 * CHUNKS) decoder_block(p, c, lo, hi, j0, CHUNKS, dots, j0 == 0);
            for (; j0 < d; j0 += 32) decoder_block(p, c, lo, hi, j0, 1, dots, j0 == 0);
            float sum = 0; /* the bias's gradient: the entries' value gradients in entry order from +0 */
            for (int64_t e = lo; e < hi; ++e) sum += g[e - lo] = _mm512_reduce_add_ps(dots[e - lo]) * p->gate[e];
            p->b_grad[c] = sum;
            float *out = block + (c - c0) * ld;
            for (j0 = 0; j0 + 32 * CHUNKS <= d; j0 += 32 * CHUNKS) encoder_block(p, lo, hi, j0, CHUNKS, g, out);
            for (; j0 < d; j0 += 32) encoder_block(p, lo, hi, j0, 1, g, out);
        }
        write_columns(block, ld, n_block, d, p->m, p->enc_grad + c0);
    }
    free(block), free(dots), free(g);
    return 0;
}
#endif

/* The bf16 step's weight gradients from its entries grouped by latent (offsets [m + 1] as for dmsae_latent_grads_f32),
   from bfloat16 rows: table [n_table, d] (the gradient at each bag's output), x [n_x, d] with row stride ld_x (the
   centred inputs) and dec [m, d] (the decoder). Each entry's value gradient is the dot product of its table row and
   its latent's decoder row times gate[e] (the loss scale, zero where BatchTopK clamped the value): it is taken here,
   in the same pass that reads the table row for the decoder gradient, not in a pass of its own. dec_grad [m, d] row c
   = sum of w_dec[e] * table[bag[e]], enc_grad [d, m] column c = sum of g[e] * x[rows[e]], b_grad [m] entry c = sum of
   g[e]: float32 products (bfloat16 widens exactly) and float32 sums in an order of this function's (the dot products
   by the CPU's bfloat16 dot instruction), so not torch's bits. Returns 0, -1 on an index out of range, -2 on no memory,
   -3 where the build has no AVX-512 bfloat16 dot instruction (the caller then runs its other path). */
int dmsae_latent_grads_bf16(const uint16_t *table, int64_t n_table, const uint16_t *x, int64_t n_x, int64_t ld_x,
                            const uint16_t *dec, const int64_t *offsets, const int64_t *bag, const int64_t *rows,
                            const float *w_dec, const float *gate, int64_t d, int64_t m, float *dec_grad,
                            float *enc_grad, float *b_grad, int parts) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    int64_t bounds[65];
    if (latent_parts(offsets, m, bag, n_table, rows, n_x, &parts, bounds)) return -1;
    hpart_t p[64];
    for (int t = 0; t < parts; ++t)
        p[t] = (hpart_t){table, x, dec, w_dec, gate, offsets, bag, rows, dec_grad, enc_grad, b_grad, d, ld_x, m,
                         bounds[t], bounds[t + 1], 0};
    run_parallel(half_grads_part, p, sizeof p[0], parts);
    for (int t = 0; t < parts; ++t)
        if (p[t].failed) return -2;
    return 0;
#else
    (void)table, (void)n_table, (void)x, (void)n_x, (void)ld_x, (void)dec, (void)offsets, (void)bag, (void)rows;
    (void)w_dec, (void)gate, (void)d, (void)m, (void)dec_grad, (void)enc_grad, (void)b_grad, (void)parts;
    return -3;
#endif
}

/* The training statistics of a step's entries (latent cols[e], value vals[e]), e in [0, n): fired[c] = 1 where latent
   c has an entry above zero, else 0; smallest[c] = the least of those values, +inf where none (scatter_reduce's
   "amin" over them: a minimum, whatever the order). Returns 0, -1 on a latent outside [0, m). */
int dmsae_fired_minimum(const int64_t *cols, const float *vals, int64_t n, int64_t m, float *smallest, uint8_t *fired) {
    for (int64_t e = 0; e < n; ++e)
        if (cols[e] < 0 || cols[e] >= m) return -1;
    for (int64_t c = 0; c < m; ++c) smallest[c] = INFINITY, fired[c] = 0;
    for (int64_t e = 0; e < n; ++e) {
        const float v = vals[e];
        if (v > 0) {
            fired[cols[e]] = 1;
            if (v < smallest[cols[e]]) smallest[cols[e]] = v;
        }
    }
    return 0;
}

/* The sum of p[0, n) in the order of torch's float32 sum over a contiguous last dimension (SumKernel.cpp's
   vectorized_inner_sum, with vectors of `lanes` floats): the row read as vectors, vector i * 4 + k summed into
   accumulator k in a cascade of four levels (a level passes its sum up after every 2^level_power vectors), the
   vectors past the last whole four into accumulator 0, the four accumulators added in order, then the scalar tail
   and the lanes in order onto zero. The caller checks the result against torch's before it relies on the order. */
static inline __attribute__((always_inline)) float torch_row_sum(const float *p, int64_t n, int lanes) {
    float acc[4][4][16] = {{{0}}}, part[4][16];
    const int64_t n_vec = n / lanes, size = n_vec / 4;
    int64_t power = 1, i = 0;
    if (size > 2)
        while (((int64_t)1 << power) < size) ++power; /* ceil(log2(size)) */
    power = power / 4 > 4 ? power / 4 : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; ++j, ++i)
            for (int k = 0; k < 4; ++k)
                for (int l = 0; l < lanes; ++l) acc[0][k][l] += p[(i * 4 + k) * lanes + l];
        for (int level = 1; level < 4; ++level) {
            for (int k = 0; k < 4; ++k)
                for (int l = 0; l < lanes; ++l) acc[level][k][l] += acc[level - 1][k][l], acc[level - 1][k][l] = 0;
            if (i & (mask << (level * power))) break;
        }
    }
    for (; i < size; ++i)
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < lanes; ++l) acc[0][k][l] += p[(i * 4 + k) * lanes + l];
    for (int k = 0; k < 4; ++k)
        for (int l = 0; l < lanes; ++l) {
            float s = acc[0][k][l];
            for (int level = 1; level < 4; ++level) s += acc[level][k][l];
            part[k][l] = s;
        }
    for (int64_t v = size * 4; v < n_vec; ++v)
        for (int l = 0; l < lanes; ++l) part[0][l] += p[v * lanes + l];
    for (int k = 1; k < 4; ++k)
        for (int l = 0; l < lanes; ++l) part[0][l] += part[k][l];
    float total = 0;
    for (int64_t j = n_vec * lanes; j < n; ++j) total += p[j];
    for (int l = 0; l < lanes; ++l) total += part[0][l];
    return total;
}

typedef struct {
    float *grad;
    const float *weight;
    int64_t d, lo, hi;
    int lanes, failed;
} ppart_t;

static void *project_part(void *arg) {
    ppart_t *p = (ppart_t *)arg;
    float *prod = (float *)malloc((size_t)(p->d > 0 ? p->d : 1) * sizeof(float));
    if (!prod) {
        p->failed = 1;
        return 0;
    }
    for (int64_t r = p->lo; r < p->hi; ++r) {
        float *g = p->grad + r * p->d;
        const float *w = p->weight + r * p->d;
        for (int64_t j = 0; j < p->d; ++j) prod[j] = g[j] * w[j];
        /* lanes as a constant in each call: the compiler then runs each lane loop as one vector */
        const float coef = p->lanes == 8 ? torch_row_sum(prod, p->d, 8) : torch_row_sum(prod, p->d, 16);
        for (int64_t j = 0; j < p->d; ++j) g[j] -= coef * w[j]; /* the product rounded, then the difference */
    }
    free(prod);
    return 0;
}

/* The decoder's gradient with each row's component along its (unit-norm) weight row removed, in place: grad row r -=
   (sum of grad[r] * weight[r]) * weight[r], over rows [0, rows) of width d. The same float32 operations as torch's
   mul, sum(dim=1) (in torch's order for vectors of `lanes` floats, 8 or 16), mul and sub, in one pass over the rows
   where torch took four. Split over `parts` threads by row. Returns 0, -1 on lanes other than 8 or 16, -2 on no
   memory. */
int dmsae_project_rows_f32(float *grad, const float *weight, int64_t rows, int64_t d, int lanes, int parts) {
    if (lanes != 8 && lanes != 16) return -1;
    ppart_t p[64];
    parts = clamp_parts(parts);
    for (int t = 0; t < parts; ++t)
        p[t] = (ppart_t){grad, weight, d, rows * t / parts, rows * (t + 1) / parts, lanes, 0};
    run_parallel(project_part, p, sizeof p[0], parts);
    for (int t = 0; t < parts; ++t)
        if (p[t].failed) return -2;
    return 0;
}
