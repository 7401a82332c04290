/* malloc+free pairs with mixed sizes, timed inside the process.
 * Usage: malloc_loop PAIRS [THREADS [RATE [DEPTH]]]
 *   PAIRS per thread; RATE caps the pairs per second per thread (0: flat out);
 *   DEPTH extra call frames between the thread start and the loop (stack depth for
 *   the unwinders to walk).
 * Protocol: prints "ready", waits for a line on stdin, runs, prints
 * "result ns_per_op=N ops=N", then waits for stdin to close. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long pairs, rate;
static int depth;
static void *volatile sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void loop(void) {
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
}

__attribute__((noinline)) static void descend(int d) {
    if (d > 0)
        descend(d - 1);
    else
        loop();
    __asm__ volatile("" ::: "memory"); /* not a tail call: a real frame per level */
}

static void *work(void *arg) {
    (void)arg;
    descend(depth);
    return NULL;
}

int main(int argc, char **argv) {
    pairs = argc > 1 ? atol(argv[1]) : 200000;
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    rate = argc > 3 ? atol(argv[3]) : 0;
    depth = argc > 4 ? atoi(argv[4]) : 0;
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
