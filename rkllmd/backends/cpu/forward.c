/* The llama forward pass of M token rows at consecutive positions, in C: prefill is a
 * chunk of rows, decode is one row. model.py's numpy passes are the reference.
 *
 * Exactness is a property of this code, not of a BLAS build: every row's arithmetic is
 * the same whatever M is, wherever the row sits in a tile and whatever thread computes
 * it. So prefilling everything, restoring a prefix and prefilling the rest, and
 * prefilling a prefix then decoding token by token all give the same bits.
 * - A matrix product's output is a dot product of a contiguous weight row (output-major,
 *   as stored) and a contiguous activation row: one accumulator of 16 float lanes over K
 *   in steps of 16 (the last step zero-padded), then a fixed pairwise tree over the
 *   lanes. Tiles of several weight rows x several tokens only change how many such
 *   accumulators are in flight (prefill is compute-bound: each weight and activation
 *   load feeds several fused multiply-adds), never what each computes. Threads split the
 *   output rows, each computed whole by one thread.
 * - Attention: each row attends positions 0..its own in chunks of ATTENTION_CHUNK,
 *   merged in chunk order, as flash-decoding does (see ``attend_chunk``).
 * - Norms, rotary, SiLU and exp: the same code for every row, no libm calls.
 * GCC's builds for targets with fused multiply-add (AVX2, AVX-512, aarch64) fuse the same
 * products (see CONTRACTED), so they give the same bits; a build without (baseline
 * x86-64) rounds them twice, so its results differ from theirs by float32 rounding,
 * never between its own runs.
 *
 * Arrays and layouts are model.py's (see its docstring): weights output-major, keys
 * [layer, kv_head, dim, position], values [layer, kv_head, position, dim], rotary in
 * halves order. Built by kernels.py with the machine's compiler (-O3 -march=native
 * -fopenmp) and called through ctypes; the vector extensions are GCC's and clang's,
 * lowered to AVX-512, AVX2, SSE or NEON as the target has them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bumped whenever struct rkllmd_model or a signature changes: kernels.py checks it. */
#define RKLLMD_KERNEL_ABI 4
/* Every sum of products runs in LANES accumulator lanes: element k goes to lane k % 16,
 * whatever the target's vector width (WIDTH floats: 16 on AVX-512, 8 on AVX2, 4 on SSE
 * and NEON), so all targets add the same numbers in the same order. Elementwise code
 * (exp, SiLU) works on the native width, which cannot change its results. */
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

/* Tiles of a matrix product: weight rows x token rows, one LANES accumulator each.
 * Sized to the target's vector registers (AVX-512: 32 of 16 floats; AVX2: 16 of 8;
 * NEON: 32 of 4). One token row (decode) streams DECODE_ROWS weight rows at once to
 * keep loads in flight. */
#if WIDTH == 16
#define TILE_ROWS 4
#define TILE_TOKENS 6
#define DECODE_ROWS 8
#else
#define TILE_ROWS 2
#define TILE_TOKENS 3
#define DECODE_ROWS 4
#endif

/* Output rows per block of a matrix product: its weights stay in L2 cache while every
 * tile of tokens passes (a multiple of TILE_ROWS and DECODE_ROWS). */
#define BLOCK_ROWS 32

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
    const float *head;        /* [vocab, dim], also the embedding */
    const float *output_norm; /* [dim] */
    const float *attn_norm;   /* [layers, dim] */
    const float *ffn_norm;    /* [layers, dim] */
    const float *wqkv;        /* [layers, q + 2 kv, dim] */
    const float *wo;          /* [layers, dim, q] */
    const float *wgu;         /* [layers, 2 ffn, dim] */
    const float *wd;          /* [layers, dim, ffn] */
    const float *rope_cos;    /* [capacity, head_dim / 2] */
    const float *rope_sin;
    /* state */
    float *keys;              /* [layers, kv_heads, head_dim, capacity] */
    float *values;            /* [layers, kv_heads, capacity, head_dim] */
};

