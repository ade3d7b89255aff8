/* The llama forward pass of M token rows in C, each row at its own position in its own KV
 * cache: prefilling a stream is a chunk of rows at consecutive positions of one cache,
 * a batched decode step one row per stream, and a mixed step both (the decode rows of
 * the streams running and a chunk of a newcomer's prompt). model.py's numpy passes are
 * the reference.
 *
 * Exactness is a property of this code, not of a BLAS build: every row's arithmetic is
 * the same whatever M is, whatever the other rows are, wherever the row sits in a tile
 * and whatever thread computes it. So prefilling everything, restoring a prefix and
 * prefilling the rest, prefilling a prefix then decoding token by token, and decoding
 * alone or batched with other streams all give the same bits.
 * - A matrix product's output is one chain of fused multiply-adds over its inputs in
 *   order, starting from zero: weights are stored in panels of 16 outputs, input by
 *   input, so one vector load gives 16 outputs' weights for one input, multiplied by
 *   that input of a token row (one broadcast) and added to 16 outputs' accumulators. No
 *   horizontal sums: the order is the same at any vector width (AVX-512: one vector a
 *   panel, AVX2: two, NEON: four). Tiles of several token rows x several panels only
 *   change how many such chains are in flight (prefill is compute-bound: each weight load
 *   feeds every token row of the tile, each broadcast every panel), never what each
 *   computes; decode (one row) runs the same chains. Threads split the panels, each
 *   output computed whole by one thread.
 * - Attention: each row attends positions 0..its own in chunks of ATTENTION_CHUNK,
 *   merged in chunk order, as flash-decoding does (see ``attend_chunk``).
 * - Norms, rotary, SiLU and exp: the same code for every row, no libm calls.
 * GCC's builds for targets with fused multiply-add (AVX2, AVX-512, aarch64) fuse the same
 * products (see CONTRACTED), so they give the same bits; a build without (baseline
 * x86-64) rounds them twice, so its results differ from theirs by float32 rounding,
 * never between its own runs.
 *
 * Arrays and layouts are model.py's (see its docstring): weight matrices in panels, KV
 * caches in blocks of ATTENTION_CHUNK positions (see ``kv_block_offset``), rotary in
 * halves order. Built by kernels.py with the machine's compiler (-O3 -march=native
 * -fopenmp) and called through ctypes; the vector extensions are GCC's and clang's,
 * lowered to AVX-512, AVX2, SSE or NEON as the target has them.
 */
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bumped whenever struct rkllmd_model or a signature changes: kernels.py checks it. */
#define RKLLMD_KERNEL_ABI 7
/* LANES floats: a panel's outputs (see ``struct product``), and the accumulator lanes of other
 * sums (norms, softmax totals: element k to lane k % 16), whatever the target's vector
 * width (WIDTH floats: 16 on AVX-512, 8 on AVX2, 4 on SSE and NEON), so all targets add
 * the same numbers in the same order. Elementwise code (exp, SiLU) works on the native
 * width, which cannot change its results. */
#define LANES 16
#if defined(__AVX512F__)
#define WIDTH 16
#elif defined(__AVX__)
#define WIDTH 8
#else
#define WIDTH 4
#endif
#define PARTS (LANES / WIDTH)
/* Positions per attention unit (see ``attend_chunk``); tests make it small. */
#ifndef ATTENTION_CHUNK
#define ATTENTION_CHUNK 256
#endif

/* Matrix products work on panels (see ``struct product``): tiles of TILE_TOKENS token rows x
 * TILE_PANELS panels, one accumulator per token and output, sized to the target's
 * vector registers (AVX-512: 24 of 32; AVX2: 12 of 16; NEON: 24 of 32, 4 per panel).
 * One token row (decode) streams DECODE_PANELS panels at once to keep loads in flight.
 * Threads take blocks of BLOCK_PANELS panels for groups of rows (``product_items``): the
 * block's weights stay in L2 cache while the group's tiles of tokens pass (a multiple of
 * the tiles' panels, and even: gate/up pairs). */
#if WIDTH == 16
#define TILE_TOKENS 12
#define TILE_PANELS 2
#elif WIDTH == 8 || defined(__aarch64__)
#define TILE_TOKENS 6
#define TILE_PANELS 1
#else /* SSE: 16 registers of 4 */
#define TILE_TOKENS 2
#define TILE_PANELS 1
#endif
/* Threads take a product's work as items of a block of panels for a group of up to
 * GROUP_TOKENS token rows. */
#define GROUP_TOKENS (8 * TILE_TOKENS)
/* Left-over tokens: tiles of SHORT_TOKENS, then of one. */
#define SHORT_TOKENS (TILE_TOKENS > 4 ? 4 : 1)
#define DECODE_PANELS 4
#define BLOCK_PANELS 4
/* Rows of one group (decode steps) take blocks of SMALL_BLOCK_PANELS, and a thread's run of
 * consecutive blocks streams as one stretch of panels (DECODE_PANELS at once): a team
 * finishes a phase together only if its items are small and divide evenly. In blocks of 4,
 * a layer's 36 output panels were 9 items for 2 threads: timed per phase, a step's threads
 * waited ~300 us for each other at the ends of its products, ~60 us in blocks of 2. */
#define SMALL_BLOCK_PANELS 2
/* Tiles ask for their weights PREFETCH_AHEAD inputs (cache lines) ahead: a prefill block's
 * first tile of tokens, and every decode tile, read them from memory, faster than the
 * hardware's prefetcher alone brings them (decode: see docs/benchmarks.md, 7 Dec). */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 48
#endif

/* The file is compiled with -ffp-contract=off: compilers for different targets contract
 * a * b + c * d differently. Only where a product is added to an accumulator, which every
 * target with fused multiply-add (AVX2, AVX-512, NEON) contracts alike, is it allowed. */
#if defined(__clang__) /* no per-function switch: clang builds round every product */
#define CONTRACTED
#else
#define CONTRACTED __attribute__((optimize("fp-contract=fast")))
#endif

typedef float vec_t __attribute__((vector_size(WIDTH * sizeof(float))));
typedef int32_t int_vec_t __attribute__((vector_size(WIDTH * sizeof(int32_t))));

/* Mirrored field for field by kernels.py's ModelStruct. */
struct rkllmd_model {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size, capacity;
    double norm_eps;
    /* weights (read only) */
    /* matrices in panels of LANES outputs (see ``struct product``): [panels, inputs, LANES] */
    const float *head;        /* vocab outputs of dim, also the embedding */
    const float *output_norm; /* [dim] */
    const float *attn_norm;   /* [layers, dim] */
    const float *ffn_norm;    /* [layers, dim] */
    const float *wqkv;        /* per layer q + 2 kv outputs of dim */
    const float *wo;          /* per layer dim outputs of q */
    const float *wgu;         /* per layer gate and up panels in turn: 2 ffn (padded) outputs of dim */
    const float *wd;          /* per layer dim outputs of ffn */
    const float *rope_cos;    /* [capacity, head_dim / 2] */
    const float *rope_sin;
};

