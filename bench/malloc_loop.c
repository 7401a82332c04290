/* malloc+free pairs with mixed sizes, timed inside the process.
 * Usage: malloc_loop PAIRS [THREADS [RATE]]
 *   PAIRS per thread; RATE caps the pairs per second per thread (0: flat out).
 * Protocol: prints "ready", waits for a line on stdin, runs, prints
 * "result ns_per_op=N ops=N", then waits for stdin to close. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long pairs, rate;
static void *volatile sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *work(void *arg) {
    (void)arg;
    double start = now();
    for (long i = 0; i < pairs; i++) {
        void *p = malloc(16 + (i & 255));
        sink = p;
        free(p);
        if (rate && (i & 1023) == 1023) {
            double due = start + (double)(i + 1) / rate;
            while (now() < due) {
                struct timespec ts = {0, 200000};
                nanosleep(&ts, NULL);
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    pairs = argc > 1 ? atol(argv[1]) : 200000;
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    rate = argc > 3 ? atol(argv[3]) : 0;
    char line[64];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 3;
    pthread_t th[64];
    double a = now();
    for (int t = 0; t < threads; t++) pthread_create(&th[t], NULL, work, NULL);
    for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
    double b = now();
    printf("result ns_per_op=%.1f ops=%ld\n", (b - a) * 1e9 / pairs, pairs * threads);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {}
    return 0;
}