/* Per-call scratch, one row per token. */
struct rows {
    int64_t n, pos;           /* rows n, the first at position pos */
    float *x, *h;             /* [n, dim]: residual stream, normalized input */
    float *qkv;               /* [n, q + 2 kv] */
    float *queries;           /* [n, heads, head_dim]: rotated and scaled */
    float *attended;          /* [n, heads * head_dim] */
    float *proj;              /* [n, dim] */
    float *gate_up;           /* [n, 2 ffn] */
    float *act;               /* [n, ffn] */
    float *partials;          /* [n, heads, chunks, head_dim + 2] */
    int64_t n_chunks;         /* chunks of the last row */
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

/* out[t * ldo + r] = dot(w[r], x[t]) for r < R, t < T, where every dot product runs in
 * LANES lanes over k, the last step zero-padded, then ``reduce``: R x T accumulators in
 * flight, each computing the same whatever the tile. One function per tile shape, so
 * that the compiler keeps the accumulators in registers. */
#define DEFINE_TILE(name, R, T)                                                                          \
    static CONTRACTED void name(const float *restrict w, const float *restrict x, float *restrict out, int64_t k_dim, \
                     int64_t ldo) {                                                                      \
        vec_t acc[R][T][PARTS];                                                                          \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                                             \
            _Pragma("GCC unroll 16") for (int t = 0; t < T; t++)                                         \
                _Pragma("GCC unroll 4") for (int j = 0; j < PARTS; j++) acc[r][t][j] = (vec_t){0};       \
        int64_t k = 0;                                                                                   \
        for (; k + LANES <= k_dim; k += LANES)                                                           \
            _Pragma("GCC unroll 4") for (int j = 0; j < PARTS; j++) {                                    \
                vec_t wv[R];                                                                             \
                _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) wv[r] = load(w + r * k_dim + k + j * WIDTH); \
                _Pragma("GCC unroll 16") for (int t = 0; t < T; t++) {                                   \
                    const vec_t xv = load(x + t * k_dim + k + j * WIDTH);                                \
                    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) acc[r][t][j] += wv[r] * xv;     \
                }                                                                                        \
            }                                                                                            \
        if (k < k_dim)                                                                                   \
            for (int t = 0; t < T; t++) {                                                                \
                float xs[LANES], ws[LANES];                                                              \
                load_part(xs, x + t * k_dim + k, k_dim - k);                                             \
                for (int r = 0; r < R; r++) {                                                            \
                    load_part(ws, w + r * k_dim + k, k_dim - k);                                         \
                    for (int j = 0; j < PARTS; j++)                                                      \
                        acc[r][t][j] += load(ws + j * WIDTH) * load(xs + j * WIDTH);                     \
                }                                                                                        \
            }                                                                                            \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < T; t++)                                                                  \
                out[t * ldo + r] = reduce(acc[r][t]);                                                    \
    }

DEFINE_TILE(tile_full, TILE_ROWS, TILE_TOKENS)
DEFINE_TILE(tile_rows, TILE_ROWS, 1)
DEFINE_TILE(tile_tokens, 1, TILE_TOKENS)
DEFINE_TILE(tile_one, 1, 1)
DEFINE_TILE(tile_decode, DECODE_ROWS, 1)

typedef void tile_fn(const float *restrict, const float *restrict, float *restrict, int64_t, int64_t);

/* The dot product of two rows, as a matrix product's output computes it. */
static float dot(const float *a, const float *b, int64_t n) {
    float out;
    tile_one(a, b, &out, n, 1);
    return out;
}

/* out = x @ w^T for the output rows [r0, r0 + n_rows) and every token row of x: for each
 * tile of TILE_TOKENS tokens (in L1 cache), the block's weight rows (in L2) by tiles of
 * ``rows``; left-over tokens and rows by smaller tiles. */
static void block(const float *w, const float *x, float *out, int64_t n_tokens, int64_t n_out, int64_t k_dim,
                  int64_t r0, int64_t n_rows, int64_t rows, tile_fn *full, tile_fn *one) {
    for (int64_t t = 0; t < n_tokens;) {
        const int many = t + TILE_TOKENS <= n_tokens;
        int64_t r = r0;
        for (; r + rows <= r0 + n_rows; r += rows)
            (many ? full : one)(w + r * k_dim, x + t * k_dim, out + t * n_out + r, k_dim, n_out);
        for (; r < r0 + n_rows; r++)
            (many ? tile_tokens : tile_one)(w + r * k_dim, x + t * k_dim, out + t * n_out + r, k_dim, n_out);
        t += many ? TILE_TOKENS : 1;
    }
}

/* out[n_tokens, n_out] = x[n_tokens, k_dim] @ w[n_out, k_dim]^T, blocks of output rows
 * shared among the team (call from every thread). */
static void matmul(const float *w, const float *x, float *out, int64_t n_tokens, int64_t n_out, int64_t k_dim) {
    /* Fewer tokens than a tile (decode): stream more weight rows at once. */
    const int decode = n_tokens < TILE_TOKENS;
    const int64_t rows = decode ? DECODE_ROWS : TILE_ROWS, n_blocks = (n_out + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; b++)
        block(w, x, out, n_tokens, n_out, k_dim, b * BLOCK_ROWS, n_out - b * BLOCK_ROWS < BLOCK_ROWS ? n_out - b * BLOCK_ROWS : BLOCK_ROWS,
              rows, decode ? tile_decode : tile_full, decode ? tile_decode : tile_rows);
}

