/* Threads that end inside probed calls, for the reliability tests: the kernel must forget their call
 * stacks, and nothing must pair a later call with them.
 *
 *   lifecycle block THREADS        main and THREADS threads each make one complete call of outer(), then
 *                                  enter outer() -> inner() and stay there until the process is killed
 *   lifecycle abort THREADS        the same, but once everyone is inside, main's inner() waits for a line
 *                                  (or end of file) on stdin and then calls abort()
 *   lifecycle thread-exit THREADS  THREADS threads enter outer() -> inner(), which calls pthread_exit();
 *                                  main joins them, prints `exited` and waits for a line on stdin; then,
 *                                  one at a time, a new thread per dead one, given the dead one's tid when
 *                                  the kernel allows (root: /proc/sys/kernel/ns_last_pid; up to 20 tries,
 *                                  each try's thread counts), makes two complete calls of outer(); then
 *                                  `done calls=N`, and it exits 0 at end of file on stdin
 *
 * stdout is nested's ground truth (pid, one `call` line per call that returned, `done calls=N` in
 * thread-exit mode; see groundtruth.c), plus
 *   inside tid=T          thread T is inside inner() and will not return from it
 *   ready                 every thread of block/abort mode is inside inner()
 *   exited                every thread of thread-exit mode has ended inside inner()
 *   reused tid=T ok=0|1   a new thread took the place of dead thread T; ok=1: it got tid T
 *
 * Every mode ends itself after 120 s (alarm) so that no test can leave it behind. */
#define _GNU_SOURCE
#include "groundtruth.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

enum action { RETURN, HOLD, LEAVE, CRASH };

static int expected_inside;
static int inside;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t all_inside = PTHREAD_COND_INITIALIZER;

static void wait_for_stdin_line(void)
{
    char c;
    while (read(STDIN_FILENO, &c, 1) == 1 && c != '\n')
        ;
}

static void announce_inside(void)
{
    pthread_mutex_lock(&lock);
    printf("inside tid=%d\n", gettid());
    if (++inside == expected_inside)
        printf("ready\n");
    pthread_cond_broadcast(&all_inside);
    pthread_mutex_unlock(&lock);
}

static void wait_all_inside(int count)
{
    pthread_mutex_lock(&lock);
    while (inside < count)
        pthread_cond_wait(&all_inside, &lock);
    pthread_mutex_unlock(&lock);
}

TRACED void inner(enum action action)
{
    struct gt_call call = gt_enter();
    switch (action) {
    case HOLD:
        announce_inside();
        for (;;)
            pause();
    case LEAVE:
        announce_inside();
        pthread_exit(NULL);
    case CRASH:
        announce_inside();
        wait_for_stdin_line();
        abort();
    case RETURN:
        break;
    }
    gt_exit("inner", &call);
}

TRACED void outer(enum action action)
{
    struct gt_call call = gt_enter();
    inner(action);
    gt_exit("outer", &call);
}

static void *holder(void *arg)
{
    (void)arg;
    outer(RETURN);
    outer(HOLD);
    return NULL;
}

static pid_t *dead_tids;

static void *leaver(void *arg)
{
    dead_tids[(long)arg] = gettid();
    outer(LEAVE);
    return NULL;
}

struct reuse {
    pid_t wanted;
    int ok;
};

static void *reuser(void *arg)
{
    struct reuse *reuse = arg;
    reuse->ok = gettid() == reuse->wanted;
    outer(RETURN);
    outer(RETURN);
    return NULL;
}

/* The last pid the kernel handed out, or 0 when it cannot be read. */
static pid_t last_pid(void)
{
    char text[32] = "";
    int fd = open("/proc/sys/kernel/ns_last_pid", O_RDONLY);
    if (fd < 0)
        return 0;
    if (read(fd, text, sizeof text - 1) < 0)
        text[0] = 0;
    close(fd);
    return (pid_t)atoi(text);
}

/* Makes `pid` the next pid the kernel hands out, if it is free (root only). */
static void set_next_pid(pid_t pid)
{
    int fd = open("/proc/sys/kernel/ns_last_pid", O_WRONLY);
    if (fd < 0)
        return;
    char text[32];
    int len = snprintf(text, sizeof text, "%d", pid - 1);
    if (write(fd, text, len) != len)
        perror("ns_last_pid");
    close(fd);
}

static void create(pthread_t *thread, void *(*fn)(void *), void *arg)
{
    int err = pthread_create(thread, NULL, fn, arg);
    if (err) {
        fprintf(stderr, "pthread_create: %s\n", strerror(err));
        exit(1);
    }
}

static int thread_exit_mode(int threads)
{
    pthread_t *ids = calloc(threads, sizeof *ids);
    dead_tids = calloc(threads, sizeof *dead_tids);
    if (!ids || !dead_tids)
        return 1;
    expected_inside = -1; /* no `ready` line: `exited` says it once they are gone */
    for (long t = 0; t < threads; t++)
        create(&ids[t], leaver, (void *)t);
    for (int t = 0; t < threads; t++)
        pthread_join(ids[t], NULL);
    printf("exited\n");
    wait_for_stdin_line();
    /* One thread at a time, so each attempt can take its dead predecessor's tid; a failed attempt
     * (another process took the tid first) still makes its calls, which count like any other. Afterwards
     * the kernel goes on from where it was, so that other processes do not get recently used pids. */
    pid_t last = last_pid();
    for (int t = 0; t < threads; t++) {
        struct reuse reuse = { dead_tids[t], 0 };
        for (int attempt = 0; attempt < 20 && !reuse.ok; attempt++) {
            set_next_pid(dead_tids[t]);
            create(&ids[t], reuser, &reuse);
            pthread_join(ids[t], NULL);
        }
        printf("reused tid=%d ok=%d\n", reuse.wanted, reuse.ok);
    }
    pid_t now = last_pid();
    if (last)
        set_next_pid((now > last ? now : last) + 1);
    printf("done calls=%ld\n", gt_total_calls());
    fflush(stdout);
    char c;
    while (read(STDIN_FILENO, &c, 1) > 0)
        ;
    free(ids);
    free(dead_tids);
    return 0;
}

static int holding_mode(int threads, enum action main_action)
{
    pthread_t *ids = calloc(threads, sizeof *ids);
    if (!ids)
        return 1;
    expected_inside = threads + 1;
    outer(RETURN);
    for (int t = 0; t < threads; t++)
        create(&ids[t], holder, NULL);
    wait_all_inside(threads);
    outer(main_action); /* never returns */
    return 1;
}

int main(int argc, char **argv)
{
    int threads = argc == 3 ? atoi(argv[2]) : 0;
    if (argc != 3 || threads < 1 || threads > 64) {
        fprintf(stderr, "usage: %s block|abort|thread-exit THREADS(1-64)\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct rlimit no_core = { 0, 0 };
    setrlimit(RLIMIT_CORE, &no_core); /* abort mode: a crash, not a core file */
    alarm(120);
    printf("pid %d\n", getpid());
    if (!strcmp(argv[1], "block"))
        return holding_mode(threads, HOLD);
    if (!strcmp(argv[1], "abort"))
        return holding_mode(threads, CRASH);
    if (!strcmp(argv[1], "thread-exit"))
        return thread_exit_mode(threads);
    fprintf(stderr, "%s: unknown mode %s\n", argv[0], argv[1]);
    return 2;
}
