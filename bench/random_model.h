/* What bench/forward_timing.c and bench/decode_phases.c share (each includes forward.c
 * first): a random model of SmolLM2-135M's shapes, and calls of one stream. */
#ifndef RKLLMD_BENCH_RANDOM_MODEL_H
#define RKLLMD_BENCH_RANDOM_MODEL_H

#include <stdint.h>
#include <stdlib.h>

#define SMOLLM2_LAYERS 30
#define SMOLLM2_DIM 576
#define SMOLLM2_FFN 1536
#define SMOLLM2_VOCAB 49152
#define SMOLLM2_KV_DIM (3 * 64) /* KV heads x head_dim */

/* The products' matrices in a step's order: q/k/v, output, gate/up, down, head. */
#define PRODUCTS 5

struct random_model {
    struct rkllmd_model m;
    float *keys, *values;              /* one stream's caches, of m.capacity positions */
    const float *products[PRODUCTS];   /* the products' weights, in a step's order */
    int64_t product_floats[PRODUCTS];
};

static uint64_t rng_state = 88172645463325252ULL;

/* ``alloc(n)`` floats filled by xorshift64*, in [-scale, scale). */
static float *random_floats(float *(*alloc)(int64_t), int64_t n, float scale) {
    float *a = alloc(n);
    for (int64_t i = 0; i < n; i++) {
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        a[i] = ((float)((rng_state * 2685821657736338717ULL) >> 40) / (float)(1 << 23) - 1.0f) * scale;
    }
    return a;
}

/* SmolLM2-135M's shapes, every array from ``alloc``, the caches zeroed. */
static struct random_model random_model(float *(*alloc)(int64_t), int64_t capacity) {
    const int64_t L = SMOLLM2_LAYERS, D = SMOLLM2_DIM, F = SMOLLM2_FFN, V = SMOLLM2_VOCAB, KV = SMOLLM2_KV_DIM;
    struct random_model r = {.m = {.n_layers = L, .dim = D, .n_heads = 9, .n_kv_heads = 3, .head_dim = 64, .ffn_dim = F,
                                   .vocab_size = V, .capacity = capacity, .norm_eps = 1e-5},
                             .product_floats = {L * (D + 2 * KV) * D, L * D * D, L * 2 * F * D, L * D * F, V * D}};
    struct rkllmd_model *m = &r.m;
    m->head = random_floats(alloc, V * D, 0.05f);
    m->output_norm = random_floats(alloc, D, 1.0f);
    m->attn_norm = random_floats(alloc, L * D, 1.0f);
    m->ffn_norm = random_floats(alloc, L * D, 1.0f);
    m->wqkv = random_floats(alloc, r.product_floats[0], 0.04f);
    m->wo = random_floats(alloc, r.product_floats[1], 0.04f);
    m->wgu = random_floats(alloc, r.product_floats[2], 0.04f);
    m->wd = random_floats(alloc, r.product_floats[3], 0.025f);
    m->rope_cos = random_floats(alloc, capacity * 32, 1.0f);
    m->rope_sin = random_floats(alloc, capacity * 32, 1.0f);
    r.keys = random_floats(alloc, L * KV * capacity, 0.0f);
    r.values = random_floats(alloc, L * KV * capacity, 0.0f);
    const float *products[PRODUCTS] = {m->wqkv, m->wo, m->wgu, m->wd, m->head};
    for (int i = 0; i < PRODUCTS; i++)
        r.products[i] = products[i];
    return r;
}

/* ``count`` tokens at positions pos.. of the stream's cache, the last row's logits unless NULL. */
static int forward(const struct random_model *r, const int64_t *tokens, int64_t count, int64_t pos, float *logits) {
    int64_t positions[count], last = count - 1;
    float *row_keys[count], *row_values[count];
    for (int64_t t = 0; t < count; t++) {
        positions[t] = pos + t;
        row_keys[t] = r->keys;
        row_values[t] = r->values;
    }
    return rkllmd_forward(&r->m, count, tokens, positions, row_keys, row_values, logits != NULL, &last, logits);
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#endif