static void rms_norm(const float *x, const float *weight, float *out, int64_t n, double eps) {
    const float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = x[i] * scale * weight[i];
}

/* h = rms_norm(x) of every row, shared among the team. */
static void rms_norm_rows(const struct rkllmd_model *m, const struct rows *s, const float *weight) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < s->n; t++)
        rms_norm(s->x + t * m->dim, weight, s->h + t * m->dim, m->dim, m->norm_eps);
}

/* Row t: rotate its queries and keys (halves order) at its position, store its key and
 * value in the cache, scale its queries by 1/sqrt(head_dim). */
static void rotate_and_store(const struct rkllmd_model *m, const struct rows *s, int64_t layer, int64_t t) {
    const int64_t hd = m->head_dim, half = hd / 2, nh = m->n_heads, nkv = m->n_kv_heads, cap = m->capacity;
    const int64_t pos = s->pos + t, qkv_dim = (nh + 2 * nkv) * hd;
    const float *qkv = s->qkv + t * qkv_dim;
    const float *cos = m->rope_cos + pos * half, *sin = m->rope_sin + pos * half;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t head = 0; head < nh + nkv; head++) {
        const float *first = qkv + head * hd, *second = first + half;
        float rotated[hd];
        for (int64_t i = 0; i < half; i++) {
            rotated[i] = first[i] * cos[i] - second[i] * sin[i];
            rotated[half + i] = second[i] * cos[i] + first[i] * sin[i];
        }
        if (head < nh) {
            float *queries = s->queries + (t * nh + head) * hd;
            for (int64_t i = 0; i < hd; i++)
                queries[i] = rotated[i] * scale;
        } else {
            float *keys = m->keys + ((layer * nkv + head - nh) * hd) * cap + pos;
            for (int64_t i = 0; i < hd; i++)
                keys[i * cap] = rotated[i];
        }
    }
    const float *values = qkv + (nh + nkv) * hd;
    for (int64_t kv = 0; kv < nkv; kv++)
        memcpy(m->values + ((layer * nkv + kv) * cap + pos) * hd, values + kv * hd, hd * sizeof(float));
}

/* Attention is split by chunks of ATTENTION_CHUNK positions, as flash-decoding does.
 * A unit, one row, one KV head and one chunk, handles the query heads sharing that KV
 * head one after the other, so the chunk's keys and values (64 KB each for SmolLM2) come
 * from memory once and from the cache after. It leaves per query head a partial result:
 * the chunk's highest score, the sum of exp(score - highest), and the values weighted by
 * those. Partial results are then merged per query head, in chunk order. A row's units
 * depend only on its position, never on the other rows. */
static CONTRACTED void attend_chunk(const struct rkllmd_model *m, const struct rows *s, int64_t layer, int64_t t, int64_t kv,
                         int64_t chunk) {
    const int64_t hd = m->head_dim, cap = m->capacity, nh = m->n_heads, group = nh / m->n_kv_heads;
    const int64_t n_keys = s->pos + t + 1;
    const int64_t p0 = chunk * ATTENTION_CHUNK, n = n_keys - p0 < ATTENTION_CHUNK ? n_keys - p0 : ATTENTION_CHUNK;
    const float *keys = m->keys + ((layer * m->n_kv_heads + kv) * hd) * cap + p0;
    const float *values = m->values + ((layer * m->n_kv_heads + kv) * cap + p0) * hd;
    for (int64_t head = kv * group; head < (kv + 1) * group; head++) {
        float scores[ATTENTION_CHUNK];
        const float *q = s->queries + (t * nh + head) * hd;
        memset(scores, 0, n * sizeof(float));
        for (int64_t d = 0; d < hd; d++) {
            const float qd = q[d], *row = keys + d * cap;
            for (int64_t p = 0; p < n; p++)
                scores[p] += qd * row[p];
        }
        float top = scores[0];
        for (int64_t p = 1; p < n; p++)
            top = scores[p] > top ? scores[p] : top;
        const float total = exp_shifted(scores, top, n);
        float acc[hd]; /* on this thread's stack: partials of neighbouring units share cache lines */
        memset(acc, 0, sizeof acc);
        for (int64_t p = 0; p < n; p++) {
            const float weight = scores[p], *row = values + p * hd;
            for (int64_t d = 0; d < hd; d++)
                acc[d] += weight * row[d];
        }
        float *partial = s->partials + ((t * nh + head) * s->n_chunks + chunk) * (hd + 2);
        partial[0] = top;
        partial[1] = total;
        memcpy(partial + 2, acc, sizeof acc);
    }
}

