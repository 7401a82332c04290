/* The soak tier's target: a long-running process at a high allocation rate, the way
 * a busy service churns its heap, with a slow leak and mapping churn.
 * Usage: soak THREADS
 *   Each thread keeps a window of 4096 live blocks of 16 B–8 KiB, replacing the
 *   oldest with a new one as fast as it can, from 64 distinct call paths (stacks
 *   leaktrace must keep), leaks one block in 10000, and every 65536 steps maps and
 *   unmaps 1 MiB. Runs until killed.
 * Protocol: prints "ready <pid>", then runs. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define WINDOW 4096

static void *leaked_sink;

__attribute__((noinline)) static void *alloc_at(unsigned path, size_t n) {
    /* Distinct return addresses per path: a switch of calls. */
    switch (path & 7) {
    case 0: return malloc(n);
    case 1: return calloc(1, n);
    case 2: return malloc(n + 1);
    case 3: return malloc(n + 2);
    case 4: return calloc(n, 1);
    case 5: return malloc(n + 3);
    case 6: return malloc(n + 4);
    default: return malloc(n + 5);
    }
}

__attribute__((noinline)) static void *depth(unsigned path, size_t n, int d) {
    if (d > 0) {
        void *p = depth(path, n, d - 1);
        __asm__ volatile("" ::: "memory");
        return p;
    }
    return alloc_at(path, n);
}

static void *worker(void *arg) {
    unsigned seed = (unsigned)(size_t)arg * 2654435761u;
    void **live = calloc(WINDOW, sizeof *live);
    for (unsigned long step = 0;; step++) {
        seed = seed * 1103515245u + 12345u;
        unsigned slot = step % WINDOW;
        free(live[slot]);
        size_t n = 16 + (seed >> 8) % 8192;
        live[slot] = depth(seed >> 3, n, (seed >> 6) & 7);
        if (live[slot]) memset(live[slot], 1, 16);
        if (step % 10000 == 9999) {
            leaked_sink = malloc(64);
        }
        if ((step & 65535) == 65535) {
            void *m = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m != MAP_FAILED) {
                memset(m, 1, 1 << 20);
                munmap(m, 1 << 20);
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    pthread_t t[64];
    for (int i = 0; i < threads && i < 64; i++) pthread_create(&t[i], NULL, worker, (void *)(size_t)(i + 1));
    for (int i = 0; i < threads && i < 64; i++) pthread_join(t[i], NULL);
    return 0;
}
