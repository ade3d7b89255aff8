/* One decode step of the llama forward pass in C: model.py's ``Model._decode_numpy``,
 * the reference, computed with less overhead.
 *
 * Decode streams every weight once per token, so its speed is the memory bandwidth the
 * matrix-vector products reach, plus whatever runs between them. numpy's products
 * (OpenBLAS sgemv) reach about 60 % of this machine's bandwidth on the model's shapes,
 * and the ~30 small numpy calls per layer between them cost as much again as their
 * arithmetic. Here each product row is a dot product summed in 4 x 16 independent lanes
 * (the compiler keeps several wide fused multiply-adds in flight without reassociating
 * anything itself), and a whole step runs in one OpenMP parallel region: products split
 * by rows, attention by chunks of positions (see ``attention``), the small vector work
 * on one thread. Every output element is computed in a fixed order whatever thread
 * computes it, so results never depend on the thread count.
 *
 * Arrays and layouts are model.py's (see its docstring): weights output-major, keys
 * [layer, kv_head, dim, position], values [layer, kv_head, position, dim], rotary in
 * halves order. Built by kernels.py with the machine's compiler (-O3 -march=native
 * -fopenmp) and called through ctypes; the vector extensions are GCC's and clang's,
 * lowered to AVX-512, AVX2 or NEON as the CPU has them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bumped whenever struct rkllmd_model or a signature changes: kernels.py checks it. */
#define RKLLMD_KERNEL_ABI 3
#define LANES 16
#define ACCUMULATORS 4
/* Positions per attention unit (see ``attention``). */
#define ATTENTION_CHUNK 256

typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t int_lanes_t __attribute__((vector_size(LANES * sizeof(int32_t))));

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
    /* scratch */
    float *x, *h;             /* [dim]: residual stream, normalized input */
    float *qkv;               /* [q + 2 kv] */
    float *queries;           /* [heads, head_dim]: rotated and scaled */
    float *scores;            /* [heads, capacity] */
    float *attended;          /* [heads * head_dim] */
    float *proj;              /* [dim] */
    float *gate_up;           /* [2 ffn] */
    float *act;               /* [ffn] */
    float *logits;            /* [vocab] */
};

static inline lanes_t load(const float *p) {
    lanes_t v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

static inline lanes_t broadcast(float value) { return (lanes_t){0} + value; }

static inline lanes_t select_lanes(int_lanes_t mask, lanes_t yes, lanes_t no) {
    return (lanes_t)(((int_lanes_t)yes & mask) | ((int_lanes_t)no & ~mask));
}

/* exp(x) in every lane: Cephes' single-precision range reduction and polynomial (within
 * 2 ulp), arguments clamped to [-87, 88]; libm's expf is one call per element. */
static inline lanes_t exp_lanes(lanes_t x) {
    x = select_lanes(x > 88.0f, broadcast(88.0f), x);
    x = select_lanes(x < -87.0f, broadcast(-87.0f), x);
    lanes_t whole = x * 1.44269504088896341f + 0.5f; /* round(x / ln 2) by floor(x / ln 2 + 0.5) */
    const lanes_t truncated = __builtin_convertvector(__builtin_convertvector(whole, int_lanes_t), lanes_t);
    whole = truncated - select_lanes(truncated > whole, broadcast(1.0f), broadcast(0.0f));
    x -= whole * 0.693359375f;
    x -= whole * -2.12194440e-4f;
    lanes_t y = broadcast(1.9875691500e-4f);
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * (x * x) + x + 1.0f;
    const int_lanes_t exponent = (__builtin_convertvector(whole, int_lanes_t) + 127) << 23;
    return y * (lanes_t)exponent;
}

/* values[i] = exp(values[i] - shift) for i < n; returns their sum. */
static float exp_shifted(float *values, float shift, int64_t n) {
    lanes_t sums = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const lanes_t v = exp_lanes(load(values + i) - shift);
        memcpy(values + i, &v, sizeof v);
        sums += v;
    }
    if (i < n) {
        lanes_t v = {0};
        memcpy(&v, values + i, (n - i) * sizeof(float));
        v = exp_lanes(v - shift);
        memcpy(values + i, &v, (n - i) * sizeof(float));
        for (int64_t l = 0; l < n - i; l++)
            sums[l] += v[l];
    }
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++)
        sum += sums[l];
    return sum;
}

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    lanes_t acc[ACCUMULATORS] = {{0}};
    int64_t i = 0;
    for (; i + ACCUMULATORS * LANES <= n; i += ACCUMULATORS * LANES)
        for (int k = 0; k < ACCUMULATORS; k++)
            acc[k] += load(a + i + k * LANES) * load(b + i + k * LANES);
    for (; i + LANES <= n; i += LANES)
        acc[0] += load(a + i) * load(b + i);
    for (int k = 1; k < ACCUMULATORS; k++)
        acc[0] += acc[k];
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++)
        sum += acc[0][l];
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* out = matrix @ vector, rows shared among the team (call from every thread). */
static void matvec(const float *matrix, const float *vector, float *out, int64_t rows, int64_t cols) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        out[r] = dot(matrix + r * cols, vector, cols);
}