/* Row t's attended[head] from its partial results: each rescaled to the highest score. */
static void merge_chunks(const struct rkllmd_model *m, const struct rows *s, int64_t t, int64_t head) {
    const int64_t hd = m->head_dim, nh = m->n_heads;
    const int64_t n_chunks = (s->pos + t + 1 + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK;
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

/* softmax(q K) V of every row's query heads at ``layer``. Call from every thread. */
static void attention(const struct rkllmd_model *m, const struct rows *s, int64_t layer) {
    const int64_t nkv = m->n_kv_heads, nc = s->n_chunks;
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < s->n * nkv * nc; unit++) {
        const int64_t t = unit / (nkv * nc), kv = unit / nc % nkv, chunk = unit % nc;
        if (chunk * ATTENTION_CHUNK <= s->pos + t) /* the row's positions reach this chunk */
            attend_chunk(m, s, layer, t, kv, chunk);
    }
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < s->n * m->n_heads; unit++)
        merge_chunks(m, s, unit / m->n_heads, unit % m->n_heads);
}

static void add_rows(float *x, const float *proj, int64_t n) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++)
        x[i] += proj[i];
}

/* act = silu(gate) * up of every row. */
static void silu_rows(const struct rkllmd_model *m, const struct rows *s) {
    const int64_t ffn = m->ffn_dim, per_row = (ffn + WIDTH - 1) / WIDTH;
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < s->n * per_row; unit++) {
        const int64_t t = unit / per_row, i = unit % per_row * WIDTH;
        const int64_t count = ffn - i < WIDTH ? ffn - i : WIDTH;
        const float *gate_up = s->gate_up + t * 2 * ffn;
        vec_t gate = {0}, up = {0};
        memcpy(&gate, gate_up + i, count * sizeof(float));
        memcpy(&up, gate_up + ffn + i, count * sizeof(float));
        const vec_t act = gate / (1.0f + exp_vec(-gate)) * up;
        memcpy(s->act + t * ffn + i, &act, count * sizeof(float));
    }
}

int rkllmd_kernel_abi(void) { return RKLLMD_KERNEL_ABI; }

int64_t rkllmd_model_struct_size(void) { return sizeof(struct rkllmd_model); }

int rkllmd_kernel_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* Run ``n`` tokens at positions pos.. (their keys and values join the cache); the last
 * row's logits into ``logits`` unless it is NULL. Returns 0, or -1 when scratch memory
 * cannot be had. */
int rkllmd_forward(const struct rkllmd_model *m, const int64_t *tokens, int64_t n, int64_t pos, float *logits) {
    const int64_t dim = m->dim, hd = m->head_dim, ffn = m->ffn_dim, nh = m->n_heads;
    const int64_t q_dim = nh * hd, qkv_dim = q_dim + 2 * m->n_kv_heads * hd;
    struct rows s = {.n = n, .pos = pos, .n_chunks = (pos + n + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK};
    const int64_t per_row = 3 * dim + qkv_dim + 2 * q_dim + 3 * ffn, partials = nh * s.n_chunks * (hd + 2);
    float *scratch = malloc((size_t)n * (per_row + partials) * sizeof(float));
    if (!scratch)
        return -1;
    s.x = scratch;
    s.h = s.x + n * dim;
    s.qkv = s.h + n * dim;
    s.queries = s.qkv + n * qkv_dim;
    s.attended = s.queries + n * q_dim;
    s.proj = s.attended + n * q_dim;
    s.gate_up = s.proj + n * dim;
    s.act = s.gate_up + n * 2 * ffn;
    s.partials = s.act + n * ffn;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n; t++)
            memcpy(s.x + t * dim, m->head + tokens[t] * dim, dim * sizeof(float));
        for (int64_t layer = 0; layer < m->n_layers; layer++) {
            rms_norm_rows(m, &s, m->attn_norm + layer * dim);
            matmul(m->wqkv + layer * qkv_dim * dim, s.h, s.qkv, n, qkv_dim, dim);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < n; t++)
                rotate_and_store(m, &s, layer, t);
            attention(m, &s, layer);
            matmul(m->wo + layer * dim * q_dim, s.attended, s.proj, n, dim, q_dim);
            add_rows(s.x, s.proj, n * dim);
            rms_norm_rows(m, &s, m->ffn_norm + layer * dim);
            matmul(m->wgu + layer * 2 * ffn * dim, s.h, s.gate_up, n, 2 * ffn, dim);
            silu_rows(m, &s);
            matmul(m->wd + layer * dim * ffn, s.act, s.proj, n, dim, ffn);
            add_rows(s.x, s.proj, n * dim);
        }
        if (logits) {
#pragma omp single
            rms_norm(s.x + (n - 1) * dim, m->output_norm, s.h, dim, m->norm_eps);
            matmul(m->head, s.h, logits, 1, m->vocab_size, dim);
        }
    }
    free(scratch);
    return 0;
}
