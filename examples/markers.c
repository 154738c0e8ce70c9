/* USDT probes built with <sys/sdt.h> (Debian's systemtap-sdt-dev), for the USDT tests: handle() serves N
 * requests, each between app:request__start(id, path) and app:request__done(id, status), with lookup() in
 * between, and app:cache__miss(key, id) for the odd ones. cache__miss is semaphore-guarded: its key is only
 * built while a tracer has the probe enabled, as real programs do for costly arguments.
 *
 *   markers N
 *
 * env MARKERS_WAIT_FOR: first wait until this file exists (a gate the test opens once a tracer is attached).
 *
 * stdout, one line per event, with CLOCK_MONOTONIC ns (the kernel's span clock) read right before the probe:
 *   start id=ID path=PATH ns=NS
 *   miss id=ID key=KEY ns=NS         (only when the semaphore was set)
 *   skipped id=ID                    (an odd id while the semaphore was 0)
 *   done id=ID status=S ns=NS
 * then `finished`. */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* The semaphores: the kernel counts each up while a probe on it is attached. */
unsigned short app_request__start_semaphore __attribute__((section(".probes")));
unsigned short app_request__done_semaphore __attribute__((section(".probes")));
unsigned short app_cache__miss_semaphore __attribute__((section(".probes")));

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

__attribute__((noinline)) int lookup(int id)
{
    struct timespec pause = {0, 200000};
    nanosleep(&pause, NULL);
    return id % 4 == 3 ? 404 : 200;
}

__attribute__((noinline)) void handle(int id)
{
    char path[32];
    snprintf(path, sizeof(path), "/items/%d", id);
    printf("start id=%d path=%s ns=%lld\n", id, path, now_ns());
    STAP_PROBE2(app, request__start, id, path);
    int status = lookup(id);
    if (id % 2) {
        if (app_cache__miss_semaphore) {
            char key[48];
            snprintf(key, sizeof(key), "item:%d:v%d", id, id * 7);
            printf("miss id=%d key=%s ns=%lld\n", id, key, now_ns());
            STAP_PROBE2(app, cache__miss, key, id);
        } else {
            printf("skipped id=%d\n", id);
        }
    }
    printf("done id=%d status=%d ns=%lld\n", id, status, now_ns());
    STAP_PROBE2(app, request__done, id, status);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 4;
    const char *gate = getenv("MARKERS_WAIT_FOR");
    while (gate && access(gate, F_OK) != 0) {
        struct timespec pause = {0, 10000000};
        nanosleep(&pause, NULL);
    }
    for (int id = 0; id < n; id++)
        handle(id);
    printf("finished\n");
    return 0;
}