static void rms_norm(const float *x, const float *weight, float *out, int64_t n, double eps) {
    float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = x[i] * scale * weight[i];
}

/* Rotate queries and keys (halves order) at ``pos``, store this position's key and
 * value in the cache, scale the queries by 1/sqrt(head_dim). */
static void rotate_and_store(const struct rkllmd_model *m, int64_t layer, int64_t pos) {
    const int64_t hd = m->head_dim, half = hd / 2, nh = m->n_heads, nkv = m->n_kv_heads, cap = m->capacity;
    const float *cos = m->rope_cos + pos * half, *sin = m->rope_sin + pos * half;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t head = 0; head < nh + nkv; head++) {
        const float *first = m->qkv + head * hd, *second = first + half;
        float rotated[hd];
        for (int64_t i = 0; i < half; i++) {
            rotated[i] = first[i] * cos[i] - second[i] * sin[i];
            rotated[half + i] = second[i] * cos[i] + first[i] * sin[i];
        }
        if (head < nh) {
            for (int64_t i = 0; i < hd; i++)
                m->queries[head * hd + i] = rotated[i] * scale;
        } else {
            float *keys = m->keys + ((layer * nkv + head - nh) * hd) * cap + pos;
            for (int64_t i = 0; i < hd; i++)
                keys[i * cap] = rotated[i];
        }
    }
    const float *values = m->qkv + (nh + nkv) * hd;
    for (int64_t kv = 0; kv < nkv; kv++)
        memcpy(m->values + ((layer * nkv + kv) * cap + pos) * hd, values + kv * hd, hd * sizeof(float));
}

/* Attention is split by chunks of ATTENTION_CHUNK positions, as flash-decoding does.
 * A unit, one KV head and one chunk, handles the query heads sharing that KV head one
 * after the other, so the chunk's keys and values (64 KB each for SmolLM2) come from
 * memory once and from the cache after. It leaves per query head a partial result: the
 * chunk's highest score, the sum of exp(score - highest), and the values weighted by
 * those. Partial results are then merged per query head, in chunk order. Units are
 * spread over the threads, so long contexts use every core; short ones leave some idle. */
static void attend_chunk(const struct rkllmd_model *m, int64_t layer, int64_t kv, int64_t chunk, int64_t n_keys,
                         float *partials, int64_t n_chunks) {
    const int64_t hd = m->head_dim, cap = m->capacity, group = m->n_heads / m->n_kv_heads;
    const int64_t p0 = chunk * ATTENTION_CHUNK, n = n_keys - p0 < ATTENTION_CHUNK ? n_keys - p0 : ATTENTION_CHUNK;
    const float *keys = m->keys + ((layer * m->n_kv_heads + kv) * hd) * cap + p0;
    const float *values = m->values + ((layer * m->n_kv_heads + kv) * cap + p0) * hd;
    for (int64_t head = kv * group; head < (kv + 1) * group; head++) {
        /* This unit's slice of the head's score row: no other unit writes it. */
        float *scores = m->scores + head * cap + p0;
        const float *q = m->queries + head * hd;
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
        float *partial = partials + (head * n_chunks + chunk) * (hd + 2);
        partial[0] = top;
        partial[1] = total;
        memcpy(partial + 2, acc, sizeof acc);
    }
}