/* The rows of one call and their scratch. A KV cache (one per stream): see ``kv_block_offset``. */
struct rows {
    int64_t n;                /* rows */
    const int64_t *pos;       /* [n]: each row's position */
    float *const *keys;       /* [n]: each row's cache */
    float *const *values;
    int64_t n_logits;         /* rows whose logits are wanted ... */
    const int64_t *logit_rows; /* [n_logits]: ... which */
    float *x;                 /* [n, dim]: residual stream */
    float *h;                 /* [threads, n, dim]: normalized input, each thread's own */
    float *qkv;               /* [n, q + 2 kv] */
    float *queries;           /* [n, heads, head_dim]: rotated and scaled */
    float *attended;          /* [n, heads * head_dim] */
    float *gate_up;           /* [n, 2 ffn padded to panels]: gate and up panels in turn */
    float *act;               /* [n, ffn] */
    float *partials;          /* [n, heads, chunks, head_dim + 2] */
    int64_t n_chunks;         /* chunks of the row furthest on */
    int own_caches;           /* no two rows share a cache: attention units rotate and store (``attend_unit``) */
};

static inline vec_t load(const float *p) {
    vec_t v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

/* The first n (< LANES) floats at p, zero-padded to LANES. */
static inline void load_part(float padded[LANES], const float *p, int64_t n) {
    memset(padded, 0, LANES * sizeof(float));
    memcpy(padded, p, n * sizeof(float));
}

static inline vec_t broadcast(float value) { return (vec_t){0} + value; }

/* Keeps a loaded vector in a register: GCC otherwise folds the load into the fused
 * multiply-adds using it (memory operands), which an AMD Zen 5 runs markedly slower than
 * the same loop on registers (a 256-position head's scores: 0.57 -> 0.42 us; three heads'
 * weighted values: 0.84 -> 0.38 us). No effect on what is computed. */
#if defined(__x86_64__) || defined(__i386__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

static inline vec_t select_lanes(int_vec_t mask, vec_t yes, vec_t no) {
    return (vec_t)(((int_vec_t)yes & mask) | ((int_vec_t)no & ~mask));
}

/* The sum of LANES accumulator lanes (held as PARTS vectors) by a fixed pairwise tree:
 * lane i with i + 8, then i + 4, ... */
static inline float reduce(const vec_t parts[PARTS]) {
    float s[LANES];
    memcpy(s, parts, sizeof s);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++)
            s[i] = s[i] + s[i + width];
    return s[0];
}

/* exp(x) in every lane: Cephes' single-precision range reduction and polynomial (within
 * 2 ulp), arguments clamped to [-87, 88]; libm's expf differs between its builds. */
static inline vec_t exp_vec(vec_t x) {
    x = select_lanes(x > 88.0f, broadcast(88.0f), x);
    x = select_lanes(x < -87.0f, broadcast(-87.0f), x);
    vec_t whole = x * 1.44269504088896341f + 0.5f; /* round(x / ln 2) by floor(x / ln 2 + 0.5) */
    const vec_t truncated = __builtin_convertvector(__builtin_convertvector(whole, int_vec_t), vec_t);
    whole = truncated - select_lanes(truncated > whole, broadcast(1.0f), broadcast(0.0f));
    x -= whole * 0.693359375f;
    x -= whole * -2.12194440e-4f;
    vec_t y = broadcast(1.9875691500e-4f);
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * (x * x) + x + 1.0f;
    const int_vec_t exponent = (__builtin_convertvector(whole, int_vec_t) + 127) << 23;
    return y * (vec_t)exponent;
}

static inline float exp_one(float x) { return exp_vec(broadcast(x))[0]; }

/* values[i] = exp(values[i] - shift) for i < n; returns their sum. */
static float exp_shifted(float *values, float shift, int64_t n) {
    vec_t sums[PARTS] = {{0}};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < PARTS; j++) {
            const vec_t v = exp_vec(load(values + i + j * WIDTH) - shift);
            memcpy(values + i + j * WIDTH, &v, sizeof v);
            sums[j] += v;
        }
    if (i < n) {
        float padded[LANES];
        load_part(padded, values + i, n - i);
        for (int j = 0; j < PARTS; j++) {
            vec_t v = exp_vec(load(padded + j * WIDTH) - shift);
            memcpy(padded + j * WIDTH, &v, sizeof v);
        }
        memcpy(values + i, padded, (n - i) * sizeof(float));
        memset(padded + (n - i), 0, (LANES - (n - i)) * sizeof(float));
        for (int j = 0; j < PARTS; j++)
            sums[j] += load(padded + j * WIDTH);
    }
    return reduce(sums);
}

/* The sum of a[i] * b[i] in LANES lanes (element i to lane i % LANES, the last step
 * zero-padded), then ``reduce``: the same on every target. */
static CONTRACTED float dot(const float *a, const float *b, int64_t n) {
    vec_t acc[PARTS] = {{0}};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < PARTS; j++)
            acc[j] += load(a + i + j * WIDTH) * load(b + i + j * WIDTH);
    if (i < n) {
        float as[LANES], bs[LANES];
        load_part(as, a + i, n - i);
        load_part(bs, b + i, n - i);
        for (int j = 0; j < PARTS; j++)
            acc[j] += load(as + j * WIDTH) * load(bs + j * WIDTH);
    }
    return reduce(acc);
}

/* value in every lane (x - 0 is x for every float, the sign of zero included: one broadcast). */
static inline vec_t splat(float value) { return value - (vec_t){0}; }

/* A tile: outputs [0, n_valid) of NP panels (from ``w``) for T token rows (``x``, rows of
 * k_dim), into (or, ``accumulate``, added to) rows of ``out`` ldo apart. Each output is
 * one chain of fused multiply-adds over k = 0, 1, ...: the same whatever the tile, the
 * target's vector width or the thread. One function per tile shape, so that the
 * compiler keeps the accumulators in registers. */
/* One input k of a tile: NP panels' weights for k, times each token's input k. */
#define TILE_STEP(T, NP)                                                                                      \
    {                                                                                                         \
        vec_t wv[NP][PARTS];                                                                                  \
        _Pragma("GCC unroll 16") for (int p = 0; p < NP; p++)                                                 \
            _Pragma("GCC unroll 4") for (int j = 0; j < PARTS; j++)                                           \
                wv[p][j] = load(w + p * stride + k * LANES + j * WIDTH);                                      \
        _Pragma("GCC unroll 16") for (int t = 0; t < T; t++) {                                                \
            const vec_t xv = splat(x[t * k_dim + k]);                                                         \
            _Pragma("GCC unroll 16") for (int p = 0; p < NP; p++)                                             \
                _Pragma("GCC unroll 4") for (int j = 0; j < PARTS; j++) acc[t][p][j] += wv[p][j] * xv;        \
        }                                                                                                     \
    }

