/* Benchmark target: `loop N [THREADS]` calls tick() N times in a tight loop, in each of THREADS threads
 * (default 1), and prints the total number of calls and the mean cost of one, so traced and untraced runs can
 * be compared.
 *
 *   loop N [THREADS]   ->   loop calls=N*THREADS ns_per_call=F
 *
 * env LOOP_WAIT: wait for a line on stdin before the loop, so a tracer can attach to the running process. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* volatile: every call must really happen, however cheap. */
volatile unsigned long tick_total;

__attribute__((noinline, noclone)) void tick(unsigned long i)
{
    tick_total += i;
}

static double monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static unsigned long long per_thread;

/* Each thread's own time per call, as the mean of all threads is what `ns_per_call` reports. */
static void *run(void *result)
{
    double start = monotonic_ns();
    for (unsigned long long i = 0; i < per_thread; i++)
        tick(i);
    *(double *)result = per_thread ? (monotonic_ns() - start) / per_thread : 0.0;
    return NULL;
}

static unsigned long long parse(const char *text)
{
    char *end = NULL;
    errno = 0;
    unsigned long long n = strtoull(text, &end, 10);
    return errno || end == text || *end || text[0] == '-' ? 0 : n;
}

int main(int argc, char **argv)
{
    per_thread = argc >= 2 && argc <= 3 ? parse(argv[1]) : 0;
    unsigned long long threads = argc == 3 ? parse(argv[2]) : 1;
    if (argc < 2 || argc > 3 || (!per_thread && argv[1][0] != '0') || threads < 1 || threads > 64) {
        fprintf(stderr, "usage: %s N [THREADS]\n", argv[0]);
        return 2;
    }
    if (getenv("LOOP_WAIT")) {
        char c;
        while (read(0, &c, 1) == 1 && c != '\n')
            ;
    }

    pthread_t ids[64];
    double ns[64], total = 0;
    for (unsigned long long t = 0; t < threads; t++)
        pthread_create(&ids[t], NULL, run, &ns[t]);
    for (unsigned long long t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        total += ns[t];
    }
    printf("loop calls=%llu ns_per_call=%.3f\n", per_thread * threads, total / threads);
    return 0;
}
