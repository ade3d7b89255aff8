/* Runs rkllmd's C forward pass (forward.c, included whole) on a small random model, so
 * the same check can run on any target, under qemu-user for a foreign one.
 *
 * usage: forward_driver LAYERS DIM HEADS KV_HEADS FFN VOCAB TOKENS SEED
 *
 * Prefills TOKENS random tokens at once, then checks, bit for bit, that every other way
 * of getting there gives the same last logits and KV cache: a prefix then the rest (at
 * many splits, the cache past the prefix filled with garbage), chunks of several sizes,
 * a prefix then decode steps one token at a time, and the same stream batched with two
 * others in their own caches (decode rows of two streams and a prompt chunk of a third in
 * each call, all at different positions). Exit status 1 names the first difference; on
 * success the logits and the cache go to stdout (float32, native byte order) for the test
 * to compare between builds and thread counts.
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
    const int64_t blocks = (m->capacity + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK;
    return blocks * m->n_layers * m->n_kv_heads * m->head_dim * ATTENTION_CHUNK;
}

/* Where position pos's key component d, or its value, of a layer's KV head kv sits in a cache. */
static int64_t key_at(const struct rkllmd_model *m, int64_t layer, int64_t kv, int64_t d, int64_t pos) {
    return kv_block_offset(m, layer, kv, pos) + d * ATTENTION_CHUNK + pos % ATTENTION_CHUNK;
}

static int64_t value_at(const struct rkllmd_model *m, int64_t layer, int64_t kv, int64_t pos) {
    return kv_block_offset(m, layer, kv, pos) + pos % ATTENTION_CHUNK * m->head_dim;
}

/* One stream's KV cache. */
struct cache {
    float *keys, *values;
};

static struct cache new_cache(const struct rkllmd_model *m) {
    return (struct cache){malloc(cache_size(m) * sizeof(float)), malloc(cache_size(m) * sizeof(float))};
}

static void spoil_cache(const struct rkllmd_model *m, struct cache c) {
    for (int64_t i = 0; i < cache_size(m); i++)
        c.keys[i] = c.values[i] = 7.0f;
}

/* ``n`` tokens of one stream at positions pos..; the last one's logits unless NULL. */
static int forward(const struct rkllmd_model *m, struct cache c, const int64_t *tokens, int64_t n, int64_t pos, float *logits) {
    int64_t positions[n], last = n - 1;
    float *keys[n], *values[n];
    for (int64_t t = 0; t < n; t++) {
        positions[t] = pos + t;
        keys[t] = c.keys;
        values[t] = c.values;
    }
    return rkllmd_forward(m, n, tokens, positions, keys, values, logits != NULL, &last, logits);
}

/* The cache of positions [0, n) and the logits equal the reference's. */
static int same(const struct rkllmd_model *m, struct cache c, const float *keys, const float *values, const float *logits,
                const float *ref_logits, int64_t n, const char *what) {
    int ok = memcmp(logits, ref_logits, m->vocab_size * sizeof(float)) == 0;
    for (int64_t layer = 0; layer < m->n_layers; layer++)
        for (int64_t kv = 0; kv < m->n_kv_heads; kv++)
            for (int64_t pos = 0; pos < n; pos++) {
                for (int64_t d = 0; d < m->head_dim; d++) {
                    const int64_t at = key_at(m, layer, kv, d, pos);
                    ok &= memcmp(c.keys + at, keys + at, sizeof(float)) == 0;
                }
                const int64_t at = value_at(m, layer, kv, pos);
                ok &= memcmp(c.values + at, values + at, m->head_dim * sizeof(float)) == 0;
            }
    if (!ok)
        fprintf(stderr, "differs from prefilling everything at once: %s\n", what);
    return ok;
}

/* Three streams batched: ``tokens`` (the reference's) and two others, each in its own
 * (spoiled) cache. The first two start decoding from different positions, the third is
 * prefilled 3 tokens a call beside them; every stream must end as it would alone. */
