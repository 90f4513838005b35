/* The memory-traffic floors of bench/step_floor.py: reads of 16-bit rows (the step's gathers, or a stream when the
   rows come in order), summed as 16-bit integers (wrapping: one vector add per load) so that no arithmetic hides
   the loads' cost. */
#include <stdint.h>
#include <string.h>

/* the sum of rows idx[e] of a [.., d] table of 16-bit values, e in [0, n), over `parts` OpenMP threads */
uint64_t dmsae_floor_read_rows(const uint16_t *table, const int64_t *idx, int64_t n, int64_t d, int parts) {
    uint64_t total = 0;
#pragma omp parallel for num_threads(parts) reduction(+ : total) schedule(static)
    for (int64_t e = 0; e < n; ++e) {
        const uint16_t *row = table + idx[e] * d;
        uint16_t acc[32];
        memset(acc, 0, sizeof acc);
        for (int64_t j = 0; j + 32 <= d; j += 32)
            for (int l = 0; l < 32; ++l) acc[l] += row[j + l];
        for (int l = 0; l < 32; ++l) total += acc[l];
    }
    return total;
}
