/* The one compilation unit BCC builds: every map and program of otel-ebpf, whatever the number of probed
 * functions (probes are told apart by their attach cookies, so nothing here depends on them).
 *
 * Tunables (-D): MAX_DEPTH, MAX_THREADS, MAX_PROCESSES, MAX_IDENTITIES, SPAN_RING_PAGES, NOTICE_RING_PAGES,
 * SPAN_WAKE_EVERY (every so many ids of a call stack, a span wakes user space), PIDNS_DEV and PIDNS_INO (see
 * visible_ids), SAMPLE_ALL or SAMPLE_THRESHOLD (a root is sampled when the lower 64 bits of its trace id,
 * read big-endian, are below it: the OpenTelemetry TraceIdRatioBased rule), PARENT_BASED, MIN_DURATION_NS,
 * FOLLOW_ONLY (trace only processes user space registered and their descendants, rather than every process
 * that runs a probed binary), and HTTP_TRACING (http.bpf.c: probed calls become children of the HTTP
 * request they serve).
 *
 * Every tracepoint is declared here, in the unit itself: BCC generates the structs of their arguments (from
 * the running kernel's tracefs formats) only for the file it is given. */
#include <uapi/linux/ptrace.h>
#include "maps.h"
#include "bits.h"
#ifdef HTTP_TRACING
#include "http_maps.h"
#endif
#include "common.bpf.h"
#include "uprobe.bpf.c"
#ifdef HTTP_TRACING
#include "http.bpf.c"
#endif
#include "process.bpf.c"

TRACEPOINT_PROBE(syscalls, sys_enter_execve) { capture_exec(args->filename, args->argv, args->envp); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { capture_exec(args->filename, args->argv, args->envp); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_execve) { exec_failed(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { exec_failed(args->ret); return 0; }
TRACEPOINT_PROBE(sched, sched_process_exec) { on_exec(args->old_pid); return 0; }
TRACEPOINT_PROBE(task, task_newtask) { on_new_task(args->pid, args->clone_flags); return 0; }
TRACEPOINT_PROBE(sched, sched_process_exit) { on_task_exit(); return 0; }

#ifdef HTTP_TRACING
TRACEPOINT_PROBE(syscalls, sys_enter_read) { remember_read(args->fd, args->buf); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { on_read(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { remember_read(args->fd, args->ubuf); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { on_read(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { remember_write(args->fd, args->buf); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { on_write(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { remember_write(args->fd, args->buff); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { on_write(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_close) { on_close(args->fd); return 0; }
#endif