/* attended[head] from the head's partial results: each rescaled to the highest score. */
static void merge_chunks(const struct rkllmd_model *m, int64_t head, const float *partials, int64_t n_chunks) {
    const int64_t hd = m->head_dim;
    const float *first = partials + head * n_chunks * (hd + 2);
    float top = first[0];
    for (int64_t c = 1; c < n_chunks; c++)
        top = first[c * (hd + 2)] > top ? first[c * (hd + 2)] : top;
    float *out = m->attended + head * hd, total = 0.0f;
    memset(out, 0, hd * sizeof(float));
    for (int64_t c = 0; c < n_chunks; c++) {
        const float *partial = first + c * (hd + 2);
        const float scale = expf(partial[0] - top);
        total += partial[1] * scale;
        for (int64_t d = 0; d < hd; d++)
            out[d] += partial[2 + d] * scale;
    }
    for (int64_t d = 0; d < hd; d++)
        out[d] /= total;
}

/* softmax(q K) V of every query head of ``layer`` over positions [0, n_keys). Call from
 * every thread of the team; ``partials`` holds n_heads x n_chunks x (head_dim + 2). */
static void attention(const struct rkllmd_model *m, int64_t layer, int64_t n_keys, float *partials) {
    const int64_t n_chunks = (n_keys + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK;
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < m->n_kv_heads * n_chunks; unit++)
        attend_chunk(m, layer, unit / n_chunks, unit % n_chunks, n_keys, partials, n_chunks);
#pragma omp for schedule(static)
    for (int64_t head = 0; head < m->n_heads; head++)
        merge_chunks(m, head, partials, n_chunks);
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

/* Run ``token`` at ``pos`` (its key and value join the cache); logits into m->logits.
 * Returns 0, or -1 when the attention's scratch memory cannot be had. */
int rkllmd_decode(const struct rkllmd_model *m, int64_t token, int64_t pos) {
    const int64_t dim = m->dim, hd = m->head_dim, ffn = m->ffn_dim;
    const int64_t q_dim = m->n_heads * hd, qkv_dim = q_dim + 2 * m->n_kv_heads * hd;
    const int64_t n_chunks = (pos + 1 + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK;
    float *partials = malloc(m->n_heads * n_chunks * (hd + 2) * sizeof(float));
    if (!partials)
        return -1;
#pragma omp parallel
    {
#pragma omp single
        memcpy(m->x, m->head + token * dim, dim * sizeof(float));
        for (int64_t layer = 0; layer < m->n_layers; layer++) {
#pragma omp single
            rms_norm(m->x, m->attn_norm + layer * dim, m->h, dim, m->norm_eps);
            matvec(m->wqkv + layer * qkv_dim * dim, m->h, m->qkv, qkv_dim, dim);
#pragma omp single
            rotate_and_store(m, layer, pos);
            attention(m, layer, pos + 1, partials);
            matvec(m->wo + layer * dim * q_dim, m->attended, m->proj, dim, q_dim);
#pragma omp single
            {
                for (int64_t i = 0; i < dim; i++)
                    m->x[i] += m->proj[i];
                rms_norm(m->x, m->ffn_norm + layer * dim, m->h, dim, m->norm_eps);
            }
            matvec(m->wgu + layer * 2 * ffn * dim, m->h, m->gate_up, 2 * ffn, dim);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < ffn; i += LANES) { /* silu(gate) * up */
                const int64_t count = ffn - i < LANES ? ffn - i : LANES;
                lanes_t gate = {0}, up = {0};
                memcpy(&gate, m->gate_up + i, count * sizeof(float));
                memcpy(&up, m->gate_up + ffn + i, count * sizeof(float));
                const lanes_t act = gate / (1.0f + exp_lanes(-gate)) * up;
                memcpy(m->act + i, &act, count * sizeof(float));
            }
            matvec(m->wd + layer * dim * ffn, m->act, m->proj, dim, ffn);
#pragma omp single
            for (int64_t i = 0; i < dim; i++)
                m->x[i] += m->proj[i];
        }
#pragma omp single
        rms_norm(m->x, m->output_norm, m->h, dim, m->norm_eps);
        matvec(m->head, m->h, m->logits, m->vocab_size, dim);
    }
    free(partials);
    return 0;
}
