/* The program the demo and the end-to-end tests trace: a few threads serving
 * requests through nested calls, one of them into libgreet.so.
 *
 *   nested [THREADS] [REQUESTS_PER_THREAD]     (defaults 3 and 4)
 *
 * env NESTED_START_DELAY_MS: sleep that long after printing the pid, so a
 *     tracer has time to attach before the first call;
 * env NESTED_WAIT_FOR: then wait until this file exists (a gate the caller opens once a tracer is attached);
 * env NESTED_FORK_TRUTH: then fork; the child runs the same requests and writes its ground truth here;
 * env NESTED_EXIT_CODE: exit status to return (default 0);
 * env NESTED_GROUND_TRUTH: write the ground truth to this file instead of stdout
 *     (the demo sends it to /dev/null so only the tracer's console spans show).
 *
 * stdout is the ground truth: `pid N`, one `call ...` line per traced call
 * (see groundtruth.c), then `done calls=N`. */
#define _GNU_SOURCE
#include "greet.h"
#include "groundtruth.h"
#include "work.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

static int requests_per_thread;
/* Results land here so the compiler cannot drop the work. */
static volatile long sink;

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* Turns a request id into the size of the work: fib(3), fib(4) or fib(5). */
TRACED int parse_request(int id)
{
    struct gt_call call = gt_enter();
    int n = 3 + id % 3;
    gt_exit("parse_request", &call);
    return n;
}

TRACED long handle_request(int id)
{
    struct gt_call call = gt_enter();
    char name[32], greeting[64];
    int n = parse_request(id);
    snprintf(name, sizeof name, "user-%d", id);
    long result = greet(name, greeting, sizeof greeting) + compute(n);
    sleep_ms(1);
    gt_exit("handle_request", &call);
    return result;
}

static void *worker(void *arg)
{
    int first_id = (int)(long)arg * requests_per_thread;
    for (int i = 0; i < requests_per_thread; i++)
        sink += handle_request(first_id + i);
    return NULL;
}

/* Parses a non-negative decimal int; returns -1 when s is not one. */
static int parse_count(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > 1000000)
        return -1;
    return (int)v;
}

static long env_long(const char *name, long fallback)
{
    const char *value = getenv(name);
    return value && *value ? strtol(value, NULL, 10) : fallback;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? parse_count(argv[1]) : 3;
    requests_per_thread = argc > 2 ? parse_count(argv[2]) : 4;
    if (argc > 3 || threads < 1 || requests_per_thread < 0) {
        fprintf(stderr, "usage: %s [THREADS>=1] [REQUESTS_PER_THREAD>=0]\n", argv[0]);
        return 2;
    }
    const char *truth = getenv("NESTED_GROUND_TRUTH");
    if (truth && *truth && !freopen(truth, "w", stdout)) {
        perror(truth);
        return 2;
    }
    /* Line buffered even when piped, so each line is written whole. */
    setvbuf(stdout, NULL, _IOLBF, 0);

    printf("pid %d\n", getpid());
    sleep_ms(env_long("NESTED_START_DELAY_MS", 0));
    const char *gate = getenv("NESTED_WAIT_FOR");
    while (gate && *gate && access(gate, F_OK) != 0)
        sleep_ms(10);
    const char *child_truth = getenv("NESTED_FORK_TRUTH");
    if (child_truth && *child_truth) {
        fflush(stdout);
        pid_t child = fork();
        if (child < 0) {
            perror("fork");
            return 1;
        }
        if (child == 0) {
            if (!freopen(child_truth, "w", stdout)) {
                perror(child_truth);
                return 2;
            }
            setvbuf(stdout, NULL, _IOLBF, 0);
            printf("pid %d\n", getpid());
        }
    }

    pthread_t *tids = calloc(threads, sizeof *tids);
    if (!tids) {
        perror("calloc");
        return 1;
    }
    for (long t = 0; t < threads; t++) {
        int err = pthread_create(&tids[t], NULL, worker, (void *)t);
        if (err) {
            fprintf(stderr, "pthread_create: %s\n", strerror(err));
            return 1;
        }
    }
    for (int t = 0; t < threads; t++)
        pthread_join(tids[t], NULL);
    free(tids);

    printf("done calls=%ld\n", gt_total_calls());
    fflush(stdout);
    if (child_truth && *child_truth)
        while (wait(NULL) > 0)
            ;
    return (int)env_long("NESTED_EXIT_CODE", 0);
}
