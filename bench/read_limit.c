/* A STREAM-style read probe: how fast this machine's cores together can read a buffer
 * from memory, the bound under a decode step (which streams every weight once a token).
 *
 * bench/read_limit.py compiles it with the C forward pass's flags (kernels.compile_flags:
 * -O3 -march=... -fopenmp) and calls ``rkllmd_read_seconds`` for 1..16 streams, on all
 * cores and on one (the teams forward.c decodes with), keeping the best. Each OpenMP
 * thread reads its own contiguous
 * share of the buffer as ``streams`` contiguous parts walked side by side (several
 * streams of cache lines in flight for the hardware prefetchers), summing each part in
 * its own vector accumulator: one load and one add per 64 bytes, far below what a core
 * can issue, so memory is the only limit. The sums go to ``sink`` so nothing is elided.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
#include <time.h>
#endif

#if defined(__AVX512F__)
#define WIDTH 16
#elif defined(__AVX__)
#define WIDTH 8
#else
#define WIDTH 4
#endif
/* Floats a stream reads per step: one 64-byte cache line. */
#define LINE 16
#define MAX_STREAMS 16

typedef float vec_t __attribute__((vector_size(WIDTH * sizeof(float))));

static inline vec_t load(const float *p) {
    vec_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ``n_lines`` cache lines of each of S parts starting ``part`` floats apart. */
#define DEFINE_READ(S)                                                                                        \
    static double read_##S(const float *p, int64_t part, int64_t n_lines) {                                    \
        vec_t acc[S] = {{0}};                                                                                 \
        for (int64_t i = 0; i < n_lines * LINE; i += LINE)                                                    \
            _Pragma("GCC unroll 16") for (int s = 0; s < (S); s++)                                            \
                _Pragma("GCC unroll 4") for (int j = 0; j < LINE; j += WIDTH)                                 \
                    acc[s] += load(p + s * part + i + j);                                                     \
        vec_t total = {0};                                                                                    \
        for (int s = 0; s < (S); s++)                                                                         \
            total += acc[s];                                                                                  \
        double sum = 0.0;                                                                                     \
        for (int j = 0; j < WIDTH; j++)                                                                       \
            sum += total[j];                                                                                  \
        return sum;                                                                                           \
    }

DEFINE_READ(1)
DEFINE_READ(2)
DEFINE_READ(3)
DEFINE_READ(4)
DEFINE_READ(5)
DEFINE_READ(6)
DEFINE_READ(7)
DEFINE_READ(8)
DEFINE_READ(9)
DEFINE_READ(10)
DEFINE_READ(11)
DEFINE_READ(12)
DEFINE_READ(13)
DEFINE_READ(14)
DEFINE_READ(15)
DEFINE_READ(16)

typedef double read_fn(const float *, int64_t, int64_t);
static read_fn *const READS[MAX_STREAMS + 1] = {0,       read_1,  read_2,  read_3,  read_4,  read_5,
                                                read_6,  read_7,  read_8,  read_9,  read_10, read_11,
                                                read_12, read_13, read_14, read_15, read_16};

/* Sums a thread's share of floats outside whole lines of its parts (tails). */
static double read_rest(const float *p, int64_t n) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += p[i];
    return sum;
}

static double now(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
#endif
}

int rkllmd_read_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* Seconds to read ``n_pieces`` buffers one after the other, as a decode step's products read
 * the weights (a layer's q/k/v, output, gate/up and down matrices, then the head): in one
 * parallel region, each piece's lines shared out to the threads in contiguous shares (from
 * whole lines: the pieces are page-aligned), each share read as ``streams`` parts side by
 * side, the threads waiting for each other at the piece's end; each thread's sum into
 * sink[thread], the other sinks zeroed. Returns -1 for a stream or thread count out of range. */
double rkllmd_read_pieces_seconds(const float *const *pieces, const int64_t *sizes, int64_t n_pieces, int streams,
                                  int threads, double *sink) {
    if (streams < 1 || streams > MAX_STREAMS || threads < 1 || threads > rkllmd_read_threads())
        return -1.0;
    for (int t = 0; t < rkllmd_read_threads(); t++)
        sink[t] = 0.0;
    const double start = now();
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
#else
        const int64_t thread = 0, threads = 1;
#endif
        double sum = 0.0;
        for (int64_t i = 0; i < n_pieces; i++) {
            const int64_t n = sizes[i], lines = n / LINE;
            const int64_t first = lines * thread / threads * LINE;
            const int64_t last = thread == threads - 1 ? n : lines * (thread + 1) / threads * LINE;
            const int64_t n_lines = (last - first) / LINE / streams, part = n_lines * LINE;
            sum += READS[streams](pieces[i] + first, part, n_lines);
            sum += read_rest(pieces[i] + first + streams * part, last - first - streams * part);
#pragma omp barrier
        }
        sink[thread] = sum;
    }
    return now() - start;
}

/* Seconds to read all ``n`` floats of ``buffer`` once with ``threads`` threads (forward.c
 * runs a decode step with every thread or, on a busy machine, one), each thread's share as
 * ``streams`` (1..16) parts side by side; each thread's sum into sink[thread], the other
 * sinks zeroed. Returns -1 for a stream or thread count out of range. */
double rkllmd_read_seconds(const float *buffer, int64_t n, int streams, int threads, double *sink) {
    return rkllmd_read_pieces_seconds(&buffer, &n, 1, streams, threads, sink);
}