static int batched(const struct rkllmd_model *m, const int64_t *tokens, int64_t n, const float *ref_keys,
                   const float *ref_values, const float *ref_logits) {
    int64_t *streams[3] = {(int64_t *)tokens, malloc(n * sizeof(int64_t)), malloc(n * sizeof(int64_t))};
    for (int64_t i = 0; i < n; i++) {
        streams[1][i] = tokens[n - 1 - i];
        streams[2][i] = (tokens[i] * 7 + 3) % m->vocab_size;
    }
    struct cache caches[3], alone = new_cache(m);
    float *alone_logits = malloc(m->vocab_size * sizeof(float)), *logits = malloc(3 * m->vocab_size * sizeof(float));
    float *final_logits[3] = {malloc(m->vocab_size * sizeof(float)), malloc(m->vocab_size * sizeof(float)), malloc(m->vocab_size * sizeof(float))};
    int64_t done[3] = {n / 2, n / 3, 0};
    for (int s = 0; s < 3; s++) {
        caches[s] = new_cache(m);
        spoil_cache(m, caches[s]);
        if (done[s])
            forward(m, caches[s], streams[s], done[s], 0, NULL);
    }
    while (done[0] < n || done[1] < n || done[2] < n) {
        int64_t row_tokens[5], positions[5], logit_rows[3], rows = 0, wanted = 0, owner[3];
        float *keys[5], *values[5];
        for (int s = 0; s < 3; s++) {
            const int64_t count = s < 2 ? 1 : 3, left = n - done[s], take = left < count ? left : count;
            for (int64_t i = 0; i < take; i++, rows++) {
                row_tokens[rows] = streams[s][done[s] + i];
                positions[rows] = done[s] + i;
                keys[rows] = caches[s].keys;
                values[rows] = caches[s].values;
            }
            done[s] += take;
            if (take && done[s] == n) {
                owner[wanted] = s;
                logit_rows[wanted++] = rows - 1;
            }
        }
        rkllmd_forward(m, rows, row_tokens, positions, keys, values, wanted, logit_rows, logits);
        for (int64_t i = 0; i < wanted; i++)
            memcpy(final_logits[owner[i]], logits + i * m->vocab_size, m->vocab_size * sizeof(float));
    }
    int ok = same(m, caches[0], ref_keys, ref_values, final_logits[0], ref_logits, n, "batched with two other streams");
    for (int s = 1; s < 3; s++) {
        spoil_cache(m, alone);
        forward(m, alone, streams[s], n, 0, alone_logits);
        ok &= same(m, caches[s], alone.keys, alone.values, final_logits[s], alone_logits, n, "another stream of the batch");
    }
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
    struct cache c = new_cache(&m);
    int64_t *tokens = malloc(n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++)
        tokens[i] = (int64_t)((uniform() + 1.0f) / 2.0f * (float)m.vocab_size) % m.vocab_size;

    float *ref_logits = malloc(m.vocab_size * sizeof(float)), *logits = malloc(m.vocab_size * sizeof(float));
    spoil_cache(&m, c);
    if (forward(&m, c, tokens, n, 0, ref_logits) != 0)
        return 1;
    float *ref_keys = malloc(cache_size(&m) * sizeof(float)), *ref_values = malloc(cache_size(&m) * sizeof(float));
    memcpy(ref_keys, c.keys, cache_size(&m) * sizeof(float));
    memcpy(ref_values, c.values, cache_size(&m) * sizeof(float));

    int ok = 1;
    char what[64];
    for (int64_t split = 1; split < n; split += split < 8 ? 1 : split / 3) { /* a prefix, then the rest */
        spoil_cache(&m, c);
        forward(&m, c, tokens, split, 0, NULL);
        forward(&m, c, tokens + split, n - split, split, logits);
        snprintf(what, sizeof what, "prefix of %lld, then the rest", (long long)split);
        ok &= same(&m, c, ref_keys, ref_values, logits, ref_logits, n, what);
    }
    const int64_t chunk_sizes[] = {1, 5, 7, 13, 64};
    for (size_t k = 0; k < sizeof chunk_sizes / sizeof *chunk_sizes; k++) { /* in chunks */
        spoil_cache(&m, c);
        for (int64_t pos = 0; pos < n; pos += chunk_sizes[k]) {
            const int64_t count = n - pos < chunk_sizes[k] ? n - pos : chunk_sizes[k];
            forward(&m, c, tokens + pos, count, pos, pos + count == n ? logits : NULL);
        }
        snprintf(what, sizeof what, "chunks of %lld", (long long)chunk_sizes[k]);
        ok &= same(&m, c, ref_keys, ref_values, logits, ref_logits, n, what);
    }
    spoil_cache(&m, c); /* a prefix, then decode steps */
    forward(&m, c, tokens, n / 2, 0, NULL);
    for (int64_t pos = n / 2; pos < n; pos++)
        forward(&m, c, tokens + pos, 1, pos, logits);
    ok &= same(&m, c, ref_keys, ref_values, logits, ref_logits, n, "prefix, then decode steps");
    ok &= batched(&m, tokens, n, ref_keys, ref_values, ref_logits);
    if (!ok)
        return 1;

    fwrite(ref_logits, sizeof(float), m.vocab_size, stdout);
    for (int64_t layer = 0; layer < L; layer++)
        for (int64_t kv = 0; kv < m.n_kv_heads; kv++) {
            for (int64_t d = 0; d < hd; d++)
                for (int64_t pos = 0; pos < n; pos++)
                    fwrite(ref_keys + key_at(&m, layer, kv, d, pos), sizeof(float), 1, stdout);
            for (int64_t pos = 0; pos < n; pos++)
                fwrite(ref_values + value_at(&m, layer, kv, pos), sizeof(float), hd, stdout);
        }
    return 0;
}