#define DEFINE_TILE(name, T, NP)                                                                              \
    static CONTRACTED void name(const float *restrict w, const float *restrict x, float *restrict out,        \
                                int64_t k_dim, int64_t ldo, int64_t n_valid, int accumulate) {                \
        vec_t acc[T][NP][PARTS];                                                                              \
        _Pragma("GCC unroll 16") for (int t = 0; t < T; t++)                                                  \
            _Pragma("GCC unroll 16") for (int p = 0; p < NP; p++)                                             \
                _Pragma("GCC unroll 4") for (int j = 0; j < PARTS; j++) acc[t][p][j] = (vec_t){0};            \
        const int64_t stride = k_dim * LANES;                                                                 \
        int64_t k = 0;                                                                                        \
        for (; k + PREFETCH_AHEAD < k_dim; k++) {                                                             \
            _Pragma("GCC unroll 16") for (int p = 0; p < NP; p++)                                             \
                __builtin_prefetch(w + p * stride + (k + PREFETCH_AHEAD) * LANES);                            \
            TILE_STEP(T, NP)                                                                                  \
        }                                                                                                     \
        for (; k < k_dim; k++)                                                                                \
            TILE_STEP(T, NP)                                                                                  \
        for (int t = 0; t < T; t++) {                                                                         \
            float *row = out + t * ldo;                                                                       \
            if (n_valid == (NP) * LANES) { /* whole panels: vector stores */                                  \
                _Pragma("GCC unroll 16") for (int p = 0; p < NP; p++)                                         \
                    _Pragma("GCC unroll 4") for (int j = 0; j < PARTS; j++) {                                 \
                        float *to = row + p * LANES + j * WIDTH;                                              \
                        const vec_t v = accumulate ? load(to) + acc[t][p][j] : acc[t][p][j];                  \
                        memcpy(to, &v, sizeof v);                                                             \
                    }                                                                                         \
                continue;                                                                                     \
            }                                                                                                 \
            float sums[NP * LANES];                                                                           \
            memcpy(sums, acc[t], sizeof sums);                                                                \
            for (int64_t i = 0; i < n_valid; i++)                                                             \
                row[i] = accumulate ? row[i] + sums[i] : sums[i];                                             \
        }                                                                                                     \
    }

DEFINE_TILE(tile_full, TILE_TOKENS, TILE_PANELS)
DEFINE_TILE(tile_full_one, TILE_TOKENS, 1)
DEFINE_TILE(tile_short, SHORT_TOKENS, TILE_PANELS)
DEFINE_TILE(tile_short_one, SHORT_TOKENS, 1)
DEFINE_TILE(tile_decode, 1, DECODE_PANELS)
DEFINE_TILE(tile_one, 1, 1)
DEFINE_TILE(tile_decode_pair, 1, 2)

typedef void tile_fn(const float *restrict, const float *restrict, float *restrict, int64_t, int64_t, int64_t, int);

/* Panels [p0, p1) for every token row: for each tile of tokens (in L1 cache), the
 * block's panels (in L2) by the widest tile that fits, the rest one panel at a time (a
 * single row: two at a time, then one). */
static void block(const float *w, const float *x, float *out, int64_t n_tokens, int64_t n_out, int64_t k_dim,
                  int64_t p0, int64_t p1, int accumulate) {
    for (int64_t t = 0; t < n_tokens;) {
        const int64_t left = n_tokens - t;
        const int64_t tokens = left >= TILE_TOKENS ? TILE_TOKENS : left >= SHORT_TOKENS ? SHORT_TOKENS : 1;
        tile_fn *wide = tile_decode, *narrow = tile_one;
        int64_t panels = DECODE_PANELS;
        if (tokens > 1) {
            wide = tokens == TILE_TOKENS ? tile_full : tile_short;
            narrow = tokens == TILE_TOKENS ? tile_full_one : tile_short_one;
            panels = TILE_PANELS;
        }
        for (int64_t p = p0; p < p1;) {
            const int64_t n = p + panels <= p1 ? panels : tokens == 1 && p + 2 <= p1 ? 2 : 1, valid = n_out - p * LANES;
            tile_fn *tile = n == panels ? wide : n == 2 ? tile_decode_pair : narrow;
            tile(w + p * k_dim * LANES, x + t * k_dim, out + t * n_out + p * LANES, k_dim, n_out,
                 valid < n * LANES ? valid : n * LANES, accumulate);
            p += n;
        }
        t += tokens;
    }
}

/* A matrix product on panels: w holds n_out outputs of k_dim inputs in panels of LANES
 * outputs, output o's weight for input k at ((o / LANES) * k_dim + k) * LANES + o %
 * LANES (the last panel zero-padded), so that one vector load gives LANES outputs'
 * weights for one input. out[n_tokens, n_out] = x[n_tokens, k_dim] @ w^T, or added to
 * out (``accumulate``). Threads take it by items (``product_items``). */
struct product {
    const float *w, *x;
    float *out;
    int64_t n_tokens, n_out, k_dim;
    int accumulate;
};

static void rms_norm(const float *x, const float *weight, float *out, int64_t n, double eps) {
    const float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = x[i] * scale * weight[i];
}

/* rms_norm(x) of every row into h. */
static void rms_norm_rows(const struct rkllmd_model *m, const struct rows *s, const float *weight, float *h) {
    for (int64_t t = 0; t < s->n; t++)
        rms_norm(s->x + t * m->dim, weight, h + t * m->dim, m->dim, m->norm_eps);
}

/* Row t's head ``head`` of its q and k (q heads first; halves order) rotated at its position. */
static void rotate_head(const struct rkllmd_model *m, const struct rows *s, int64_t t, int64_t head, float *out) {
    const int64_t hd = m->head_dim, half = hd / 2, pos = s->pos[t];
    const float *first = s->qkv + t * (m->n_heads + 2 * m->n_kv_heads) * hd + head * hd, *second = first + half;
    const float *cos = m->rope_cos + pos * half, *sin = m->rope_sin + pos * half;
    for (int64_t i = 0; i < half; i++) {
        out[i] = first[i] * cos[i] - second[i] * sin[i];
        out[half + i] = second[i] * cos[i] + first[i] * sin[i];
    }
}

/* Row t's query head ``head``, rotated and scaled by 1/sqrt(head_dim), into out. */
static void rotate_query(const struct rkllmd_model *m, const struct rows *s, int64_t t, int64_t head, float *out) {
    const int64_t hd = m->head_dim;
    const float scale = 1.0f / sqrtf((float)hd);
    float rotated[hd];
    rotate_head(m, s, t, head, rotated);
    for (int64_t i = 0; i < hd; i++)
        out[i] = rotated[i] * scale;
}

/* A KV cache (one per stream) is blocks of ATTENTION_CHUNK positions, one after another,
 * each holding every layer's keys and values of those positions: keys [blocks, layers,
 * kv_heads, head_dim, ATTENTION_CHUNK], values [blocks, layers, kv_heads, ATTENTION_CHUNK,
 * head_dim] (blocks: capacity rounded up). This is the offset of the keys (or values) of
 * ``layer`` and KV head ``kv`` in the block of position ``pos``.
 * - An attention unit (one head, one chunk: ``attend_chunk``) reads its keys and its values
 *   from two contiguous stretches (64 KB each for SmolLM2). With keys [layer, kv_head, dim,
 *   capacity] a unit's 64 key rows of 1 KB lay 16 KB apart, each in a page of its own:
 *   timed per phase at 478 positions, attention took 702-802 us a step that way against
 *   654-707 in blocks, and 539-557 in blocks on 2 MB pages.
 * - The positions a stream writes stay within their blocks, so a cache can be mapped in
 *   2 MB pages as it fills (model.py's ``_lazy_zeros``): in the former layout one position
 *   touched every key row of the whole context. */
