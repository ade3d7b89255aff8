/* Where a decode step's time goes, phase by phase, against a read probe in the same memory.
 * Built by bench/decode_phases.py with forward.c's flags and -DRKLLMD_PHASE_TIMES
 * (forward.c, included whole: -DFORWARD_C='"path"', then reports each thread's time in each
 * phase through rkllmd_phase_timed).
 *
 * usage: decode_phases CONTEXT STEPS
 * A random model of SmolLM2-135M's shapes, every array in 2 MB pages (as the daemon keeps
 * its weights and caches), CONTEXT tokens prefilled, then STEPS decode steps timed. One line
 * of key=value pairs on stdout:
 * - step: the median step's wall seconds;
 * - for each kind of phase (qkv, attend, merge, wo, gu, wd, head, embed): seconds a step
 *   in it (thread 0's items and its wait for the other threads), summed over the layers;
 * - kv: bytes of keys and values a step's attention reads (its positions' blocks, at the
 *   mean position of the timed steps); weights: bytes a step's products read, and each
 *   kind's (bytes_qkv, ...);
 * - probe: the best GB/s of reading the weights in a step's order with read_limit.c's
 *   rkllmd_read_pieces_seconds (each matrix shared out to every thread in contiguous
 *   shares of 1..12 streams, the threads waiting for each other at its end), the same
 *   pages the step reads.
 */
#include FORWARD_C

#include <stdio.h>
#include <sys/mman.h>

#define KINDS 8
static const char *const KIND_NAMES[KINDS] = {"embed", "qkv", "attend", "merge", "wo", "gu", "wd", "head"};
static int64_t kind_ns[KINDS], n_layers_timed;
static int timing;

/* Phase p of a decode call (one row, its own cache: no rotation phase): 0 embeds, then six a
 * layer, then the head. */
void rkllmd_phase_timed(int64_t phase, int64_t member, int64_t items_ns, int64_t wait_ns) {
    if (!timing || member != 0)
        return;
    const int64_t kind = phase == 0 ? 0 : phase > 6 * n_layers_timed ? 7 : 1 + (phase - 1) % 6;
    kind_ns[kind] += items_ns + wait_ns;
}

#include "random_model.h"

static float *huge_floats(int64_t n) { /* in 2 MB pages, as the daemon keeps weights and caches */
    const size_t huge = 2 << 20, bytes = (n * sizeof(float) + huge - 1) / huge * huge;
    float *a = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED)
        exit(1);
    madvise(a, bytes, MADV_HUGEPAGE);
    return a;
}

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* read_limit.c's probe, linked beside this file (bench/decode_phases.py builds both): the
 * pieces read one after the other, each thread's share as ``streams`` parts side by side. */
double rkllmd_read_pieces_seconds(const float *const *pieces, const int64_t *sizes, int64_t n_pieces, int streams,
                                  int threads, double *sink);

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s CONTEXT STEPS\n", argv[0]);
        return 2;
    }
    const int64_t L = SMOLLM2_LAYERS, KV = SMOLLM2_KV_DIM, V = SMOLLM2_VOCAB, capacity = 4096, C = ATTENTION_CHUNK;
    const int64_t context = atoll(argv[1]), steps = atoll(argv[2]), warm = 8;
    if (context < 1 || steps < 1 || context + warm + steps > capacity)
        return 2;
    const struct random_model model = random_model(huge_floats, capacity);
    int64_t *tokens = malloc((context + warm + steps) * sizeof(int64_t));
    for (int64_t i = 0; i < context + warm + steps; i++)
        tokens[i] = i * 7919 % V;
    float *logits = malloc(V * sizeof(float));
    double *times = malloc(steps * sizeof(double));
    n_layers_timed = L;
    if (forward(&model, tokens, context, 0, logits) != 0)
        return 1;
    for (int64_t i = 0; i < warm; i++)
        forward(&model, tokens + context + i, 1, context + i, logits);
    timing = 1;
    double kv_bytes = 0.0;
    for (int64_t i = 0; i < steps; i++) {
        const int64_t pos = context + warm + i, chunks = pos / C + 1;
        const double t0 = seconds();
        if (forward(&model, tokens + pos, 1, pos, logits) != 0)
            return 1;
        times[i] = seconds() - t0;
        /* each chunk's keys: whole passes of positions (attend_chunk); its values: its positions */
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t n = c + 1 < chunks ? C : pos + 1 - c * C, pass = SET_VECTORS * WIDTH;
            const int64_t scored = (n + pass - 1) / pass * pass <= C ? (n + pass - 1) / pass * pass : n;
            kv_bytes += (double)L * KV * (scored + n) * sizeof(float);
        }
    }
    timing = 0;
    qsort(times, steps, sizeof *times, by_value);
    double weights = 0.0, best = 0.0;
    for (int i = 0; i < PRODUCTS; i++)
        weights += model.product_floats[i] * sizeof(float);
    double sink[256];
    const int team_threads = rkllmd_kernel_threads();
    for (int streams = 1; streams <= 12; streams++)
        for (int round = 0; round < 3; round++) {
            const double gbps = weights / rkllmd_read_pieces_seconds(model.products, model.product_floats, PRODUCTS, streams, team_threads, sink) / 1e9;
            best = gbps > best ? gbps : best;
        }
    printf("step=%.6f", times[steps / 2]);
    for (int k = 0; k < KINDS; k++)
        printf(" %s=%.6f", KIND_NAMES[k], kind_ns[k] * 1e-9 / steps);
    const char *const products[PRODUCTS] = {"qkv", "wo", "gu", "wd", "head"};
    for (int i = 0; i < PRODUCTS; i++)
        printf(" bytes_%s=%.0f", products[i], model.product_floats[i] * (double)sizeof(float));
    printf(" kv=%.0f weights=%.0f probe=%.3f\n", kv_bytes / steps, weights, best);
    return 0;
}
