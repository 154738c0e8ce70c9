/* Lives in libgreet.so, not in the executable: greet() and the functions of
 * nested must share ONE per-thread seq counter and stack, so the bookkeeping
 * state may exist only once in the process. */
#define _GNU_SOURCE
#include "groundtruth.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define GT_MAX_DEPTH 64

static __thread int gt_seq;
static __thread int gt_stack[GT_MAX_DEPTH];
static __thread int gt_depth;
static long gt_calls;

static long long realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

struct gt_call gt_enter(void)
{
    struct gt_call call;
    if (gt_depth == GT_MAX_DEPTH) {
        fprintf(stderr, "groundtruth: call stack deeper than %d\n", GT_MAX_DEPTH);
        abort();
    }
    call.seq = ++gt_seq;
    call.parent = gt_depth ? gt_stack[gt_depth - 1] : 0;
    gt_stack[gt_depth++] = call.seq;
    call.start_ns = realtime_ns();
    return call;
}

void gt_exit(const char *fn, const struct gt_call *call)
{
    long long end_ns = realtime_ns();
    gt_depth--;
    __atomic_add_fetch(&gt_calls, 1, __ATOMIC_RELAXED);
    /* One fprintf per line: glibc locks the stream per call, so lines of
     * different threads never interleave. */
    fprintf(stdout, "call fn=%s tid=%d seq=%d parent=%d start=%lld end=%lld\n",
            fn, gettid(), call->seq, call->parent, call->start_ns, end_ns);
}

long gt_total_calls(void)
{
    return __atomic_load_n(&gt_calls, __ATOMIC_RELAXED);
}