static inline int64_t kv_block_offset(const struct rkllmd_model *m, int64_t layer, int64_t kv, int64_t pos) {
    return ((pos / ATTENTION_CHUNK * m->n_layers + layer) * m->n_kv_heads + kv) * m->head_dim * ATTENTION_CHUNK;
}

/* Row t's key (rotated) and value of KV head kv into its cache, at its position. */
static void store_key_value(const struct rkllmd_model *m, const struct rows *s, int64_t layer, int64_t t, int64_t kv) {
    const int64_t hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, pos = s->pos[t];
    const int64_t block = kv_block_offset(m, layer, kv, pos), within = pos % ATTENTION_CHUNK;
    float rotated[hd];
    rotate_head(m, s, t, nh + kv, rotated);
    float *keys = s->keys[t] + block + within;
    for (int64_t i = 0; i < hd; i++)
        keys[i * ATTENTION_CHUNK] = rotated[i];
    const float *value = s->qkv + t * (nh + 2 * nkv) * hd + (nh + nkv + kv) * hd;
    memcpy(s->values[t] + block + within * hd, value, hd * sizeof(float));
}

/* Row t: its queries rotated and scaled into s->queries, its keys and values into its cache. */
static void rotate_and_store(const struct rkllmd_model *m, const struct rows *s, int64_t layer, int64_t t) {
    for (int64_t head = 0; head < m->n_heads; head++)
        rotate_query(m, s, t, head, s->queries + (t * m->n_heads + head) * m->head_dim);
    for (int64_t kv = 0; kv < m->n_kv_heads; kv++)
        store_key_value(m, s, layer, t, kv);
}

/* out[i] = the sum over r < n_rows of coef[r] * rows[r * stride + i], for i < n: attention's
 * scores (query by keys) and weighted values. Each out[i] is one chain of fused multiply-adds
 * in r order from zero, what ``out[i] += coef[r] * rows[...]`` over r computes, with blocks of
 * i held in registers through the whole chain instead of loaded and stored at every step. */
#define COMBINE(V)                                                                                            \
    for (; i + (V) * WIDTH <= n; i += (V) * WIDTH) {                                                          \
        vec_t acc[V];                                                                                         \
        _Pragma("GCC unroll 16") for (int j = 0; j < (V); j++) acc[j] = (vec_t){0};                            \
        for (int64_t r = 0; r < n_rows; r++) {                                                                \
            const vec_t c = splat(coef[r]);                                                                   \
            _Pragma("GCC unroll 16") for (int j = 0; j < (V); j++) {                                          \
                vec_t row = load(rows + r * stride + i + j * WIDTH);                                          \
                IN_REGISTER(row);                                                                             \
                acc[j] += c * row;                                                                            \
            }                                                                                                 \
        }                                                                                                     \
        memcpy(out + i, acc, sizeof acc);                                                                     \
    }

static CONTRACTED void combine_rows(const float *coef, const float *rows, int64_t stride, int64_t n_rows, float *out,
                                    int64_t n) {
    int64_t i = 0;
#if WIDTH == 16 /* 32 registers: a 256-position chunk's scores in one pass over each key row */
    COMBINE(16)
#endif
    COMBINE(8)
    COMBINE(4)
    COMBINE(1)
    if (i < n) { /* the last n - i (< WIDTH) */
        memset(out + i, 0, (n - i) * sizeof(float));
        for (int64_t r = 0; r < n_rows; r++)
            for (int64_t j = i; j < n; j++)
                out[j] += coef[r] * rows[r * stride + j];
    }
}

/* combine_rows for n_sets sets of coefficients at once (set h: coef + h * coef_stride, into
 * out + h * out_stride), on the same rows: each row's vectors, loaded once, feed every set's
 * chains, so that SETS x V chains are in flight where one set alone has V (attention's
 * weighted values: 64 outputs are 4 chains on AVX-512, too few to hide the fused
 * multiply-add's latency). Every output is still one chain in r order from zero: the same
 * bits as combine_rows. */
#if WIDTH == 16
#define SETS 3
#define SET_VECTORS 4
#else /* AVX2, SSE, NEON: V = 8 vectors of one set are chains enough (and registers allow no more) */
#define SETS 1
#define SET_VECTORS 8
#endif
static CONTRACTED void combine_sets(const float *coef, int64_t coef_stride, int64_t n_sets, const float *rows,
                                    int64_t stride, int64_t n_rows, float *out, int64_t out_stride, int64_t n) {
    int64_t h = 0;
    for (; SETS > 1 && h + SETS <= n_sets; h += SETS) {
        int64_t i = 0;
        for (; i + SET_VECTORS * WIDTH <= n; i += SET_VECTORS * WIDTH) {
            vec_t acc[SETS][SET_VECTORS];
            _Pragma("GCC unroll 4") for (int k = 0; k < SETS; k++)
                _Pragma("GCC unroll 8") for (int j = 0; j < SET_VECTORS; j++) acc[k][j] = (vec_t){0};
            for (int64_t r = 0; r < n_rows; r++) {
                vec_t row[SET_VECTORS];
                _Pragma("GCC unroll 8") for (int j = 0; j < SET_VECTORS; j++) {
                    row[j] = load(rows + r * stride + i + j * WIDTH);
                    IN_REGISTER(row[j]); /* loaded once for every set */
                }
                _Pragma("GCC unroll 4") for (int k = 0; k < SETS; k++) {
                    const vec_t c = splat(coef[(h + k) * coef_stride + r]);
                    _Pragma("GCC unroll 8") for (int j = 0; j < SET_VECTORS; j++) acc[k][j] += c * row[j];
                }
            }
            for (int k = 0; k < SETS; k++)
                memcpy(out + (h + k) * out_stride + i, acc[k], sizeof acc[k]);
        }
        if (i < n) /* the last outputs, set by set */
            for (int k = 0; k < SETS; k++)
                combine_rows(coef + (h + k) * coef_stride, rows + i, stride, n_rows, out + (h + k) * out_stride + i, n - i);
    }
    for (; h < n_sets; h++)
        combine_rows(coef + h * coef_stride, rows, stride, n_rows, out + h * out_stride, n);
}

/* The highest of values[0..n) (n > 0). */
static float highest(const float *values, int64_t n) {
    int64_t i = 0;
    float top = values[0];
    if (n >= WIDTH) {
        vec_t tops = load(values);
        for (i = WIDTH; i + WIDTH <= n; i += WIDTH) {
            const vec_t v = load(values + i);
            tops = select_lanes(v > tops, v, tops);
        }
        top = tops[0];
        for (int j = 1; j < WIDTH; j++)
            top = tops[j] > top ? tops[j] : top;
    }
    for (; i < n; i++)
        top = values[i] > top ? values[i] : top;
    return top;
}

