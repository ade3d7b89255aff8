/* Runs rkllmd's C forward pass (forward.c, included whole) on a small random model, so
 * the same check can run on any target, under qemu-user for a foreign one.
 *
 * usage: forward_driver LAYERS DIM HEADS KV_HEADS FFN VOCAB TOKENS SEED
 *
 * Prefills TOKENS random tokens at once, then checks, bit for bit, that every other way
 * of getting there gives the same last logits and KV cache: a prefix then the rest (at
 * many splits, the cache past the prefix filled with garbage), chunks of several sizes,
 * and a prefix then decode steps one token at a time. Exit status 1 names the first
 * difference; on success the logits and the cache go to stdout (float32, native byte
 * order) for the test to compare between builds and thread counts.
 */
#include "../rkllmd/backends/cpu/forward.c"

#include <stdio.h>

static uint64_t rng_state;

static float uniform(void) { /* xorshift64*, in [-1, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 2685821657736338717ULL) >> 40) / (float)(1 << 23) - 1.0f;
}

static float *random_array(int64_t n, float scale) {
    float *a = malloc(n * sizeof(float));
    for (int64_t i = 0; i < n; i++)
        a[i] = uniform() * scale;
    return a;
}

/* ``count`` matrices of n_out outputs of k inputs, random, in forward.c's panels
 * (``struct product``; the last panel zero-padded). */
static float *random_panels(int64_t count, int64_t n_out, int64_t k, float scale) {
    const int64_t panels = (n_out + LANES - 1) / LANES;
    float *a = malloc(count * panels * k * LANES * sizeof(float));
    for (int64_t i = 0; i < count * panels * k * LANES; i++) {
        const float value = uniform() * scale;
        a[i] = (i / (k * LANES)) % panels * LANES + i % LANES < n_out ? value : 0.0f;
    }
    return a;
}

static int64_t cache_size(const struct rkllmd_model *m) {
    return m->n_layers * m->n_kv_heads * m->head_dim * m->capacity;
}

static void spoil_cache(struct rkllmd_model *m) {
    for (int64_t i = 0; i < cache_size(m); i++)
        m->keys[i] = m->values[i] = 7.0f;
}

/* The cache of positions [0, n) and the logits equal the reference's. */
static int same(const struct rkllmd_model *m, const float *keys, const float *values, const float *logits,
                const float *ref_logits, int64_t n, const char *what) {
    int ok = memcmp(logits, ref_logits, m->vocab_size * sizeof(float)) == 0;
    for (int64_t block = 0; block < m->n_layers * m->n_kv_heads; block++) {
        const int64_t cap = m->capacity, hd = m->head_dim;
        for (int64_t d = 0; d < hd; d++)
            ok &= memcmp(m->keys + (block * hd + d) * cap, keys + (block * hd + d) * cap, n * sizeof(float)) == 0;
        ok &= memcmp(m->values + block * cap * hd, values + block * cap * hd, n * hd * sizeof(float)) == 0;
    }
    if (!ok)
        fprintf(stderr, "differs from prefilling everything at once: %s\n", what);
    return ok;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s LAYERS DIM HEADS KV_HEADS FFN VOCAB TOKENS SEED\n", argv[0]);
        return 2;
    }
    struct rkllmd_model m = {
        .n_layers = atoll(argv[1]), .dim = atoll(argv[2]), .n_heads = atoll(argv[3]), .n_kv_heads = atoll(argv[4]),
        .ffn_dim = atoll(argv[5]), .vocab_size = atoll(argv[6]), .norm_eps = 1e-5,
    };
    const int64_t n = atoll(argv[7]);
    rng_state = strtoull(argv[8], NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
    m.head_dim = m.dim / m.n_heads;
    m.capacity = n + 3;
    const int64_t L = m.n_layers, D = m.dim, F = m.ffn_dim, hd = m.head_dim;
    const int64_t q = m.n_heads * hd, kv = m.n_kv_heads * hd;
    const float scale = 1.0f / sqrtf((float)D);
    m.head = random_panels(1, m.vocab_size, D, 1.0f);
    m.output_norm = random_array(D, 1.0f);
    m.attn_norm = random_array(L * D, 1.0f);
    m.ffn_norm = random_array(L * D, 1.0f);
    m.wqkv = random_panels(L, q + 2 * kv, D, scale);
    m.wo = random_panels(L, D, q, scale);
    m.wgu = random_panels(L * 2 * ((F + LANES - 1) / LANES), LANES, D, scale); /* gate and up panels in turn */
    m.wd = random_panels(L, D, F, 1.0f / sqrtf((float)F));
    m.rope_cos = random_array(m.capacity * hd / 2, 1.0f); /* any table will do: libm's cos differs by target */
    m.rope_sin = random_array(m.capacity * hd / 2, 1.0f);
    m.keys = malloc(cache_size(&m) * sizeof(float));
    m.values = malloc(cache_size(&m) * sizeof(float));
    int64_t *tokens = malloc(n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++)
        tokens[i] = (int64_t)((uniform() + 1.0f) / 2.0f * (float)m.vocab_size) % m.vocab_size;

    float *ref_logits = malloc(m.vocab_size * sizeof(float)), *logits = malloc(m.vocab_size * sizeof(float));
    spoil_cache(&m);
    if (rkllmd_forward(&m, tokens, n, 0, ref_logits) != 0)
        return 1;
    float *ref_keys = malloc(cache_size(&m) * sizeof(float)), *ref_values = malloc(cache_size(&m) * sizeof(float));
    memcpy(ref_keys, m.keys, cache_size(&m) * sizeof(float));
    memcpy(ref_values, m.values, cache_size(&m) * sizeof(float));

    int ok = 1;
    char what[64];
    for (int64_t split = 1; split < n; split += split < 8 ? 1 : split / 3) { /* a prefix, then the rest */
        spoil_cache(&m);
        rkllmd_forward(&m, tokens, split, 0, NULL);
        rkllmd_forward(&m, tokens + split, n - split, split, logits);
        snprintf(what, sizeof what, "prefix of %lld, then the rest", (long long)split);
        ok &= same(&m, ref_keys, ref_values, logits, ref_logits, n, what);
    }
    const int64_t chunk_sizes[] = {1, 5, 7, 13, 64};
    for (size_t c = 0; c < sizeof chunk_sizes / sizeof *chunk_sizes; c++) { /* in chunks */
        spoil_cache(&m);
        for (int64_t pos = 0; pos < n; pos += chunk_sizes[c]) {
            const int64_t count = n - pos < chunk_sizes[c] ? n - pos : chunk_sizes[c];
            rkllmd_forward(&m, tokens + pos, count, pos, pos + count == n ? logits : NULL);
        }
        snprintf(what, sizeof what, "chunks of %lld", (long long)chunk_sizes[c]);
        ok &= same(&m, ref_keys, ref_values, logits, ref_logits, n, what);
    }
    spoil_cache(&m); /* a prefix, then decode steps */
    rkllmd_forward(&m, tokens, n / 2, 0, NULL);
    for (int64_t pos = n / 2; pos < n; pos++)
        rkllmd_forward(&m, tokens + pos, 1, pos, logits);
    ok &= same(&m, ref_keys, ref_values, logits, ref_logits, n, "prefix, then decode steps");
    if (!ok)
        return 1;

    fwrite(ref_logits, sizeof(float), m.vocab_size, stdout);
    for (int64_t block = 0; block < L * m.n_kv_heads; block++) {
        for (int64_t d = 0; d < hd; d++)
            fwrite(ref_keys + (block * hd + d) * m.capacity, sizeof(float), n, stdout);
        fwrite(ref_values + block * m.capacity * hd, sizeof(float), n * hd, stdout);
    }
    return 0;
}
