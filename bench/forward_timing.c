/* Times one build of forward.c (included whole: -DFORWARD_C='"path"') on a random model
 * of SmolLM2-135M's shapes, for bench/forward_versions.py, which builds two versions and
 * runs them in turn.
 *
 * usage: forward_timing prefill TOKENS CHUNK REPEAT | forward_timing decode CONTEXT STEPS
 * prefill: TOKENS in chunks of CHUNK rows, best of REPEAT: wall seconds, CPU seconds of
 *   the process (all threads: a thread's time spinning at the end of a phase counts too),
 *   and a hash of the last logits (equal between versions that compute the same bits);
 * decode: CONTEXT tokens prefilled, then the median wall time of STEPS steps.
 * One line of key=value pairs on stdout.
 */
#include FORWARD_C

#include <stdio.h>
#include <time.h>

/* The entry point this driver calls (older revisions took one cache). ABI 7 laid the caches
 * out in blocks of positions, in the same memory: a capacity of whole 256-position blocks. */
#if RKLLMD_KERNEL_ABI != 6 && RKLLMD_KERNEL_ABI != 7
#error "forward_timing.c drives kernel ABI 6 and 7: compare revisions of those"
#endif

#include "random_model.h"

/* plain malloc memory: 4 KB pages where transparent huge pages are left to madvise */
static float *plain_floats(int64_t n) { return malloc(n * sizeof(float)); }

static double seconds(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 4 || (strcmp(argv[1], "prefill") != 0 && strcmp(argv[1], "decode") != 0)) {
        fprintf(stderr, "usage: %s prefill TOKENS CHUNK REPEAT | %s decode CONTEXT STEPS\n", argv[0], argv[0]);
        return 2;
    }
    const int64_t capacity = 4096, V = SMOLLM2_VOCAB;
    const struct random_model model = random_model(plain_floats, capacity);
    const int64_t n = atoll(argv[2]);
    int64_t *tokens = malloc((n + 1024) * sizeof(int64_t));
    for (int64_t i = 0; i < n + 1024; i++)
        tokens[i] = i * 7919 % V;
    float *logits = malloc(V * sizeof(float));

    if (strcmp(argv[1], "prefill") == 0) {
        const int64_t chunk = argc > 3 ? atoll(argv[3]) : 128, repeat = argc > 4 ? atoll(argv[4]) : 3;
        double wall = 1e9, cpu = 1e9;
        for (int64_t r = 0; r < repeat; r++) {
            const double w0 = seconds(CLOCK_MONOTONIC), c0 = seconds(CLOCK_PROCESS_CPUTIME_ID);
            for (int64_t pos = 0; pos < n; pos += chunk) {
                const int64_t count = n - pos < chunk ? n - pos : chunk;
                if (forward(&model, tokens + pos, count, pos, pos + count == n ? logits : NULL) != 0)
                    return 1;
            }
            const double w = seconds(CLOCK_MONOTONIC) - w0, c = seconds(CLOCK_PROCESS_CPUTIME_ID) - c0;
            wall = w < wall ? w : wall;
            cpu = c < cpu ? c : cpu;
        }
        uint32_t hash = 0;
        for (int64_t i = 0; i < V; i++) {
            uint32_t bits;
            memcpy(&bits, logits + i, sizeof bits);
            hash = hash * 31 + bits;
        }
        printf("wall=%.6f cpu=%.6f hash=%08x\n", wall, cpu, hash);
    } else {
        const int64_t steps = atoll(argv[3]);
        double *times = malloc(steps * sizeof(double));
        if (steps < 1 || n + steps > capacity || forward(&model, tokens, n, 0, logits) != 0)
            return 1;
        for (int64_t i = 0; i < steps; i++) {
            const double t0 = seconds(CLOCK_MONOTONIC);
            forward(&model, tokens + n + i, 1, n + i, logits);
            times[i] = seconds(CLOCK_MONOTONIC) - t0;
        }
        qsort(times, steps, sizeof *times, by_value);
        printf("step=%.6f\n", times[steps / 2]);
    }
    return 0;
}