/* Attention is split by chunks of ATTENTION_CHUNK positions, as flash-decoding does.
 * A unit, one row, one KV head and one chunk, handles the query heads sharing that KV
 * head, so the chunk's keys and values (64 KB each for SmolLM2) come from memory once:
 * their scores and their weighted values each in one pass for every head (``combine_sets``).
 * It leaves per query head a partial result: the chunk's highest score, the sum of
 * exp(score - highest), and the values weighted by those. Partial results are then merged
 * per query head, in chunk order. A row's units depend only on its position and its cache,
 * never on the other rows. ``queries``: the unit's query heads, rotated and scaled. */
static CONTRACTED void attend_chunk(const struct rkllmd_model *m, const struct rows *s, int64_t layer, int64_t t, int64_t kv,
                                    int64_t chunk, const float *queries) {
    const int64_t hd = m->head_dim, nh = m->n_heads, group = nh / m->n_kv_heads;
    const int64_t n_keys = s->pos[t] + 1;
    const int64_t p0 = chunk * ATTENTION_CHUNK, n = n_keys - p0 < ATTENTION_CHUNK ? n_keys - p0 : ATTENTION_CHUNK;
    const float *keys = s->keys[t] + kv_block_offset(m, layer, kv, p0);
    const float *values = s->values[t] + kv_block_offset(m, layer, kv, p0);
    /* The scores of a partial chunk are computed over whole passes of ``combine_sets``
     * (positions past the row's are read from its block, where they fit, and their scores
     * ignored): its tail in narrower passes took as long as the whole chunk. */
    const int64_t pass = SET_VECTORS * WIDTH, wide = (n + pass - 1) / pass * pass;
    const int64_t n_scores = wide <= ATTENTION_CHUNK ? wide : n;
    float scores[group][ATTENTION_CHUNK], top[group], total[group];
    combine_sets(queries, hd, group, keys, ATTENTION_CHUNK, hd, scores[0], ATTENTION_CHUNK, n_scores);
    for (int64_t g = 0; g < group; g++) {
        top[g] = highest(scores[g], n);
        total[g] = exp_shifted(scores[g], top[g], n);
    }
    float acc[group][hd]; /* on this thread's stack: partials of neighbouring units share cache lines */
    combine_sets(scores[0], ATTENTION_CHUNK, group, values, hd, n, acc[0], hd, hd);
    for (int64_t g = 0; g < group; g++) {
        float *partial = s->partials + ((t * nh + kv * group + g) * s->n_chunks + chunk) * (hd + 2);
        partial[0] = top[g];
        partial[1] = total[g];
        memcpy(partial + 2, acc[g], sizeof acc[g]);
    }
}

