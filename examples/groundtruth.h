/* Ground truth for the end-to-end tests: every traced function reports its own
 * call on stdout, so spans produced by a tracer can be checked against it. */
#ifndef GROUNDTRUTH_H
#define GROUNDTRUTH_H

/* For functions meant to be probed: a uprobe needs the function to exist as
 * its own symbol, so it must be neither inlined nor cloned (fib.constprop...). */
#define TRACED __attribute__((noinline, noclone))

struct gt_call {
    int seq;                 /* per-thread call number, 1-based */
    int parent;              /* seq of the enclosing traced call, 0 at top level */
    long long start_ns;      /* CLOCK_REALTIME at entry */
};

/* First thing a traced function does. */
struct gt_call gt_enter(void);
/* Last thing before it returns: prints the `call ...` line. */
void gt_exit(const char *fn, const struct gt_call *call);
/* Number of `call` lines printed so far, all threads. */
long gt_total_calls(void);

#endif
