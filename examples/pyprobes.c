/* An interpreter-shaped program with CPython's USDT probe ABI: python:function__entry and function__return,
 * each passing (file name, function name, first line), around the "functions" it runs. Debian's python3.11 has
 * these probes, but fires function__entry for almost no call (CPython gh-98894); this program fires both, so
 * the py: tests can check spans, names, nesting, recursion and the kernel's filter against its own record.
 *
 *   pyprobes
 *
 * It runs main (app.py) -> handle x3 -> lookup, fact(3) -> fact(2) -> fact(1), plus tick (lib/util.py) 50 times
 * from main, and in each handle a return without its entry (`orphan`, as python3.11 does for most calls).
 * stdout, one line per function that had both probes:
 *   call file=F name=N line=L depth=D start=NS end=NS     (CLOCK_MONOTONIC, read inside the probes' span)
 * then `orphans=3 ticks=50`. */
#include <sys/sdt.h>

#include <stdio.h>
#include <string.h>
#include <time.h>

static int depth;

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A BPF program cannot fault a page in: names in a page of .rodata the program has not touched yet would be
 * unreadable to the probe. CPython's names are in heap objects it has just used; touch these the same way. */
static volatile size_t touched;

__attribute__((noinline)) static void entry_probe(const char *file, const char *name, int line)
{
    touched += strlen(file) + strlen(name);
    STAP_PROBE3(python, function__entry, file, name, line);
}

__attribute__((noinline)) static void return_probe(const char *file, const char *name, int line)
{
    touched += strlen(file) + strlen(name);
    STAP_PROBE3(python, function__return, file, name, line);
}

typedef void (*body_fn)(int);

/* Runs body(arg) as the function `name` of `file`, between the two probes, and records it. */
static void run(const char *file, const char *name, int line, body_fn body, int arg, int record)
{
    entry_probe(file, name, line);
    long long start = now_ns();
    depth++;
    if (body)
        body(arg);
    depth--;
    long long end = now_ns();
    return_probe(file, name, line);
    if (record)
        printf("call file=%s name=%s line=%d depth=%d start=%lld end=%lld\n", file, name, line, depth, start, end);
}

static void fact(int n)
{
    if (n > 1)
        run("app.py", "fact", 20, fact, n - 1, 1);
}

static void lookup(int n)
{
    struct timespec pause = {0, 100000 * (n + 1)};
    nanosleep(&pause, NULL);
}

static void handle(int n)
{
    run("app.py", "lookup", 12, lookup, n, 1);
    return_probe("app.py", "orphan", 30); /* a call whose entry was not reported */
    if (n == 2)
        run("app.py", "fact", 20, fact, 3, 1);
}

static void program(int unused)
{
    (void)unused;
    for (int i = 0; i < 3; i++)
        run("app.py", "handle", 8, handle, i, 1);
    for (int i = 0; i < 50; i++)
        run("/usr/lib/util.py", "tick", 3, NULL, 0, 1);
}

int main(void)
{
    run("app.py", "main", 1, program, 0, 1);
    printf("orphans=3 ticks=50\n");
    return 0;
}