/* Row t's attended[head] from its partial results: each rescaled to the highest score. */
static void merge_chunks(const struct rkllmd_model *m, const struct rows *s, int64_t t, int64_t head) {
    const int64_t hd = m->head_dim, nh = m->n_heads;
    const int64_t n_chunks = (s->pos[t] + 1 + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK;
    const float *first = s->partials + (t * nh + head) * s->n_chunks * (hd + 2);
    float top = first[0];
    for (int64_t c = 1; c < n_chunks; c++)
        top = first[c * (hd + 2)] > top ? first[c * (hd + 2)] : top;
    float *out = s->attended + (t * nh + head) * hd, total = 0.0f;
    memset(out, 0, hd * sizeof(float));
    for (int64_t c = 0; c < n_chunks; c++) {
        const float *partial = first + c * (hd + 2);
        const float scale = exp_one(partial[0] - top);
        total += partial[1] * scale;
        for (int64_t d = 0; d < hd; d++)
            out[d] += partial[2 + d] * scale;
    }
    for (int64_t d = 0; d < hd; d++)
        out[d] /= total;
}

/* act = silu(gate) * up of rows [t0, t1), for the gate/up panels [p0, p1) (pairs: gate
 * panel i is panel 2i, its up panel 2i + 1), once a thread has computed them. */
static void silu_panels(const struct rkllmd_model *m, const struct rows *s, int64_t t0, int64_t t1, int64_t p0,
                        int64_t p1) {
    const int64_t ffn = m->ffn_dim, width = 2 * ((ffn + LANES - 1) / LANES) * LANES;
    for (int64_t t = t0; t < t1; t++)
        for (int64_t pair = p0 / 2; pair < p1 / 2; pair++)
            for (int64_t j = 0; j < LANES; j += WIDTH) {
                const int64_t i = pair * LANES + j;
                if (i >= ffn)
                    break;
                const float *gate_up = s->gate_up + t * width + 2 * pair * LANES + j;
                const vec_t gate = load(gate_up), up = load(gate_up + LANES);
                const vec_t act = gate / (1.0f + exp_vec(-gate)) * up;
                memcpy(s->act + t * ffn + i, &act, (ffn - i < WIDTH ? ffn - i : WIDTH) * sizeof(float));
            }
}

/* Work shared by the team without barriers. A pass is a sequence of phases (a matrix
 * product, the rotations, attention, ...), each of items that threads claim as they come
 * free; a thread moves on once every item of the phase is done, by whichever thread. A
 * thread that another process keeps off its core holds the others up only by the item
 * it is in, never by arriving late at one of the ~200 barriers of a token: under load
 * the pass runs on the threads that get a core instead of stalling at every barrier.
 * Which thread computes an item never changes what it computes.
 * A phase's items are split into one contiguous segment per thread (``run``); its counters
 * are cache lines: the items done, then each segment's items taken from its front (by its
 * thread) and from its back (by the others, once theirs are done), in one word so that one
 * compare-and-swap decides between them. */
struct counter {
    uint64_t value;
    char pad[64 - sizeof(uint64_t)]; /* a cache line each */
};

/* A thread's way through a pass's phases: the next phase's counters, ``stride`` lines on. */
struct pass {
    struct counter *next;
    int64_t stride, segments; /* segments: the team's threads (at most stride - 1) */
#ifdef RKLLMD_PHASE_TIMES
    struct counter *first; /* the call's first phase's: phases are numbered from it */
#endif
};

#ifdef RKLLMD_PHASE_TIMES
/* Defined by bench/decode_phases.c, which builds this file with RKLLMD_PHASE_TIMES: each
 * thread's time in each phase of a call, on its items and waiting for the team's. */
void rkllmd_phase_timed(int64_t phase, int64_t member, int64_t items_ns, int64_t wait_ns);
static int64_t nanos_now(void);
#endif

/* What a phase's items work on; each thread has its own. */
struct task {
    const struct rkllmd_model *m;
    const struct rows *s;
    const int64_t *tokens;
    int64_t layer;
    struct product product;
    int silu;                 /* the product is gate/up: its blocks' activations too */
    void (*prepare)(struct task *); /* before a thread's first item of the phase, if any */
    const float *norm;        /* prepare's rms_norm weight */
    float *h;                 /* this thread's normalized rows: the products' input */
};

/* Items [first, end) of a phase. */
typedef void item_fn(const struct task *, int64_t first, int64_t end);

static void norm_rows(struct task *task) { rms_norm_rows(task->m, task->s, task->norm, task->h); }

static void norm_logit_rows(struct task *task) { /* the rows whose logits are wanted, in order */
    const int64_t dim = task->m->dim;
    for (int64_t i = 0; i < task->s->n_logits; i++)
        rms_norm(task->s->x + task->s->logit_rows[i] * dim, task->norm, task->h + i * dim, dim, task->m->norm_eps);
}

static void embed_items(const struct task *task, int64_t first, int64_t end) { /* rows tokens[t] of the head's panels */
    const int64_t dim = task->m->dim;
    for (int64_t t = first; t < end; t++) {
        const int64_t token = task->tokens[t];
        for (int64_t k = 0; k < dim; k++)
            task->s->x[t * dim + k] = task->m->head[(token / LANES * dim + k) * LANES + token % LANES];
    }
}

static int64_t row_groups(int64_t n_tokens) { return (n_tokens + GROUP_TOKENS - 1) / GROUP_TOKENS; }

static int64_t block_panels(const struct product *p) { return row_groups(p->n_tokens) == 1 ? SMALL_BLOCK_PANELS : BLOCK_PANELS; }

/* Items of a product: its blocks of panels, each for every group of rows. */
static int64_t count_product_items(const struct product *p) {
    const int64_t panels = block_panels(p);
    return ((p->n_out + LANES - 1) / LANES + panels - 1) / panels * row_groups(p->n_tokens);
}

/* Blocks of panels, each for a group of rows (consecutive items share a block, whose
 * weights then come from L2 cache; with one group, consecutive blocks are one stretch). */
static void product_items(const struct task *task, int64_t first, int64_t end) {
    const struct product *p = &task->product;
    const int64_t groups = row_groups(p->n_tokens), n_panels = (p->n_out + LANES - 1) / LANES, panels = block_panels(p);
    for (int64_t item = first; item < end;) {
        const int64_t blocks = groups == 1 ? end - item : 1;
        const int64_t p0 = item / groups * panels, p1 = p0 + blocks * panels < n_panels ? p0 + blocks * panels : n_panels;
        const int64_t t0 = item % groups * GROUP_TOKENS, t1 = t0 + GROUP_TOKENS < p->n_tokens ? t0 + GROUP_TOKENS : p->n_tokens;
        block(p->w, p->x + t0 * p->k_dim, p->out + t0 * p->n_out, t1 - t0, p->n_out, p->k_dim, p0, p1, p->accumulate);
        if (task->silu)
            silu_panels(task->m, task->s, t0, t1, p0, p1);
        item += blocks;
    }
}

static void rotate_items(const struct task *task, int64_t first, int64_t end) {
    for (int64_t t = first; t < end; t++)
        rotate_and_store(task->m, task->s, task->layer, t);
}

/* One row, one KV head and one chunk of positions (``attend_chunk``). When every row has
 * its own cache (decode steps), no row reads what another writes, so there is no rotation
 * phase (one thread rotating while the others wait, 30 times a token): each unit rotates its
 * own queries, and the unit of the chunk holding the row's position stores its key and
 * value before reading them. The same arithmetic either way. */
static void attend_unit(const struct task *task, int64_t unit) {
    const struct rkllmd_model *m = task->m;
    const struct rows *s = task->s;
    const int64_t nkv = m->n_kv_heads, nc = s->n_chunks, hd = m->head_dim, group = m->n_heads / nkv;
    const int64_t t = unit / (nkv * nc), kv = unit / nc % nkv, chunk = unit % nc, pos = s->pos[t];
    if (chunk * ATTENTION_CHUNK > pos) /* the row's positions do not reach this chunk */
        return;
    if (!s->own_caches) {
        attend_chunk(m, s, task->layer, t, kv, chunk, s->queries + (t * m->n_heads + kv * group) * hd);
        return;
    }
    float queries[group][hd];
    for (int64_t g = 0; g < group; g++)
        rotate_query(m, s, t, kv * group + g, queries[g]);
    if (chunk == pos / ATTENTION_CHUNK)
        store_key_value(m, s, task->layer, t, kv);
    attend_chunk(m, s, task->layer, t, kv, chunk, queries[0]);
}

static void attend_items(const struct task *task, int64_t first, int64_t end) {
    for (int64_t unit = first; unit < end; unit++)
        attend_unit(task, unit);
}

static void merge_items(const struct task *task, int64_t first, int64_t end) {
    for (int64_t unit = first; unit < end; unit++)
        merge_chunks(task->m, task->s, unit / task->m->n_heads, unit % task->m->n_heads);
}

/* The most items a thread claims from its own segment at once (``run``). */
#define RUN_ITEMS 8

static int64_t team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static int64_t team_member(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Takes items of a segment of ``size`` items (``taken``: see ``struct counter``): from its
 * back one, from its front an eighth of those left (at least two, one of the last three,
 * at most RUN_ITEMS).
 * Returns how many (0: none left), the first at *first. */
static int64_t take(struct counter *taken, int64_t size, int from_back, int64_t *first) {
    uint64_t word = __atomic_load_n(&taken->value, __ATOMIC_RELAXED);
    for (;;) {
        const int64_t front = (int64_t)(word & 0xffffffffu), back = (int64_t)(word >> 32), left = size - front - back;
        if (left <= 0)
            return 0;
        const int64_t n = from_back || left < 4 ? 1 : left / 8 > RUN_ITEMS ? RUN_ITEMS : left / 8 < 2 ? 2 : left / 8;
        if (__atomic_compare_exchange_n(&taken->value, &word, word + (from_back ? (uint64_t)n << 32 : (uint64_t)n), 0,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            *first = from_back ? size - back - n : front;
            return n;
        }
    }
}

/* Items [0, total) of the pass's next phase, with the team; returns once all are done.
 * Each thread works through its own contiguous segment of the items from the front
 * (``take``: a phase of a thousand tiny items costs a few hundred atomic operations), then
 * takes the other segments' last items, one at a time, from their backs. So each thread
 * streams one contiguous part of a product's weights, as the read probe does (items taken
 * in turn by whichever thread came first made each thread's reading jump every block: a
 * decode step's products read 0.93-0.95 of an 8-stream probe's bandwidth, 1.00 in
 * segments), while a thread kept off its core by another process holds the others up by at
 * most RUN_ITEMS items: they finish its segment from the back. */
static void run(struct pass *pass, int64_t total, item_fn *item, struct task *task) {
    struct counter *counters = pass->next;
    const int64_t me = team_member(), segments = pass->segments;
    pass->next += pass->stride;
    int prepared = task->prepare == NULL;
#ifdef RKLLMD_PHASE_TIMES
    const int64_t entered = nanos_now();
#endif
    for (int64_t k = 0; k < segments; k++) {
        const int64_t segment = (me + k) % segments, start = total * segment / segments;
        const int64_t size = total * (segment + 1) / segments - start;
        for (int64_t first, count; (count = take(&counters[1 + segment], size, k > 0, &first)) > 0;) {
            if (!prepared) {
                task->prepare(task);
                prepared = 1;
            }
            item(task, start + first, start + first + count);
            __atomic_fetch_add(&counters[0].value, count, __ATOMIC_RELEASE);
        }
    }
#ifdef RKLLMD_PHASE_TIMES
    const int64_t worked = nanos_now();
#endif
    for (int64_t spins = 0; (int64_t)__atomic_load_n(&counters[0].value, __ATOMIC_ACQUIRE) < total; spins++)
        if (spins > 2000) /* the item's thread may need this core */
            sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else
            __builtin_ia32_pause();
#endif
#ifdef RKLLMD_PHASE_TIMES
    rkllmd_phase_timed((counters - pass->first) / pass->stride, me, worked - entered, nanos_now() - worked);
#endif
}

/* Whether no two of the n rows share a KV cache (checked for up to OWN_CACHES_CHECKED rows,
 * a batch of decode steps; more rows are taken to share). */
#define OWN_CACHES_CHECKED 64
static int own_caches(int64_t n, float *const *keys) {
    if (n > OWN_CACHES_CHECKED)
        return 0;
    for (int64_t t = 1; t < n; t++)
        for (int64_t u = 0; u < t; u++)
            if (keys[t] == keys[u])
                return 0;
    return 1;
}

int rkllmd_kernel_abi(void) { return RKLLMD_KERNEL_ABI; }

int64_t rkllmd_model_struct_size(void) { return sizeof(struct rkllmd_model); }

/* Positions per block of a KV cache (see ``kv_block_offset``). */
int64_t rkllmd_kv_block(void) { return ATTENTION_CHUNK; }

int rkllmd_kernel_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* The team a decode step runs with. Threads wait for each other at the end of every phase
 * (~200 a token), so on a machine whose cores other processes want too, a team of two
 * stalls whenever one of its threads is descheduled: the daemon decoded 58-65 tokens/s on
 * one thread against 34-53 on two with the machine's 2 cores at load 4, and 64 against 74
 * when quiet. So decode calls (every row wants its logits, at most TEAM_ROWS rows) keep an
 * average of their time with every thread and with one, run with the faster, and now and
 * then with the other to keep its average current: every TEAM_PROBE_EVERY-th call while
 * one thread is the faster (every thread may be again as soon as the machine quietens), and
 * every TEAM_PROBE_ONE_EVERY-th while every thread is (a machine getting busy shows first in
 * every thread's own average, measured at each call; a step on one thread takes a third
 * longer on a quiet machine: probing it every 64th call cost 0.6 % of the decode rate).
 * The team never changes a row's bits (see the top of this file); other calls use every thread. */
#define TEAM_ROWS 16
#define TEAM_PROBE_EVERY 64
#define TEAM_PROBE_ONE_EVERY 512
static int64_t team_nanos[2], team_calls, team_rows; /* [every thread, one]: 0 until measured */
static const struct rkllmd_model *team_model;          /* whose calls the averages are of */

static int64_t nanos_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Which team (0: every thread, 1: one) a call of model m with n rows, n_logits of them
 * wanted, runs with (-1: every thread, not measured), and whether that is a probe of the
 * slower one. */
static int choose_team(const struct rkllmd_model *m, int64_t n, int64_t n_logits, int64_t threads, int *probe) {
    *probe = 0;
    if (threads == 1 || n_logits != n || n > TEAM_ROWS)
        return -1;
    const int other_model = __atomic_exchange_n(&team_model, m, __ATOMIC_RELAXED) != m;
    if (__atomic_exchange_n(&team_rows, n, __ATOMIC_RELAXED) != n || other_model) { /* another batch or model: measure anew */
        __atomic_store_n(&team_nanos[0], 0, __ATOMIC_RELAXED);
        __atomic_store_n(&team_nanos[1], 0, __ATOMIC_RELAXED);
    }
    const int64_t every = __atomic_load_n(&team_nanos[0], __ATOMIC_RELAXED), one = __atomic_load_n(&team_nanos[1], __ATOMIC_RELAXED);
    const int faster = every > 0 && one > 0 && one < every;
    const int64_t period = faster || one == 0 ? TEAM_PROBE_EVERY : TEAM_PROBE_ONE_EVERY;
    *probe = __atomic_add_fetch(&team_calls, 1, __ATOMIC_RELAXED) % period == 0;
    return *probe ? !faster : faster;
}

/* A call with ``team`` took ``nanos``: its average moves an eighth of the way (the team in
 * use), or half of it (a probe, measured rarely). */
static void timed_team(int team, int64_t nanos, int probe) {
    const int64_t average = __atomic_load_n(&team_nanos[team], __ATOMIC_RELAXED);
    __atomic_store_n(&team_nanos[team], average == 0 ? nanos : probe ? (average + nanos) / 2 : average + (nanos - average) / 8,
                     __ATOMIC_RELAXED);
}

/* Run ``n`` token rows, row t at position positions[t] of the KV cache keys[t], values[t]
 * (its key and value join that cache; it attends to the cache's positions up to its own,
 * which earlier rows of the same call may have written); the logits of rows
 * logit_rows[0..n_logits) into logits [n_logits, vocab]. Returns 0, or -1 when scratch
 * memory cannot be had. The caller checks tokens, positions and caches: this trusts them. */
int rkllmd_forward(const struct rkllmd_model *m, int64_t n, const int64_t *tokens, const int64_t *positions,
                   float *const *keys, float *const *values, int64_t n_logits, const int64_t *logit_rows, float *logits) {
    const int64_t dim = m->dim, hd = m->head_dim, ffn = m->ffn_dim, nh = m->n_heads, nkv = m->n_kv_heads;
    const int64_t q_dim = nh * hd, qkv_dim = q_dim + 2 * nkv * hd;
    const int64_t gu_dim = 2 * ((ffn + LANES - 1) / LANES) * LANES, threads = rkllmd_kernel_threads();
    const int64_t padded_dim = (dim + LANES - 1) / LANES * LANES, qkv_size = (qkv_dim + LANES - 1) / LANES * LANES * dim;
    int64_t furthest = 0;
    for (int64_t t = 0; t < n; t++)
        furthest = positions[t] > furthest ? positions[t] : furthest;
    struct rows s = {.n = n, .pos = positions, .keys = keys, .values = values, .n_logits = n_logits,
                     .logit_rows = logit_rows, .n_chunks = (furthest + 1 + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK,
                     .own_caches = own_caches(n, keys)};
    const int64_t per_row = (1 + threads) * dim + qkv_dim + 2 * q_dim + gu_dim + ffn, partials = nh * s.n_chunks * (hd + 2);
    const int64_t n_phases = 2 + 7 * m->n_layers;
    float *scratch = malloc((size_t)n * (per_row + partials) * sizeof(float));
    struct counter *counters = calloc(n_phases * (1 + threads), sizeof *counters);
    if (!scratch || !counters) {
        free(scratch);
        free(counters);
        return -1;
    }
    s.x = scratch;
    s.h = s.x + n * dim;
    s.qkv = s.h + threads * n * dim;
    s.queries = s.qkv + n * qkv_dim;
    s.attended = s.queries + n * q_dim;
    s.gate_up = s.attended + n * q_dim;
    s.act = s.gate_up + n * gu_dim;
    s.partials = s.act + n * ffn;
    int probe;
    const int team = choose_team(m, n, n_logits, threads, &probe);
    const int64_t started = nanos_now();
#pragma omp parallel num_threads(team == 1 ? 1 : threads)
    {
#ifdef _OPENMP
        float *h = s.h + omp_get_thread_num() * n * dim;
#else
        float *h = s.h;
#endif
        struct pass pass = {.next = counters, .stride = 1 + threads, .segments = team_size()};
#ifdef RKLLMD_PHASE_TIMES
        pass.first = counters;
#endif
        struct task task = {.m = m, .s = &s, .h = h, .tokens = tokens};
        run(&pass, n, embed_items, &task);
        for (int64_t layer = 0; layer < m->n_layers; layer++) {
            task.layer = layer;
            task.prepare = norm_rows;
            task.norm = m->attn_norm + layer * dim;
            task.product = (struct product){m->wqkv + layer * qkv_size, h, s.qkv, n, qkv_dim, dim, 0};
            run(&pass, count_product_items(&task.product), product_items, &task);
            task.prepare = NULL;
            if (!s.own_caches)
                run(&pass, n, rotate_items, &task);
            run(&pass, n * nkv * s.n_chunks, attend_items, &task);
            run(&pass, n * nh, merge_items, &task);
            task.product = (struct product){m->wo + layer * padded_dim * q_dim, s.attended, s.x, n, dim, q_dim, 1};
            run(&pass, count_product_items(&task.product), product_items, &task);
            task.prepare = norm_rows;
            task.norm = m->ffn_norm + layer * dim;
            task.product = (struct product){m->wgu + layer * gu_dim * dim, h, s.gate_up, n, gu_dim, dim, 0};
            task.silu = 1;
            run(&pass, count_product_items(&task.product), product_items, &task);
            task.silu = 0;
            task.prepare = NULL;
            task.product = (struct product){m->wd + layer * padded_dim * ffn, s.act, s.x, n, dim, ffn, 1};
            run(&pass, count_product_items(&task.product), product_items, &task);
        }
        if (n_logits > 0) {
            task.prepare = norm_logit_rows;
            task.norm = m->output_norm;
            task.product = (struct product){m->head, h, logits, n_logits, m->vocab_size, dim, 0};
            run(&pass, count_product_items(&task.product), product_items, &task);
        }
    }
    if (team >= 0)
        timed_team(team, nanos_now() - started, probe);
    free(counters);
    free(scratch);
    return 0;
}

/* Embeddings: run ``n`` token rows as rkllmd_forward does (same positions, caches and
 * arithmetic), and write every row's final hidden state after the output norm into
 * hidden [n, dim] instead of logits: the input of a pooling (mean, for embeddings), no
 * lm_head. The layers are rkllmd_forward's, repeated here rather than shared so that the
 * decode path can change without touching this one. Returns 0, or -1 without memory. */
int rkllmd_forward_hidden(const struct rkllmd_model *m, int64_t n, const int64_t *tokens, const int64_t *positions,
                          float *const *keys, float *const *values, float *hidden) {
    const int64_t dim = m->dim, hd = m->head_dim, ffn = m->ffn_dim, nh = m->n_heads, nkv = m->n_kv_heads;
    const int64_t q_dim = nh * hd, qkv_dim = q_dim + 2 * nkv * hd;
    const int64_t gu_dim = 2 * ((ffn + LANES - 1) / LANES) * LANES, threads = rkllmd_kernel_threads();
    const int64_t padded_dim = (dim + LANES - 1) / LANES * LANES, qkv_size = (qkv_dim + LANES - 1) / LANES * LANES * dim;
    int64_t furthest = 0;
    for (int64_t t = 0; t < n; t++)
        furthest = positions[t] > furthest ? positions[t] : furthest;
    struct rows s = {.n = n, .pos = positions, .keys = keys, .values = values, .n_logits = 0,
                     .logit_rows = NULL, .n_chunks = (furthest + 1 + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK};
    const int64_t per_row = (1 + threads) * dim + qkv_dim + 2 * q_dim + gu_dim + ffn, partials = nh * s.n_chunks * (hd + 2);
    const int64_t n_phases = 1 + 7 * m->n_layers;
    float *scratch = malloc((size_t)n * (per_row + partials) * sizeof(float));
    struct counter *counters = calloc(n_phases * (1 + threads), sizeof *counters);
    if (!scratch || !counters) {
        free(scratch);
        free(counters);
        return -1;
    }
    s.x = scratch;
    s.h = s.x + n * dim;
    s.qkv = s.h + threads * n * dim;
    s.queries = s.qkv + n * qkv_dim;
    s.attended = s.queries + n * q_dim;
    s.gate_up = s.attended + n * q_dim;
    s.act = s.gate_up + n * gu_dim;
    s.partials = s.act + n * ffn;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        float *h = s.h + omp_get_thread_num() * n * dim;
#else
        float *h = s.h;
#endif
        struct pass pass = {.next = counters, .stride = 1 + threads, .segments = team_size()};
#ifdef RKLLMD_PHASE_TIMES
        pass.first = counters;
#endif
        struct task task = {.m = m, .s = &s, .h = h, .tokens = tokens};
        run(&pass, n, embed_items, &task);
        for (int64_t layer = 0; layer < m->n_layers; layer++) {
            task.layer = layer;
            task.prepare = norm_rows;
            task.norm = m->attn_norm + layer * dim;
            task.product = (struct product){m->wqkv + layer * qkv_size, h, s.qkv, n, qkv_dim, dim, 0};
            run(&pass, count_product_items(&task.product), product_items, &task);
            task.prepare = NULL;
            run(&pass, n, rotate_items, &task);
            run(&pass, n * nkv * s.n_chunks, attend_items, &task);
            run(&pass, n * nh, merge_items, &task);
            task.product = (struct product){m->wo + layer * padded_dim * q_dim, s.attended, s.x, n, dim, q_dim, 1};
            run(&pass, count_product_items(&task.product), product_items, &task);
            task.prepare = norm_rows;
            task.norm = m->ffn_norm + layer * dim;
            task.product = (struct product){m->wgu + layer * gu_dim * dim, h, s.gate_up, n, gu_dim, dim, 0};
            task.silu = 1;
            run(&pass, count_product_items(&task.product), product_items, &task);
            task.silu = 0;
            task.prepare = NULL;
            task.product = (struct product){m->wd + layer * padded_dim * ffn, s.act, s.x, n, dim, ffn, 1};
            run(&pass, count_product_items(&task.product), product_items, &task);
        }
    }
    for (int64_t t = 0; t < n; t++)
        rms_norm(s.x + t * dim, m->output_norm, hidden + t * dim, dim, m->norm_eps);
    free(counters);
    free(scratch);
    return 0;
}
