/* Benchmark target: `loop N` calls tick() N times in a tight loop and prints
 * the mean cost of one call, so traced and untraced runs can be compared.
 *
 *   loop N   ->   loop calls=N ns_per_call=F */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

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

int main(int argc, char **argv)
{
    char *end = NULL;
    errno = 0;
    unsigned long long n = argc == 2 ? strtoull(argv[1], &end, 10) : 0;
    if (argc != 2 || errno || end == argv[1] || *end || argv[1][0] == '-') {
        fprintf(stderr, "usage: %s N\n", argv[0]);
        return 2;
    }

    double start = monotonic_ns();
    for (unsigned long long i = 0; i < n; i++)
        tick(i);
    double elapsed = monotonic_ns() - start;

    printf("loop calls=%llu ns_per_call=%.3f\n", n, n ? elapsed / n : 0.0);
    return 0;
}
