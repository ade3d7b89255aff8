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
 * by rows, attention by query heads, the small vector work on one thread. Every output
 * element is computed by one thread in a fixed order, so results never depend on the
 * thread count.
 *
 * Arrays and layouts are model.py's (see its docstring): weights output-major, keys
 * [layer, kv_head, dim, position], values [layer, kv_head, position, dim], rotary in
 * halves order. Built by kernels.py with the machine's compiler (-O3 -march=native
 * -fopenmp) and called through ctypes; the vector extensions are GCC's and clang's,
 * lowered to AVX-512, AVX2 or NEON as the CPU has them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bumped whenever struct rkllmd_model or a signature changes: kernels.py checks it. */
#define RKLLMD_KERNEL_ABI 2
#define LANES 16
#define ACCUMULATORS 4

typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

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

/* One query head's attention over positions [0, n_keys): softmax(q K) V. */
static void attend(const struct rkllmd_model *m, int64_t layer, int64_t head, int64_t n_keys) {
    const int64_t hd = m->head_dim, cap = m->capacity, nkv = m->n_kv_heads;
    const int64_t kv = head / (m->n_heads / nkv);
    const float *q = m->queries + head * hd;
    const float *keys = m->keys + ((layer * nkv + kv) * hd) * cap;
    const float *values = m->values + ((layer * nkv + kv) * cap) * hd;
    float *scores = m->scores + head * cap, *out = m->attended + head * hd;

    memset(scores, 0, n_keys * sizeof(float));
    for (int64_t d = 0; d < hd; d++) {
        const float qd = q[d], *row = keys + d * cap;
        for (int64_t p = 0; p < n_keys; p++)
            scores[p] += qd * row[p];
    }
    float top = scores[0];
    for (int64_t p = 1; p < n_keys; p++)
        top = scores[p] > top ? scores[p] : top;
    float total = 0.0f;
    for (int64_t p = 0; p < n_keys; p++) {
        scores[p] = expf(scores[p] - top);
        total += scores[p];
    }
    memset(out, 0, hd * sizeof(float));
    for (int64_t p = 0; p < n_keys; p++) {
        const float weight = scores[p], *row = values + p * hd;
        for (int64_t d = 0; d < hd; d++)
            out[d] += weight * row[d];
    }
    for (int64_t d = 0; d < hd; d++)
        out[d] /= total;
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

/* Run ``token`` at ``pos`` (its key and value join the cache); logits into m->logits. */
void rkllmd_decode(const struct rkllmd_model *m, int64_t token, int64_t pos) {
    const int64_t dim = m->dim, hd = m->head_dim, ffn = m->ffn_dim;
    const int64_t q_dim = m->n_heads * hd, qkv_dim = q_dim + 2 * m->n_kv_heads * hd;
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
#pragma omp for schedule(static)
            for (int64_t head = 0; head < m->n_heads; head++)
                attend(m, layer, head, pos + 1);
            matvec(m->wo + layer * dim * q_dim, m->attended, m->proj, dim, q_dim);
#pragma omp single
            {
                for (int64_t i = 0; i < dim; i++)
                    m->x[i] += m->proj[i];
                rms_norm(m->x, m->ffn_norm + layer * dim, m->h, dim, m->norm_eps);
            }
            matvec(m->wgu + layer * 2 * ffn * dim, m->h, m->gate_up, 2 * ffn, dim);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < ffn; i++) {
                const float gate = m->gate_up[i];
                m->act[i] = gate / (1.0f + expf(-gate)) * m->gate_up[ffn + i];
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
}
