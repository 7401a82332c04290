/* A small service that leaks at three known places while churning temporaries.
 * Used by `cargo xtask demo`; build: cc -O0 -g -fno-omit-frame-pointer leaky.c -o leaky */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct session { char name[48]; struct session *next; };
static struct session *sessions;

/* Leak 1: a session list that is never pruned (64 bytes per request). */
__attribute__((noinline)) static void remember_session(int id) {
    struct session *s = malloc(sizeof *s);
    snprintf(s->name, sizeof s->name, "session-%d", id);
    s->next = sessions;
    sessions = s;
}

/* Leak 2: a response buffer that is dropped on the error path (4 KiB every 10th request). */
__attribute__((noinline)) static void handle_error(int id) {
    char *buf = calloc(1, 4096);
    snprintf(buf, 4096, "error %d", id);
    /* forgot free(buf) */
}

/* Leak 3: a cache that grows by realloc and is never trimmed. */
static char *cache; static size_t cache_len;
__attribute__((noinline)) static void cache_append(const char *s) {
    size_t n = strlen(s);
    cache = realloc(cache, cache_len + n + 1);
    memcpy(cache + cache_len, s, n + 1);
    cache_len += n;
}

/* Temporaries: allocated and freed within the request. */
__attribute__((noinline)) static void parse_request(int id) {
    char *tmp = malloc(1000 + id % 500);
    snprintf(tmp, 1000, "GET /item/%d", id);
    char *copy = strdup(tmp);
    free(tmp);
    free(copy);
}

static void serve(int i) {
    parse_request(i);
    remember_session(i);
    if (i % 10 == 0) handle_error(i);
    cache_append("0123456789abcdef");
}

/* leaky [REQUESTS]   handle REQUESTS requests (default 3000) over about 3 s, then exit
 * leaky --forever    keep serving 1000 requests a second until killed */
int main(int argc, char **argv) {
    int forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
    int requests = argc > 1 && !forever ? atoi(argv[1]) : 3000;
    printf("leaky: pid %d serving %s\n", (int)getpid(), forever ? "forever" : "then exiting");
    fflush(stdout);
    for (int i = 0; forever || i < requests; i++) {
        serve(i);
        if (i % 100 == 99) usleep(100000);
    }
    printf("leaky: done, %d requests\n", requests);
    return 0;
}
